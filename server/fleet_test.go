package server

import (
	"bufio"
	"context"
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pion/stun/v4"
	"github.com/stund/stund/internal/testutil"
	"github.com/stund/stund/server/admin"
)

// alternateOf reads ALTERNATE-SERVER (RFC 8489 §14.15) from an answer.
func alternateOf(t *testing.T, r *stun.Message) netip.AddrPort {
	t.Helper()
	var alt stun.AlternateServer
	if err := alt.GetFrom(r); err != nil {
		t.Fatalf("%v code %d without ALTERNATE-SERVER: %v", r.Type, errorCode(r), err)
	}
	a, _ := netip.AddrFromSlice(alt.IP)
	return netip.AddrPortFrom(a.Unmap(), uint16(alt.Port))
}

// TestDrain: a draining node redirects new Allocates round robin with 300
// and ALTERNATE-SERVER, signed (RFC 8489 §10, RFC 8656 §7.2), while Binding
// and the allocations it has keep working; it is drained when the last
// allocation ends. Without alternates new Allocates get 508.
func TestDrain(t *testing.T) {
	alts := []netip.AddrPort{netip.MustParseAddrPort("192.0.2.10:3478"), netip.MustParseAddrPort("192.0.2.11:3478")}
	forBoth(t, func(c *Config) { c.AlternateServers = alts }, func(t *testing.T, s *Server, tcp bool) {
		old := dialFront(t, s, tcp, "alice", "alice-pw")
		old.allocate()
		s.Drain()
		if st := s.Readiness().State; st != admin.StateDraining {
			t.Fatalf("readiness %q while draining", st)
		}
		for i := 0; i < 4; i++ {
			c := dialFront(t, s, tcp, "bob", "bob-pw")
			r := c.signed(stun.MethodAllocate, requestedTransportUDP)
			c.wantSignedError(r, 300)
			if got, want := alternateOf(t, r), alts[i%2]; got != want {
				t.Fatalf("redirect %d names %v, want %v (round robin)", i, got, want)
			}
		}
		if r := old.signed(stun.MethodRefresh, lifetime(600)); r.Type.Class != stun.ClassSuccessResponse {
			t.Fatalf("Refresh of an existing allocation while draining: %v code %d", r.Type, errorCode(r))
		}
		if r := old.rt(stun.TransactionID, stun.BindingRequest); r.Type != stun.BindingSuccess {
			t.Fatalf("Binding while draining: %v", r.Type)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		if err := s.WaitDrained(ctx); err == nil {
			t.Fatal("drained with an allocation left")
		}
		cancel()
		if r := old.signed(stun.MethodRefresh, lifetime(0)); r.Type.Class != stun.ClassSuccessResponse {
			t.Fatalf("Refresh 0: %v code %d", r.Type, errorCode(r))
		}
		ctx, cancel = context.WithTimeout(context.Background(), e2eTimeout)
		defer cancel()
		if err := s.WaitDrained(ctx); err != nil {
			t.Fatalf("not drained after the last allocation ended: %v", err)
		}
	})
	s := startTURNServer(t, nil)
	s.Drain()
	c := dialFront(t, s, false, "alice", "alice-pw")
	c.wantSignedError(c.signed(stun.MethodAllocate, requestedTransportUDP), 508)
}

// TestFullRedirects: a node at its total quota redirects new Allocates
// when it has alternates, so a fleet spills over.
func TestFullRedirects(t *testing.T) {
	alt := netip.MustParseAddrPort("192.0.2.10:3478")
	s := startTURNServer(t, func(c *Config) { c.TotalQuota = 1; c.AlternateServers = []netip.AddrPort{alt} })
	dialFront(t, s, false, "alice", "alice-pw").allocate()
	if st := s.Readiness().State; st != admin.StateFull {
		t.Fatalf("readiness %q at the total quota, want full", st)
	}
	c := dialFront(t, s, false, "bob", "bob-pw")
	r := c.signed(stun.MethodAllocate, requestedTransportUDP)
	c.wantSignedError(r, 300)
	if got := alternateOf(t, r); got != alt {
		t.Fatalf("ALTERNATE-SERVER %v, want %v", got, alt)
	}
}

// TestKillAndUsageRecords: a killed allocation ends at once and its
// client's next request gets 437; every allocation's usage record counts
// what its relay carried and says why it ended.
func TestKillAndUsageRecords(t *testing.T) {
	var usage testutil.SyncBuffer
	s := startTURNServer(t, func(c *Config) { c.UsageLog = &usage; c.AllowPeers = mustPrefixes(t, "127.0.0.0/8") })

	// A relayed flow with known bytes each way, then deleted by its client.
	_, relay := allocRelay(t, s, "udp4", "alice")
	peer := udpPeer(t, "udp4")
	from := relayToPeer(t, relay, peer, "hello") // retried until it arrives: count what the peer saw
	sent := 0
	buf := make([]byte, 1500)
	_ = peer.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
	for {
		if _, _, err := peer.ReadFrom(buf); err != nil {
			break
		}
		sent++ // retransmissions of "hello" the first read did not take
	}
	peerToClient(t, peer, relay, from, "0123456789")
	relay.Close() // Refresh 0

	// A second allocation, killed through the API.
	k := dialFront(t, s, false, "bob", "bob-pw")
	k.allocate()
	as := s.Allocations("bob")
	if len(as) != 1 || as[0].User != "user:bob" || as[0].Transport != "udp" {
		t.Fatalf("Allocations(bob) = %+v", as)
	}
	if s.KillAllocation("nope") {
		t.Fatal("killed an unknown ID")
	}
	if !s.KillAllocation(as[0].ID) {
		t.Fatal("KillAllocation refused a live ID")
	}
	waitFor(t, "the killed allocation to end", func() bool { return len(s.Allocations("")) == 0 })
	if r := k.signed(stun.MethodRefresh, lifetime(600)); errorCode(r) != 437 {
		t.Fatalf("Refresh after the kill: %v code %d, want 437", r.Type, errorCode(r))
	}

	// A record is written just after its allocation leaves the ledger.
	waitFor(t, "both usage records", func() bool { return len(usageRecords(t, usage.String())) == 2 })
	recs := map[string]UsageRecord{}
	for _, r := range usageRecords(t, usage.String()) {
		recs[userName(r.User)] = r
	}
	a, b := recs["alice"], recs["bob"]
	if a.Reason != endDeleted || b.Reason != endKilled {
		t.Fatalf("reasons alice %q bob %q, want deleted, killed", a.Reason, b.Reason)
	}
	if want := uint64(len("hello") * (sent + 1)); a.BytesOut != want || a.PktsOut != uint64(sent+1) {
		t.Errorf("alice to peers: %d bytes, %d packets; the peer received %d", a.BytesOut, a.PktsOut, want)
	}
	if a.BytesIn != 10 || a.PktsIn != 1 {
		t.Errorf("alice from peers: %d bytes, %d packets; the peer sent 10 in 1", a.BytesIn, a.PktsIn)
	}
	if a.Relayed == "" || a.Client == "" || a.Duration <= 0 || a.Ended.Before(a.Started) {
		t.Errorf("alice's record is incomplete: %+v", a)
	}
	if _, err := netip.ParseAddrPort(a.Client); err != nil {
		t.Errorf("client %q: %v", a.Client, err)
	}
}

// usageRecords parses JSON usage lines.
func usageRecords(t *testing.T, lines string) []UsageRecord {
	t.Helper()
	var out []UsageRecord
	sc := bufio.NewScanner(strings.NewReader(lines))
	for sc.Scan() {
		var r UsageRecord
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("usage line %q: %v", sc.Text(), err)
		}
		out = append(out, r)
	}
	return out
}
