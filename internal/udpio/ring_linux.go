package udpio

import (
	"errors"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Ring sends datagrams from many sockets with one system call (io_uring):
// sendmmsg batches only what leaves one socket, and a relay with many
// allocations sends each datagram from its own relay socket, so without
// the ring every datagram toward a peer costs a system call of its own.
// A Ring is one goroutine's; kernels or sandboxes without io_uring (seccomp
// profiles often refuse it) get no Ring and the caller keeps sendmmsg.
type Ring struct {
	fd             int
	ring, sqeMem   []byte
	sqHead, sqTail *uint32
	sqMask         *uint32
	sqArray        unsafe.Pointer
	cqHead, cqTail *uint32
	cqMask         *uint32
	cqes           unsafe.Pointer
	entries        uint32
	b              *Batch // msghdrs, addresses and iovecs of the queued sends
	items          []RingOut
	fds            [MaxBatch]int32
	ctl            [MaxBatch]func(fd uintptr)
	errno          syscall.Errno
	res            [MaxBatch]int32
	broken         bool // abandon: never used again
	closed         bool
}

// RingOut is one datagram for a Ring: its socket, bytes and destination.
type RingOut struct {
	C   *Conn
	Out Out
}

// Linux's io_uring ABI (include/uapi/linux/io_uring.h).
const (
	ioringOffSQRing    = 0
	ioringOffCQRing    = 0x8000000
	ioringOffSQEs      = 0x10000000
	ioringFeatSingleMM = 1 << 0
	ioringEnterGetEv   = 1 << 0
	ioringOpSendmsg    = 9
	sqeSize            = 64
	cqeSize            = 16
)

type sqringOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

type cqringOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

type uringParams struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFd uint32
	resv                                                                   [3]uint32
	sqOff                                                                  sqringOffsets
	cqOff                                                                  cqringOffsets
}

type sqe struct {
	opcode, flags uint8
	ioprio        uint16
	fd            int32
	off, addr     uint64
	len, msgFlags uint32
	userData      uint64
	_             [24]byte
}

type cqe struct {
	userData uint64
	res      int32
	flags    uint32
}

// NewRing sets up a ring for MaxBatch sends at a time.
func NewRing() (*Ring, error) {
	var p uringParams
	fd, _, e := unix.Syscall(unix.SYS_IO_URING_SETUP, MaxBatch, uintptr(unsafe.Pointer(&p)), 0)
	if e != 0 {
		return nil, e
	}
	r := &Ring{fd: int(fd), entries: p.sqEntries, b: NewBatch()}
	if p.features&ioringFeatSingleMM == 0 {
		unix.Close(r.fd)
		return nil, errors.New("udpio: io_uring without a single ring mapping (kernel before 5.4)")
	}
	size := max(p.sqOff.array+p.sqEntries*4, p.cqOff.cqes+p.cqEntries*cqeSize)
	ring, err := unix.Mmap(r.fd, ioringOffSQRing, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		unix.Close(r.fd)
		return nil, err
	}
	sqes, err := unix.Mmap(r.fd, ioringOffSQEs, int(p.sqEntries*sqeSize), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		unix.Munmap(ring)
		unix.Close(r.fd)
		return nil, err
	}
	base := unsafe.Pointer(&ring[0])
	u32 := func(off uint32) *uint32 { return (*uint32)(unsafe.Add(base, off)) }
	r.ring, r.sqeMem = ring, sqes
	r.sqHead, r.sqTail, r.sqMask, r.sqArray = u32(p.sqOff.head), u32(p.sqOff.tail), u32(p.sqOff.ringMask), unsafe.Add(base, p.sqOff.array)
	r.cqHead, r.cqTail, r.cqMask, r.cqes = u32(p.cqOff.head), u32(p.cqOff.tail), u32(p.cqOff.ringMask), unsafe.Add(base, p.cqOff.cqes)
	for i := range r.ctl {
		i := i
		// Each send's socket stays open (its descriptor referenced)
		// from before the submission until its completion: the sends
		// are submitted inside the nest of every socket's Control.
		r.ctl[i] = func(fd uintptr) {
			r.fds[i] = int32(fd)
			r.nest(i + 1)
		}
	}
	return r, nil
}

// Close releases the ring (a broken one stays: the kernel may hold it).
func (r *Ring) Close() error {
	if r.broken || r.closed {
		return nil
	}
	r.closed = true
	unix.Munmap(r.sqeMem)
	unix.Munmap(r.ring)
	return unix.Close(r.fd)
}

