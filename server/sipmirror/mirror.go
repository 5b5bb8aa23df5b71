// Package sipmirror answers SIP requests with what arrived, so that natprobe
// can see what a SIP ALG between it and stund changed (docs/design.md).
//
// It listens for SIP on UDP and TCP (and TLS when configured) on the SIP
// port, where ALGs look, and on a control port, where none does, on each
// of the server's IPs. Each well-formed request gets a 200 OK built per
// RFC 3261 §8.2.6 with RFC 3581 received=/rport= of the real source, and a
// body (internal/sipmsg.Report) holding the observed source and the request
// exactly as received, encoded so that an ALG on the way back cannot
// rewrite them. A media echo announced in that body's SDP returns RTP and
// RTCP to sources that did a SIP exchange, stamped with receive count and
// RFC 3550 jitter, for natprobe's call test.
//
// Safety on the open internet, since anyone can send it a datagram with a
// forged source:
//   - an answer goes only to the packet's (or connection's) source, never
//     to an address named in a header (RFC 3581 §4 symmetric response,
//     which this mirror applies whether or not the request asked for it);
//   - over UDP an answer is never larger than the request; a request whose
//     answer would be larger is dropped and counted (the prober pads its
//     requests, see sipmsg.Report.SDP for why the body compresses);
//   - every answer takes a token from Config.Allow, the per-source-IP
//     budget stund shares between STUN and SIP;
//   - malformed and non-SIP input is dropped and counted, never answered;
//   - TCP/TLS connections are bounded per source IP and in total, each
//     message must arrive within msgTimeout and fit the sipmsg limits, and
//     a connection carries at most maxMsgsPerConn messages.
package sipmirror

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"time"
)

// Default ports.
const (
	// DefaultSIPPort is SIP's registered port (RFC 3261 §19.1.2), the one
	// ALGs watch.
	DefaultSIPPort = 5060
	// DefaultTLSPort is SIP over TLS (RFC 3261 §26.2.1), which no ALG can
	// read.
	DefaultTLSPort = 5061
	// DefaultControlPort is where no ALG looks: the same answers as on the
	// SIP port, so that a difference between the two is the ALG's doing.
	DefaultControlPort = 5062
	// DefaultMediaPort is the media echo's RTP port (even, RFC 3550 §11),
	// RTCP on the next one; outside the 5060-5062 block so that an ALG's
	// port range rules do not cover it.
	DefaultMediaPort = 5064
)

// Limits. Each says why its value.
const (
	// msgTimeout bounds the wait for one whole message on a stream
	// (TLS handshake included): a real client sends an INVITE in one go;
	// 10 s covers a slow mobile link and stops a slowloris from holding
	// a goroutine longer.
	msgTimeout = 10 * time.Second
	// maxMsgsPerConn bounds what one connection can ask: natprobe sends
	// one request per connection, 16 leaves room for other testers.
	maxMsgsPerConn = 16
	// defaultMaxConnsPerIP bounds one source IP's open connections. One
	// ALG test opens up to 36 (waves of six per port), and a connection
	// whose INVITE an ALG swallowed stays open here until msgTimeout: 64
	// lets testers behind one NAT run back to back, and holds at most
	// 64 x 16 KiB of buffers per IP.
	defaultMaxConnsPerIP = 64
	// maxConns bounds open connections in total: each holds a goroutine
	// and at most sipmsg.MaxHeader+MaxBody bytes of buffer.
	maxConns = 512
	// udpBuf is the read buffer: a SIP datagram over UDP beyond the path
	// MTU is fragmented, 64 KiB catches any datagram whole.
	udpBuf = 64 << 10
)

// Config is one mirror.
type Config struct {
	// IPs to bind, primary first. Never the wildcard: answers must leave
	// from the address the request went to.
	IPs []netip.Addr
	// Advertise maps a bound IP to the public address that the SDP of the
	// answers announces, behind a cloud 1:1 NAT (as server.Config).
	Advertise map[netip.Addr]netip.Addr
	// Ports; 0 picks a free port (tests), the same on every IP.
	SIPPort, ControlPort, TLSPort, MediaPort int
	// NoMedia turns the media echo off.
	NoMedia bool
	// TLSConfig turns on SIP over TLS on TLSPort.
	TLSConfig *tls.Config
	// Allow takes a token from the source IP's unauthenticated-answer
	// budget; false drops the request (counted). stund passes
	// (*server.Server).AllowUnauth so SIP and STUN share one budget. nil
	// allows everything (tests only).
	Allow func(netip.Addr) bool
	// MaxConnsPerIP bounds concurrent TCP/TLS connections per source IP;
	// 0 means defaultMaxConnsPerIP.
	MaxConnsPerIP int
	// Logger; nil discards.
	Logger *slog.Logger
}

// Mirror is a running SIP mirror.
type Mirror struct {
	cfg   Config
	log   *slog.Logger
	stats counters

	udp   []*net.UDPConn
	lns   []net.Listener
	media *echo

	ports Ports

	mu      sync.Mutex
	perIP   map[netip.Addr]int
	conns   map[net.Conn]struct{}
	closing bool

	wg sync.WaitGroup
}

// Ports are the bound ports (the same on every IP).
type Ports struct {
	SIP, Control, TLS, Media int // TLS and Media 0 when off
}

