package udpio

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Conn is a UDP socket opened for batched I/O.
type Conn struct {
	rc syscall.RawConn
	v6 bool // AF_INET6 socket: IPv4 destinations go v4-mapped
}

// NewConn prepares c for batched I/O; nil when c is not a kernel UDP
// socket (tests with virtual networks), and the caller keeps its
// one-datagram path.
func NewConn(c net.PacketConn) *Conn {
	uc, ok := c.(*net.UDPConn)
	if !ok {
		return nil
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return nil
	}
	v6 := false
	var serr error
	if err := rc.Control(func(fd uintptr) {
		var sa unix.Sockaddr
		sa, serr = unix.Getsockname(int(fd))
		_, v6 = sa.(*unix.SockaddrInet6)
	}); err != nil || serr != nil {
		return nil
	}
	return &Conn{rc: rc, v6: v6}
}

// Batch is one goroutine's scratch for recvmmsg and sendmmsg: headers,
// addresses, I/O vectors and GSO control messages for up to MaxBatch
// messages, allocated once.
type Batch struct {
	hdrs  [MaxBatch]unix.Mmsghdr
	names [MaxBatch]unix.RawSockaddrInet6
	iovs  [2 * MaxBatch]unix.Iovec
	ctrl  [MaxBatch][cmsgSpace]byte

	// the current call, for the RawConn callbacks (made once: a closure
	// per call would allocate)
	n, sent   int
	single    bool // one datagram per message (a GSO run the kernel refused)
	errno     syscall.Errno
	readFn    func(fd uintptr) bool
	readNowFn func(fd uintptr)
	writeFn   func(fd uintptr) bool

	// Bufs and Outs travel with a pooled batch (NewBatchWith): the
	// buffers a Reader fills, and the caller's scratch for what it sends
	// on from them.
	Bufs [][]byte
	Outs []Out
}

// cmsgSpace holds one UDP_SEGMENT control message (a uint16).
const cmsgSpace = 24 // unix.CmsgSpace(2) on 64-bit; checked in init

func init() {
	if unix.CmsgSpace(2) > cmsgSpace {
		panic("udpio: cmsgSpace too small for this platform")
	}
}

// NewBatch returns scratch for one goroutine.
func NewBatch() *Batch {
	b := &Batch{}
	b.readFn = b.recvmmsg
	b.readNowFn = b.readNow
	b.writeFn = b.sendmmsg
	return b
}

// Read waits for datagrams on c and reads as many as are queued (at most
// len(bufs), at most MaxBatch) into bufs; Len and Addr describe datagram i.
// A datagram longer than its buffer is truncated; Truncated says so.
func (b *Batch) Read(c *Conn, bufs [][]byte) (int, error) {
	b.prepareRead(bufs, 0, -1)
	if err := c.rc.Read(b.readFn); err != nil {
		return 0, err
	}
	if b.errno != 0 {
		return 0, b.errno
	}
	return b.n, nil
}

// prepareRead points the headers at bufs[i][head:head+size] (size < 0:
// to the end of each buffer).
func (b *Batch) prepareRead(bufs [][]byte, head, size int) {
	n := min(len(bufs), MaxBatch)
	for i := 0; i < n; i++ {
		h := &b.hdrs[i]
		p := bufs[i][head:]
		if size >= 0 {
			p = p[:size]
		}
		b.iovs[i].Base = unsafe.SliceData(p)
		b.iovs[i].SetLen(len(p))
		h.Hdr = unix.Msghdr{Name: (*byte)(unsafe.Pointer(&b.names[i])), Namelen: unix.SizeofSockaddrInet6, Iov: &b.iovs[i]}
		h.Hdr.SetIovlen(1)
		h.Len = 0
	}
	b.n, b.errno = n, 0
}

// Reader reads one socket in batches into a Batch it borrows from a pool
// only while datagrams are queued: a socket that waits holds no buffer, so
// ten thousand quiet relay sockets cost no buffer memory, and the busy ones
// share what the pool holds.
type Reader struct {
	c          *Conn
	pool       *sync.Pool // of *Batch made by NewBatchWith
	head, size int
	cur        *Batch
	fn         func(fd uintptr) bool
}

// NewReader reads c into pooled batches, datagram i into
// Bufs[i][head:head+size] (room before it for a header the caller adds).
func NewReader(c *Conn, pool *sync.Pool, head, size int) *Reader {
	r := &Reader{c: c, pool: pool, head: head, size: size}
	r.fn = r.recv
	return r
}

