// Package relay is the client side of TURN (RFC 8656): it obtains a relayed
// transport address from a TURN server over UDP, TCP or TLS, hands it back as
// a net.PacketConn, and proves that the relay carries packets both ways
// (Prove).
//
// It is built on pion's turn.Client; what it adds is bounded timing (every
// step obeys the caller's context), a read loop that drops and counts junk
// instead of stopping, TURN REST credentials, and the end-to-end proof.
package relay

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pion/logging"
	"github.com/pion/stun/v4"
	"github.com/pion/transport/v5"
	"github.com/pion/transport/v5/stdnet"
	"github.com/pion/turn/v5"

	"github.com/stund/stund/internal/stunwire"
)

// Transports natprobe knows, in the order Prove tries them by default:
// UDP first (what media uses), then TCP and TLS for networks that block UDP
// (RFC 8656 §3.1 lists all three client-to-server transports).
const (
	UDP = "udp"
	TCP = "tcp"
	TLS = "tls"
)

// DefaultTransports is the fallback order of Prove when none is given.
var DefaultTransports = []string{UDP, TCP, TLS}

const (
	// DefaultPort is the TURN port for UDP and TCP (RFC 8656 §4).
	DefaultPort = 3478
	// DefaultTLSPort is the "turns" port for TLS (RFC 8656 §4).
	DefaultTLSPort = 5349

	// restCredentialLifetime is how long a credential derived from a TURN
	// REST shared secret stays valid. An hour covers the probe many times
	// over and a client clock that is some minutes behind the server's,
	// while a leaked credential is of little use for long.
	restCredentialLifetime = time.Hour

	// restUser is the user part of a TURN REST username ("expiry:user"),
	// so an operator can tell natprobe's allocations apart in the logs.
	restUser = "natprobe"

	// defaultSoftware is the SOFTWARE of our requests when Config names
	// none: every request should carry one (see softwareConn).
	defaultSoftware = "stund-relay"

	// maxDatagram bounds one read from the server. TURN messages fit in a
	// path MTU; 64 KiB takes even a jumbo-frame or TCP-framed message whole.
	maxDatagram = 64 * 1024
)

// ErrAuth means the TURN server refused the credentials (RFC 8656 §7.2:
// 401 after an authenticated Allocate, or 441 Wrong Credentials).
var ErrAuth = errors.New("TURN server refused the credentials")

// Config says which TURN server to use and how to reach it.
type Config struct {
	// Server is host[:port] for UDP and TCP; the port defaults to 3478.
	Server string
	// TLSServer is host[:port] for TLS; empty means Server's host on 5349.
	TLSServer string
	// Transport is "udp" (default), "tcp" or "tls": how the client reaches
	// the server. The relayed address itself is always UDP.
	Transport string

	// Username and Password are long-term credentials (RFC 8489 §9.2).
	Username, Password string
	// Secret is a TURN REST shared secret (draft-uberti-behave-turn-rest):
	// when set, Username and Password are derived from it.
	Secret string

	// TLSConfig is used for "tls"; nil verifies the server against the
	// system roots with the host name from TLSServer/Server.
	TLSConfig *tls.Config
	// Software goes into the SOFTWARE attribute (RFC 8489 §14.14) of every
	// request we send before authenticating; empty means "stund-relay".
	// It also makes the first Allocate big enough for a 401 with a long
	// realm from a server with an amplification budget (see softwareConn).
	Software string
	// Net is the network to use; nil is the host's network. Tests pass a
	// pion vnet.
	Net transport.Net
	// AttemptTimeout bounds, in Prove, each transport's connect and
	// Allocate; 0 means DefaultAttemptTimeout. (Dial obeys its ctx only.)
	AttemptTimeout time.Duration
	// LoggerFactory receives pion's client logs; nil discards them.
	LoggerFactory logging.LoggerFactory
}