// Write sends outs (at most MaxBatch) with one io_uring_enter, each from
// its own socket, and returns for each whether it left (res[i] >= 0 bytes
// sent, < 0 an errno). A socket closed meanwhile fails only its own sends.
func (r *Ring) Write(outs []RingOut) ([]int32, error) {
	n := min(len(outs), MaxBatch)
	if r.broken || r.closed {
		for i := 0; i < n; i++ {
			r.res[i] = -int32(unix.EBADF)
		}
		return r.res[:n], ErrRingBroken
	}
	r.items = outs[:n]
	for i := 0; i < n; i++ {
		r.res[i] = -int32(unix.EBADF)
	}
	r.errno = 0
	r.nest(0)
	if r.broken {
		return r.res[:n], ErrRingBroken
	}
	if r.errno != 0 {
		return r.res[:n], r.errno
	}
	return r.res[:n], nil
}

// nest takes socket i's descriptor (Control holds it open), then the next;
// inside the last, it submits and waits.
func (r *Ring) nest(i int) {
	if i < len(r.items) {
		if err := r.items[i].C.rc.Control(r.ctl[i]); err != nil {
			// closed: its send fails alone; the others still go
			r.fds[i] = -1
			r.nest(i + 1)
		}
		return
	}
	r.submit()
}

func (r *Ring) submit() {
	tail := atomic.LoadUint32(r.sqTail)
	mask := *r.sqMask
	k := 0
	for i, it := range r.items {
		if r.fds[i] < 0 {
			continue
		}
		namelen, ok := r.b.setName(i, it.C, it.Out.To)
		if !ok {
			r.res[i] = -int32(unix.EAFNOSUPPORT)
			continue
		}
		h := &r.b.hdrs[i].Hdr
		*h = unix.Msghdr{Name: (*byte)(unsafe.Pointer(&r.b.names[i])), Namelen: namelen, Iov: &r.b.iovs[i]}
		r.b.iovs[i].Base = unsafe.SliceData(it.Out.B)
		r.b.iovs[i].SetLen(len(it.Out.B))
		h.SetIovlen(1)
		idx := (tail + uint32(k)) & mask
		s := (*sqe)(unsafe.Add(unsafe.Pointer(&r.sqeMem[0]), uintptr(idx)*sqeSize))
		*s = sqe{opcode: ioringOpSendmsg, fd: r.fds[i], addr: uint64(uintptr(unsafe.Pointer(h))), len: 1, msgFlags: unix.MSG_DONTWAIT, userData: uint64(i)}
		*(*uint32)(unsafe.Add(r.sqArray, uintptr(idx)*4)) = idx
		k++
	}
	if k == 0 {
		return
	}
	end := tail + uint32(k)
	atomic.StoreUint32(r.sqTail, end)
	stalls := 0
	for got := 0; got < k; {
		// what the kernel has not consumed yet is submitted again
		pending := end - atomic.LoadUint32(r.sqHead)
		_, _, e := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(pending), uintptr(k-got), ioringEnterGetEv, 0, 0)
		n := r.reap()
		got += n
		transient := e == 0 || e == unix.EINTR || e == unix.EAGAIN || e == unix.EBUSY
		if n > 0 {
			stalls = 0
		} else if stalls++; transient && stalls < maxRingStalls {
			runtime.Gosched()
			continue
		}
		if !transient || stalls >= maxRingStalls {
			r.abandon(e)
			return
		}
	}
}

// maxRingStalls bounds the io_uring_enter calls in a row that complete
// nothing (a kernel short of memory answers EAGAIN): a send never waits on
// the ring for long.
const maxRingStalls = 64

// brokenRings keep rings given up on reachable: the kernel may still read
// a send it consumed but never completed, so their memory must not be
// freed or reused.
var brokenRings struct {
	sync.Mutex
	rs []*Ring
}

// abandon takes back the sends the kernel has not consumed and retires
// the ring: Write fails with ErrRingBroken from now on, and the caller
// sends by sendmmsg.
func (r *Ring) abandon(e syscall.Errno) {
	atomic.StoreUint32(r.sqTail, atomic.LoadUint32(r.sqHead))
	r.broken = true
	r.errno = e
	if e == 0 {
		r.errno = unix.ETIMEDOUT
	}
	brokenRings.Lock()
	brokenRings.rs = append(brokenRings.rs, r)
	brokenRings.Unlock()
}

// ErrRingBroken: the ring was given up on (see abandon) or closed.
var ErrRingBroken = errors.New("udpio: io_uring ring retired after the kernel stopped completing sends")

// reap reads the completions there are.
func (r *Ring) reap() int {
	head := atomic.LoadUint32(r.cqHead)
	tail := atomic.LoadUint32(r.cqTail)
	mask := *r.cqMask
	n := 0
	for ; head != tail; head++ {
		c := (*cqe)(unsafe.Add(r.cqes, uintptr(head&mask)*cqeSize))
		if c.userData < MaxBatch {
			r.res[c.userData] = c.res
		}
		n++
	}
	atomic.StoreUint32(r.cqHead, head)
	return n
}
