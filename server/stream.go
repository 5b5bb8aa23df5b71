package server

import (
	"errors"
	"github.com/stund/stund/internal/udpio"
	"github.com/stund/stund/server/binding"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stund/stund/internal/stunwire"
)

// TCP and TLS: one framer per connection, and the only one.
//
// A stream carries STUN messages framed by their own length (RFC 8489
// §6.2.2) and ChannelData padded to a multiple of 4 (RFC 8656 §12.5).
// streamConn.frameLoop cuts the stream into frames exactly once, in its own
// goroutine, and routes each whole frame:
//
//	Binding          -> the RFC 5780 responder, answered on this connection
//	ChannelData      -> the relay data plane (dataplane.go), never pion
//	other STUN       -> the TURN front (front.go), then pion, one whole
//	                    frame per Read so pion's own STUNConn finds exactly
//	                    the frame the front saw and nothing else
//
// pion never frames bytes the front has not seen: it is handed at most one
// whole, bounded STUN message per Read, and ChannelData (whose short frames
// pion's reader holds back waiting for more bytes) does not go to pion at
// all. The framer keeps reading while pion is busy with a request (a
// Connect's dial, say), so Binding and relayed data on the connection go on.

// Stream framing bounds.
const (
	// streamBufInit is the first read buffer of a connection: one
	// typical STUN/ChannelData frame plus slack.
	streamBufInit = 2048
	// maxStreamSTUN bounds a STUN message on a stream. TURN control
	// messages and Send indications of one media packet are far below it;
	// pion reads into a buffer of pionInboundMTU and drops anything that
	// fills it, so a larger message could never be served: the
	// connection is closed instead of buffering it.
	maxStreamSTUN = pionInboundMTU - 1
	// maxStreamChannelData is the largest ChannelData frame: header plus
	// the 16-bit length padded to 4 (RFC 8656 §12.4, §12.5).
	maxStreamChannelData = stunwire.ChannelDataHeaderSize + 65536
	// pionQueue bounds the STUN frames that wait for pion on one
	// connection (pion serves them one at a time); beyond it the framer
	// waits, which only slows the connection that sent them.
	pionQueue = 8
	// connectionBindWait bounds how long the framer waits for pion's
	// answer to a ConnectionBind before reading on: pion answers at once
	// unless the connection is already gone.
	connectionBindWait = 10 * time.Second
)

// pionInboundMTU is pion's read buffer (turn.ServerConfig.InboundMTU): a
// Send indication with a 1500-byte datagram, with room to spare.
const pionInboundMTU = 4096

// errFrameTooLarge closes a connection that announces a frame no message
// of ours can be.
var errFrameTooLarge = errors.New("stream: frame larger than the server accepts")

// errConnLimit closes a connection over its source's connection limit, or
// one whose client address could not be read (a PROXY protocol header
// that was required and missing).
var errConnLimit = errors.New("stream: connection refused: per-IP connection limit, or no client address")

// streamDeps is what a stream connection needs from the server: the stages
// a frame is routed to and the limits it obeys.
type streamDeps struct {
	binding *bindingStage
	front   *turnFront
	data    *dataPlane
	led     *ledger
	clients *streamClients // the way back to stream clients (dataplane.go)
	limits  *limits
	demux   *demuxStats
	// requests counts requests by transport and kind (metrics.go).
	requests *[numTransports][2]atomic.Uint64
}

// stunListener wraps a TCP or TLS listener so that each connection is
// framed and routed like the UDP sockets.
type stunListener struct {
	net.Listener
	deps *streamDeps
	ip   int
	tr   int // trTCP or trTLS
}

// Accept never waits on the client: a connection's PROXY protocol header
// (proxy.go) and its TLS handshake are read by its own frameLoop, which
// also applies the per-IP connection limit once the client's address is
// known.
func (l *stunListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	// The listener is bound to an explicit address (never the wildcard),
	// so its address is the connection's local address.
	return newStreamConn(c, stunwire.AddrPortOf(l.Listener.Addr()), l.deps, endpoint{IP: l.ip}, l.tr), nil
}

// newStreamConn starts framing c, accepted on local.
func newStreamConn(c net.Conn, local netip.AddrPort, deps *streamDeps, at endpoint, tr int) *streamConn {
	sc := &streamConn{
		Conn:   c,
		deps:   deps,
		at:     at,
		tr:     tr,
		local:  local,
		frames: make(chan pionFrame, pionQueue),
		bound:  make(chan bool, 1),
		done:   make(chan struct{}),
	}
	go sc.frameLoop()
	return sc
}