// Read waits for datagrams and returns a batch holding the n read; the
// caller gives it back with Release when done with its buffers.
func (r *Reader) Read() (*Batch, int, error) {
	if err := r.c.rc.Read(r.fn); err != nil {
		if r.cur != nil {
			r.pool.Put(r.cur)
			r.cur = nil
		}
		return nil, 0, err
	}
	b := r.cur
	r.cur = nil
	if b.errno != 0 {
		err := b.errno
		r.pool.Put(b)
		return nil, 0, err
	}
	return b, b.n, nil
}

// Release gives a batch from Read back to the pool.
func (r *Reader) Release(b *Batch) { r.pool.Put(b) }

func (r *Reader) recv(fd uintptr) bool {
	if r.cur == nil {
		r.cur = r.pool.Get().(*Batch)
		r.cur.prepareRead(r.cur.Bufs, r.head, r.size)
	}
	if !r.cur.recvmmsg(fd) {
		r.pool.Put(r.cur) // nothing queued: hold nothing while waiting
		r.cur = nil
		return false
	}
	return true
}

// NewBatchWith returns a Batch with n buffers of size bytes in Bufs and
// room for n datagrams in Outs, for a Reader's pool.
func NewBatchWith(n, size int) *Batch {
	b := NewBatch()
	b.Bufs = make([][]byte, n)
	for i := range b.Bufs {
		b.Bufs[i] = make([]byte, size)
	}
	b.Outs = make([]Out, 0, n)
	return b
}

// Interrupted calls are made again at once, never turned into a wait: the
// runtime's poller is edge-triggered, and waiting for an edge that already
// came (data queued, room in the buffer) would wait for the next one.

func (b *Batch) recvmmsg(fd uintptr) bool {
	r, _, e := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&b.hdrs[0])), uintptr(b.n), unix.MSG_DONTWAIT, 0, 0)
	for e == unix.EINTR {
		r, _, e = unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&b.hdrs[0])), uintptr(b.n), unix.MSG_DONTWAIT, 0, 0)
	}
	switch {
	case e == unix.EAGAIN:
		return false // the poller waits for the next datagram
	case e != 0:
		b.errno, b.n = e, 0
	default:
		b.n = int(r)
	}
	return true
}

// Len is the length of datagram i of the last Read.
func (b *Batch) Len(i int) int { return int(b.hdrs[i].Len) }

// Truncated reports whether datagram i did not fit its buffer.
func (b *Batch) Truncated(i int) bool { return b.hdrs[i].Hdr.Flags&unix.MSG_TRUNC != 0 }

// Addr is the source of datagram i of the last Read (IPv4 unmapped).
func (b *Batch) Addr(i int) netip.AddrPort {
	sa := &b.names[i]
	switch sa.Family {
	case unix.AF_INET:
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		return netip.AddrPortFrom(netip.AddrFrom4(sa4.Addr), ntohs(sa4.Port))
	case unix.AF_INET6:
		a := netip.AddrFrom16(sa.Addr)
		if a.Is4In6() {
			a = a.Unmap()
		} else if sa.Scope_id != 0 {
			return netip.AddrPortFrom(a.WithZone(zoneName(sa.Scope_id)), ntohs(sa.Port))
		}
		return netip.AddrPortFrom(a, ntohs(sa.Port))
	}
	return netip.AddrPort{}
}

func zoneName(idx uint32) string {
	if ifi, err := net.InterfaceByIndex(int(idx)); err == nil {
		return ifi.Name
	}
	return ""
}

func ntohs(p uint16) uint16 {
	var b [2]byte
	*(*uint16)(unsafe.Pointer(&b[0])) = p
	return binary.BigEndian.Uint16(b[:])
}

func htons(p uint16) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], p)
	return *(*uint16)(unsafe.Pointer(&b[0]))
}

// setName writes to into name i in c's family; false for a destination
// the socket cannot reach (IPv6 on an IPv4 socket).
func (b *Batch) setName(i int, c *Conn, to netip.AddrPort) (uint32, bool) {
	sa := &b.names[i]
	if !c.v6 {
		if !to.Addr().Unmap().Is4() {
			return 0, false
		}
		sa4 := (*unix.RawSockaddrInet4)(unsafe.Pointer(sa))
		*sa4 = unix.RawSockaddrInet4{Family: unix.AF_INET, Port: htons(to.Port()), Addr: to.Addr().Unmap().As4()}
		return unix.SizeofSockaddrInet4, true
	}
	*sa = unix.RawSockaddrInet6{Family: unix.AF_INET6, Port: htons(to.Port()), Addr: to.Addr().As16()}
	if z := to.Addr().Zone(); z != "" {
		if ifi, err := net.InterfaceByName(z); err == nil {
			sa.Scope_id = uint32(ifi.Index)
		}
	}
	return unix.SizeofSockaddrInet6, true
}

