package server

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stund/stund/internal/stunwire"
)

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

// stunPacketConn wraps one UDP socket of the grid. Its ReadFrom, called
// only by pion's read loop for that socket, answers Binding itself and
// returns the rest to pion.
type stunPacketConn struct {
	net.PacketConn
	s     *Server
	at    endpoint
	local netip.AddrPort
	out   []byte    // reply buffer; only the read loop goroutine uses it
	fs    frontConn // TURN front state (guard.go)

	batch     *udpBatcher // recvmmsg/sendmmsg (udpsock_batch.go); nil: one datagram per read
	batchInit bool
}

func (c *stunPacketConn) ReadFrom(p []byte) (int, net.Addr, error) {
	if n, addr := c.frontResume(p); n > 0 { // a request held while pion minted a nonce (guard.go)
		return n, addr, nil
	}
	if !c.batchInit {
		c.batchInit = true
		c.batch = newUDPBatcher(c.PacketConn, c.local.Addr().Is4(), func() { c.s.demux.sendErrors.Add(1) })
	}
	for {
		var pkt []byte
		var addr net.Addr
		var err error
		if c.batch != nil {
			pkt, addr, err = c.batch.read()
			if len(pkt) > len(p) {
				pkt = pkt[:len(p)] // as a plain read into p would truncate it
			}
		} else {
			var n int
			n, addr, err = c.PacketConn.ReadFrom(p)
			pkt = p[:n]
		}
		if err != nil {
			return 0, addr, err
		}
		if isBinding(pkt) {
			c.answer(pkt, addr)
			continue
		}
		// Only cookie STUN (pion's) and ChannelData go on; RFC 3489
		// messages other than Binding mean nothing to a TURN server.
		k := stunwire.Classify(pkt)
		if k != stunwire.KindSTUN && k != stunwire.KindChannelData {
			c.s.demux.junk.Add(1)
			continue
		}
		// Into pion's buffer (a no-op without batching).
		n := copy(p, pkt)
		if k == stunwire.KindSTUN { // TURN front: auth and RFC 8656 checks (guard.go)
			if n, addr = c.frontDatagram(p, n, addr, true); n == 0 {
				continue
			}
		}
		return n, addr, nil
	}
}

func (c *stunPacketConn) answer(pkt []byte, from net.Addr) {
	if c.out == nil {
		c.out = make([]byte, 0, 1500)
	}
	src := addrPortOf(from)
	c.s.noteProbe(pkt, src, "udp") // natprobe probe ID, logged once (probeid.go)
	buf := c.out[:0]
	if c.batch != nil {
		buf = c.batch.replyBuf()
	}
	reply, ok := c.s.binder.handle(buf, bindingRequest{
		Raw:   pkt,
		Src:   src,
		Local: c.local,
		At:    c.at,
	})
	if !ok {
		return
	}
	// Reflection bound: replies per source IP (ratelimit.go).
	if !c.s.allowUnauth(reply.To.Addr()) {
		return
	}
	if c.batch != nil && reply.From == c.at {
		// Out with the batch's sendmmsg (udpsock_batch.go); most
		// replies go back to the source, whose address we have.
		to := from
		if reply.To != src {
			to = net.UDPAddrFromAddrPort(reply.To)
		}
		c.batch.queue(reply.Msg, to)
		return
	}
	// A reply from this cell leaves by this socket (its own read loop's,
	// so SO_REUSEPORT siblings do not queue on one socket's write lock);
	// CHANGE-REQUEST replies leave by the named cell's first socket.
	conn := c.PacketConn
	if reply.From != c.at {
		conn = c.s.grid[reply.From.ip][reply.From.port]
	}
	if conn == nil {
		return // the binder never names an absent cell; stay safe if it did
	}
	if _, err := conn.WriteTo(reply.Msg, net.UDPAddrFromAddrPort(reply.To)); err != nil {
		c.s.demux.sendErrors.Add(1)
	}
	if cap(reply.Msg) > cap(c.out) {
		c.out = reply.Msg[:0]
	}
}

// stunListener wraps a TCP or TLS listener so that each connection is
// demultiplexed like the UDP sockets.
type stunListener struct {
	net.Listener
	s  *Server
	ip int
}

func (l *stunListener) Accept() (net.Conn, error) {
	var c net.Conn
	for {
		var err error
		if c, err = l.Listener.Accept(); err != nil {
			return nil, err
		}
		// Connections per source IP (ratelimit.go); an error here
		// would end pion's accept loop, so refuse by closing.
		if l.s.limits.conns.acquire(addrPortOf(c.RemoteAddr()).Addr()) {
			break
		}
		l.s.limits.streamRefused.Add(1)
		_ = c.Close()
	}
	return &stunStreamConn{
		Conn:   c,
		s:      l.s,
		at:     endpoint{ip: l.ip},
		local:  addrPortOf(c.LocalAddr()),
		remote: addrPortOf(c.RemoteAddr()),
	}, nil
}

// Stream framing limits.
const (
	// streamBufInit is the first read buffer of a connection: one
	// typical STUN/ChannelData frame plus slack.
	streamBufInit = 2048
	// maxStreamFrame is the largest frame a 16-bit length allows:
	// STUN header 20 + 65535 (RFC 8489 §5).
	maxStreamFrame = stunwire.HeaderSize + 65535
)

