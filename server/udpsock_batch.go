package server

import (
	"net"

	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
)

// Batched UDP I/O for a grid socket's read loop: one recvmmsg fills up to
// udpBatch datagrams, Binding requests among them are answered with one
// sendmmsg, and the rest are handed to pion's ReadFrom one at a time
// (pion's read loop takes one datagram per call). On loopback with many
// requests in flight this halves the syscalls per Binding request
// (bench/README.md has the before/after).
const (
	// udpBatch is how many datagrams one recvmmsg may return: at
	// bench load a socket sees tens of datagrams per wakeup; 32 x 2 KiB
	// of buffers per socket stays in cache.
	udpBatch = 32
	// udpBatchBuf is one receive buffer: above pion's inbound MTU
	// (1600), so a datagram pion would drop as truncated still arrives
	// whole enough to be recognised and dropped the same way.
	udpBatchBuf = 2048
)

// batchConn is what ipv4.PacketConn and ipv6.PacketConn share
// (ipv4.Message and ipv6.Message are both socket.Message).
type batchConn interface {
	ReadBatch(ms []ipv4.Message, flags int) (int, error)
	WriteBatch(ms []ipv4.Message, flags int) (int, error)
}

// udpBatcher holds one read loop's batch state; only that loop's
// goroutine touches it.
type udpBatcher struct {
	pc        batchConn
	in        []ipv4.Message
	n, next   int // in[next:n] are read but not yet consumed
	out       []ipv4.Message
	nout      int // out[:nout] are queued replies
	sendError func()
}

func newUDPBatcher(c net.PacketConn, v4 bool, sendError func()) *udpBatcher {
	uc, ok := c.(*net.UDPConn)
	if !ok {
		return nil // vnet in tests, fakes in fuzzing: one datagram per read
	}
	b := &udpBatcher{in: make([]ipv4.Message, udpBatch), out: make([]ipv4.Message, udpBatch), sendError: sendError}
	if v4 {
		b.pc = ipv4.NewPacketConn(uc)
	} else {
		b.pc = ipv6.NewPacketConn(uc)
	}
	for i := range b.in {
		b.in[i].Buffers = [][]byte{make([]byte, udpBatchBuf)}
		b.out[i].Buffers = [][]byte{make([]byte, 0, 1500)}
	}
	return b
}

// read returns the next datagram of the batch, reading a new batch (after
// sending the queued replies) when this one is used up. pkt stays valid
// until the next call.
func (b *udpBatcher) read() (pkt []byte, addr net.Addr, err error) {
	if b.next >= b.n {
		b.flush()
		b.next = 0
		b.n, err = b.pc.ReadBatch(b.in, 0)
		if err != nil {
			b.n = 0
			return nil, nil, err
		}
	}
	m := &b.in[b.next]
	b.next++
	return m.Buffers[0][:m.N], m.Addr, nil
}

// replyBuf returns the buffer for the next queued reply (length 0).
func (b *udpBatcher) replyBuf() []byte {
	if b.nout == len(b.out) {
		b.flush() // never at udpBatch replies per batch; stay safe
	}
	return b.out[b.nout].Buffers[0][:0]
}

// queue sends msg (built in replyBuf's buffer, or grown from it) to addr
// with the next sendmmsg.
func (b *udpBatcher) queue(msg []byte, addr net.Addr) {
	m := &b.out[b.nout]
	m.Buffers[0] = msg
	m.Addr = addr
	b.nout++
}

// flush sends the queued replies; a datagram the kernel refuses is
// counted and skipped, the rest still go.
func (b *udpBatcher) flush() {
	for sent := 0; sent < b.nout; {
		k, err := b.pc.WriteBatch(b.out[sent:b.nout], 0)
		if err != nil || k <= 0 {
			b.sendError()
			k = 1
		}
		sent += k
	}
	for i := 0; i < b.nout; i++ {
		b.out[i].Addr = nil // do not pin the client's address
	}
	b.nout = 0
}