// ErrFamily is the error for a destination of the other address family.
var ErrFamily = errors.New("udpio: destination not reachable from this socket's address family")

// Write sends outs on c: equal-sized runs to one destination as one GSO
// message each, the rest one datagram each, all in as few sendmmsg calls as
// MaxBatch allows. It returns how many datagrams the kernel took; a
// datagram it refused is skipped (and its error returned at the end) so
// one bad destination does not hold back the others.
func (b *Batch) Write(c *Conn, outs []Out) (int, error) {
	sent := 0
	var firstErr error
	for len(outs) > 0 {
		nm, _, err := b.pack(c, outs)
		if err != nil { // outs[0] cannot be addressed: skip it
			firstErr = cmpErr(firstErr, err)
			outs = outs[1:]
			continue
		}
		k, err := b.flush(c, nm)
		d := b.datagrams(k) // the datagrams of the k messages sent
		sent += d
		if k < nm {
			// message k was refused: skip its datagrams, or send them one
			// by one when the kernel refused the GSO message itself; the
			// messages after it go with the next pack.
			segs := b.segments(k)
			if segs > 1 && gsoRefused(err) {
				n, e2 := b.writeSingly(c, outs[d:d+segs])
				sent += n
				firstErr = cmpErr(firstErr, e2)
			} else {
				firstErr = cmpErr(firstErr, err)
			}
			d += segs
		}
		outs = outs[d:]
	}
	return sent, firstErr
}

func cmpErr(first, err error) error {
	if first != nil {
		return first
	}
	return err
}

// writeSingly sends a refused GSO run one datagram per message.
func (b *Batch) writeSingly(c *Conn, outs []Out) (int, error) {
	b.single = true
	defer func() { b.single = false }()
	return b.Write(c, outs)
}

// gsoRefused reports whether err means the kernel cannot send this GSO
// message at all: EIO (the device lacks checksum offload; for good, so GSO
// goes off for the process) or EINVAL (the segment exceeds the route's MTU;
// this run only).
func gsoRefused(err error) bool {
	switch err {
	case unix.EIO:
		gsoOff.Store(true)
		return true
	case unix.EINVAL, unix.EMSGSIZE:
		return true
	}
	return false
}

// pack fills the headers from outs: nm messages carrying nd datagrams.
func (b *Batch) pack(c *Conn, outs []Out) (nm, nd int, err error) {
	iov := 0
	for nm < MaxBatch && nd < len(outs) {
		// a prefix of a run is a run (its segments are all equal)
		run := min(runLen(outs[nd:], !b.single), len(b.iovs)-iov)
		if run == 0 {
			break
		}
		namelen, ok := b.setName(nm, c, outs[nd].To)
		if !ok {
			if nm == 0 {
				return 0, 0, ErrFamily
			}
			break
		}
		h := &b.hdrs[nm]
		h.Hdr = unix.Msghdr{Name: (*byte)(unsafe.Pointer(&b.names[nm])), Namelen: namelen, Iov: &b.iovs[iov]}
		for j := 0; j < run; j++ {
			p := outs[nd+j].B
			b.iovs[iov+j].Base = unsafe.SliceData(p)
			b.iovs[iov+j].SetLen(len(p))
		}
		h.Hdr.SetIovlen(run)
		if run > 1 {
			// Linux's UDP GSO (UDP_SEGMENT, linux/udp.h; no RFC): the
			// segment size as a uint16 in a SOL_UDP control message; the
			// kernel cuts the iovecs' bytes into datagrams of that size.
			cm := (*unix.Cmsghdr)(unsafe.Pointer(&b.ctrl[nm][0]))
			cm.Level, cm.Type = unix.SOL_UDP, unix.UDP_SEGMENT
			cm.SetLen(unix.CmsgLen(2))
			*(*uint16)(unsafe.Pointer(&b.ctrl[nm][unix.CmsgLen(0)])) = uint16(len(outs[nd].B))
			h.Hdr.Control = &b.ctrl[nm][0]
			h.Hdr.SetControllen(unix.CmsgSpace(2))
		}
		h.Len = 0
		iov += run
		nd += run
		nm++
	}
	return nm, nd, nil
}

// datagrams counts the datagrams in the first k packed messages.
func (b *Batch) datagrams(k int) int {
	d := 0
	for i := 0; i < k; i++ {
		d += int(b.hdrs[i].Hdr.Iovlen)
	}
	return d
}

// segments is how many datagrams packed message i carries.
func (b *Batch) segments(i int) int { return int(b.hdrs[i].Hdr.Iovlen) }

