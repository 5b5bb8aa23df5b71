package server

import (
	"github.com/stund/stund/server/binding"
	"net"
	"net/netip"
	"sync/atomic"

	"github.com/stund/stund/internal/stunwire"
)

// UDP: each socket of the RFC 5780 grid is wrapped in a stunPacketConn
// whose ReadFrom, called only by pion's read loop for that socket, routes
// every datagram once:
//
//	Binding          -> the RFC 5780 responder (server/binding), answered here
//	ChannelData      -> the relay data plane (dataplane.go), never pion
//	other STUN       -> the TURN front (front.go), then pion
//	anything else    -> dropped and counted
//
// The stream side (TCP, TLS) routes the same way after framing (stream.go).

// endpoint is a cell of the RFC 5780 grid (binding.Endpoint).
type endpoint = binding.Endpoint

// demuxStats counts what the demultiplexer dropped before pion saw it.
type demuxStats struct {
	junk       atomic.Uint64 // datagrams that are neither STUN nor ChannelData
	streamJunk atomic.Uint64 // TCP/TLS connections closed on an unframeable byte stream
	sendErrors atomic.Uint64 // Binding replies the kernel refused to send
}

// DemuxStats is a snapshot of demuxStats.
type DemuxStats struct {
	Junk, StreamJunk, SendErrors uint64
}

// Demux returns the demultiplexer's counters.
func (s *Server) Demux() DemuxStats {
	return DemuxStats{Junk: s.demux.junk.Load(), StreamJunk: s.demux.streamJunk.Load(), SendErrors: s.demux.sendErrors.Load()}
}

// bindingStage is the Binding responder as the listeners use it: the
// natprobe probe log first, then the RFC 5780 answer.
type bindingStage struct {
	binder    *binding.Responder
	noteProbe func(pkt []byte, src netip.AddrPort, transport string)
}

// answer builds the reply to a Binding message into buf.
func (b *bindingStage) answer(buf, pkt []byte, src, local netip.AddrPort, at endpoint, stream bool) ([]byte, bool) {
	transport := "udp"
	if stream {
		transport = "tcp"
	}
	b.noteProbe(pkt, src, transport)
	reply, ok := b.binder.Handle(buf, binding.Request{Raw: pkt, Src: src, Local: local, At: at, Stream: stream})
	return reply.Msg, ok
}

// isSend reports whether a STUN message is a Send indication (RFC 8656
// §10.2), by its type alone.
func isSend(b []byte) bool {
	return len(b) >= 2 && uint16(b[0])<<8|uint16(b[1]) == stunwire.MessageType(stunwire.MethodSend, stunwire.ClassIndication)
}

// udpDeps is what a grid socket needs from the server.
type udpDeps struct {
	binding *bindingStage
	front   *turnFront
	data    *dataPlane
	demux   *demuxStats
	// allowUnauth takes a token from the source's unauthenticated budget
	// (ratelimit.go) before any Binding reply leaves.
	allowUnauth func(netip.Addr) bool
	// grid is every cell's first socket, for CHANGE-REQUEST replies.
	grid *[2][2]net.PacketConn
	// requests counts requests by transport and kind (metrics.go).
	requests *[numTransports][2]atomic.Uint64
	// ring lets a read loop send toward many relay sockets with one
	// io_uring submission (udpio.Ring) when the kernel allows it.
	ring bool
}

// stunPacketConn wraps one UDP socket of the grid.
type stunPacketConn struct {
	net.PacketConn
	deps  *udpDeps
	at    endpoint
	local netip.AddrPort
	out   []byte    // reply buffer; only the read loop goroutine uses it
	fc    frontConn // front scratch, the read loop's only

	// pass is what the front handed pion last; pion answers it from this
	// read loop's goroutine before the next read (WriteTo).
	pass passedRequest

	batch     *udpBatcher // recvmmsg/sendmmsg (udpsock_batch.go); nil: one datagram per read
	batchInit bool
}

func (c *stunPacketConn) ReadFrom(p []byte) (int, net.Addr, error) {
	if !c.batchInit {
		c.batchInit = true
		c.batch = newUDPBatcher(c.PacketConn, c.deps.ring, func() { c.deps.demux.sendErrors.Add(1) })
	}
	for {
		pkt, src, addr, err := c.read(p)
		if err != nil {
			if c.batch != nil {
				c.batch.close() // the socket is done: so is its ring
			}
			return 0, addr, err
		}
		if pkt == nil {
			c.deps.demux.junk.Add(1) // longer than any buffer: never anything we parse
			continue
		}
		if binding.IsBinding(pkt) {
			c.deps.requests[trUDP][0].Add(1)
			c.answer(pkt, src, addr)
			continue
		}
		switch stunwire.Classify(pkt) {
		case stunwire.KindChannelData:
			c.deps.data.fromClient(fiveTuple{src: src, dst: c.local}, pkt, c.toPeers())
		case stunwire.KindSTUN:
			if isSend(pkt) && c.deps.data.send(fiveTuple{src: src, dst: c.local}, pkt, c.toPeers()) {
				continue // a Send indication on an allocation: the data plane's
			}
			c.deps.requests[trUDP][1].Add(1)
			if addr == nil {
				addr = net.UDPAddrFromAddrPort(src)
			}
			if n := c.toFront(p, pkt, addr); n > 0 {
				return n, addr, nil
			}
		default:
			// RFC 3489 messages other than Binding mean nothing to a
			// TURN server; neither does anything that is not STUN.
			c.deps.demux.junk.Add(1)
		}
	}
}

