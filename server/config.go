package server

import (
	"crypto/tls"
	"fmt"
	"github.com/stund/stund/server/offload"
	"io"
	"log/slog"
	"net/netip"
	"time"

	"github.com/pion/logging"
	"github.com/pion/transport/v5"
)

// Defaults. Each is what an operator of a public STUN/TURN service expects
// when the setting is left out.
const (
	// DefaultPort is the IANA "stun"/"turn" port (RFC 8489 §9, RFC 8656 §4).
	DefaultPort = 3478
	// DefaultAltPort is the conventional RFC 5780 alternate port (what
	// coturn and the classic stun servers use: primary + 1).
	DefaultAltPort = 3479
	// DefaultTLSPort is the IANA "stuns"/"turns" port (RFC 8489 §9).
	DefaultTLSPort = 5349
	// DefaultRelayPortMin and DefaultRelayPortMax are the IANA dynamic port
	// range (RFC 6335 §6), which RFC 8656 §6.2 suggests for relayed
	// transport addresses.
	DefaultRelayPortMin = 49152
	DefaultRelayPortMax = 65535
	// DefaultUserQuota bounds allocations per user: a WebRTC client needs
	// one or two per call, so ten leaves room for several tabs while
	// stopping a leaked credential from exhausting the relay ports.
	DefaultUserQuota = 10
	// DefaultTotalQuota bounds all allocations; each holds a socket and a
	// few KiB, and the relay range holds 16384 ports.
	DefaultTotalQuota = 10000
	// MaxAllocationLifetime is the RFC 8656 §7.2 recommended upper bound
	// (3600 s) that the server imposes on a requested LIFETIME.
	MaxAllocationLifetime = time.Hour
	// DefaultRealm is the realm of the embedded default configuration.
	DefaultRealm = "stund.local"
)