// Relay is one allocation on a TURN server.
type Relay struct {
	transport string
	server    netip.AddrPort
	base      net.PacketConn // UDP socket, or a STUNConn over TCP/TLS
	client    *turn.Client
	relayed   net.PacketConn
	relayAddr netip.AddrPort

	dropped   atomic.Uint64
	closeOnce sync.Once
	loopDone  chan struct{}
}

// credentials returns the username and password to use.
func (c *Config) credentials() (string, string, error) {
	if c.Secret == "" {
		return c.Username, c.Password, nil
	}
	user := restUser
	if c.Username != "" {
		user = c.Username
	}

	return turn.GenerateLongTermTURNRESTCredentials(c.Secret, user, restCredentialLifetime)
}

// address returns the server address for the transport, with its default
// port filled in.
func (c *Config) address(transport string) (string, error) {
	hostport, port := c.Server, DefaultPort
	if transport == TLS {
		port = DefaultTLSPort
		if c.TLSServer != "" {
			hostport = c.TLSServer
		} else if host, _, err := net.SplitHostPort(c.Server); err == nil {
			hostport = host // Server's port is its UDP/TCP port, not the TLS one.
		}
	}
	if hostport == "" {
		return "", errors.New("relay: no server address")
	}

	return withDefaultPort(hostport, port)
}

// withDefaultPort accepts host, host:port, [v6] and [v6]:port.
func withDefaultPort(hostport string, port int) (string, error) {
	if host, p, err := net.SplitHostPort(hostport); err == nil {
		if n, err := strconv.Atoi(p); err != nil || n <= 0 || n > 65535 {
			return "", fmt.Errorf("relay: bad port in %q", hostport)
		}

		return net.JoinHostPort(host, p), nil
	}
	host := hostport
	if len(host) > 1 && host[0] == '[' && host[len(host)-1] == ']' {
		host = host[1 : len(host)-1]
	}

	return net.JoinHostPort(host, strconv.Itoa(port)), nil
}

// Dial connects to the TURN server over cfg.Transport and allocates a UDP
// relayed address (RFC 8656 §7). Every step is bounded by ctx.
func Dial(ctx context.Context, cfg Config) (*Relay, error) {
	transportName := cfg.Transport
	if transportName == "" {
		transportName = UDP
	}
	addr, err := cfg.address(transportName)
	if err != nil {
		return nil, err
	}
	user, pass, err := cfg.credentials()
	if err != nil {
		return nil, fmt.Errorf("relay: deriving REST credentials: %w", err)
	}
	if user == "" {
		return nil, errors.New("relay: no TURN credentials (username/password or shared secret)")
	}
	n := cfg.Net
	if n == nil {
		if n, err = stdnet.NewNet(); err != nil {
			return nil, err
		}
	}
	logf := cfg.LoggerFactory
	if logf == nil {
		logf = discardLogger{}
	}

	base, server, err := dialBase(ctx, n, transportName, addr, cfg.TLSConfig)
	if err != nil {
		return nil, err
	}
	sw := cfg.Software
	if sw == "" {
		sw = defaultSoftware
	}
	base = &softwareConn{PacketConn: base, sw: stun.NewSoftware(sw)}
	r := &Relay{transport: transportName, server: server, base: base, loopDone: make(chan struct{})}

	r.client, err = turn.NewClient(&turn.ClientConfig{
		STUNServerAddr: server.String(),
		TURNServerAddr: server.String(),
		Username:       user,
		Password:       pass,
		Software:       cfg.Software,
		Conn:           base,
		Net:            n,
		LoggerFactory:  logf,
	})
	if err != nil {
		_ = base.Close()

		return nil, err
	}
	go r.readLoop()

	// Closing the base socket ends every pending transaction, so a server
	// that never answers cannot hold us past ctx.
	stop := context.AfterFunc(ctx, func() { _ = r.base.Close() })
	relayed, err := r.client.AllocateWithContext(ctx)
	stop()
	if err == nil && ctx.Err() != nil {
		err = ctx.Err()
	}
	if err != nil {
		r.Close()

		return nil, explain(ctx, stepAllocate, err)
	}
	r.relayed = relayed
	ra, ok := relayed.LocalAddr().(*net.UDPAddr)
	if !ok {
		r.Close()

		return nil, fmt.Errorf("relay: unexpected relayed address %v", relayed.LocalAddr())
	}
	r.relayAddr = stunwire.Unmap(ra.AddrPort())

	return r, nil
}