// admit learns the client's address (after a PROXY protocol header, if one
// is required from this source) and takes a connection slot for it
// (ratelimit.go); false closes the connection.
func (c *streamConn) admit() bool {
	c.remote = stunwire.AddrPortOf(c.Conn.RemoteAddr())
	c.remoteAddr = net.TCPAddrFromAddrPort(c.remote)
	c.localAddr = net.TCPAddrFromAddrPort(c.local)
	if !c.remote.IsValid() || !c.deps.limits.conns.acquire(c.remote.Addr()) {
		c.deps.limits.streamRefused.Add(1)
		return false
	}
	c.acquired.Store(true)
	c.deps.clients.add(c.tuple(), c)
	return true
}

// tuple is the connection's 5-tuple (RFC 8656 §2).
func (c *streamConn) tuple() fiveTuple { return fiveTuple{src: c.remote, dst: c.local, tcp: true} }

// writeClient sends relayed data (ChannelData, Data indications) to the
// client (dataplane.go).
func (c *streamConn) writeClient(b []byte) error {
	if c.raw.Load() {
		return net.ErrClosed // an RFC 6062 data connection carries no frames
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_ = c.Conn.SetWriteDeadline(time.Now().Add(streamWriteTimeout))
	_, err := c.Conn.Write(b)
	return err
}

func (*streamConn) stream() bool { return true }

// writeBatch sends a batch of relayed frames with one Write (one system
// call, and over TLS one record) instead of one per frame.
func (c *streamConn) writeBatch(_ *udpio.Batch, outs []udpio.Out) int {
	if len(outs) == 1 {
		return writeEach(c, outs)
	}
	bp := streamBatchBufs.Get().(*[]byte)
	b := (*bp)[:0]
	for _, o := range outs {
		b = append(b, o.B...)
	}
	n := 0
	if c.writeClient(b) == nil {
		n = len(outs)
	}
	*bp = b[:0]
	streamBatchBufs.Put(bp)
	return n
}

// streamBatchBufs hold one batch of frames toward a stream client: at most
// udpio.MaxBatch relayed datagrams with their headers and padding.
var streamBatchBufs = sync.Pool{New: func() any {
	b := make([]byte, 0, udpio.MaxBatch*(relayHeadroom+relayBufSize+3))
	return &b
}}

// RemoteAddr is the client's address (from the PROXY protocol header when
// one was required): what pion keys the allocation by, as we do.
func (c *streamConn) RemoteAddr() net.Addr { return c.remoteAddr }

// LocalAddr is the listener's address.
func (c *streamConn) LocalAddr() net.Addr { return c.localAddr }

// pionFrame is one STUN message for pion, with what the front must know
// to sign pion's answer to it.
type pionFrame struct {
	msg  []byte
	pass passedRequest
}

// streamConn is one TCP/TLS connection: net.Conn for pion (which wraps it
// in its STUNConn), fed by frameLoop.
type streamConn struct {
	net.Conn
	deps          *streamDeps
	at            endpoint
	tr            int // trTCP or trTLS
	local, remote netip.AddrPort
	// remoteAddr and localAddr are remote and local for pion, set by admit
	// before the first frame reaches pion.
	remoteAddr, localAddr net.Addr
	acquired              atomic.Bool // admit took a connection slot

	frames  chan pionFrame // frameLoop -> Read
	readErr error          // why frameLoop stopped; read after frames is closed
	bound   chan bool      // Write -> frameLoop: pion's ConnectionBind verdict
	done    chan struct{}  // closed when frameLoop has returned

	// Read's goroutine (pion's read loop) only.
	pass passedRequest
	// frameLoop's goroutine only: the buffers answers are built in.
	out []byte
	fc  frontConn
	// toPeers batches the relayed data of the frames one read brought in
	// (frameLoop's only).
	toPeers streamQueue

	// raw: pion answered a ConnectionBind with success, so from here on the
	// connection is an RFC 6062 data connection carrying the peer's bytes
	// unframed (§4.3, §5.4), which pion copies itself; rest holds what
	// frameLoop had read past the ConnectionBind.
	raw  atomic.Bool
	rest []byte

	wmu       sync.Mutex // pion's writes, relayed data and our answers share the stream
	authed    atomic.Bool
	closeOnce sync.Once
}

// Read hands pion the next STUN frame, whole (pion's buffer is
// pionInboundMTU, larger than maxStreamSTUN).
func (c *streamConn) Read(p []byte) (int, error) {
	if c.raw.Load() {
		return c.readRaw(p)
	}
	f, ok := <-c.frames
	if !ok {
		if c.raw.Load() {
			return c.readRaw(p)
		}
		if c.readErr == nil {
			return 0, io.EOF
		}
		return 0, c.readErr
	}
	c.pass = f.pass
	return copy(p, f.msg), nil
}

// readRaw reads an RFC 6062 data connection: what frameLoop read past the
// ConnectionBind first, then the stream as it comes, with the idle bound
// of an authenticated connection.
func (c *streamConn) readRaw(p []byte) (int, error) {
	<-c.done // frameLoop has stopped reading and left c.rest
	if len(c.rest) > 0 {
		n := copy(p, c.rest)
		c.rest = c.rest[n:]
		return n, nil
	}
	_ = c.Conn.SetReadDeadline(time.Now().Add(c.deps.limits.authedTimeout))
	return c.Conn.Read(p)
}

// framer is the read side of one stream: buf[r:w] is read but not yet
// consumed.
type framer struct {
	buf  []byte
	r, w int
}

// frameLoop reads frames until the connection ends, routing each; it is
// the only reader of the connection until it returns.
func (c *streamConn) frameLoop() {
	defer close(c.done)
	defer close(c.frames)
	if !c.admit() {
		c.readErr = errConnLimit
		return
	}
	fr := framer{buf: make([]byte, streamBufInit)}
	defer c.toPeers.flush()
	started := false
	for {
		frame, kind, err := c.next(&fr, started)
		if err != nil {
			// RFC 6062 §5.3 (and pion): an allocation ends with its
			// control connection.
			if a := c.deps.led.lookup(c.tuple()); a != nil {
				a.ending(endClosed)
			}
			c.readErr = err
			return
		}
		started = true
		switch {
		case kind == stunwire.KindChannelData:
			c.deps.data.fromClient(c.tuple(), frame, c.toPeers.queue())
		case binding.IsBinding(frame):
			c.deps.requests[c.tr][0].Add(1)
			c.answerBinding(frame)
		case kind == stunwire.KindSTUN && isSend(frame) && c.deps.data.send(c.tuple(), frame, c.toPeers.queue()):
			// A Send indication on an allocation: the data plane's.
		case kind == stunwire.KindSTUN:
			c.toPeers.flush() // relayed data before the request that follows it
			c.deps.requests[c.tr][1].Add(1)
			if !c.toFront(frame) {
				continue
			}
			// RFC 6062 §5.4: after a successful ConnectionBind the rest of
			// the stream is the peer's data, not frames.
			if isConnectionBind(frame) && c.awaitBind() {
				c.rest = append([]byte(nil), fr.buf[fr.r:fr.w]...)
				return
			}
		default:
			// RFC 3489 messages other than Binding mean nothing here.
			c.deps.demux.streamJunk.Add(1)
		}
	}
}

// next returns the next whole frame. Between frames the connection may be
// idle for the timeout of its state; once a frame's first byte has
// arrived, the whole frame must follow within firstTimeout of it, however
// the bytes dribble in (no read extends that deadline).
func (c *streamConn) next(fr *framer, started bool) ([]byte, stunwire.Kind, error) {
	var frameDeadline time.Time
	if fr.r == fr.w && len(fr.buf) > streamBufInit {
		// A large frame grew the buffer; the previous frame has been
		// routed, so an idle connection goes back to the small one.
		fr.buf, fr.r, fr.w = make([]byte, streamBufInit), 0, 0
	}
	for {
		avail := fr.buf[fr.r:fr.w]
		n, kind, err := stunwire.FrameLen(avail)
		switch {
		case err != nil && !errors.Is(err, stunwire.ErrNeedMore):
			c.deps.demux.streamJunk.Add(1)
			return nil, 0, err
		case err == nil && kind != stunwire.KindChannelData && n > maxStreamSTUN,
			err == nil && n > maxStreamChannelData:
			c.deps.demux.streamJunk.Add(1)
			return nil, 0, errFrameTooLarge
		case err == nil && len(avail) >= n:
			frame := avail[:n]
			fr.r += n
			if kind != stunwire.KindChannelData {
				kind = stunwire.Classify(frame)
			}
			return frame, kind, nil
		}
		// Every whole frame read is routed: what they queued toward peers
		// leaves now, before the bytes move or the read waits.
		c.toPeers.flush()
		if fr.r > 0 { // make room at the front
			fr.w = copy(fr.buf, avail)
			fr.r = 0
		}
		if n > len(fr.buf) {
			nb := make([]byte, n)
			copy(nb, fr.buf[:fr.w])
			fr.buf = nb
		}
		// Slowloris bounds: see the doc comment.
		if fr.w > 0 && frameDeadline.IsZero() {
			frameDeadline = time.Now().Add(c.deps.limits.firstTimeout)
		}
		dl := frameDeadline
		if dl.IsZero() {
			dl = time.Now().Add(c.deps.limits.readTimeout(false, started, c.authed.Load()))
		}
		_ = c.Conn.SetReadDeadline(dl)
		m, err := c.Conn.Read(fr.buf[fr.w:])
		fr.w += m
		if err != nil && m == 0 {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				c.deps.limits.streamIdleClosed.Add(1)
			}
			return nil, 0, err
		}
	}
}