// New binds every socket or none and starts serving.
func New(cfg Config) (*Mirror, error) {
	if len(cfg.IPs) == 0 {
		return nil, errors.New("sipmirror: IPs: at least one address to bind")
	}
	for _, ip := range cfg.IPs {
		if !ip.IsValid() || ip.IsUnspecified() {
			return nil, fmt.Errorf("sipmirror: IPs: %v is not a bindable address (never the wildcard)", ip)
		}
	}
	if cfg.MaxConnsPerIP <= 0 {
		cfg.MaxConnsPerIP = defaultMaxConnsPerIP
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	m := &Mirror{cfg: cfg, log: cfg.Logger, perIP: map[netip.Addr]int{}, conns: map[net.Conn]struct{}{}}
	m.stats.init()
	for try := 1; ; try++ {
		err := m.bind()
		if err == nil {
			break
		}
		m.closeAll()
		// A free port picked for UDP may be taken for TCP (or the next
		// IP) by then: pick again, a bounded number of times.
		if !m.pickedFree() || !errors.Is(err, syscall.EADDRINUSE) || try == bindTries {
			return nil, err
		}
		m.udp, m.lns, m.media, m.closing = nil, nil, nil, false
	}
	for i, c := range m.udp {
		m.wg.Add(1)
		go func() { defer m.wg.Done(); m.serveUDP(c, m.udpPortName(i)) }()
	}
	for _, ln := range m.lns {
		m.wg.Add(1)
		go func() { defer m.wg.Done(); m.accept(ln) }()
	}
	if m.media != nil {
		m.media.start(&m.wg)
	}
	m.log.Info("SIP mirror listening", "ips", cfg.IPs, "sip", m.ports.SIP, "control", m.ports.Control,
		"tls", m.ports.TLS, "media", m.ports.Media)
	return m, nil
}

// bindTries bounds New's attempts when it picks free ports.
const bindTries = 8

// pickedFree says whether some port is 0 in the Config (tests).
func (m *Mirror) pickedFree() bool {
	c := m.cfg
	return c.SIPPort == 0 || c.ControlPort == 0 || (c.TLSConfig != nil && c.TLSPort == 0) || (!c.NoMedia && c.MediaPort == 0)
}

// udpPortName: the UDP sockets are bound SIP, control for each IP in turn.
func (m *Mirror) udpPortName(i int) string {
	if i%2 == 0 {
		return portSIP
	}
	return portControl
}

// Port names in the reports and the counters.
const (
	portSIP     = "sip"
	portControl = "control"
)

// listener tags a stream listener with its transport and port name.
type listener struct {
	net.Listener
	transport, port string
}

func (m *Mirror) bind() error {
	want := []*int{&m.ports.SIP, &m.ports.Control}
	m.ports.SIP, m.ports.Control = m.cfg.SIPPort, m.cfg.ControlPort
	if m.cfg.TLSConfig != nil {
		m.ports.TLS = m.cfg.TLSPort
		want = append(want, &m.ports.TLS)
	}
	for _, ip := range m.cfg.IPs {
		for i, p := range want {
			tlsPort := i == 2
			if !tlsPort {
				// UDP first, then TCP on the port UDP got.
				u, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(ip, uint16(*p))))
				if err != nil {
					return fmt.Errorf("sipmirror: udp %s: %w", netip.AddrPortFrom(ip, uint16(*p)), err)
				}
				m.udp = append(m.udp, u)
				*p = u.LocalAddr().(*net.UDPAddr).Port
			}
			ln, err := net.Listen("tcp", netip.AddrPortFrom(ip, uint16(*p)).String())
			if err != nil {
				return fmt.Errorf("sipmirror: tcp %s: %w", netip.AddrPortFrom(ip, uint16(*p)), err)
			}
			*p = ln.Addr().(*net.TCPAddr).Port
			l := &listener{Listener: ln, transport: "tcp", port: portSIP}
			switch {
			case tlsPort:
				l.transport = "tls"
			case i == 1:
				l.port = portControl
			}
			m.lns = append(m.lns, l)
		}
	}
	if m.cfg.NoMedia {
		return nil
	}
	e, err := newEcho(m, m.cfg.IPs[0], m.cfg.MediaPort)
	if err != nil {
		return err
	}
	m.media = e
	m.ports.Media = e.port
	return nil
}

// Ports returns the bound ports.
func (m *Mirror) Ports() Ports { return m.ports }

// Close stops every listener and connection and waits for the goroutines.
func (m *Mirror) Close() error {
	m.closeAll()
	m.wg.Wait()
	return nil
}

func (m *Mirror) closeAll() {
	m.mu.Lock()
	m.closing = true
	for c := range m.conns {
		_ = c.Close()
	}
	m.mu.Unlock()
	for _, c := range m.udp {
		_ = c.Close()
	}
	for _, l := range m.lns {
		_ = l.Close()
	}
	if m.media != nil {
		m.media.close()
	}
}

// advertised is the address the SDP announces for a bound IP.
func (m *Mirror) advertised(ip netip.Addr) netip.Addr {
	if a, ok := m.cfg.Advertise[ip]; ok {
		return a
	}
	return ip
}

// allow applies the shared per-IP budget.
func (m *Mirror) allow(src netip.Addr) bool {
	return m.cfg.Allow == nil || m.cfg.Allow(src)
}

func (m *Mirror) serveUDP(c *net.UDPConn, port string) {
	buf := make([]byte, udpBuf)
	out := make([]byte, 0, udpBuf)
	local := c.LocalAddr().(*net.UDPAddr).AddrPort()
	for {
		n, src, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue // ICMP errors surface here on some systems: not fatal
		}
		src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
		ans, ok := m.handle(out[:0], buf[:n], src, local.Addr().Unmap(), "udp", port)
		if !ok {
			continue
		}
		// Only ever to the datagram's source (RFC 3581 §4).
		if _, err := c.WriteToUDPAddrPort(ans, src); err != nil {
			m.stats.drop("send-failed")
		}
	}
}
