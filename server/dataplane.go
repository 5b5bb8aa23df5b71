package server

import (
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/stund/stund/internal/stunwire"
	"github.com/stund/stund/internal/udpio"
)

// The relay data plane: relayed data on established allocations, both
// directions, without pion (which keeps the control plane: Allocate,
// Refresh, permissions, channels, RFC 6062).
//
//   - client to peer: ChannelData (RFC 8656 §12.5) and Send indications
//     (RFC 8656 §10.2) arriving on a listener are looked up in the ledger by
//     5-tuple (one lookup), checked against the channel and the peer's
//     permission there, and written by the allocation's relay socket
//     (relaysock.go: policy, cap, counters);
//   - peer to client: a relay socket's read loop checks the permission
//     first, then wraps the datagram as ChannelData on the peer's channel
//     or as a Data indication (RFC 8656 §11.3, §12.6) and writes it straight
//     to the client's 5-tuple or connection.
//
// Per packet: no allocation, no goroutine switch, one map lookup per
// direction under a read lock.

// dataPlane relays client-to-peer data.
type dataPlane struct {
	led *ledger

	relayed   atomic.Uint64 // ChannelData frames and Send indications sent on to a peer
	noChannel atomic.Uint64 // dropped: no allocation, channel or permission
	malformed atomic.Uint64 // dropped: length past the frame, bad attributes
}

// DataPlaneStats counts what the data plane saw from clients.
type DataPlaneStats struct {
	Relayed, NoChannel, Malformed uint64
}

func (d *dataPlane) stats() DataPlaneStats {
	return DataPlaneStats{Relayed: d.relayed.Load(), NoChannel: d.noChannel.Load(), Malformed: d.malformed.Load()}
}

// fromClient relays one ChannelData message that arrived on 5-tuple t,
// through q when the read loop batches (nil: at once). Over a stream the
// frame is padded to 4 (RFC 8656 §12.5); over UDP the padding is optional
// and the Length field says how much is data.
func (d *dataPlane) fromClient(t fiveTuple, frame []byte, q *relayQueue) {
	if len(frame) < stunwire.ChannelDataHeaderSize {
		d.malformed.Add(1)
		return
	}
	ch := binary.BigEndian.Uint16(frame[0:2])
	n := int(binary.BigEndian.Uint16(frame[2:4]))
	data := frame[stunwire.ChannelDataHeaderSize:]
	if n > len(data) {
		d.malformed.Add(1)
		return
	}
	data = data[:n]
	a := d.led.lookup(t)
	if a == nil || a.sock == nil {
		d.noChannel.Add(1)
		return
	}
	peer, ok := a.channelPeer(ch)
	if !ok {
		d.noChannel.Add(1)
		return
	}
	d.relay(a.sock, data, peer, q)
}

// relay sends data to peer by sock, now or with q's next flush.
func (d *dataPlane) relay(sock *relaySocket, data []byte, peer netip.AddrPort, q *relayQueue) {
	if q != nil {
		q.add(d, sock, data, peer)
		return
	}
	if _, err := sock.send(data, peer); err == nil {
		d.relayed.Add(1)
	}
}

// relayQueue is a batching read loop's datagrams toward peers: consecutive
// datagrams for one relay socket leave with one sendmmsg, a run of equal
// sizes to one peer as one UDP GSO message (internal/udpio). With a ring
// (io_uring), datagrams for many relay sockets leave with one system call
// at the flush instead of one call per socket. The data stays in the read
// batch's buffers, which outlive the queue: it is flushed before the next
// read and, without a ring, whenever the socket changes.
type relayQueue struct {
	wb    *udpio.Batch
	ring  *udpio.Ring // nil: one sendmmsg per relay socket run
	d     *dataPlane
	sock  *relaySocket // the run's socket, without a ring
	outs  []udpio.Out
	socks []*relaySocket // with a ring: outs[i] leaves by socks[i]
	routs []udpio.RingOut
}

func (q *relayQueue) add(d *dataPlane, sock *relaySocket, data []byte, to netip.AddrPort) {
	q.d = d
	if q.ring != nil && sock.io != nil {
		if len(q.socks) == udpio.MaxBatch {
			q.flushRing()
		}
		q.outs = append(q.outs, udpio.Out{B: data, To: to})
		q.socks = append(q.socks, sock)
		return
	}
	if q.socks != nil {
		q.flushRing() // keep the order of what came first
	}
	if sock != q.sock || len(q.outs) == udpio.MaxBatch {
		q.flush()
	}
	q.sock = sock
	q.outs = append(q.outs, udpio.Out{B: data, To: to})
}

