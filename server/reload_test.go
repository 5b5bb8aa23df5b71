package server

import (
	"slices"
	"testing"
	"time"

	"github.com/pion/turn/v5"
)

// TestReload: a live allocation survives a reload; a removed user can no
// longer allocate; a changed REST secret takes effect; quotas and the peer
// policy change; a bad configuration changes nothing.
func TestReload(t *testing.T) {
	base := Config{}
	s := startTURNServer(t, func(c *Config) {
		c.AllowPeers = mustPrefixes(t, "127.0.0.0/8")
		c.AuthSecrets = []string{"old-secret"}
		base = *c
	})

	alice, aliceConn := newTURNClient(t, s, "alice", "alice-pw")
	relay, err := alice.Allocate()
	if err != nil {
		t.Fatalf("Allocate: %v", err)
	}
	defer relay.Close()
	peer := udpPeer(t, "udp4")
	// Until pion's client has its channel bound, it sends ChannelBind with
	// alice's credentials; after the reload that would fail (as it should)
	// and pion's client closes its allocation itself. So wait for the
	// channel to carry data before removing alice.
	for i := 0; i < 250 && aliceConn.chanOut.Load() == 0; i++ {
		if reachPeer(t, relay, peer, "ping", 40) == nil {
			t.Fatal("relay carries nothing before the reload")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if aliceConn.chanOut.Load() == 0 {
		t.Fatal("pion's client never used a channel")
	}

	// Remove alice, rotate the secret, quota 1 per user.
	next := base
	next.Users = map[string]string{"bob": "bob-pw"}
	next.AuthSecrets = []string{"new-secret"}
	next.UserQuota = 1
	if err := s.Reload(next); err != nil {
		t.Fatalf("Reload: %v", err)
	}

	// The live allocation is still there and still relays.
	if s.AllocationCount() != 1 {
		t.Fatalf("allocations after reload: %d, want 1", s.AllocationCount())
	}
	if reachPeer(t, relay, peer, "ping", 40) == nil {
		t.Fatal("the live allocation stopped relaying after the reload")
	}

	// alice is gone; bob works, and only once (quota 1).
	if c, _ := newTURNClient(t, s, "alice", "alice-pw"); true {
		if _, err := c.Allocate(); err == nil {
			t.Error("removed user alice could still allocate")
		}
	}
	bob, _ := newTURNClient(t, s, "bob", "bob-pw")
	rb, err := bob.Allocate()
	if err != nil {
		t.Fatalf("bob: %v", err)
	}
	defer rb.Close()
	bob2, _ := newTURNClient(t, s, "bob", "bob-pw")
	if _, err := bob2.Allocate(); err == nil || turnErrorCode(err) != 486 {
		t.Errorf("bob's second allocation over quota 1: %v, want 486", err)
	}

	// The old secret no longer verifies, the new one does.
	oldU, oldP, _ := turn.GenerateLongTermTURNRESTCredentials("old-secret", "dave", time.Hour)
	if c, _ := newTURNClient(t, s, oldU, oldP); true {
		if _, err := c.Allocate(); err == nil {
			t.Error("credentials from the replaced secret still allocate")
		}
	}
	newU, newP, _ := turn.GenerateLongTermTURNRESTCredentials("new-secret", "dave", time.Hour)
	cd, _ := newTURNClient(t, s, newU, newP)
	rd, err := cd.Allocate()
	if err != nil {
		t.Fatalf("credentials from the new secret refused: %v", err)
	}
	rd.Close()

	// Peer policy: close loopback. The live allocation's next packet is
	// refused at the relay (its permission predates the reload), and a
	// new permission is refused with 403.
	closed := next
	closed.AllowPeers = nil
	if err := s.Reload(closed); err != nil {
		t.Fatal(err)
	}
	if reachPeer(t, relay, peer, "ping", 40) != nil {
		t.Error("a peer closed by the reload still receives relayed packets")
	}
	// (alice was removed, so her CreatePermission would fail on auth;
	// bob's fails on the policy alone.)
	if err := bob.CreatePermission(udpPeer(t, "udp4").LocalAddr()); err == nil {
		t.Error("a permission toward a peer closed by the reload was granted")
	}
	if s.AllocationCount() < 2 {
		t.Errorf("allocations: %d, want alice's and bob's still live", s.AllocationCount())
	}

	// A bad configuration is refused whole: bob keeps working, quotas
	// and policy stay.
	for name, bad := range map[string]Config{
		"empty password": func() Config { c := closed; c.Users = map[string]string{"bob": ""}; return c }(),
		"five secrets":   func() Config { c := closed; c.AuthSecrets = []string{"a", "b", "c", "d", "e"}; return c }(),
		"no credentials": func() Config { c := closed; c.Users, c.AuthSecrets = nil, nil; return c }(),
	} {
		if err := s.Reload(bad); err == nil {
			t.Errorf("%s: Reload accepted it", name)
		}
	}
	rb.Close()
	for i := 0; i < 200 && s.quotas.ActiveFor("user:bob") != 0; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	bob3, _ := newTURNClient(t, s, "bob", "bob-pw")
	r3, err := bob3.Allocate()
	if err != nil {
		t.Fatalf("bob after refused reloads: %v", err)
	}
	r3.Close()
	if v := metricValue(t, s, "stund_reloads_total", "result=ok"); v != 2 {
		t.Errorf("reloads ok = %v, want 2", v)
	}
	if v := metricValue(t, s, "stund_reloads_total", "result=error"); v != 3 {
		t.Errorf("reloads error = %v, want 3", v)
	}
	if v := metricValue(t, s, "stund_peer_refused_total", "stage=permission"); v < 1 {
		t.Errorf("permission refusals after the policy reload: %v", v)
	}
	if v := metricValue(t, s, "stund_peer_refused_total", "stage=relay"); v < 1 {
		t.Errorf("relay refusals after the policy reload: %v", v)
	}
}

// TestReloadRestartNeeded: settings that need new sockets are reported, not
// silently ignored, and the rest is applied.
func TestReloadRestartNeeded(t *testing.T) {
	base := Config{}
	s := startTURNServer(t, func(c *Config) { base = *c })
	next := base
	next.Realm = "other.realm"
	next.RFC5780Lean = true
	next.Users = map[string]string{"erin": "erin-pw"}
	rep, err := s.ReloadWithReport(next)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"realm", "rfc5780-lean"} {
		if !slices.Contains(rep.RestartNeeded, want) {
			t.Errorf("RestartNeeded %v lacks %q", rep.RestartNeeded, want)
		}
	}
	// The users were applied under the running realm.
	c, _ := newTURNClient(t, s, "erin", "erin-pw")
	r, err := c.Allocate()
	if err != nil {
		t.Fatalf("reloaded user refused: %v", err)
	}
	r.Close()

	s.Close()
	if err := s.Reload(base); err == nil {
		t.Error("Reload on a closed server succeeded")
	}
}
