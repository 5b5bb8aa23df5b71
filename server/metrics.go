package server

// metrics.go exposes the server's counters to Prometheus.
//
// The packet paths keep the atomic counters they already had (server/binding,
// demux.go) or get one atomic add (relay packets); the registry reads them
// at scrape time through CounterFunc/GaugeFunc, so scraping costs the hot
// path nothing. No metric has a per-user label: TURN REST usernames embed an
// expiry, so their number is unbounded.

import (
	"github.com/stund/stund/internal/udpio"
	"github.com/stund/stund/server/binding"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// opsStats counts what pion's event hooks, the auth hook and the relay
// sockets see. Written by many goroutines, read at scrape time.
type opsStats struct {
	allocCreated, allocDeleted atomic.Uint64
	permCreated, permDeleted   atomic.Uint64
	chanCreated, chanDeleted   atomic.Uint64

	// authUnknown: the AuthHandler refused the USERNAME (unknown user,
	// expired or malformed REST username, foreign realm). authIntegrity:
	// the username was known but MESSAGE-INTEGRITY did not verify (wrong
	// password or secret). The alloc* pair counts the Allocate requests
	// among them.
	authUnknown, authIntegrity           atomic.Uint64
	allocAuthUnknown, allocAuthIntegrity atomic.Uint64

	// relay data, counted by relayConn: "out" is toward the peer
	// (relay socket WriteTo), "in" is from the peer (ReadFrom).
	relayPktsOut, relayBytesOut atomic.Uint64
	relayPktsIn, relayBytesIn   atomic.Uint64
	relayRefused                atomic.Uint64 // relayed packets and peer dials the peer policy refused

	// RFC 6062 peer connections refused at the per-allocation or per-user
	// bound (relaygen.go): Connect (out) and accepted on a relay (in).
	peerConnRefusedOut, peerConnRefusedIn atomic.Uint64
	// peerDialFailed counts Connect dials that failed, by dialFailure
	peerDialFailed [numDialFailures]atomic.Uint64

	reloads, reloadErrors atomic.Uint64

	// By client transport (transportIndex): allocations made, requests
	// seen (Binding, TURN) and relayed bytes each way (to peer, from peer).
	allocCreatedBy [numTransports]atomic.Uint64
	requestsBy     [numTransports][2]atomic.Uint64
	relayBytesBy   [numTransports][2]atomic.Uint64

	// allocDurations observes each ended allocation's lifetime (fleet.go);
	// usageErrors counts usage records the sink refused.
	allocDurations prometheus.Histogram
	usageErrors    atomic.Uint64

	probesLogged, probesSuppressed atomic.Uint64
}

// Client transports, as metrics label them.
const (
	trUDP = iota
	trTCP
	trTLS
	numTransports
)

var transportNames = [numTransports]string{"udp", "tcp", "tls"}

func transportIndex(name string) int {
	for i, n := range transportNames {
		if n == name {
			return i
		}
	}
	return trUDP
}

// Ready reports whether the server serves: New bound every socket (it binds
// all or none) and Close has not begun.
func (s *Server) Ready() bool { return s.turn != nil && !s.closing.Load() }

// Registry returns the server's Prometheus registry (built on first use): the
// stund_* metrics below plus the Go runtime and process collectors. Callers
// may register more (cmd/stund adds build information).
func (s *Server) Registry() *prometheus.Registry {
	s.metricsOnce.Do(func() { s.registry = s.newRegistry() })
	return s.registry
}

// metricSet registers the server's metrics, all read at scrape time from
// counters the data path keeps (no metric call on the hot path).
type metricSet struct{ reg *prometheus.Registry }

func (m metricSet) counter(name, help string, labels prometheus.Labels, f func() uint64) {
	m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: name, Help: help, ConstLabels: labels,
	}, func() float64 { return float64(f()) }))
}

func (m metricSet) gauge(name, help string, f func() float64) {
	m.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, f))
}

// live is created minus deleted, read in that order so that it never goes
// below zero.
func live(created, deleted *atomic.Uint64) func() float64 {
	return func() float64 {
		d := deleted.Load()
		c := created.Load()
		if c < d {
			return 0
		}
		return float64(c - d)
	}
}

func l(k, v string) prometheus.Labels { return prometheus.Labels{k: v} }

func (s *Server) newRegistry() *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(
		s.ops.allocDurations,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	m := metricSet{reg}
	s.registerAllocations(m)
	s.registerRelay(m)
	s.registerBinding(m)
	s.registerFront(m)
	s.registerDrops(m)
	s.registerOps(m)
	return reg
}

