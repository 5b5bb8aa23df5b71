package server

import (
	"github.com/stund/stund/internal/stunwire"
	"github.com/stund/stund/internal/udpio"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
)

// relaySocket is one UDP relay socket (RFC 8656 §7.2), the relay data
// plane's only way to the peers. Every datagram in either direction passes
// its checks in this order, cheapest refusal first:
//
//  1. toward a peer: the peer policy per packet (the backstop for the
//     port-level rules a permission cannot express, PeerPolicy.AllowedAddrPort);
//     from a peer: the allocation's permissions (RFC 8656 §9), so that a
//     stranger's datagrams are dropped before anything is charged for them;
//  2. the user's bandwidth cap (--max-bps), charged only for what is relayed;
//  3. the counters (per server and per allocation).
type relaySocket struct {
	net.PacketConn
	uc   *net.UDPConn   // the same socket when it is a kernel one (allocation-free reads)
	addr netip.AddrPort // the announced relayed address (the ledger's key)

	live *livePolicy
	ops  *opsStats
	bw   *bandwidth // nil: no cap
	bwu  *userBW
	user string
	led  *ledger

	// alloc is set when pion reports the allocation created (ledger.created);
	// until then nothing from a peer is relayed, as no permission exists.
	alloc atomic.Pointer[allocation]

	// last is the most recent peer the policy allowed, under which policy:
	// a relay sends to one peer (or a few) at a time, so most packets skip
	// the policy walk; a reload swaps the policy pointer and so invalidates it.
	last atomic.Pointer[relayVerdict]
	// lastFrom is the peer address ReadFrom last returned; only the
	// allocation's read goroutine touches it.
	lastFrom   *net.UDPAddr
	lastFromAP netip.AddrPort

	// by is the client transport's relayed-bytes pair in the server's
	// counters, set with alloc.
	by atomic.Pointer[[2]atomic.Uint64]

	// usage is the allocation's usage, each way (usage records).
	usage          usageCounters
	strangers      atomic.Uint64 // datagrams from peers without a permission
	oversize       atomic.Uint64 // datagrams too large for rbuf, dropped
	toClient       atomic.Uint64 // datagrams the data plane wrote to the client
	toClientErrors atomic.Uint64 // writes toward the client that failed

	// rbuf is the read loop's buffer without batching: relayHeadroom for
	// the header the datagram gets toward the client, then the datagram
	// and its padding.
	rbuf []byte

	// io and rd batch the socket (internal/udpio): writes toward peers
	// with sendmmsg/GSO, reads with recvmmsg into pooled buffers held only
	// while datagrams are queued. nil for sockets that are not the
	// kernel's (tests with virtual networks): one datagram per call.
	io *udpio.Conn
	rd *udpio.Reader
	// held is a read batch not yet relayed to its end (a datagram in it
	// went to pion first); only the read goroutine touches it.
	held       *udpio.Batch
	heldN, hep int

	// polls, when set, may take the socket's reads (relaypoll.go) once
	// the allocation exists and its client is on UDP; ready is closed when
	// that is decided (polled says how), closed when the socket closes.
	polls         *relayPollers
	ready, closed chan struct{}
	readyOnce     sync.Once
	polled        bool
	decided       bool // ReadFrom saw ready; the read goroutine's only
	// pollMu orders attached against Close: a socket closing is never
	// put on a poller, and one on a poller leaves it before it closes.
	pollMu sync.Mutex
	shut   bool
	poller *relayPoller
	token  uint64

	closeOnce sync.Once
	// onClose gives the port back to the relay port ledger (relaygen.go).
	onClose func()
}

// usageCounters is one allocation's relayed traffic: "out" toward its
// peers, "in" from them; packets are datagrams (UDP relays) or reads and
// writes (RFC 6062 peer connections).
type usageCounters struct {
	pktsOut, bytesOut, pktsIn, bytesIn atomic.Uint64
}

func (u *usageCounters) out(n int) {
	u.pktsOut.Add(1)
	u.bytesOut.Add(uint64(n))
}

func (u *usageCounters) in(n int) {
	u.pktsIn.Add(1)
	u.bytesIn.Add(uint64(n))
}

type relayVerdict struct {
	pol *PeerPolicy
	to  netip.AddrPort
}

// newRelaySocket wraps a freshly bound relay socket and records it in the
// ledger under its announced address.
func newRelaySocket(c net.PacketConn, announced netip.AddrPort, user string, led *ledger, live *livePolicy, ops *opsStats, bw *bandwidth, polls *relayPollers) *relaySocket {
	s := &relaySocket{PacketConn: c, addr: announced, live: live, ops: ops, bw: bw, user: user, led: led, closed: make(chan struct{})}
	s.uc, _ = c.(*net.UDPConn)
	if s.io = udpio.NewConn(c); s.io != nil {
		s.rd = udpio.NewReader(s.io, &relayBatches, relayHeadroom, relayBufSize)
		if polls != nil {
			s.polls, s.ready = polls, make(chan struct{})
		}
	}
	if bw != nil {
		s.bwu = bw.acquire(user)
	}
	led.addSocket(s)
	return s
}