// dialBase opens the socket the TURN client speaks on.
func dialBase(ctx context.Context, n transport.Net, transportName, addr string, tlsCfg *tls.Config) (net.PacketConn, netip.AddrPort, error) {
	switch transportName {
	case UDP:
		ua, err := n.ResolveUDPAddr("udp", addr)
		if err != nil {
			return nil, netip.AddrPort{}, fmt.Errorf("relay: resolving %s: %w", addr, err)
		}
		network, local := "udp4", "0.0.0.0:0"
		if ua.IP.To4() == nil {
			network, local = "udp6", "[::]:0"
		}
		pc, err := n.ListenPacket(network, local)
		if err != nil {
			return nil, netip.AddrPort{}, err
		}

		return pc, stunwire.Unmap(ua.AddrPort()), nil
	case TCP, TLS:
		d := &net.Dialer{}
		if dl, ok := ctx.Deadline(); ok {
			d.Deadline = dl
		}
		conn, err := n.CreateDialer(d).Dial("tcp", addr)
		if err != nil {
			return nil, netip.AddrPort{}, fmt.Errorf("relay: connecting to %s over %s: %w", addr, transportName, err)
		}
		if transportName == TLS {
			cfg := &tls.Config{MinVersion: tls.VersionTLS12}
			if tlsCfg != nil {
				cfg = tlsCfg.Clone()
			}
			if cfg.ServerName == "" && !cfg.InsecureSkipVerify {
				host, _, _ := net.SplitHostPort(addr)
				cfg.ServerName = host
			}
			tc := tls.Client(conn, cfg)
			if err := tc.HandshakeContext(ctx); err != nil {
				_ = conn.Close()

				return nil, netip.AddrPort{}, fmt.Errorf("relay: TLS handshake with %s: %w", addr, err)
			}
			conn = tc
		}
		ta, ok := conn.RemoteAddr().(*net.TCPAddr)
		if !ok {
			// A vnet or TLS wrapper may hide the type; fall back to the text.
			ap, err := netip.ParseAddrPort(conn.RemoteAddr().String())
			if err != nil {
				_ = conn.Close()

				return nil, netip.AddrPort{}, fmt.Errorf("relay: server address %v: %w", conn.RemoteAddr(), err)
			}

			return turn.NewSTUNConn(conn), ap, nil
		}

		// RFC 8656 §12.5: over TCP/TLS STUN and ChannelData are framed
		// back to back; STUNConn splits the stream into messages.
		return turn.NewSTUNConn(conn), stunwire.Unmap(ta.AddrPort()), nil
	default:
		return nil, netip.AddrPort{}, fmt.Errorf("relay: unknown transport %q (want udp, tcp or tls)", transportName)
	}
}

// softwareConn adds SOFTWARE (RFC 8489 §14.14: a client SHOULD include it)
// to each STUN request that goes out without MESSAGE-INTEGRITY and without
// SOFTWARE. pion's turn.Client puts its Software only on Binding requests,
// so its first, unauthenticated Allocate is a bare 36 bytes; a server that
// answers unauthenticated UDP requests with at most twice their size (as
// stund does so that it cannot amplify traffic reflected at a spoofed
// source) then drops the 401 whenever the realm is longer than about 28
// bytes, and the relay never starts. With natprobe's SOFTWARE (~30 bytes)
// the request is about 72 bytes and a 401 with a realm of up to ~60 bytes
// fits. Requests with MESSAGE-INTEGRITY are left alone: an attribute
// inserted before it would break the integrity check, and their answers are
// authenticated anyway.
type softwareConn struct {
	net.PacketConn
	sw stun.Software
}

