package server

import (
	"net"
	"net/netip"

	"github.com/stund/stund/internal/udpio"
)

// Batched UDP I/O for a grid socket's read loop (internal/udpio): one
// recvmmsg fills up to udpBatch datagrams; Binding replies among them leave
// with one sendmmsg, relayed data toward peers with one sendmmsg per relay
// socket run (relayQueue, UDP GSO where the run allows), and STUN for pion
// goes to pion's ReadFrom one message at a time. Both queues are flushed
// before the next recvmmsg, so nothing waits on more traffic arriving.
const (
	// udpBatch is how many datagrams one recvmmsg may return: at bench
	// load a socket sees tens of datagrams per wakeup.
	udpBatch = udpio.MaxBatch
	// udpBatchBuf is one receive buffer: above pion's inbound MTU
	// (1600), so a datagram pion would drop as truncated still arrives
	// whole enough to be recognised and dropped the same way.
	udpBatchBuf = 2048
)

// udpBatcher holds one read loop's batch state; only that loop's
// goroutine touches it.
type udpBatcher struct {
	conn    *udpio.Conn
	rb      *udpio.Batch // the read batch: its lengths and sources live until the next read
	wb      *udpio.Batch // writes, so that a flush mid-batch keeps rb's
	bufs    [][]byte
	n, next int // bufs[next:n] are read but not yet consumed

	replies   []udpio.Out // queued Binding replies, in replyBufs
	replyBufs [][]byte
	toPeers   relayQueue // relayed data toward peers
	sendError func()
}

func newUDPBatcher(c net.PacketConn, ring bool, sendError func()) *udpBatcher {
	conn := udpio.NewConn(c)
	if conn == nil {
		return nil // vnet in tests, fakes in fuzzing: one datagram per read
	}
	b := &udpBatcher{conn: conn, rb: udpio.NewBatch(), wb: udpio.NewBatch(), sendError: sendError,
		bufs: make([][]byte, udpBatch), replyBufs: make([][]byte, udpBatch), replies: make([]udpio.Out, 0, udpBatch)}
	for i := range b.bufs {
		b.bufs[i] = make([]byte, udpBatchBuf)
		b.replyBufs[i] = make([]byte, 0, 1500)
	}
	b.toPeers.wb = b.wb
	if ring {
		if r, err := udpio.NewRing(); err == nil {
			b.toPeers.ring = r // closed when the read loop ends (close)
		}
	}
	return b
}

// read returns the next datagram of the batch, reading a new batch (after
// sending what is queued) when this one is used up. pkt stays valid until
// the next read; a datagram longer than its buffer comes back truncated,
// with trunc set.
func (b *udpBatcher) read() (pkt []byte, src netip.AddrPort, trunc bool, err error) {
	if b.next >= b.n {
		b.flush()
		b.next = 0
		b.n, err = b.rb.Read(b.conn, b.bufs)
		if err != nil {
			b.n = 0
			return nil, netip.AddrPort{}, false, err
		}
	}
	i := b.next
	b.next++
	return b.bufs[i][:b.rb.Len(i)], b.rb.Addr(i), b.rb.Truncated(i), nil
}

// close releases the ring once the socket is closed.
func (b *udpBatcher) close() {
	if b.toPeers.ring != nil {
		_ = b.toPeers.ring.Close()
		b.toPeers.ring = nil
	}
}

// replyBuf returns the buffer for the next queued reply (length 0).
func (b *udpBatcher) replyBuf() []byte {
	if len(b.replies) == udpBatch {
		b.flushReplies() // never at udpBatch replies per batch; stay safe
	}
	return b.replyBufs[len(b.replies)][:0]
}

// queue sends msg (built in replyBuf's buffer, or grown from it) to addr
// with the next sendmmsg.
func (b *udpBatcher) queue(msg []byte, to netip.AddrPort) {
	if cap(msg) > cap(b.replyBufs[len(b.replies)]) {
		b.replyBufs[len(b.replies)] = msg[:0]
	}
	b.replies = append(b.replies, udpio.Out{B: msg, To: to})
}

// flush sends what the batch queued: relayed data, then replies.
func (b *udpBatcher) flush() {
	b.toPeers.flush()
	b.flushReplies()
}

// flushReplies sends the queued replies; a datagram the kernel refuses is
// counted and skipped, the rest still go.
func (b *udpBatcher) flushReplies() {
	if len(b.replies) == 0 {
		return
	}
	if sent, _ := b.wb.Write(b.conn, b.replies); sent < len(b.replies) {
		for i := sent; i < len(b.replies); i++ {
			b.sendError()
		}
	}
	clear(b.replies)
	b.replies = b.replies[:0]
}