// toFront runs the TURN front on one STUN frame: it answers the frame
// itself or queues it for pion (true).
func (c *streamConn) toFront(frame []byte) bool {
	v, msg, pass := c.deps.front.inspect(&c.fc, frame, c.remote, c.local, true)
	switch v {
	case frontPass:
		c.frames <- pionFrame{msg: append([]byte(nil), msg...), pass: pass}
		return true
	case frontReply:
		c.writeOwn(msg)
	}
	return false
}

// awaitBind waits for pion's verdict on the ConnectionBind just queued.
func (c *streamConn) awaitBind() bool {
	t := time.NewTimer(connectionBindWait)
	defer t.Stop()
	select {
	case ok := <-c.bound:
		return ok
	case <-t.C:
		return false
	}
}

func (c *streamConn) answerBinding(frame []byte) {
	reply, ok := c.deps.binding.answer(c.out[:0], frame, c.remote, c.local, c.at, true)
	if ok {
		c.writeOwn(reply)
		c.out = reply[:0]
	}
}

// writeOwn sends an answer stund made (Binding, front errors).
func (c *streamConn) writeOwn(b []byte) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_ = c.Conn.SetWriteDeadline(time.Now().Add(streamWriteTimeout))
	if _, err := c.Conn.Write(b); err != nil {
		c.deps.demux.sendErrors.Add(1)
	}
}

