package server

// reload.go swaps the settings an operator changes on a running server
// (SIGHUP in cmd/stund): users and REST secrets, quotas and the peer policy.
// Live allocations stay: pion's allocation manager is not touched, only the
// hooks it consults on the next request.

import (
	"errors"
	"fmt"
	"maps"
	"slices"
)

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
	s.kern.recheck(s.led.all("")) // the kernel relay has no per-packet policy

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
