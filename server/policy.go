package server

import (
	"errors"
	"maps"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/pion/turn/v5"
	"github.com/stund/stund/internal/stunwire"
)

// PeerPolicy decides which peer addresses a TURN client may reach.
//
// A public TURN server is an open relay into the network it sits in, so the
// default refuses every address that is not globally reachable unicast
// (RFC 6890 and the IANA special-purpose registries), every IPv6 form that
// embeds such an IPv4 address, and the server's own addresses.
//
// Precedence, first match wins:
//
//  1. deny (--deny-peer): refused. Matched against the address and against the
//     IPv4 address embedded in it, so denying 203.0.113.0/24 also denies
//     ::ffff:203.0.113.9, 2002:cb00:7109::1 and 64:ff9b::cb00:7109.
//     The operator's deny is the stronger statement and beats any allow.
//  2. allow (--allow-peer): allowed. Matched against the address itself
//     only (IPv4-mapped addresses are the IPv4 address, see canonical), so
//     allowing 127.0.0.0/8 opens 127.0.0.1 and ::ffff:127.0.0.1 but not the
//     6to4 form 2002:7f00:1::; opening an embedded form takes an explicit
//     IPv6 prefix. An allow also opens an own address at the IP level; the
//     listener ports stay closed in the data path (AllowedAddrPort).
//  3. the default table (special): refused.
//  4. own addresses (and their embedded forms): refused, unless relay ports
//     are known (WithRelayPorts): then a global own IP is allowed and
//     AllowedAddrPort lets through only the relay port range, so two
//     clients of this server can relay to each other's relayed addresses
//     while the host's other services stay out of reach. Own addresses
//     that are special (loopback, private) never get this exception: other
//     processes may listen on them in the relay range.
//  5. anything else: allowed.
//
// Above all of these, in the data path (AllowedAddrPort: relayed packets
// and outgoing peer connections), the port of every listener of the
// process (WithListeners) is refused on every address of the host
// (WithHostAddrs, loopback, the unspecified address, own addresses).
//
// A PeerPolicy is immutable after construction and safe for concurrent use.
type PeerPolicy struct {
	allow []netip.Prefix
	deny  []netip.Prefix
	own   map[netip.Addr]bool

	// protected are the ports of the process's own listeners (STUN, TURN,
	// TLS, the admin listener with /metrics and pprof): never a relay
	// destination on any address of the host, whatever allow says
	// (RFC 8656 §17: the relay must not become a way into the server's own
	// services; coturn's CVE-2020-26262 is this class). A listener bound to
	// the wildcard answers on every address of the host, a loopback one
	// on all of 127.0.0.0/8, so the port is refused on all of them.
	protected map[uint16]bool
	// host are the addresses of this host (interfaces, the server's own
	// addresses and their advertised public forms, which a 1:1 NAT sends
	// back to the host); loopback and unspecified addresses always count.
	host map[netip.Addr]bool
	// relayLo..relayHi is the relay port range; 0,0 when unknown.
	relayLo, relayHi uint16

	refused atomic.Uint64
}

// NewPeerPolicy builds the policy. allow and deny come from --allow-peer and
// --deny-peer; own lists the addresses the server binds and advertises.
// Prefixes are masked; IPv4-mapped prefixes and addresses are unmapped.
func NewPeerPolicy(allow, deny []netip.Prefix, own []netip.Addr) *PeerPolicy {
	p := &PeerPolicy{
		allow:     canonicalPrefixes(allow),
		deny:      canonicalPrefixes(deny),
		own:       make(map[netip.Addr]bool, len(own)),
		protected: map[uint16]bool{},
		host:      map[netip.Addr]bool{},
	}
	for _, a := range own {
		if a.IsValid() {
			p.own[canonical(a)] = true
			p.host[canonical(a)] = true
		}
	}

	return p
}

// WithListeners returns a copy of p that refuses, in the data path, every
// relayed packet and peer connection to the port of one of the process's
// own listeners on any address of the host (WithHostAddrs).
func (p *PeerPolicy) WithListeners(l []netip.AddrPort) *PeerPolicy {
	q := p.clone()
	for _, ap := range l {
		q.protected[ap.Port()] = true
		if a := ap.Addr(); a.IsValid() {
			q.host[canonical(a)] = true
		}
	}

	return q
}