// stunStreamConn frames a TCP/TLS byte stream, answers Binding frames
// itself and passes every other frame's bytes through to pion (which
// frames them again).
type stunStreamConn struct {
	net.Conn
	s             *Server
	at            endpoint
	local, remote netip.AddrPort

	buf  []byte // buf[r:w] is read but not yet consumed
	r, w int
	pass []byte // the rest of a frame being handed to pion
	out  []byte

	wmu sync.Mutex // pion's writes and our Binding replies share the stream
	fs  frontConn  // TURN front state (guard.go), Read's goroutine only

	started   bool        // a whole frame arrived (Read's goroutine only)
	authed    atomic.Bool // pion answered a TURN request with success
	closeOnce sync.Once

	// raw: pion answered a ConnectionBind with success, so from here on the
	// connection is an RFC 6062 data connection carrying the peer's bytes
	// unframed (§4.3, §5.4), which pion copies itself.
	raw atomic.Bool
}

func (c *stunStreamConn) Read(p []byte) (int, error) {
	if c.buf == nil {
		c.buf = make([]byte, streamBufInit)
	}
	for {
		if len(c.pass) == 0 && c.raw.Load() {
			return c.readRaw(p)
		}
		if len(c.pass) == 0 && c.fs.holding {
			c.pass = c.frontResume() // held while pion minted a nonce (guard.go)
		}
		if len(c.pass) > 0 {
			n := copy(p, c.pass)
			c.pass = c.pass[n:]
			return n, nil
		}
		n, _, err := stunwire.FrameLen(c.buf[c.r:c.w])
		if err != nil && !errors.Is(err, stunwire.ErrNeedMore) {
			c.s.demux.streamJunk.Add(1)
			return 0, err
		}
		if err == nil && c.w-c.r >= n {
			frame := c.buf[c.r : c.r+n]
			c.r += n
			c.started = true
			if isBinding(frame) {
				c.answer(frame)
			} else {
				c.pass = c.frontFrame(frame, true) // TURN front (guard.go)
			}
			continue
		}
		// Need more bytes: make room, then read.
		if c.r > 0 {
			c.w = copy(c.buf, c.buf[c.r:c.w])
			c.r = 0
		}
		if need := n; need > len(c.buf) {
			if need > maxStreamFrame {
				need = maxStreamFrame
			}
			nb := make([]byte, need)
			copy(nb, c.buf[:c.w])
			c.buf = nb
		}
		// Slowloris bound: every wait for bytes has a deadline.
		_ = c.Conn.SetReadDeadline(time.Now().Add(c.s.limits.readTimeout(c.w > c.r, c.started, c.authed.Load())))
		m, err := c.Conn.Read(c.buf[c.w:])
		c.w += m
		if err != nil && m == 0 {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				c.s.limits.streamIdleClosed.Add(1)
			}
			return 0, err
		}
	}
}

// readRaw reads an RFC 6062 data connection: what was read past the
// ConnectionBind first, then the stream as it comes, with the idle bound
// of an authenticated connection.
func (c *stunStreamConn) readRaw(p []byte) (int, error) {
	if c.r < c.w {
		n := copy(p, c.buf[c.r:c.w])
		c.r += n
		return n, nil
	}
	_ = c.Conn.SetReadDeadline(time.Now().Add(c.s.limits.readTimeout(false, true, true)))
	return c.Conn.Read(p)
}

func (c *stunStreamConn) answer(frame []byte) {
	if c.out == nil {
		c.out = make([]byte, 0, 1500)
	}
	c.s.noteProbe(frame, c.remote, "tcp")
	reply, ok := c.s.binder.handle(c.out[:0], bindingRequest{
		Raw:    frame,
		Src:    c.remote,
		Local:  c.local,
		At:     c.at,
		Stream: true,
	})
	if !ok {
		return
	}
	if _, err := c.Write(reply.Msg); err != nil {
		c.s.demux.sendErrors.Add(1)
	}
	if cap(reply.Msg) > cap(c.out) {
		c.out = reply.Msg[:0]
	}
}

// streamWriteTimeout bounds a write to a client that stopped reading, so
// a stuck peer cannot hold the connection's writers forever.
const streamWriteTimeout = 10 * time.Second

func (c *stunStreamConn) Write(b []byte) (int, error) {
	if c.raw.Load() { // an RFC 6062 data connection: the peer's bytes
		c.wmu.Lock()
		defer c.wmu.Unlock()
		_ = c.Conn.SetWriteDeadline(time.Now().Add(streamWriteTimeout))
		return c.Conn.Write(b)
	}
	if c.s.front.capture(b) { // pion's answer to the front's synthetic request (guard.go)
		return len(b), nil
	}
	n := len(b)
	b, resigned := c.s.front.signResponse(&c.fs, b) // signed under the client's key (guard.go)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_ = c.Conn.SetWriteDeadline(time.Now().Add(streamWriteTimeout))
	if isTURNSuccess(b) {
		c.authed.Store(true)
		// RFC 6062 §5.4: after a ConnectionBind success response the
		// connection carries raw peer data; pion writes this answer
		// from the read loop that reads the data next.
		if len(b) >= 2 && uint16(b[0])<<8|uint16(b[1]) == stunType(methodConnectionBind, classSuccess) {
			c.raw.Store(true)
		}
	}
	m, err := c.Conn.Write(b)
	if resigned && err == nil {
		m = n // what pion wrote
	}
	return m, err
}

// Close closes the connection and uncounts it from its source IP.
func (c *stunStreamConn) Close() error {
	c.closeOnce.Do(func() { c.s.limits.conns.release(c.remote.Addr()) })
	return c.Conn.Close()
}