// registerAllocations registers TURN allocations, permissions and channels (RFC 8656 §7, §9, §12).
func (s *Server) registerAllocations(m metricSet) {
	o := &s.ops
	counter, gauge := m.counter, m.gauge
	// TURN allocations (RFC 8656 §7).
	gauge("stund_allocations_active", "Live TURN allocations.", func() float64 { return float64(s.turn.AllocationCount()) })
	for i, tr := range transportNames {
		counter("stund_allocations_created_total", "TURN allocations created, by client transport.", l("transport", tr), o.allocCreatedBy[i].Load)
		const reqHelp = "Requests received, by client transport and kind: binding (Binding requests) or turn (TURN requests and indications the front passed or answered)."
		counter("stund_requests_total", reqHelp, prometheus.Labels{"transport": tr, "kind": "binding"}, o.requestsBy[i][0].Load)
		counter("stund_requests_total", reqHelp, prometheus.Labels{"transport": tr, "kind": "turn"}, o.requestsBy[i][1].Load)
		const trBytesHelp = "Payload bytes relayed over UDP relays, by the client's transport and direction (to_peer, from_peer)."
		counter("stund_relayed_bytes_by_transport_total", trBytesHelp, prometheus.Labels{"transport": tr, "direction": "to_peer"}, o.relayBytesBy[i][0].Load)
		counter("stund_relayed_bytes_by_transport_total", trBytesHelp, prometheus.Labels{"transport": tr, "direction": "from_peer"}, o.relayBytesBy[i][1].Load)
	}
	counter("stund_allocations_deleted_total", "TURN allocations deleted (expired, refreshed to 0, or server closing).", nil, o.allocDeleted.Load)
	const refusedHelp = "TURN requests refused, by reason: auth (Allocates with unknown/expired credentials or wrong MESSAGE-INTEGRITY, 401), quota (Allocates over a quota, 486), alloc_rate (Allocates over the per-user rate, 486), peer_policy (CreatePermission/ChannelBind/Connect refused with 403, and Send/ChannelData packets dropped, by the peer policy: the sum of stund_peer_refused_total)."
	counter("stund_allocations_refused_total", refusedHelp, l("reason", "auth"), func() uint64 { return o.allocAuthUnknown.Load() + o.allocAuthIntegrity.Load() })
	counter("stund_allocations_refused_total", refusedHelp, l("reason", "quota"), s.quotas.Refused)
	counter("stund_allocations_refused_total", refusedHelp, l("reason", "alloc_rate"), func() uint64 { return s.Limits().AllocRateRefused })
	counter("stund_allocations_refused_total", refusedHelp, l("reason", "peer_policy"), func() uint64 { return s.live.refused() + o.relayRefused.Load() })
	const authHelp = "Authenticated TURN requests (any method) that failed authentication: unknown_user (unknown, expired REST or foreign-realm username) or bad_integrity (wrong password or secret)."
	counter("stund_auth_failures_total", authHelp, l("reason", "unknown_user"), o.authUnknown.Load)
	counter("stund_auth_failures_total", authHelp, l("reason", "bad_integrity"), o.authIntegrity.Load)

	// Permissions and channels (RFC 8656 §9, §12).
	gauge("stund_permissions_active", "Live TURN permissions.", live(&o.permCreated, &o.permDeleted))
	counter("stund_permissions_created_total", "TURN permissions created.", nil, o.permCreated.Load)
	gauge("stund_channels_active", "Live TURN channel bindings.", live(&o.chanCreated, &o.chanDeleted))
	counter("stund_channels_created_total", "TURN channel bindings created.", nil, o.chanCreated.Load)
	const peerHelp = "Peers refused by the peer policy (403): permission (CreatePermission, ChannelBind, Connect) or relay (a relayed packet, or a Connect's dial, toward a refused address or port: the host's own listeners)."
	counter("stund_peer_refused_total", peerHelp, l("stage", "permission"), s.live.refused)
	counter("stund_peer_refused_total", peerHelp, l("stage", "relay"), o.relayRefused.Load)
}