// WriteTo sends p, with SOFTWARE added when it is such a request. It
// reports len(p) written on success, as the caller expects.
func (c *softwareConn) WriteTo(p []byte, addr net.Addr) (int, error) {
	q, ok := withSoftware(p, c.sw)
	if !ok {
		return c.PacketConn.WriteTo(p, addr)
	}
	if _, err := c.PacketConn.WriteTo(q, addr); err != nil {
		return 0, err
	}

	return len(p), nil
}

// withSoftware returns p re-encoded with sw before its FINGERPRINT (which
// is recomputed), or false when p is not a request that needs it.
func withSoftware(p []byte, sw stun.Software) ([]byte, bool) {
	if len(sw) == 0 || !stun.IsMessage(p) {
		return nil, false
	}
	m := &stun.Message{Raw: append([]byte(nil), p...)}
	if m.Decode() != nil || m.Type.Class != stun.ClassRequest ||
		m.Contains(stun.AttrMessageIntegrity) || m.Contains(stun.AttrMessageIntegritySHA256) ||
		m.Contains(stun.AttrSoftware) {
		return nil, false
	}
	out := stun.New()
	out.Type, out.TransactionID = m.Type, m.TransactionID
	out.WriteHeader()
	fingerprint := false
	for _, a := range m.Attributes {
		if a.Type == stun.AttrFingerprint {
			fingerprint = true // must stay last (RFC 8489 §14.7)

			continue
		}
		out.Add(a.Type, a.Value)
	}
	if sw.AddTo(out) != nil {
		return nil, false // over the attribute's limit: send p as it is
	}
	if fingerprint && stun.Fingerprint.AddTo(out) != nil {
		return nil, false
	}

	return out.Raw, true
}

// readLoop feeds everything the server sends into the TURN client. Unlike
// turn.Client.Listen it does not stop on a malformed message: the message is
// dropped and counted. It ends when the base socket is closed.
func (r *Relay) readLoop() {
	defer close(r.loopDone)
	buf := make([]byte, maxDatagram)
	for {
		n, from, err := r.base.ReadFrom(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}

			return
		}
		handled, err := r.client.HandleInbound(buf[:n], from)
		if err != nil || !handled {
			r.dropped.Add(1)
		}
	}
}

// PacketConn is the relayed socket: WriteTo sends through the server to a
// peer (installing a permission on first use, RFC 8656 §9), ReadFrom returns
// what peers sent to the relayed address.
func (r *Relay) PacketConn() net.PacketConn { return r.relayed }

// RelayedAddr is the XOR-RELAYED-ADDRESS the server allocated.
func (r *Relay) RelayedAddr() netip.AddrPort { return r.relayAddr }

// Server is the address of the TURN server this relay talks to.
func (r *Relay) Server() netip.AddrPort { return r.server }

// Transport is how this relay reaches its server: udp, tcp or tls.
func (r *Relay) Transport() string { return r.transport }

// Dropped counts messages from the server that were malformed or not for
// the TURN client.
func (r *Relay) Dropped() uint64 { return r.dropped.Load() }

// Permit installs permissions for peers (RFC 8656 §9: by IP address; the
// port is ignored), so that their packets to the relayed address are let
// through. Bounded by ctx.
func (r *Relay) Permit(ctx context.Context, peers ...netip.AddrPort) error {
	addrs := make([]net.Addr, 0, len(peers))
	for _, p := range peers {
		addrs = append(addrs, net.UDPAddrFromAddrPort(p))
	}
	stop := context.AfterFunc(ctx, r.Close)
	defer stop()
	if err := r.client.CreatePermission(addrs...); err != nil {
		return explain(ctx, "create permission", err)
	}

	return nil
}

