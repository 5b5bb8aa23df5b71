package sipmirror

import (
	"crypto/tls"
	"errors"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/stund/stund/internal/sipmsg"
)

// accept serves one stream listener until it is closed.
func (m *Mirror) accept(ln net.Listener) {
	l := ln.(*listener)
	for {
		c, err := l.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// EMFILE and the like: say so, and back off a little rather
			// than spin.
			m.log.Warn("SIP mirror: accept failed", "listener", l.Addr().String(), "error", err)
			time.Sleep(10 * time.Millisecond)
			continue
		}
		src := c.RemoteAddr().(*net.TCPAddr).AddrPort()
		src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
		if !m.admit(c, src.Addr()) {
			m.stats.drop(DropConnLimit)
			_ = c.Close()
			continue
		}
		m.wg.Add(1)
		go func() {
			defer m.wg.Done()
			defer m.release(c, src.Addr())
			if l.transport == "tls" {
				c = tls.Server(c, m.cfg.TLSConfig)
			}
			m.serveConn(c, src, l.transport, l.port)
		}()
	}
}

// admit counts a new connection against the per-IP and total bounds.
func (m *Mirror) admit(c net.Conn, ip netip.Addr) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closing || len(m.conns) >= maxConns || m.perIP[ip] >= m.cfg.MaxConnsPerIP {
		return false
	}
	m.perIP[ip]++
	m.conns[c] = struct{}{}
	return true
}

func (m *Mirror) release(c net.Conn, ip netip.Addr) {
	_ = c.Close()
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.conns, c)
	if m.perIP[ip]--; m.perIP[ip] <= 0 {
		delete(m.perIP, ip)
	}
}

// serveConn answers up to maxMsgsPerConn messages, each of which must
// arrive whole within msgTimeout (RFC 3261 §18.3 framing by Content-Length).
func (m *Mirror) serveConn(c net.Conn, src netip.AddrPort, transport, port string) {
	local := c.LocalAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
	buf := make([]byte, 0, sipmsg.MaxHeader+sipmsg.MaxBody)
	var out []byte
	for n := 0; ; n++ {
		if n == maxMsgsPerConn {
			m.stats.drop(DropConnMsgs)
			return
		}
		_ = c.SetDeadline(time.Now().Add(msgTimeout))
		msgLen, ok := m.readMessage(c, &buf, transport)
		if !ok {
			return
		}
		ans, ok := m.handle(out[:0], buf[:msgLen], src, local, transport, port)
		if !ok {
			return // a stream that sent garbage is not worth keeping
		}
		out = ans
		if _, err := c.Write(ans); err != nil {
			return
		}
		buf = buf[:copy(buf, buf[msgLen:])]
	}
}

// readMessage reads until buf starts with one whole message and returns its
// length; false when the connection ended, timed out or sent too much.
func (m *Mirror) readMessage(c net.Conn, buf *[]byte, transport string) (int, bool) {
	for {
		if len(*buf) > 0 {
			msg, err := sipmsg.Parse(*buf, true)
			switch {
			case err == nil:
				return msg.Len, true
			case !errors.Is(err, sipmsg.ErrShort):
				// Counted as a request so that drops never exceed requests.
				m.stats.inc(m.stats.requests, transport)
				m.stats.drop(dropReason(err))
				return 0, false
			}
		}
		b := *buf
		if len(b) == cap(b) {
			m.stats.inc(m.stats.requests, transport)
			m.stats.drop(DropTooLarge)
			return 0, false
		}
		k, err := c.Read(b[len(b):cap(b)])
		*buf = b[:len(b)+k]
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				m.stats.drop(DropTimeout)
			}
			if k == 0 {
				return 0, false
			}
		}
	}
}