// WithHostAddrs returns a copy of p that counts addrs as the host's own
// (the listener ports are refused on them).
func (p *PeerPolicy) WithHostAddrs(addrs []netip.Addr) *PeerPolicy {
	q := p.clone()
	for _, a := range addrs {
		if a.IsValid() {
			q.host[canonical(a)] = true
		}
	}

	return q
}

// WithRelayPorts returns a copy of p that allows relaying to the server's own
// addresses on ports lo..hi only (relay-to-relay between two clients of this
// server, the common case when both ends of a call need TURN).
func (p *PeerPolicy) WithRelayPorts(lo, hi uint16) *PeerPolicy {
	q := p.clone()
	q.relayLo, q.relayHi = lo, hi

	return q
}

func (p *PeerPolicy) clone() *PeerPolicy {
	return &PeerPolicy{
		allow:     p.allow,
		deny:      p.deny,
		own:       p.own,
		protected: maps.Clone(p.protected),
		host:      maps.Clone(p.host),
		relayLo:   p.relayLo,
		relayHi:   p.relayHi,
	}
}

// Allowed reports whether a client may install a permission (and so send)
// toward ip. Ports are not part of a TURN permission (RFC 8656 §9).
func (p *PeerPolicy) Allowed(ip netip.Addr) bool {
	ok, _ := p.Explain(ip)

	return ok
}

// Explain is Allowed with the reason, for logs and tests.
func (p *PeerPolicy) Explain(ip netip.Addr) (ok bool, reason string) {
	if !ip.IsValid() {
		return false, "invalid address"
	}
	a := canonical(ip)
	v4, embedded := embeddedIPv4(a)

	for _, d := range p.deny {
		if d.Contains(a) || (embedded && d.Contains(v4)) {
			return false, "denied by --deny-peer " + d.String()
		}
	}
	for _, al := range p.allow {
		if al.Contains(a) {
			return true, "allowed by --allow-peer " + al.String()
		}
	}
	if why, bad := special(a); bad {
		return false, why
	}
	if embedded {
		if why, bad := special(v4); bad {
			return false, "embeds " + v4.String() + ": " + why
		}
	}
	if p.own[a] || (embedded && p.own[v4]) {
		if p.relayHi != 0 && !embedded {
			return true, "own address, relay ports only"
		}

		return false, "the server's own address"
	}

	return true, "global unicast"
}

// AllowedAddrPort is the data-path verdict for one relayed packet or
// outgoing peer connection: Allowed for the IP, never a listener port on
// an address of the host, and for the server's own addresses only the
// relay port range (when known).
func (p *PeerPolicy) AllowedAddrPort(ap netip.AddrPort) bool {
	a := canonical(ap.Addr())
	if !p.Allowed(a) {
		return false
	}
	if p.protected[ap.Port()] {
		if p.isHost(a) {
			return false
		}
		if v4, ok := embeddedIPv4(a); ok && p.isHost(v4) {
			return false // a NAT64 or 6to4 gateway on this host would deliver it here
		}
	}
	if p.own[a] && p.relayHi != 0 {
		allowedExplicitly := false
		for _, al := range p.allow {
			if al.Contains(a) {
				allowedExplicitly = true

				break
			}
		}
		if !allowedExplicitly && (ap.Port() < p.relayLo || ap.Port() > p.relayHi) {
			return false
		}
	}

	return true
}

// Refused counts peer addresses refused so far at the permission level
// (livePolicy.permissionHandler).
func (p *PeerPolicy) Refused() uint64 { return p.refused.Load() }

// ErrPeerRefused is returned by a relay socket (relayConn) or an outgoing
// peer dial (relayGenerator.AllocateConn) for a destination the policy
// refuses.
var ErrPeerRefused = errors.New("peer address refused by policy")