func (q *relayQueue) flush() {
	if len(q.socks) > 0 {
		q.flushRing()
		return
	}
	if len(q.outs) == 0 {
		return
	}
	q.d.relayed.Add(uint64(q.sock.sendBatch(q.wb, q.outs)))
	clear(q.outs)
	q.outs = q.outs[:0]
	q.sock = nil
}

// flushRing sends what the ring queue holds: a single socket's datagrams
// by its own sendmmsg (GSO runs), those of several sockets with one
// io_uring submission, each past its socket's policy and cap first.
func (q *relayQueue) flushRing() {
	defer func() {
		clear(q.outs)
		clear(q.socks)
		clear(q.routs)
		q.outs, q.socks, q.routs = q.outs[:0], q.socks[:0], q.routs[:0]
	}()
	if len(q.socks) == 0 {
		return
	}
	one := true
	for _, s := range q.socks[1:] {
		one = one && s == q.socks[0]
	}
	if one {
		q.d.relayed.Add(uint64(q.socks[0].sendBatch(q.wb, q.outs)))
		return
	}
	k := 0
	for i, o := range q.outs {
		s := q.socks[i]
		if s.admit(len(o.B), o.To) != nil {
			continue
		}
		q.socks[k] = s
		q.routs = append(q.routs, udpio.RingOut{C: s.io, Out: o})
		k++
	}
	res, err := q.ring.Write(q.routs)
	if errors.Is(err, udpio.ErrRingBroken) {
		q.ring = nil // from now on one sendmmsg per socket run
	}
	sent := 0
	for i, n := range res {
		switch {
		case n >= 0:
			q.socks[i].sent(1, int(n))
			sent++
		case err != nil: // the ring failed as a whole: this one goes alone
			if _, werr := q.socks[i].write(q.routs[i].Out.B, q.routs[i].Out.To); werr == nil {
				sent++
			}
		}
	}
	q.d.relayed.Add(uint64(sent))
}

// streamQueue is a stream connection's relayQueue, its write scratch
// borrowed from a pool only while frames are queued: ten thousand idle
// TCP/TLS clients hold none.
type streamQueue struct {
	q relayQueue
}

// relayWriteBatches are the stream connections' write scratch.
var relayWriteBatches = sync.Pool{New: func() any { return udpio.NewBatch() }}

// queue is the relayQueue to add to, with scratch in hand.
func (s *streamQueue) queue() *relayQueue {
	if s.q.wb == nil {
		s.q.wb = relayWriteBatches.Get().(*udpio.Batch)
	}
	return &s.q
}

// flush sends what is queued and gives the scratch back.
func (s *streamQueue) flush() {
	if s.q.wb == nil {
		return
	}
	s.q.flush()
	relayWriteBatches.Put(s.q.wb)
	s.q.wb = nil
}

// knownInSend lists the comprehension-required attributes a Send
// indication may carry (RFC 8656 §10.2, §18); with any other the
// indication is discarded (RFC 8489 §7.3.2).
func knownInSend(t uint16) bool {
	switch t {
	case stunwire.AttrXORPeerAddress, stunwire.AttrData, stunwire.AttrDontFragment:
		return true
	}
	return false
}

// send relays one Send indication (already framed) that arrived on t; false
// when it is not a well-formed Send indication on an allocation we relay
// for, and pion should see it (it then drops it as we would).
func (d *dataPlane) send(t fiveTuple, msg []byte, q *relayQueue) bool {
	h, err := stunwire.ParseHeader(msg)
	if err != nil || h.Type != stunwire.MessageType(stunwire.MethodSend, stunwire.ClassIndication) {
		return false
	}
	a := d.led.lookup(t)
	if a == nil || a.sock == nil {
		d.noChannel.Add(1)
		return true // RFC 8656 §10.2: no allocation, discarded
	}
	sc, err := stunwire.Check(msg, knownInSend)
	if err != nil || len(sc.Unknown()) > 0 {
		d.malformed.Add(1)
		return true
	}
	var peer netip.AddrPort
	var data []byte
	havePeer, haveData := false, false
	it := stunwire.NewAttrs(msg)
	for {
		typ, val, _, ok := it.Next()
		if !ok {
			break
		}
		switch typ {
		case stunwire.AttrXORPeerAddress:
			if peer, err = stunwire.ParseXORAddress(val, &h.ID); err != nil {
				d.malformed.Add(1)
				return true
			}
			havePeer = true
		case stunwire.AttrData:
			data, haveData = val, true
		}
	}
	// RFC 8656 §10.2: both are mandatory; no permission, no relay.
	if !havePeer || !haveData {
		d.malformed.Add(1)
		return true
	}
	peer = stunwire.Unmap(peer)
	if !a.permitted(peer.Addr()) {
		d.noChannel.Add(1)
		return true
	}
	d.relay(a.sock, data, peer, q)
	return true
}

