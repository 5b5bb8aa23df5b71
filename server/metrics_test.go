package server

import (
	"github.com/stund/stund/internal/stunwire"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/pion/stun/v4"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
)

// metricValue reads one series from the server's registry: name plus the
// label pairs given as "k=v". It returns -1 when the series is absent.
func metricValue(t *testing.T, s *Server, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := s.Registry().Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for _, want := range labels {
				k, v, _ := strings.Cut(want, "=")
				found := false
				for _, lp := range m.GetLabel() {
					if lp.GetName() == k && lp.GetValue() == v {
						found = true
					}
				}
				if !found {
					continue next
				}
			}
			return value(m)
		}
	}
	return -1
}

func value(m *dto.Metric) float64 {
	switch {
	case m.Counter != nil:
		return m.Counter.GetValue()
	case m.Gauge != nil:
		return m.Gauge.GetValue()
	}
	return -1
}

// waitMetric polls (bounded) until the series reaches at least min: pion
// updates some counters from its own goroutines after the client returns.
func waitMetric(t *testing.T, s *Server, min float64, name string, labels ...string) float64 {
	t.Helper()
	var v float64
	for i := 0; i < 500; i++ {
		if v = metricValue(t, s, name, labels...); v >= min {
			return v
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Errorf("%s%v = %v, want >= %v", name, labels, v, min)
	return v
}

// sendBinding sends one Binding request built with pion/stun from a fresh
// socket and waits for the reply (if want is true).
func sendRaw(t *testing.T, to *net.UDPAddr, pkt []byte, want bool) {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.WriteTo(pkt, to); err != nil {
		t.Fatal(err)
	}
	if !want {
		return
	}
	_ = c.SetReadDeadline(time.Now().Add(e2eTimeout))
	buf := make([]byte, 1500)
	if _, _, err := c.ReadFrom(buf); err != nil {
		t.Fatalf("no Binding reply: %v", err)
	}
}

// TestMetrics drives every kind of traffic the metrics describe and reads
// the counters back, from the registry and over HTTP.
func TestMetrics(t *testing.T) {
	s := startTURNServer(t, func(c *Config) { c.AllowPeers = mustPrefixes(t, "127.0.0.0/8") })

	// Allocation, permission, data both ways.
	c, _ := newTURNClient(t, s, "alice", "alice-pw")
	relay, err := c.Allocate()
	if err != nil {
		t.Fatalf("Allocate: %v", err)
	}
	defer relay.Close()
	peer := udpPeer(t, "udp4")
	relayed := relayToPeer(t, relay, peer, "to-peer")
	peerToClient(t, peer, relay, relayed, "to-client!")

	// Auth failures: a wrong password (integrity) and an unknown user.
	bad, _ := newTURNClient(t, s, "alice", "wrong")
	if _, err := bad.Allocate(); err == nil {
		t.Fatal("wrong password allocated")
	}
	unknown, _ := newTURNClient(t, s, "mallory", "x")
	if _, err := unknown.Allocate(); err == nil {
		t.Fatal("unknown user allocated")
	}

	// Binding: one with CHANGE-REQUEST change-port, junk, a bad FINGERPRINT.
	srv := serverAddr(s)
	m := stun.MustBuild(stun.TransactionID, stun.BindingRequest,
		stun.RawAttribute{Type: stun.AttrChangeRequest, Value: []byte{0, 0, 0, byte(stunwire.ChangePort)}})
	sendRaw(t, srv, m.Raw, true)
	sendRaw(t, srv, []byte("junk-junk-junk"), false)
	fp := stun.MustBuild(stun.TransactionID, stun.BindingRequest, stun.Fingerprint)
	fp.Raw[len(fp.Raw)-1] ^= 0xff
	sendRaw(t, srv, fp.Raw, false)

	if v := metricValue(t, s, "stund_allocations_active"); v != 1 {
		t.Errorf("stund_allocations_active = %v, want 1", v)
	}
	waitMetric(t, s, 1, "stund_allocations_created_total", "transport=udp")
	waitMetric(t, s, 1, "stund_requests_total", "transport=udp", "kind=turn")
	waitMetric(t, s, 1, "stund_permissions_active")
	waitMetric(t, s, 1, "stund_permissions_created_total")
	waitMetric(t, s, 1, "stund_relay_packets_total", "direction=to_peer")
	waitMetric(t, s, float64(len("to-peer")), "stund_relay_bytes_total", "direction=to_peer")
	waitMetric(t, s, 1, "stund_relay_packets_total", "direction=from_peer")
	waitMetric(t, s, float64(len("to-client!")), "stund_relay_bytes_total", "direction=from_peer")
	waitMetric(t, s, 1, "stund_auth_failures_total", "reason=bad_integrity")
	waitMetric(t, s, 1, "stund_auth_failures_total", "reason=unknown_user")
	waitMetric(t, s, 2, "stund_allocations_refused_total", "reason=auth")
	waitMetric(t, s, 1, "stund_binding_rfc5780_total", "feature=change_port")
	waitMetric(t, s, 1, "stund_binding_responses_total", "result=success")
	waitMetric(t, s, 1, "stund_dropped_packets_total", "reason=not_stun")
	waitMetric(t, s, 1, "stund_dropped_packets_total", "reason=malformed")
	// Every Allocate above began with the front's 401 challenge.
	waitMetric(t, s, 3, "stund_turn_error_responses_total", "code=401")
	if v := metricValue(t, s, "stund_binding_rfc5780_total", "feature=change_ip"); v != 0 {
		t.Errorf("change_ip = %v, want 0 (only change-port was asked)", v)
	}
	if v := metricValue(t, s, "stund_allocations_refused_total", "reason=quota"); v != 0 {
		t.Errorf("quota refusals = %v, want 0", v)
	}

	// Over HTTP, with the runtime collectors; no per-user label anywhere.
	rec := httptest.NewRecorder()
	promhttp.HandlerFor(s.Registry(), promhttp.HandlerOpts{}).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	text := string(body)
	for _, want := range []string{"stund_allocations_active 1", "go_goroutines", "process_open_fds", `stund_relay_packets_total{direction="to_peer"}`} {
		if !strings.Contains(text, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	for _, bad := range []string{"alice", "mallory", "user="} {
		if strings.Contains(text, bad) {
			t.Errorf("/metrics mentions %q: no per-user labels", bad)
		}
	}

	// Closing the allocation empties the gauges.
	relay.Close()
	for i := 0; i < 500 && metricValue(t, s, "stund_allocations_active") != 0; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if v := metricValue(t, s, "stund_allocations_active"); v != 0 {
		t.Errorf("after close: stund_allocations_active = %v", v)
	}
	waitMetric(t, s, 1, "stund_allocations_deleted_total")
}

// TestMetricsQuotaAndPolicy: 486 and peer-policy refusals are counted by
// reason.
func TestMetricsQuotaAndPolicy(t *testing.T) {
	s := startTURNServer(t, func(c *Config) { c.UserQuota = 1 })
	c, _ := newTURNClient(t, s, "alice", "alice-pw")
	relay, err := c.Allocate()
	if err != nil {
		t.Fatal(err)
	}
	defer relay.Close()
	c2, _ := newTURNClient(t, s, "alice", "alice-pw")
	if _, err := c2.Allocate(); err == nil {
		t.Fatal("second allocation over quota 1 succeeded")
	}
	waitMetric(t, s, 1, "stund_allocations_refused_total", "reason=quota")

	// Loopback is refused by default: the permission is refused (403).
	if err := c.CreatePermission(&net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 9}); err == nil {
		t.Fatal("permission toward loopback granted")
	}
	waitMetric(t, s, 1, "stund_peer_refused_total", "stage=permission")
	waitMetric(t, s, 1, "stund_allocations_refused_total", "reason=peer_policy")
	waitMetric(t, s, 1, "stund_turn_error_responses_total", "code=403")
}

// TestMetricsRateLimitedBindings is the audit's repro: with --unauth-rate 1
// (burst 8, the clock standing still) 20 bare Bindings from one socket get 8
// replies, and the 12 suppressed ones show in /metrics.
func TestMetricsRateLimitedBindings(t *testing.T) {
	clk := newClock()
	cfg := twoIPConfig()
	cfg.UnauthRate = 1
	cfg.abuse = &abuseHooks{now: clk.Now, firstTimeout: time.Minute, idleTimeout: time.Minute, authedTimeout: time.Minute}
	s := startServer(t, cfg)
	c := udpSocket(t)
	const sent = 20
	for range sent {
		req := stun.MustBuild(stun.TransactionID, stun.BindingRequest)
		if _, err := c.WriteToUDPAddrPort(req.Raw, s.Grid()[0][0]); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 500; i++ {
		if st := s.Limits(); st.UnauthAllowed+st.UnauthDropped >= sent {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if v := metricValue(t, s, "stund_dropped_packets_total", "reason=rate_limited"); v != sent-minBurst {
		t.Errorf(`stund_dropped_packets_total{reason="rate_limited"} = %v, want %d`, v, sent-minBurst)
	}
}

// TestMetricsAbuseCounters: each abuse counter the limits, the bandwidth
// cap and the TURN front keep is exported, under its own series. The
// atomics are set to distinct values (no traffic runs), so a series
// wired to the wrong counter shows.
func TestMetricsAbuseCounters(t *testing.T) {
	s := startTURNServer(t, func(c *Config) { c.MaxBPS = 1 << 20 })
	if s.limits.unauth == nil || s.limits.alloc == nil || s.limits.bw == nil {
		t.Fatal("a limiter is off in the default configuration")
	}
	n := uint64(100)
	next := func(a interface{ Add(uint64) uint64 }) float64 {
		n++
		a.Add(n)
		return float64(n)
	}
	// The peer-policy reason is the sum of both stages.
	perm, relay := next(&s.live.load().refused), next(&s.ops.relayRefused)
	// The Binding responder's own count is driven by real junk in
	// TestJunkIsDroppedAndCounted; here it is read, the front's is set.
	bindMal, frontMal := float64(s.binder.Stats().Malformed), next(&s.front.stats.malformed)
	fs := &s.front.stats
	chal, authFailed := next(&fs.challenged), next(&fs.authFailed)
	for _, c := range []struct {
		want   float64
		name   string
		labels []string
	}{
		{next(&s.limits.unauth.dropped), "stund_dropped_packets_total", []string{"reason=rate_limited"}},
		{next(&s.limits.unauth.evicted), "stund_rate_limit_evictions_total", nil},
		{next(&s.limits.alloc.dropped), "stund_allocations_refused_total", []string{"reason=alloc_rate"}},
		{perm + relay, "stund_allocations_refused_total", []string{"reason=peer_policy"}},
		{next(&s.limits.bw.droppedPkts), "stund_dropped_packets_total", []string{"reason=bandwidth"}},
		{next(&s.limits.bw.droppedBytes), "stund_dropped_bytes_total", []string{"reason=bandwidth"}},
		{next(&s.limits.streamRefused), "stund_stream_connections_closed_total", []string{"reason=per_ip_limit"}},
		{next(&s.limits.streamIdleClosed), "stund_stream_connections_closed_total", []string{"reason=idle"}},
		{next(&fs.amplification), "stund_dropped_packets_total", []string{"reason=amplification"}},
		{bindMal + frontMal, "stund_dropped_packets_total", []string{"reason=malformed"}},
		{next(&s.demux.junk), "stund_dropped_packets_total", []string{"reason=not_stun"}},
		{chal + authFailed, "stund_turn_error_responses_total", []string{"code=401"}},
		{next(&fs.badRequest), "stund_turn_error_responses_total", []string{"code=400"}},
		{next(&fs.forbidden), "stund_turn_error_responses_total", []string{"code=403"}},
		{next(&fs.unknownAttr), "stund_turn_error_responses_total", []string{"code=420"}},
		{next(&fs.noAlloc), "stund_turn_error_responses_total", []string{"code=437"}},
		{next(&fs.stale), "stund_turn_error_responses_total", []string{"code=438"}},
		{next(&fs.wrongCreds), "stund_turn_error_responses_total", []string{"code=441"}},
		{next(&fs.capacity), "stund_turn_error_responses_total", []string{"code=508"}},
	} {
		if got := metricValue(t, s, c.name, c.labels...); got != c.want {
			t.Errorf("%s%v = %v, want %v", c.name, c.labels, got, c.want)
		}
	}
}

// TestHealthReady: Ready (what /readyz reports, server/admin) and
// stund_ready hold only between New and Close.
func TestHealthReady(t *testing.T) {
	s := startTURNServer(t, nil)
	if !s.Ready() {
		t.Fatal("not ready while running")
	}
	if v := metricValue(t, s, "stund_ready"); v != 1 {
		t.Errorf("stund_ready = %v while running", v)
	}
	s.Close()
	if s.Ready() {
		t.Fatal("ready after Close")
	}
	if v := metricValue(t, s, "stund_ready"); v != 0 {
		t.Errorf("stund_ready = %v after Close", v)
	}
}