// Close releases the allocation (a Refresh with lifetime 0, RFC 8656 §7.2,
// sent without waiting) and the socket. It is safe to call more than once.
func (r *Relay) Close() {
	r.closeOnce.Do(func() {
		if r.relayed != nil {
			_ = r.relayed.Close()
		}
		r.client.Close()
		_ = r.base.Close()
		<-r.loopDone
	})
}

// stepAllocate names the Allocate step in errors.
const stepAllocate = "allocate"

// explain turns pion's errors into ones that say what happened.
func explain(ctx context.Context, step string, err error) error {
	var te *stun.TurnError
	if errors.As(err, &te) {
		r := &RefusedError{Step: step, Code: int(te.ErrorCodeAttr.Code), Reason: codeText(te.ErrorCodeAttr)}
		switch te.ErrorCodeAttr.Code {
		case stun.CodeUnauthorized, stun.CodeWrongCredentials:
			r.auth = true
		case stun.CodeBadRequest:
			// Our Allocate is well-formed (pion builds it), so a 400 to
			// it after the 401 challenge is how pion-based servers refuse
			// credentials, instead of RFC 8489 §9.2.4's 401.
			r.auth = step == stepAllocate
		}

		return r
	}
	if ctx.Err() != nil {
		return fmt.Errorf("relay: %s: no answer from the TURN server in time: %w", step, ctx.Err())
	}

	return fmt.Errorf("relay: %s: %w", step, err)
}

// RefusedError is the TURN server's own error response to one of our
// requests. errors.Is(err, ErrAuth) holds when it refused the credentials.
type RefusedError struct {
	Step   string // what we asked: "allocate", "create permission"
	Code   int    // the ERROR-CODE (RFC 8489 §14.8)
	Reason string // "401 Unauthorized"
	auth   bool
}

func (e *RefusedError) Error() string {
	if e.auth {
		return fmt.Sprintf("relay: %s: %v: the server answered %s (wrong username/password, or an expired or wrong REST secret)", e.Step, ErrAuth, e.Reason)
	}

	return fmt.Sprintf("relay: %s: the server answered %s", e.Step, e.Reason)
}

// Is makes errors.Is(err, ErrAuth) work.
func (e *RefusedError) Is(target error) bool { return e.auth && target == ErrAuth }

// codeNames are the RFC 8489 §14.8 and RFC 8656 §19 reason phrases, for
// servers that send a code with an empty phrase.
var codeNames = map[stun.ErrorCode]string{
	400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
	437: "Allocation Mismatch", 438: "Stale Nonce", 440: "Address Family not Supported",
	441: "Wrong Credentials", 442: "Unsupported Transport Protocol",
	443: "Peer Address Family Mismatch", 486: "Allocation Quota Reached",
	500: "Server Error", 508: "Insufficient Capacity",
}

func codeText(e stun.ErrorCodeAttribute) string {
	reason := string(e.Reason)
	if reason == "" {
		reason = codeNames[e.Code]
	}

	return strings.TrimSpace(strconv.Itoa(int(e.Code)) + " " + reason)
}

// discardLogger keeps pion quiet: natprobe reports errors itself.
type discardLogger struct{}

func (discardLogger) NewLogger(string) logging.LeveledLogger { return discardLeveled{} }

type discardLeveled struct{}

func (discardLeveled) Trace(string)          {}
func (discardLeveled) Tracef(string, ...any) {}
func (discardLeveled) Debug(string)          {}
func (discardLeveled) Debugf(string, ...any) {}
func (discardLeveled) Info(string)           {}
func (discardLeveled) Infof(string, ...any)  {}
func (discardLeveled) Warn(string)           {}
func (discardLeveled) Warnf(string, ...any)  {}
func (discardLeveled) Error(string)          {}
func (discardLeveled) Errorf(string, ...any) {}