// toPeers is the batch's queue toward relay sockets; nil without batching
// (each datagram then leaves at once).
func (c *stunPacketConn) toPeers() *relayQueue {
	if c.batch == nil {
		return nil
	}
	return &c.batch.toPeers
}

// read returns the next datagram, from the batch or the socket, with its
// source; addr is the source as a net.Addr when the socket gave one (the
// batch does not: it is made only for what pion sees). A datagram larger
// than the batch's buffer comes back as nil.
func (c *stunPacketConn) read(p []byte) (pkt []byte, src netip.AddrPort, addr net.Addr, err error) {
	if c.batch != nil {
		pkt, src, trunc, err := c.batch.read()
		if err != nil {
			return nil, src, nil, err
		}
		if trunc {
			return nil, src, nil, nil
		}
		if len(pkt) > len(p) {
			pkt = pkt[:len(p)] // as a plain read into p would truncate it
		}
		return pkt, src, nil, nil
	}
	n, addr, err := c.PacketConn.ReadFrom(p)
	return p[:n], stunwire.AddrPortOf(addr), addr, err
}

// toFront runs the TURN front on a STUN datagram; it returns how many bytes
// of p to hand pion (0: none, the front answered or dropped it).
func (c *stunPacketConn) toFront(p, pkt []byte, addr net.Addr) int {
	v, msg, pass := c.deps.front.inspect(&c.fc, pkt, stunwire.AddrPortOf(addr), c.local, false)
	switch v {
	case frontPass:
		if len(msg) >= len(p) {
			return 0 // grew past pion's buffer; pion would drop it as truncated
		}
		c.pass = pass
		return copy(p, msg)
	case frontReply:
		if _, err := c.PacketConn.WriteTo(msg, addr); err != nil {
			c.deps.demux.sendErrors.Add(1)
		}
	}
	return 0
}

func (c *stunPacketConn) answer(pkt []byte, src netip.AddrPort, from net.Addr) {
	if c.out == nil {
		c.out = make([]byte, 0, 1500)
	}
	buf := c.out[:0]
	if c.batch != nil {
		buf = c.batch.replyBuf()
	}
	reply, ok := c.deps.binding.binder.Handle(buf, binding.Request{Raw: pkt, Src: src, Local: c.local, At: c.at})
	c.deps.binding.noteProbe(pkt, src, "udp")
	if !ok {
		return
	}
	// Reflection bound: replies per source IP (ratelimit.go).
	if !c.deps.allowUnauth(reply.To.Addr()) {
		return
	}
	if c.batch != nil && reply.From == c.at {
		// Out with the batch's sendmmsg (udpsock_batch.go).
		c.batch.queue(reply.Msg, reply.To)
		return
	}
	// A reply from this cell leaves by this socket (its own read loop's,
	// so SO_REUSEPORT siblings do not queue on one socket's write lock);
	// CHANGE-REQUEST replies leave by the named cell's first socket.
	conn := c.PacketConn
	if reply.From != c.at {
		conn = c.deps.grid[reply.From.IP][reply.From.Port]
	}
	if conn == nil {
		return // the binder never names an absent cell; stay safe if it did
	}
	to := from
	if to == nil || reply.To != src {
		to = net.UDPAddrFromAddrPort(reply.To)
	}
	if _, err := conn.WriteTo(reply.Msg, to); err != nil {
		c.deps.demux.sendErrors.Add(1)
	}
	if c.batch == nil && cap(reply.Msg) > cap(c.out) {
		c.out = reply.Msg[:0]
	}
}

// WriteTo is pion's way out on UDP: responses (signed for the client by
// the front), and relayed data as Data indications and ChannelData.
func (c *stunPacketConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	if out, resigned := c.deps.front.signResponse(&c.pass, b); resigned {
		if _, err := c.PacketConn.WriteTo(out, addr); err != nil {
			return 0, err
		}
		return len(b), nil // what pion wrote
	}
	return c.PacketConn.WriteTo(b, addr)
}