// isHost reports whether a (canonical) address reaches this host.
func (p *PeerPolicy) isHost(a netip.Addr) bool {
	return p.host[a] || a.IsLoopback() || a.IsUnspecified()
}

// canonical strips the zone and unmaps IPv4-mapped IPv6 addresses: an
// IPv4-mapped address (RFC 4291 §2.5.5.2) is the IPv4 address for every
// purpose here, because Go and pion send a packet to ::ffff:a.b.c.d to
// a.b.c.d. Other embedded forms stay IPv6 (they are routed as IPv6).
func canonical(a netip.Addr) netip.Addr {
	return a.WithZone("").Unmap()
}

func canonicalPrefixes(in []netip.Prefix) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(in))
	for _, p := range in {
		if !p.IsValid() {
			continue
		}
		a := p.Addr().WithZone("")
		bits := p.Bits()
		if a.Is4In6() {
			if bits < 96 {
				// A mapped prefix shorter than /96 covers non-mapped IPv6
				// space too; keep it as IPv6.
				out = append(out, netip.PrefixFrom(a, bits).Masked())

				continue
			}
			a, bits = a.Unmap(), bits-96
		}
		out = append(out, netip.PrefixFrom(a, bits).Masked())
	}

	return out
}

// Well-known IPv6 prefixes that embed an IPv4 address.
var (
	// RFC 3056 §2: 2002:V4ADDR::/48, the IPv4 address in bits 16-47.
	pfx6to4 = netip.MustParsePrefix("2002::/16")
	// RFC 6052 §2.1: the well-known NAT64 prefix, IPv4 in the last 32 bits.
	pfxNAT64 = netip.MustParsePrefix("64:ff9b::/96")
	// RFC 4291 §2.5.5.1: IPv4-compatible (deprecated), IPv4 in the last 32 bits.
	pfxCompat = netip.MustParsePrefix("::/96")
)

// embeddedIPv4 returns the IPv4 address an IPv6 address carries in one of
// the standard embeddings (IPv4-mapped addresses are unmapped earlier).
func embeddedIPv4(a netip.Addr) (netip.Addr, bool) {
	if !a.Is6() {
		return netip.Addr{}, false
	}
	b := a.As16()
	switch {
	case pfx6to4.Contains(a):
		return netip.AddrFrom4([4]byte{b[2], b[3], b[4], b[5]}), true
	case pfxNAT64.Contains(a), pfxCompat.Contains(a):
		return netip.AddrFrom4([4]byte{b[12], b[13], b[14], b[15]}), true
	}

	return netip.Addr{}, false
}

type specialRange struct {
	prefix netip.Prefix
	why    string
}

// special4 lists the IPv4 ranges that are not globally reachable unicast:
// RFC 6890 §2.2.2 and the IANA IPv4 Special-Purpose Address Registry
// ("Globally Reachable: False"), plus multicast and the reserved class E.
// Documentation and benchmarking ranges are refused too: no real peer lives
// there, while lab and cloud networks do route them internally (198.18/15 in
// particular), so refusing them costs nothing and closes a door. A test rig
// opens them with --allow-peer.
var special4 = []specialRange{
	{netip.MustParsePrefix("0.0.0.0/8"), "\"this network\" (RFC 6890, RFC 791)"},
	{netip.MustParsePrefix("10.0.0.0/8"), "private (RFC 1918)"},
	{netip.MustParsePrefix("100.64.0.0/10"), "shared CGNAT space (RFC 6598)"},
	{netip.MustParsePrefix("127.0.0.0/8"), "loopback (RFC 1122)"},
	{netip.MustParsePrefix("169.254.0.0/16"), "link-local, cloud metadata (RFC 3927)"},
	{netip.MustParsePrefix("172.16.0.0/12"), "private (RFC 1918)"},
	{netip.MustParsePrefix("192.0.0.0/24"), "IETF protocol assignments (RFC 6890)"},
	{netip.MustParsePrefix("192.0.2.0/24"), "documentation TEST-NET-1 (RFC 5737)"},
	{netip.MustParsePrefix("192.88.99.0/24"), "deprecated 6to4 relay anycast (RFC 7526)"},
	{netip.MustParsePrefix("192.168.0.0/16"), "private (RFC 1918)"},
	{netip.MustParsePrefix("198.18.0.0/15"), "benchmarking (RFC 2544)"},
	{netip.MustParsePrefix("198.51.100.0/24"), "documentation TEST-NET-2 (RFC 5737)"},
	{netip.MustParsePrefix("203.0.113.0/24"), "documentation TEST-NET-3 (RFC 5737)"},
	{netip.MustParsePrefix("224.0.0.0/4"), "multicast (RFC 5771)"},
	{netip.MustParsePrefix("255.255.255.255/32"), "limited broadcast (RFC 919)"},
	{netip.MustParsePrefix("240.0.0.0/4"), "reserved (RFC 1112)"},
}