// WriteTo sends toward the peer (pion's Send indications and our
// ChannelData fast path alike).
func (s *relaySocket) WriteTo(b []byte, addr net.Addr) (int, error) {
	return s.send(b, stunwire.AddrPortOf(addr))
}

// send is WriteTo for callers that hold a netip.AddrPort already.
func (s *relaySocket) send(b []byte, to netip.AddrPort) (int, error) {
	if err := s.admit(len(b), to); err != nil {
		return 0, err
	}
	return s.write(b, to)
}

// write sends a datagram admit has passed, and counts it.
func (s *relaySocket) write(b []byte, to netip.AddrPort) (int, error) {
	var n int
	var err error
	if s.uc != nil {
		n, err = s.uc.WriteToUDPAddrPort(b, to)
	} else {
		n, err = s.PacketConn.WriteTo(b, net.UDPAddrFromAddrPort(to))
	}
	if err == nil {
		s.sent(1, n)
	}
	return n, err
}

// admit runs the checks before a datagram of n bytes leaves toward to:
// the peer policy, then the user's cap.
func (s *relaySocket) admit(n int, to netip.AddrPort) error {
	pol := s.live.load()
	if v := s.last.Load(); v == nil || v.pol != pol || v.to != to {
		if !to.IsValid() || !pol.AllowedAddrPort(to) {
			s.ops.relayRefused.Add(1)
			return ErrPeerRefused
		}
		s.last.Store(&relayVerdict{pol: pol, to: to})
	}
	if s.bwu != nil && !s.bw.take(&s.bwu.out, n) {
		return errBandwidth
	}
	return nil
}

// sent counts pkts datagrams of bytes in all toward peers.
func (s *relaySocket) sent(pkts, bytes int) {
	s.ops.relayPktsOut.Add(uint64(pkts))
	s.ops.relayBytesOut.Add(uint64(bytes))
	s.usage.pktsOut.Add(uint64(pkts))
	s.usage.bytesOut.Add(uint64(bytes))
	if by := s.by.Load(); by != nil {
		by[0].Add(uint64(bytes))
	}
}

// sendBatch sends outs toward their peers with as few system calls as the
// batch allows (outs is reused: refused datagrams are taken out); it
// returns how many left.
func (s *relaySocket) sendBatch(wb *udpio.Batch, outs []udpio.Out) int {
	if s.io == nil {
		n := 0
		for _, o := range outs {
			if _, err := s.send(o.B, o.To); err == nil {
				n++
			}
		}
		return n
	}
	k := 0
	for _, o := range outs {
		if s.admit(len(o.B), o.To) == nil {
			outs[k] = o
			k++
		}
	}
	if k == 0 {
		return 0
	}
	n, _ := wb.Write(s.io, outs[:k])
	bytes := 0
	for _, o := range outs[:n] { // exact unless one in the middle was refused
		bytes += len(o.B)
	}
	s.sent(n, bytes)
	return n
}

// relayBatches are the relay sockets' read batches, shared: a socket holds
// one only while it has datagrams queued.
var relayBatches = sync.Pool{New: func() any {
	return udpio.NewBatchWith(udpio.MaxBatch, relayHeadroom+relayBufSize+3)
}}

// ReadFrom is pion's read loop on the relay socket. Each datagram from a
// permitted peer, within the user's cap, goes straight to the client as
// ChannelData or a Data indication (dataplane.go); ReadFrom returns only on
// an error (the socket closed: pion then deletes the allocation), or with a
// datagram for pion to relay when the way to the client is not known.
func (s *relaySocket) ReadFrom(b []byte) (int, net.Addr, error) {
	if s.ready != nil && !s.decided {
		// Until the allocation exists no permission does, so nothing
		// read would be relayed: the datagrams wait in the kernel.
		select {
		case <-s.ready:
		case <-s.closed:
			return 0, nil, net.ErrClosed
		}
		s.decided = true
	}
	if s.polled {
		<-s.closed // a poller reads; pion's loop only learns of the end
		return 0, nil, net.ErrClosed
	}
	if s.rd == nil {
		return s.readSingly(b)
	}
	for {
		if s.held == nil {
			bt, n, err := s.rd.Read()
			if err != nil {
				return 0, nil, err
			}
			s.held, s.heldN, s.hep = bt, n, 0
		}
		if n, addr := s.relayHeld(b); addr != nil {
			return n, addr, nil
		}
	}
}