// Config is everything stund needs to run. cmd/stund fills it from flags,
// environment and YAML; tests fill it directly. The zero value of each
// optional field means the documented default.
type Config struct {
	// PrimaryIP and AlternateIP are bound explicitly (never the wildcard)
	// so every reply leaves from the address it claims (RFC 5780 §3).
	// AlternateIP invalid means single-IP mode: no OTHER-ADDRESS, and
	// CHANGE-REQUEST asking to change the IP gets 420 (RFC 5780 §6).
	PrimaryIP   netip.Addr
	AlternateIP netip.Addr

	// Port and AltPort are the two UDP ports of the RFC 5780 grid; TCP
	// listens on Port. 0 means "pick free ports" (tests).
	Port    int
	AltPort int

	// TLSPort is where TURN/STUN over TLS listens when TLSConfig is set.
	// 0 with TLSConfig set means "pick a free port" (tests).
	TLSPort   int
	TLSConfig *tls.Config

	// DisableTCP turns off the TCP listeners (UDP-only deployments).
	DisableTCP bool

	// Advertise maps a private address of this host to the public address
	// a cloud 1:1 NAT gives it. OTHER-ADDRESS, RESPONSE-ORIGIN and relayed
	// addresses carry the public forms.
	Advertise map[netip.Addr]netip.Addr

	// Realm and credentials for TURN long-term authentication
	// (RFC 8489 §9.2). Users maps name to password; AuthSecrets are TURN
	// REST API shared secrets, up to four, any of which verifies
	// (rotation).
	Realm       string
	Users       map[string]string
	AuthSecrets []string

	// RelayPortMin..RelayPortMax (inclusive) is where relayed transport
	// addresses are allocated (RFC 8656 §6.2).
	RelayPortMin, RelayPortMax uint16

	// AllowPeers opens peer ranges the default policy refuses (test rigs,
	// private deployments); DenyPeers refuses more.
	AllowPeers, DenyPeers []netip.Prefix

	// ProtectedListeners are the process's other listeners (cmd/stund:
	// the --metrics admin listener, which serves pprof too) as bound. Like
	// the server's own STUN/TURN/TLS sockets, their ports are never a
	// relay destination on any address of the host, whatever AllowPeers
	// says (RFC 8656 §17). Taken at New; Reload keeps the ones of New.
	ProtectedListeners []netip.AddrPort

	// UserQuota and TotalQuota bound allocations (486 when reached,
	// RFC 8656 §7.2). Negative means unlimited.
	UserQuota, TotalQuota int

	// UnauthRate is how many unauthenticated responses (UDP Binding
	// replies, TURN 401 challenges) one source IP, or IPv6 /64, gets per
	// second, with a burst of four seconds' worth (ratelimit.go). Beyond
	// it the request is dropped unanswered and counted. 0 means
	// DefaultUnauthRate; negative means unlimited.
	UnauthRate float64
	// AllocRate is how many Allocates one user may make per second (486
	// beyond, like the quota). 0 means DefaultAllocRate; negative means
	// unlimited.
	AllocRate float64
	// MaxBPS caps each user's relayed UDP traffic, in bits per second in
	// each direction, summed over all the user's allocations; datagrams
	// over it are dropped and counted (bandwidth.go). 0 means no cap.
	MaxBPS int64
	// Offload relays the ChannelData of UDP allocations in the kernel
	// (--offload): ModeAuto when the kernel and privileges allow, ModeEBPF
	// or fail, ModeOff (the zero value) never.
	Offload offload.Mode
	// DisableIOURing sends relayed datagrams one system call per relay
	// socket (sendmmsg) even where io_uring could send a batch for many
	// relay sockets at once (--io-uring off): for operators who keep
	// io_uring off their hosts.
	DisableIOURing bool

	// AlternateServers are named, round robin, in 300 Try Alternate
	// answers to new Allocates while the node drains or is full (RFC 8489
	// §10, RFC 8656 §7.2): --alternate-server.
	AlternateServers []netip.AddrPort
	// UsageLog receives one JSON line per ended allocation (--usage-log);
	// nil: usage records go to the log only.
	UsageLog io.Writer
	// ProxyProtocolFrom lists the sources allowed to send a PROXY protocol
	// (v1 or v2) header on the TCP and TLS listeners
	// (--proxy-protocol-from). From them a header is required; from others
	// it is never honoured.
	ProxyProtocolFrom []netip.Prefix

	// MaxConnsPerIP bounds concurrent TCP/TLS connections from one source
	// IP, or IPv6 /64; more are closed at accept. 0 means
	// DefaultMaxConnsPerIP; negative means unlimited.
	MaxConnsPerIP int
	// abuse: tests only, a fake clock for the rate limits and short
	// stream timeouts; nil means the real ones.
	abuse *abuseHooks

	// RFC5780Lean answers a Binding request with OTHER-ADDRESS and
	// RESPONSE-ORIGIN only when it uses an RFC 5780 feature
	// (CHANGE-REQUEST, RESPONSE-PORT, PADDING), and only within twice its
	// size. Off by default: with an alternate IP every Binding request
	// gets the RFC 5780 answer (RFC 5780 §6), because NAT-discovery
	// clients (coturn's natdiscovery, pion's stun-nat-behaviour,
	// NatTypeTester, stuntman) send a bare request first and need
	// OTHER-ADDRESS in its answer. That answer costs 56 bytes for a bare
	// 20-byte request over IPv4 (2.8x), 92 over IPv6 (4.6x); lean mode
	// keeps every answer within 2x, except the IPv6 mapped address alone
	// (44 bytes for 20). server/binding states the rule.
	RFC5780Lean bool

	// Software, when set, is sent in the SOFTWARE attribute. Empty by
	// default: it tells an attacker the version for free.
	Software string

	// Net is the network stack: nil means the host's; tests pass a pion
	// vnet to run the real server inside an emulated network.
	Net transport.Net

	// Logger receives stund's own structured logs; nil discards them.
	Logger *slog.Logger
	// LoggerFactory receives pion/turn's logs; nil discards them.
	LoggerFactory logging.LoggerFactory
}