// special6 lists the IPv6 ranges refused outright (IANA IPv6 Special-Purpose
// Address Registry, RFC 6890 §2.2.3). Addresses outside 2000::/3 and
// 64:ff9b::/96 are refused as not global unicast (RFC 4291 §2.4), which
// covers the rest of ::/8 (unspecified, loopback, IPv4-compatible,
// IPv4-translated), 100::/64 discard-only, ULA, link-local, site-local,
// multicast and the unassigned space; they are listed for the reason string.
var special6 = []specialRange{
	{netip.MustParsePrefix("::/128"), "unspecified (RFC 4291 §2.5.2)"},
	{netip.MustParsePrefix("::1/128"), "loopback (RFC 4291 §2.5.3)"},
	{pfxCompat, "IPv4-compatible, deprecated (RFC 4291 §2.5.5.1)"},
	{netip.MustParsePrefix("64:ff9b:1::/48"), "local-use NAT64 (RFC 8215)"},
	{netip.MustParsePrefix("::/8"), "reserved by IETF (RFC 4291 §2.4)"},
	{netip.MustParsePrefix("100::/64"), "discard-only (RFC 6666)"},
	{netip.MustParsePrefix("2001::/32"), "Teredo, embeds IPv4 (RFC 4380)"},
	{netip.MustParsePrefix("2001:2::/48"), "benchmarking (RFC 5180)"},
	{netip.MustParsePrefix("2001:10::/28"), "ORCHID (RFC 4843)"},
	{netip.MustParsePrefix("2001:20::/28"), "ORCHIDv2 (RFC 7343)"},
	{netip.MustParsePrefix("2001:db8::/32"), "documentation (RFC 3849)"},
	{netip.MustParsePrefix("3fff::/20"), "documentation (RFC 9637)"},
	{netip.MustParsePrefix("5f00::/16"), "SRv6 SIDs (RFC 9602)"},
	{netip.MustParsePrefix("fc00::/7"), "unique local (RFC 4193)"},
	{netip.MustParsePrefix("fe80::/10"), "link-local (RFC 4291 §2.5.6)"},
	{netip.MustParsePrefix("fec0::/10"), "site-local, deprecated (RFC 3879)"},
	{netip.MustParsePrefix("ff00::/8"), "multicast (RFC 4291 §2.7)"},
}

var pfxGlobal6 = netip.MustParsePrefix("2000::/3")

// special reports whether a (canonical) address is refused by default.
func special(a netip.Addr) (why string, bad bool) {
	table := special4
	if a.Is6() {
		if pfxNAT64.Contains(a) {
			// Judged by the IPv4 address it embeds (RFC 6052 §3.1: the
			// well-known prefix must not carry non-global IPv4 addresses).
			return "", false
		}
		table = special6
	}
	for _, s := range table {
		if s.prefix.Contains(a) {
			return s.why, true
		}
	}
	if a.Is6() && !pfxGlobal6.Contains(a) {
		return "not global unicast (RFC 4291 §2.4)", true
	}

	return "", false
}

// livePolicy is the peer policy in force. pion's PermissionHandler and every
// relay socket consult it per request or packet, so a reload applies to
// existing allocations too: a peer range closed by a reload is closed for
// the next CreatePermission and the next relayed packet.
type livePolicy struct {
	cur atomic.Pointer[PeerPolicy]

	mu      sync.Mutex // serialises swap against refused, so the sum never goes back
	retired uint64     // refusals counted by the policies replaced so far
}