// relayHeld relays the held batch's datagrams to the client, counted and
// checked as in readSingly, with one sendmmsg (GSO runs where the sizes
// allow); it stops early only at a datagram whose way to the client pion
// alone knows, which it copies into p for pion, keeping the rest held.
func (s *relaySocket) relayHeld(p []byte) (int, net.Addr) {
	bt := s.held
	a := s.alloc.Load()
	outs := bt.Outs[:0]
	pkts, bytes := 0, 0
	var toPion net.Addr
	n := 0
	for s.hep < s.heldN && toPion == nil {
		i := s.hep
		s.hep++
		ap, ln := bt.Addr(i), bt.Len(i)
		ch, ok := s.admitIn(a, ap, ln, bt.Truncated(i))
		if !ok {
			continue
		}
		pkts++
		bytes += ln
		if a.client == nil {
			n, toPion = copy(p, bt.Bufs[i][relayHeadroom:relayHeadroom+ln]), s.fromAddr(ap)
			break
		}
		outs = append(outs, udpio.Out{B: wrapForClient(bt.Bufs[i], ln, ap, ch, a.client.stream())})
	}
	s.countIn(pkts, bytes)
	if len(outs) > 0 {
		// bt's headers serve as the write's scratch: safe, as outs is
		// non-empty only when a.client is set, and then the loop above
		// read every datagram of the batch (it stops early only for pion,
		// when a.client is nil and nothing is written here).
		sent := a.client.writeBatch(bt, outs)
		s.toClient.Add(uint64(sent))
		s.toClientErrors.Add(uint64(len(outs) - sent))
	}
	clear(outs)
	if s.hep >= s.heldN {
		s.rd.Release(bt)
		s.held = nil
	}
	return n, toPion
}

// readSingly is ReadFrom one datagram at a time, for sockets udpio cannot
// batch.
func (s *relaySocket) readSingly(b []byte) (int, net.Addr, error) {
	if s.rbuf == nil {
		s.rbuf = make([]byte, relayHeadroom+relayBufSize+3)
	}
	for {
		payload := s.rbuf[relayHeadroom : relayHeadroom+relayBufSize]
		n, ap, addr, err := s.read(payload)
		if err != nil {
			return n, addr, err
		}
		// RFC 8656 §9: no permission, no relay; dropped before the cap
		// is charged, so strangers cannot spend a user's bandwidth. A
		// datagram that fills the buffer may have been cut: dropped.
		a := s.alloc.Load()
		ch, ok := s.admitIn(a, ap, n, n == relayBufSize)
		if !ok {
			continue
		}
		s.countIn(1, n)
		if a.client == nil {
			return copy(b, payload[:n]), addr, nil // pion knows the way
		}
		if err := a.client.writeClient(wrapForClient(s.rbuf, n, ap, ch, a.client.stream())); err != nil {
			s.toClientErrors.Add(1)
		} else {
			s.toClient.Add(1)
		}
	}
}

func (s *relaySocket) read(b []byte) (int, netip.AddrPort, net.Addr, error) {
	if s.uc == nil {
		n, addr, err := s.PacketConn.ReadFrom(b)
		return n, stunwire.AddrPortOf(addr), addr, err
	}
	n, ap, err := s.uc.ReadFromUDPAddrPort(b)
	if err != nil {
		return n, ap, nil, err
	}
	ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	return n, ap, s.fromAddr(ap), nil
}

// fromAddr is ap as the net.Addr pion's read loop gets, one value reused
// while the sender stays the same.
func (s *relaySocket) fromAddr(ap netip.AddrPort) net.Addr {
	if s.lastFrom == nil || s.lastFromAP != ap {
		s.lastFromAP, s.lastFrom = ap, net.UDPAddrFromAddrPort(ap)
	}
	return s.lastFrom
}

// attached is told that the allocation a now owns the socket: a UDP
// client's relaying goes to a poller, any other keeps ReadFrom's goroutine.
func (s *relaySocket) attached(a *allocation) {
	if s.ready == nil {
		return
	}
	s.readyOnce.Do(func() {
		s.pollMu.Lock()
		if u, ok := a.client.(*udpClient); ok && u.io != nil && !s.shut {
			s.polled = s.polls.add(s)
		}
		s.pollMu.Unlock()
		close(s.ready)
	})
}

// Close releases the socket, its bandwidth buckets and its ledger entry.
func (s *relaySocket) Close() error {
	s.closeOnce.Do(func() {
		s.pollMu.Lock()
		s.shut = true
		if s.poller != nil {
			s.poller.remove(s) // before the descriptor can be reused
		}
		s.pollMu.Unlock()
		close(s.closed)
		s.led.removeSocket(s)
		if s.bwu != nil {
			s.bw.release(s.user, s.bwu)
		}
		if s.onClose != nil {
			s.onClose()
		}
	})
	return s.PacketConn.Close()
}