// registerRelay registers relayed data.
func (s *Server) registerRelay(m metricSet) {
	o := &s.ops
	counter, gauge := m.counter, m.gauge
	// Relayed data (UDP relays).
	const pktHelp = "Packets relayed over UDP relays: to_peer (client to peer) or from_peer (peer to client)."
	const byteHelp = "Payload bytes relayed over UDP relays: to_peer or from_peer."
	counter("stund_relay_packets_total", pktHelp, l("direction", "to_peer"), o.relayPktsOut.Load)
	counter("stund_relay_packets_total", pktHelp, l("direction", "from_peer"), o.relayPktsIn.Load)
	counter("stund_relay_bytes_total", byteHelp, l("direction", "to_peer"), o.relayBytesOut.Load)
	counter("stund_relay_bytes_total", byteHelp, l("direction", "from_peer"), o.relayBytesIn.Load)
	gauge("stund_offloaded_channels", "UDP channels relayed in the kernel (eBPF) now; their traffic is added to the relay counters when each leaves the kernel.", func() float64 {
		return float64(s.kern.offloaded(s.led.all("")))
	})
	gauge("stund_udp_gso", "1 while relayed datagrams leave in UDP GSO runs; 0 once the kernel refused GSO (EIO: no checksum offload) and each datagram leaves on its own.", func() float64 {
		if udpio.GSODisabled() {
			return 0
		}
		return 1
	})
	const peerConnHelp = "RFC 6062 peer connections refused at the per-allocation or per-user bound: connect (Connect answered 447) or accept (a peer's connection to a relayed address closed at once)."
	counter("stund_peer_connections_refused_total", peerConnHelp, l("direction", "connect"), o.peerConnRefusedOut.Load)
	const dialHelp = "RFC 6062 Connect requests whose dial to the peer failed (answered 447), by reason: refused (RST), timeout, unreachable (no route, host or network unreachable), address_in_use (the relayed address already has a connection to that peer, or one in TIME_WAIT), other."
	for r := dialFailure(0); r < numDialFailures; r++ {
		counter("stund_peer_connect_failures_total", dialHelp, l("reason", r.String()), o.peerDialFailed[r].Load)
	}
	counter("stund_peer_connections_refused_total", peerConnHelp, l("direction", "accept"), o.peerConnRefusedIn.Load)
}

// registerBinding registers Binding (RFC 8489 §7, RFC 5780 §6, §7).
func (s *Server) registerBinding(m metricSet) {
	bs := func() binding.Stats { return s.binder.Stats() }
	counter := m.counter
	// Binding (RFC 8489 §7, RFC 5780 §6/§7).
	const bindHelp = "Binding requests that parsed, by form: rfc8489 (magic cookie) or rfc3489 (classic)."
	counter("stund_binding_requests_total", bindHelp, l("form", "rfc8489"), func() uint64 {
		st := bs()
		r, c := st.Requests, st.RFC3489
		if c > r {
			return 0
		}
		return r - c
	})
	counter("stund_binding_requests_total", bindHelp, l("form", "rfc3489"), func() uint64 { return bs().RFC3489 })
	counter("stund_binding_indications_total", "Binding indications (keepalives), never answered (RFC 8489 §6.3.2).", nil, func() uint64 { return bs().Indications })
	const featHelp = "Successful Binding replies using an RFC 5780 feature: change_ip, change_port (CHANGE-REQUEST §7.2), response_port (§7.5), padding (§7.6)."
	counter("stund_binding_rfc5780_total", featHelp, l("feature", "change_ip"), func() uint64 { return bs().ChangeIP })
	counter("stund_binding_rfc5780_total", featHelp, l("feature", "change_port"), func() uint64 { return bs().ChangePort })
	counter("stund_binding_rfc5780_total", featHelp, l("feature", "response_port"), func() uint64 { return bs().ResponsePort })
	counter("stund_binding_rfc5780_total", featHelp, l("feature", "padding"), func() uint64 { return bs().Padding })
	const respHelp = "Binding responses sent, by result: success, 400 (Bad Request), 420 (Unknown Attribute)."
	counter("stund_binding_responses_total", respHelp, l("result", "success"), func() uint64 { return bs().Success })
	counter("stund_binding_responses_total", respHelp, l("result", "400"), func() uint64 { return bs().Err400 })
	counter("stund_binding_responses_total", respHelp, l("result", "420"), func() uint64 { return bs().Err420 })
	counter("stund_binding_over_budget_total", "Binding replies whose mandatory core exceeded the 2x amplification budget.", nil, func() uint64 { return bs().OverBudget })
}