func (l *livePolicy) load() *PeerPolicy { return l.cur.Load() }

// swap makes p current and carries the old policy's refusal count over, so
// stund_peer_refused_total stays a counter across reloads. A refusal that
// races the swap on the old policy may be lost: one packet, never a reset.
func (l *livePolicy) swap(p *PeerPolicy) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if old := l.cur.Swap(p); old != nil {
		l.retired += old.Refused()
	}
}

// refused is the number of refusals since start, over every policy.
func (l *livePolicy) refused() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.retired + l.cur.Load().Refused()
}

// permissionHandler adapts the current policy to pion, which consults it
// for CreatePermission, ChannelBind and Connect (RFC 8656 §9), after the
// TURN front (front.go) has already answered 403 for refused peers (pion
// alone answers a refused ChannelBind with 401). Send indications and
// ChannelData only reach peers that hold a permission; the port-level
// rules are the relay sockets' and the peer dials' (AllowedAddrPort).
func (l *livePolicy) permissionHandler() turn.PermissionHandler {
	return func(_ net.Addr, peerIP net.IP) bool {
		p := l.cur.Load()
		a, ok := netip.AddrFromSlice(peerIP) // 16-byte IPv4 becomes ::ffff:a.b.c.d, canonical unmaps it
		if ok && p.Allowed(a) {
			return true
		}
		p.refused.Add(1)
		return false
	}
}

// buildPolicy is the peer policy for cfg on the sockets this server bound:
// its own addresses and listeners are never peers (see PeerPolicy). The
// listeners are those of the start (s.cfg.ProtectedListeners: a reload
// does not rebind the admin listener), their ports refused on every
// address the host has when the policy is built (start, and each reload).
func (s *Server) buildPolicy(cfg Config) *PeerPolicy {
	var own []netip.Addr
	for _, ip := range s.ips() {
		own = append(own, ip, cfg.public(ip))
	}
	var listeners []netip.AddrPort
	for i := range s.gridAddr {
		for p := range s.gridAddr[i] {
			if a := s.gridAddr[i][p]; a.IsValid() {
				listeners = append(listeners, a, netip.AddrPortFrom(cfg.public(a.Addr()), a.Port()))
			}
		}
	}
	for _, l := range append(append([]net.Listener{}, s.tcp...), s.tls...) {
		a := stunwire.AddrPortOf(l.Addr())
		listeners = append(listeners, a, netip.AddrPortFrom(cfg.public(a.Addr()), a.Port()))
	}
	listeners = append(listeners, s.cfg.ProtectedListeners...)
	return NewPeerPolicy(cfg.AllowPeers, cfg.DenyPeers, own).
		WithListeners(listeners).
		WithHostAddrs(s.hostAddrs()).
		WithRelayPorts(cfg.RelayPortMin, cfg.RelayPortMax)
}

// hostAddrs lists the addresses of the host's interfaces, and of the
// emulated network's when the server runs in one (Config.Net). An
// interface address added later is covered from the next reload on.
func (s *Server) hostAddrs() []netip.Addr {
	var out []netip.Addr
	add := func(addrs []net.Addr) {
		for _, a := range addrs {
			var ip net.IP
			switch v := a.(type) {
			case *net.IPNet:
				ip = v.IP
			case *net.IPAddr:
				ip = v.IP
			}
			if na, ok := netip.AddrFromSlice(ip); ok {
				out = append(out, na)
			}
		}
	}
	if addrs, err := net.InterfaceAddrs(); err == nil {
		add(addrs)
	} else {
		s.log.Warn("cannot list the host's addresses; the listener ports are refused on the server's own and loopback addresses only", "error", err)
	}
	if ifs, err := s.net.Interfaces(); err == nil {
		for _, ifc := range ifs {
			if addrs, err := ifc.Addrs(); err == nil {
				add(addrs)
			}
		}
	}
	return out
}