// streamWriteTimeout bounds a write to a client that stopped reading, so
// a stuck peer cannot hold the connection's writers forever.
const streamWriteTimeout = 10 * time.Second

// Write is pion's way out: its answers (signed for the client by the
// front), and relayed data toward the client.
func (c *streamConn) Write(b []byte) (int, error) {
	if c.raw.Load() { // an RFC 6062 data connection: the peer's bytes
		c.wmu.Lock()
		defer c.wmu.Unlock()
		_ = c.Conn.SetWriteDeadline(time.Now().Add(streamWriteTimeout))
		return c.Conn.Write(b)
	}
	n := len(b)
	out, resigned := c.deps.front.signResponse(&c.pass, b)
	if isConnectionBindAnswer(out) {
		ok := isTURNSuccess(out)
		if ok {
			c.raw.Store(true)
		}
		select {
		case c.bound <- ok:
		default:
		}
	}
	if isTURNSuccess(out) {
		c.authed.Store(true)
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_ = c.Conn.SetWriteDeadline(time.Now().Add(streamWriteTimeout))
	m, err := c.Conn.Write(out)
	if resigned && err == nil {
		m = n // what pion wrote
	}
	return m, err
}

// Close closes the connection and uncounts it from its source IP.
func (c *streamConn) Close() error {
	c.closeOnce.Do(func() {
		if c.acquired.Load() {
			c.deps.clients.remove(c.tuple(), c)
			c.deps.limits.conns.release(c.remote.Addr())
		}
	})
	return c.Conn.Close()
}

// isConnectionBind reports whether a STUN frame is a ConnectionBind
// request (RFC 6062 §6.1).
func isConnectionBind(b []byte) bool {
	return len(b) >= 2 && uint16(b[0])<<8|uint16(b[1]) == stunwire.MessageType(stunwire.MethodConnectionBind, stunwire.ClassRequest)
}

// isConnectionBindAnswer reports whether b answers a ConnectionBind.
func isConnectionBindAnswer(b []byte) bool {
	if len(b) < 2 || b[0]&0xC0 != 0 {
		return false
	}
	t := uint16(b[0])<<8 | uint16(b[1])
	return t == stunwire.MessageType(stunwire.MethodConnectionBind, stunwire.ClassSuccess) || t == stunwire.MessageType(stunwire.MethodConnectionBind, stunwire.ClassError)
}