// flush sends the first nm packed messages; it returns how many the kernel
// took and, when it took fewer, the error of the first one it refused.
func (b *Batch) flush(c *Conn, nm int) (int, error) {
	done := 0
	for done < nm {
		b.n, b.sent, b.errno = nm, done, 0
		if err := c.rc.Write(b.writeFn); err != nil {
			return done, err
		}
		if b.errno != 0 {
			return b.sent, b.errno
		}
		done = b.sent
	}
	return done, nil
}

func (b *Batch) sendmmsg(fd uintptr) bool {
	r, _, e := unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&b.hdrs[b.sent])), uintptr(b.n-b.sent), unix.MSG_DONTWAIT, 0, 0)
	for e == unix.EINTR {
		r, _, e = unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&b.hdrs[b.sent])), uintptr(b.n-b.sent), unix.MSG_DONTWAIT, 0, 0)
	}
	switch {
	case e == unix.EAGAIN:
		return false // socket buffer full: the poller waits for room
	case e != 0:
		b.errno = e
	default:
		b.sent += int(r)
	}
	return true
}

// ReadNow reads what c has queued right now, without waiting, into
// bufs[i][head:head+size] (size < 0: to each buffer's end): 0 when nothing
// is queued. For a Poller's caller, which learnt from the poller that c is
// readable; an error means c is closed or broken.
func (b *Batch) ReadNow(c *Conn, bufs [][]byte, head, size int) (int, error) {
	b.prepareRead(bufs, head, size)
	if err := c.rc.Control(b.readNowFn); err != nil {
		return 0, err
	}
	if b.errno != 0 {
		return 0, b.errno
	}
	return b.n, nil
}

func (b *Batch) readNow(fd uintptr) {
	if !b.recvmmsg(fd) {
		b.n = 0 // EAGAIN: nothing queued after all
	}
}

// Poller waits on many sockets at once (epoll): one goroutine learns
// which of thousands of relay sockets have datagrams and serves them all
// in one pass, where a goroutine per socket would wake, read and write once
// per datagram. Sockets are level-triggered, so one that still holds
// datagrams after a pass shows up in the next. The epoll descriptor itself
// waits in the Go runtime's poller, so a waiting Poller holds no thread.
type Poller struct {
	epfd   int
	f      *os.File
	rc     syscall.RawConn
	events [MaxEvents]unix.EpollEvent
	n      int
	errno  syscall.Errno
	fn     func(fd uintptr) bool
}

// MaxEvents bounds the sockets one Wait returns: a pass over this many
// sockets' datagrams is a few hundred microseconds of work at most.
const MaxEvents = 128

// NewPoller makes an epoll instance registered with the Go runtime.
func NewPoller() (*Poller, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, err
	}
	if err := unix.SetNonblock(epfd, true); err != nil {
		unix.Close(epfd)
		return nil, err
	}
	f := os.NewFile(uintptr(epfd), "epoll")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	p := &Poller{epfd: epfd, f: f, rc: rc}
	p.fn = p.wait
	return p, nil
}

// Add watches c for datagrams; Wait reports it by token.
func (p *Poller) Add(c *Conn, token uint64) error {
	var err error
	cerr := c.rc.Control(func(fd uintptr) {
		ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(uint32(token)), Pad: int32(uint32(token >> 32))}
		err = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, int(fd), &ev)
	})
	if cerr != nil {
		return cerr
	}
	return err
}

// Remove stops watching c; call it before closing c. A Wait already under
// way may still report c's token once.
func (p *Poller) Remove(c *Conn) error {
	var err error
	cerr := c.rc.Control(func(fd uintptr) {
		err = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_DEL, int(fd), nil)
	})
	if cerr != nil {
		return cerr
	}
	return err
}

// Wait blocks until some watched socket is readable and returns how many
// are; Token(i) names each. It fails only once the Poller is closed.
func (p *Poller) Wait() (int, error) {
	p.errno = 0
	if err := p.rc.Read(p.fn); err != nil {
		return 0, err
	}
	if p.errno != 0 {
		return 0, p.errno
	}
	return p.n, nil
}

func (p *Poller) wait(fd uintptr) bool {
	n, err := unix.EpollWait(int(fd), p.events[:], 0)
	for err == unix.EINTR {
		n, err = unix.EpollWait(int(fd), p.events[:], 0)
	}
	switch {
	case err != nil:
		p.errno = err.(syscall.Errno)
		return true
	case n == 0:
		return false // the runtime's poller wakes us at the next datagram
	}
	p.n = n
	return true
}

// Token is the token of ready socket i of the last Wait.
func (p *Poller) Token(i int) uint64 {
	ev := &p.events[i]
	return uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
}

// Close ends the Poller; a Wait under way returns an error.
func (p *Poller) Close() error { return p.f.Close() }