// withDefaults returns a copy of c with every unset optional field set to
// its documented default.
func (c Config) withDefaults() Config {
	if c.Realm == "" {
		c.Realm = DefaultRealm
	}
	if c.RelayPortMin == 0 && c.RelayPortMax == 0 {
		c.RelayPortMin, c.RelayPortMax = DefaultRelayPortMin, DefaultRelayPortMax
	}
	if c.UserQuota == 0 {
		c.UserQuota = DefaultUserQuota
	}
	if c.TotalQuota == 0 {
		c.TotalQuota = DefaultTotalQuota
	}
	if c.UnauthRate == 0 {
		c.UnauthRate = DefaultUnauthRate
	}
	if c.AllocRate == 0 {
		c.AllocRate = DefaultAllocRate
	}
	if c.MaxConnsPerIP == 0 {
		c.MaxConnsPerIP = DefaultMaxConnsPerIP
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}

// Validate reports the first setting that cannot work, naming it the way
// the command line and the YAML file do.
func (c Config) Validate() error {
	for _, check := range []func() error{c.validateAddrs, c.validatePorts, c.validateAdvertise, c.validateLimits, c.validateAuth} {
		if err := check(); err != nil {
			return err
		}
	}
	return nil
}

// validateAddrs checks the two IPs of the RFC 5780 grid.
func (c Config) validateAddrs() error {
	if !c.PrimaryIP.IsValid() {
		return fmt.Errorf("primary-ip: an address is required")
	}
	if c.PrimaryIP.IsUnspecified() {
		return fmt.Errorf("primary-ip: %s is the wildcard; bind an explicit address so replies leave from it (RFC 5780 §3)", c.PrimaryIP)
	}
	if !c.AlternateIP.IsValid() {
		return nil
	}
	if c.AlternateIP.IsUnspecified() {
		return fmt.Errorf("alternate-ip: %s is the wildcard; bind an explicit address", c.AlternateIP)
	}
	if c.AlternateIP == c.PrimaryIP {
		return fmt.Errorf("alternate-ip: must differ from primary-ip (%s)", c.PrimaryIP)
	}
	if c.AlternateIP.Unmap().Is4() != c.PrimaryIP.Unmap().Is4() {
		return fmt.Errorf("alternate-ip: %s and primary-ip %s must be of one address family (OTHER-ADDRESS names the other)", c.AlternateIP, c.PrimaryIP)
	}
	return nil
}

// validatePorts checks the listening ports, the relay range and the
// listeners the relay must not reach.
func (c Config) validatePorts() error {
	for _, p := range []struct {
		name string
		v    int
	}{{"port", c.Port}, {"alt-port", c.AltPort}, {"tls-port", c.TLSPort}} {
		if p.v < 0 || p.v > 65535 {
			return fmt.Errorf("%s: %d is not a port (0-65535)", p.name, p.v)
		}
	}
	if c.Port != 0 && c.Port == c.AltPort {
		return fmt.Errorf("alt-port: must differ from port (%d)", c.Port)
	}
	if c.TLSConfig != nil && c.TLSPort != 0 && (c.TLSPort == c.Port && !c.DisableTCP) {
		return fmt.Errorf("tls-port: %d is already the TCP port", c.TLSPort)
	}
	if c.RelayPortMin > c.RelayPortMax {
		return fmt.Errorf("relay-ports: %d-%d is empty", c.RelayPortMin, c.RelayPortMax)
	}
	if (c.RelayPortMin == 0) != (c.RelayPortMax == 0) {
		return fmt.Errorf("relay-ports: give both ends of the range")
	}
	for _, l := range c.ProtectedListeners {
		if !l.IsValid() || l.Port() == 0 {
			return fmt.Errorf("metrics: protected listener %s: give the bound address and port", l)
		}
	}
	for _, a := range c.AlternateServers {
		if !a.IsValid() || a.Port() == 0 {
			return fmt.Errorf("alternate-server: %s: give IP:PORT", a)
		}
	}
	return nil
}

// validateAdvertise checks the --advertise pairs.
func (c Config) validateAdvertise() error {
	for priv, pub := range c.Advertise {
		if !priv.IsValid() || !pub.IsValid() {
			return fmt.Errorf("advertise: %s=%s is not an address pair", priv, pub)
		}
		if priv != c.PrimaryIP && priv != c.AlternateIP {
			return fmt.Errorf("advertise: %s is neither primary-ip nor alternate-ip", priv)
		}
		if priv.Unmap().Is4() != pub.Unmap().Is4() {
			return fmt.Errorf("advertise: %s=%s mixes address families", priv, pub)
		}
	}
	return nil
}

// validateLimits checks the rates and the bandwidth cap.
func (c Config) validateLimits() error {
	if c.UnauthRate != c.UnauthRate || c.AllocRate != c.AllocRate { // NaN
		return fmt.Errorf("unauth-rate: not a number")
	}
	if c.MaxBPS < 0 {
		return fmt.Errorf("max-bps: %d: give a positive number of bits per second, or 0 for no cap", c.MaxBPS)
	}
	return nil
}

// validateAuth checks the static users and the REST secrets.
func (c Config) validateAuth() error {
	for name, pw := range c.Users {
		if name == "" || pw == "" {
			return fmt.Errorf("user: %q needs a name and a password", name+":"+pw)
		}
	}
	for _, s := range c.AuthSecrets {
		if s == "" {
			return fmt.Errorf("auth-secret: empty secret")
		}
	}
	if len(c.AuthSecrets) > maxSecrets {
		return fmt.Errorf("auth-secret: %d secrets, at most %d (each is tried per request; rotation needs two)", len(c.AuthSecrets), maxSecrets)
	}
	return nil
}

// public returns the advertised form of a local address.
func (c Config) public(a netip.Addr) netip.Addr {
	if p, ok := c.Advertise[a]; ok {
		return p
	}
	return a
}
