package server

import (
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"

	"github.com/stund/stund/internal/udpio"
)

// Peer-to-client relaying for allocations whose client is on UDP: a few
// pollers (one per core) each watch many relay sockets with epoll
// (udpio.Poller). One pass reads every ready socket with recvmmsg and sends
// everything bound for clients on one listener socket with one sendmmsg
// (UDP GSO for runs to one client), so with many allocations each carrying
// a little, a datagram costs about one system call (its recvmmsg) instead
// of a read, a write and a goroutine wakeup per datagram.
//
// Allocations whose client is on TCP/TLS keep a goroutine per relay socket
// (relaySocket.ReadFrom): a stream write can block on a client that stopped
// reading, and that must stall its own allocation, never a poller's others.

// relayArena is how many datagrams one pass holds before it flushes
// toward the clients: four full recvmmsg batches, 256 KiB per poller.
const relayArena = 4 * udpio.MaxBatch

// relayPollers are the server's pollers; sockets are spread round robin.
type relayPollers struct {
	ps   []*relayPoller
	next atomic.Uint32
	wg   sync.WaitGroup
}

// relayPoller is one poller and its goroutine's scratch.
type relayPoller struct {
	p     *udpio.Poller
	mu    sync.RWMutex
	socks map[uint64]*relaySocket
	seq   uint64 // the last token given, under mu

	// the poller goroutine's only:
	b      *udpio.Batch
	bufs   [][]byte // relayArena buffers: relayHeadroom, datagram, padding
	used   int      // bufs[:used] hold datagrams not yet flushed
	groups []clientGroup
}

// clientGroup is what one pass sends by one listener socket.
type clientGroup struct {
	io    *udpio.Conn
	outs  []udpio.Out
	socks []*relaySocket // outs[i] came from socks[i], for its counters
}

// newRelayPollers starts one poller per core; nil (and each relay socket
// keeps its own goroutine) where epoll is not available.
func newRelayPollers() *relayPollers {
	rp := &relayPollers{}
	for i := 0; i < runtime.GOMAXPROCS(0); i++ {
		p, err := udpio.NewPoller()
		if err != nil {
			rp.close()
			return nil
		}
		rpl := &relayPoller{p: p, socks: map[uint64]*relaySocket{}, b: udpio.NewBatch(), bufs: make([][]byte, relayArena)}
		for j := range rpl.bufs {
			rpl.bufs[j] = make([]byte, relayHeadroom+relayBufSize+3)
		}
		rp.ps = append(rp.ps, rpl)
		rp.wg.Add(1)
		go func() {
			defer rp.wg.Done()
			rpl.run()
		}()
	}
	return rp
}

// add hands s's reads to a poller; false when it cannot (s is closed).
func (rp *relayPollers) add(s *relaySocket) bool {
	p := rp.ps[int(rp.next.Add(1))%len(rp.ps)]
	p.mu.Lock()
	p.seq++
	tok := p.seq
	p.socks[tok] = s
	p.mu.Unlock()
	if err := p.p.Add(s.io, tok); err != nil {
		p.mu.Lock()
		delete(p.socks, tok)
		p.mu.Unlock()
		return false
	}
	s.poller, s.token = p, tok
	return true
}

// remove stops polling s; before its descriptor closes.
func (p *relayPoller) remove(s *relaySocket) {
	_ = p.p.Remove(s.io)
	p.mu.Lock()
	delete(p.socks, s.token)
	p.mu.Unlock()
}

// close stops the pollers and waits for their goroutines.
func (rp *relayPollers) close() {
	for _, p := range rp.ps {
		_ = p.p.Close()
	}
	rp.wg.Wait()
}

func (p *relayPoller) run() {
	for {
		n, err := p.p.Wait()
		if err != nil {
			return // closed
		}
		for i := 0; i < n; i++ {
			p.mu.RLock()
			s := p.socks[p.p.Token(i)]
			p.mu.RUnlock()
			if s != nil { // nil: removed since the wait returned
				p.serve(s)
			}
		}
		p.flush()
	}
}

// serve reads what s holds (up to one batch: a socket with more shows up
// in the next pass, so one busy peer cannot starve the others) and queues
// it for the client.
func (p *relayPoller) serve(s *relaySocket) {
	if relayArena-p.used < udpio.MaxBatch {
		p.flush()
	}
	bufs := p.bufs[p.used : p.used+udpio.MaxBatch]
	n, err := p.b.ReadNow(s.io, bufs, relayHeadroom, relayBufSize)
	if err != nil || n == 0 {
		return // closed under us (pion ends the allocation), or nothing after all
	}
	a := s.alloc.Load()
	u, _ := a.client.(*udpClient) // set before the socket was polled
	g := p.group(u.io)
	pkts, bytes := 0, 0
	for i := 0; i < n; i++ {
		ap, ln := p.b.Addr(i), p.b.Len(i)
		ch, ok := s.admitIn(a, ap, ln, p.b.Truncated(i))
		if !ok {
			continue
		}
		pkts++
		bytes += ln
		g.outs = append(g.outs, udpio.Out{B: wrapForClient(bufs[i], ln, ap, ch, false), To: u.to})
		g.socks = append(g.socks, s)
	}
	s.countIn(pkts, bytes)
	p.used += n
}

// group is the pass's queue for listener socket io.
func (p *relayPoller) group(io *udpio.Conn) *clientGroup {
	for i := range p.groups {
		if p.groups[i].io == io {
			return &p.groups[i]
		}
	}
	p.groups = append(p.groups, clientGroup{io: io, outs: make([]udpio.Out, 0, relayArena), socks: make([]*relaySocket, 0, relayArena)})
	return &p.groups[len(p.groups)-1]
}

// flush sends what the pass queued, one sendmmsg (or a few) per listener
// socket, and frees the arena.
func (p *relayPoller) flush() {
	for i := range p.groups {
		g := &p.groups[i]
		if len(g.outs) == 0 {
			continue
		}
		sent, _ := p.b.Write(g.io, g.outs)
		for i, s := range g.socks { // exact unless one in the middle was refused
			if i < sent {
				s.toClient.Add(1)
			} else {
				s.toClientErrors.Add(1)
			}
		}
		clear(g.outs)
		clear(g.socks)
		g.outs, g.socks = g.outs[:0], g.socks[:0]
	}
	p.used = 0
}

// admitIn runs the checks on a datagram of n bytes from peer ap, cheapest
// refusal first, and says on which channel it goes to the client (0: a
// Data indication); false when it is dropped.
func (s *relaySocket) admitIn(a *allocation, ap netip.AddrPort, n int, truncated bool) (uint16, bool) {
	var ch uint16
	ok := false
	if a != nil {
		ch, ok = a.peerRoute(ap)
	}
	if !ok { // RFC 8656 §9: no permission, no relay, nothing charged
		s.strangers.Add(1)
		return 0, false
	}
	if truncated || n > relayBufSize {
		s.oversize.Add(1) // never relay part of a datagram
		return 0, false
	}
	if s.bwu != nil && !s.bw.take(&s.bwu.in, n) {
		return 0, false
	}
	return ch, true
}

// countIn counts pkts datagrams of bytes in all from peers.
func (s *relaySocket) countIn(pkts, bytes int) {
	if pkts == 0 {
		return
	}
	s.ops.relayPktsIn.Add(uint64(pkts))
	s.ops.relayBytesIn.Add(uint64(bytes))
	s.usage.pktsIn.Add(uint64(pkts))
	s.usage.bytesIn.Add(uint64(bytes))
	s.by.Load()[1].Add(uint64(bytes)) // the allocation is set, so by is
}