// registerFront registers the TURN front's answers.
func (s *Server) registerFront(m metricSet) {
	counter := m.counter
	// TURN requests the front (front.go) answered itself, RFC 8489 §9.2.4
	// and RFC 8656 §7-§12. Unauthenticated answers (400, 401, 438) are
	// counted when decided; the amplification budget or the rate limit may
	// then suppress them (stund_dropped_packets_total).
	const turnErrHelp = "TURN error responses decided by stund in front of pion, by code: 400 (also 440), 401 (challenge or failed authentication), 403 (peer policy), 420, 437, 438, 441, 508 (permission limit)."
	turnErr := func(code string, f func(*FrontStats) uint64) {
		counter("stund_turn_error_responses_total", turnErrHelp, l("code", code), func() uint64 { st := s.Front(); return f(&st) })
	}
	turnErr("400", func(st *FrontStats) uint64 { return st.BadRequest })
	turnErr("401", func(st *FrontStats) uint64 { return st.Challenged + st.AuthFailed })
	turnErr("403", func(st *FrontStats) uint64 { return st.Forbidden })
	turnErr("420", func(st *FrontStats) uint64 { return st.UnknownAttr })
	turnErr("437", func(st *FrontStats) uint64 { return st.NoAllocation })
	turnErr("438", func(st *FrontStats) uint64 { return st.StaleNonce })
	turnErr("441", func(st *FrontStats) uint64 { return st.WrongCreds })
	turnErr("508", func(st *FrontStats) uint64 { return st.Capacity })
}

// registerDrops registers what was dropped before or instead of a reply.
func (s *Server) registerDrops(m metricSet) {
	bs, dm := func() binding.Stats { return s.binder.Stats() }, &s.demux
	counter := m.counter
	// Dropped before or instead of a reply.
	const dropHelp = "Packets dropped and counted, by reason: malformed (bad STUN framing, attribute or FINGERPRINT, Binding or TURN), not_stun (neither STUN nor ChannelData), stream_unframeable (TCP/TLS connections closed on junk), send_error (replies the kernel refused), rate_limited (unauthenticated replies over the per-source-IP rate), amplification (unauthenticated TURN answers over 2x their request), bandwidth (relayed datagrams over the per-user --max-bps cap)."
	counter("stund_dropped_packets_total", dropHelp, l("reason", "malformed"), func() uint64 { return bs().Malformed + s.Front().Malformed })
	counter("stund_dropped_packets_total", dropHelp, l("reason", "not_stun"), dm.junk.Load)
	counter("stund_dropped_packets_total", dropHelp, l("reason", "stream_unframeable"), dm.streamJunk.Load)
	counter("stund_dropped_packets_total", dropHelp, l("reason", "send_error"), dm.sendErrors.Load)
	counter("stund_dropped_packets_total", dropHelp, l("reason", "rate_limited"), func() uint64 { return s.Limits().UnauthDropped })
	counter("stund_dropped_packets_total", dropHelp, l("reason", "amplification"), func() uint64 { return s.Front().Amplification })
	counter("stund_dropped_packets_total", dropHelp, l("reason", "bandwidth"), func() uint64 { return s.Limits().BandwidthDroppedPackets })
	counter("stund_dropped_bytes_total", "Payload bytes of dropped packets, by reason: bandwidth (relayed datagrams over the per-user --max-bps cap).", l("reason", "bandwidth"), func() uint64 { return s.Limits().BandwidthDroppedBytes })
	counter("stund_rate_limit_evictions_total", "Per-source-IP rate-limit buckets replaced while still holding state (more active sources than the table's slots).", nil, func() uint64 { return s.Limits().UnauthEvicted })
	const streamHelp = "TCP/TLS connections closed by stund, by reason: per_ip_limit (at accept: the source IP had --max-conns-per-ip open), idle (silent, or half a frame, past its read deadline)."
	counter("stund_stream_connections_closed_total", streamHelp, l("reason", "per_ip_limit"), func() uint64 { return s.Limits().StreamRefused })
	counter("stund_stream_connections_closed_total", streamHelp, l("reason", "idle"), func() uint64 { return s.Limits().StreamIdle })
}

// registerOps registers operations: reloads and natprobe probes.
func (s *Server) registerOps(m metricSet) {
	o := &s.ops
	counter, gauge := m.counter, m.gauge
	// Operations.
	const reloadHelp = "Configuration reloads (SIGHUP), by result: ok or error (the old settings were kept)."
	counter("stund_reloads_total", reloadHelp, l("result", "ok"), o.reloads.Load)
	counter("stund_reloads_total", reloadHelp, l("result", "error"), o.reloadErrors.Load)
	counter("stund_natprobe_probes_total", "Distinct natprobe probe IDs logged (SOFTWARE natprobe/... probe=ID).", nil, o.probesLogged.Load)
	counter("stund_natprobe_probes_suppressed_total", "natprobe probe IDs not logged because the log rate limit was reached.", nil, o.probesSuppressed.Load)
	gauge("stund_ready", "1 while every socket is bound and the server is not closing.", func() float64 {
		if s.Ready() {
			return 1
		}
		return 0
	})
}
