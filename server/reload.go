package server

// reload.go swaps the settings an operator changes on a running server
// (SIGHUP in cmd/stund): users and REST secrets, quotas and the peer policy.
// Live allocations stay: pion's allocation manager is not touched, only the
// hooks it consults on the next request.

import (
	"errors"
	"fmt"
	"github.com/stund/stund/internal/stunwire"
	"maps"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/pion/turn/v5"
)

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

// ErrClosed is returned by Reload on a server that is closing.
var ErrClosed = errors.New("server is closed")

// Reload applies the reloadable settings of cfg to the running server:
// Users, AuthSecrets, UserQuota, TotalQuota, AllowPeers and DenyPeers. It
// validates everything first and changes nothing when anything is wrong,
// so a bad configuration file keeps the old settings.
//
// Live allocations are kept, including those of a user the reload removed:
// they run until their lifetime ends, because their next Refresh fails
// authentication (RFC 8656 §7.3). New Allocates see the new credentials at
// once. Quotas apply to new Allocates; allocations over a lowered quota are
// not cut.
//
// Settings that need new sockets or a new pion server (addresses, ports,
// TLS, advertise, realm, relay ports, RFC5780Lean, Software) are not
// reloaded: when they differ from the running ones, Reload logs them at warn
// and returns their names in RestartNeeded; the rest is applied.
func (s *Server) Reload(cfg Config) error {
	_, err := s.reload(cfg)
	return err
}

// ReloadFailed counts a reload that failed before reaching Reload (the
// configuration file did not parse), for stund_reloads_total.
func (s *Server) ReloadFailed() { s.ops.reloadErrors.Add(1) }

// ReloadReport says what a reload did.
type ReloadReport struct {
	// RestartNeeded lists the settings (by flag name) that differ from the
	// running server's and only take effect on a restart.
	RestartNeeded []string
}

// ReloadWithReport is Reload, returning what it could not apply.
func (s *Server) ReloadWithReport(cfg Config) (ReloadReport, error) { return s.reload(cfg) }

func (s *Server) reload(cfg Config) (ReloadReport, error) {
	rep, err := s.apply(cfg)
	if err != nil {
		s.ops.reloadErrors.Add(1)
		return rep, err
	}
	s.ops.reloads.Add(1)
	return rep, nil
}

func (s *Server) apply(cfg Config) (ReloadReport, error) {
	var rep ReloadReport
	if s.closing.Load() {
		return rep, ErrClosed
	}
	if err := cfg.Validate(); err != nil {
		return rep, err
	}
	cfg = cfg.withDefaults()
	creds := Credentials{Realm: s.cfg.Realm, Users: cfg.Users, Secrets: cfg.AuthSecrets}
	if err := creds.Validate(); err != nil {
		return rep, err
	}

	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	rep.RestartNeeded = restartNeeded(s.cfg, cfg)

	// Every check passed: apply. Each swap is atomic on its own; a request
	// racing the reload sees the old or the new value of each setting.
	policy := s.buildPolicy(cfg)
	if err := s.auth.Store(creds); err != nil {
		return rep, err // validated above; kept for safety
	}
	s.quotas.SetLimits(cfg.UserQuota, cfg.TotalQuota)
	s.live.swap(policy)

	s.log.Info("configuration reloaded",
		"users", len(cfg.Users), "auth_secrets", len(cfg.AuthSecrets),
		"user_quota", cfg.UserQuota, "total_quota", cfg.TotalQuota,
		"allow_peer", len(cfg.AllowPeers), "deny_peer", len(cfg.DenyPeers),
		"allocations", s.AllocationCount())
	if len(rep.RestartNeeded) > 0 {
		s.log.Warn("settings changed that take effect only on restart", "settings", rep.RestartNeeded)
	}
	return rep, nil
}

// restartNeeded names the non-reloadable settings that differ.
func restartNeeded(old, cur Config) []string {
	var out []string
	add := func(name string, differ bool) {
		if differ {
			out = append(out, name)
		}
	}
	add("primary-ip", old.PrimaryIP != cur.PrimaryIP)
	add("alternate-ip", old.AlternateIP != cur.AlternateIP)
	add("port", old.Port != 0 && old.Port != cur.Port)
	add("alt-port", old.AltPort != 0 && old.AltPort != cur.AltPort)
	add("tls-port", (old.TLSConfig != nil) != (cur.TLSConfig != nil) || (old.TLSPort != 0 && old.TLSPort != cur.TLSPort && cur.TLSConfig != nil))
	add("no-tcp", old.DisableTCP != cur.DisableTCP)
	add("advertise", !maps.Equal(old.Advertise, cur.Advertise))
	add("realm", old.Realm != cur.Realm)
	add("relay-ports", old.RelayPortMin != cur.RelayPortMin || old.RelayPortMax != cur.RelayPortMax)
	add("rfc5780-lean", old.RFC5780Lean != cur.RFC5780Lean)
	add("software", old.Software != cur.Software)
	return slices.Clip(out)
}

// String is for logs.
func (r ReloadReport) String() string {
	if len(r.RestartNeeded) == 0 {
		return "all settings applied"
	}
	return fmt.Sprintf("restart needed for %v", r.RestartNeeded)
}