// clientWriter is the way back to an allocation's client.
type clientWriter interface {
	// writeClient sends one datagram or frame to the client.
	writeClient(b []byte) error
	// writeBatch sends outs' datagrams or frames to the client (their
	// To is the writer's to fill), with wb's scratch; it returns how many
	// left.
	writeBatch(wb *udpio.Batch, outs []udpio.Out) int
	// stream reports whether the client is on TCP/TLS, where ChannelData
	// is padded to 4 (RFC 8656 §12.5).
	stream() bool
}

// udpClient is a UDP client reached from the listener socket its 5-tuple
// names.
type udpClient struct {
	conn net.PacketConn
	uc   *net.UDPConn
	io   *udpio.Conn // the listener socket for batches; nil: one by one
	to   netip.AddrPort
}

func (u *udpClient) writeBatch(wb *udpio.Batch, outs []udpio.Out) int {
	if u.io == nil {
		return writeEach(u, outs)
	}
	for i := range outs {
		outs[i].To = u.to
	}
	n, _ := wb.Write(u.io, outs)
	return n
}

// writeEach is writeBatch one message at a time.
func writeEach(w clientWriter, outs []udpio.Out) int {
	n := 0
	for _, o := range outs {
		if w.writeClient(o.B) == nil {
			n++
		}
	}
	return n
}

func (u *udpClient) writeClient(b []byte) error {
	var err error
	if u.uc != nil {
		_, err = u.uc.WriteToUDPAddrPort(b, u.to)
	} else {
		_, err = u.conn.WriteTo(b, net.UDPAddrFromAddrPort(u.to))
	}
	return err
}

func (*udpClient) stream() bool { return false }

// streamClients are the TCP/TLS connections by 5-tuple, while they last.
type streamClients struct {
	mu    sync.RWMutex
	conns map[fiveTuple]*streamConn
}

func (s *streamClients) add(t fiveTuple, c *streamConn) {
	s.mu.Lock()
	if s.conns == nil {
		s.conns = map[fiveTuple]*streamConn{}
	}
	s.conns[t] = c
	s.mu.Unlock()
}

func (s *streamClients) remove(t fiveTuple, c *streamConn) {
	s.mu.Lock()
	if s.conns[t] == c {
		delete(s.conns, t)
	}
	s.mu.Unlock()
}

func (s *streamClients) get(t fiveTuple) *streamConn {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.conns[t]
}

// Room in a relay socket's buffer before the payload, for the largest
// header the payload gets toward the client: a Data indication with an
// IPv6 XOR-PEER-ADDRESS, 20 + (4+20) + 4 = 48 bytes.
const relayHeadroom = stunwire.HeaderSize + 24 + 4

// relayBufSize bounds a datagram from a peer: a full Ethernet-MTU UDP
// payload and more; the relay reads one datagram at a time into this.
const relayBufSize = 2048

// wrapForClient puts the header for a datagram from peer in front of
// buf[relayHeadroom:relayHeadroom+n] (and the padding after it) and
// returns the message: ChannelData on channel ch, else a Data indication.
func wrapForClient(buf []byte, n int, peer netip.AddrPort, ch uint16, stream bool) []byte {
	payload := relayHeadroom
	if ch != 0 {
		// RFC 8656 §12.4; padded to 4 over streams only (§12.5).
		start := payload - stunwire.ChannelDataHeaderSize
		binary.BigEndian.PutUint16(buf[start:], ch)
		binary.BigEndian.PutUint16(buf[start+2:], uint16(n))
		end := payload + n
		if stream {
			end = payload + (n+3)&^3
			clear(buf[payload+n : end])
		}
		return buf[start:end]
	}
	// RFC 8656 §11.3: a Data indication with XOR-PEER-ADDRESS and DATA.
	var id [16]byte
	binary.BigEndian.PutUint32(id[0:4], stunwire.MagicCookie)
	binary.BigEndian.PutUint64(id[4:12], rand.Uint64())
	binary.BigEndian.PutUint32(id[12:16], rand.Uint32())
	var hdr [relayHeadroom]byte
	h := stunwire.AppendHeader(hdr[:0], stunwire.MessageType(stunwire.MethodData, stunwire.ClassIndication), &id)
	h = stunwire.AppendXORAddress(h, stunwire.AttrXORPeerAddress, peer, &id)
	h = binary.BigEndian.AppendUint16(h, stunwire.AttrData)
	h = binary.BigEndian.AppendUint16(h, uint16(n))
	start := payload - len(h)
	copy(buf[start:], h)
	end := payload + (n+3)&^3 // attributes are padded to 4 (RFC 8489 §14)
	clear(buf[payload+n : end])
	binary.BigEndian.PutUint16(buf[start+2:], uint16(end-start-stunwire.HeaderSize))
	return buf[start:end]
}
