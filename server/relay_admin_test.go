package server

import (
	"github.com/stund/stund/internal/stunwire"
	"net"
	"net/netip"
	"testing"

	"github.com/pion/stun/v4"
)

// The relay turned toward the process's own listeners (RFC 8656 §17; the
// class of coturn's CVE-2020-26262), against the real server over
// loopback.

// TestRelayNeverReachesAdmin: with --allow-peer covering loopback, Connect
// toward the admin listener (bound to the wildcard, as --metrics :9641
// does) fails on 127.0.0.1 and on another loopback address, and no
// connection reaches it; the policy refuses its port on every interface
// address; and relay-to-relay between two allocations still works
// (RFC 8656 §17).
func TestRelayNeverReachesAdmin(t *testing.T) {
	admin, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4zero})
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close()
	adminAddr := stunwire.AddrPortOf(admin.Addr())
	s := startTURNServer(t, func(c *Config) {
		c.DisableTCP = false
		c.AllowPeers = mustPrefixes(t, "127.0.0.0/8")
		c.ProtectedListeners = []netip.AddrPort{adminAddr}
	})

	ctl, r := tcpAllocate(t, s, "alice")
	relayedAddr(t, r)
	for _, ip := range []string{"127.0.0.1", "127.0.0.2", "127.8.9.10"} {
		to := netip.AddrPortFrom(netip.MustParseAddr(ip), adminAddr.Port())
		r := ctl.signed(stun.MethodConnect, peerAddr(to))
		if c := errorCode(r); c != 447 && c != 403 {
			t.Fatalf("Connect to the admin listener at %v: %v code %d, want 447 or 403", to, r.Type, c)
		}
	}
	mine := dialMarker(t, admin)
	if got := acceptOne(t, admin); got != mine {
		t.Fatalf("the admin listener got a connection from %v through the relay", got)
	}

	// Every address of the host, whatever --allow-peer opens.
	open := startTURNServer(t, func(c *Config) {
		c.AllowPeers = mustPrefixes(t, "0.0.0.0/0", "::/0")
		c.ProtectedListeners = []netip.AddrPort{adminAddr}
	})
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	pol := open.live.load()
	for _, a := range addrs {
		ipn, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		ip, _ := netip.AddrFromSlice(ipn.IP)
		to := netip.AddrPortFrom(ip.Unmap(), adminAddr.Port())
		if pol.AllowedAddrPort(to) {
			t.Errorf("the admin port is open to the relay at the interface address %v", to)
		}
	}

	// Relay to relay: alice connects to bob's relayed address.
	bob, r := tcpAllocate(t, s, "bob")
	bobRelay := relayedAddr(t, r)
	if r := bob.signed(stun.MethodCreatePermission, peerAddr(netip.MustParseAddrPort("127.0.0.1:9"))); r.Type.Class != stun.ClassSuccessResponse {
		t.Fatalf("bob's CreatePermission: %v code %d", r.Type, errorCode(r))
	}
	r = ctl.signed(stun.MethodConnect, peerAddr(bobRelay))
	if r.Type.Class != stun.ClassSuccessResponse {
		t.Fatalf("Connect from alice's relay to bob's %v: %v code %d", bobRelay, r.Type, errorCode(r))
	}
	aliceData := bindData(t, s, "alice", connectionID(t, r))
	bobData := bindData(t, s, "bob", connectionID(t, bob.indication(stun.MethodConnectionAttempt)))
	echoBothWays(t, aliceData, bobData, "relay to relay")
}

// TestProtectedListenersSurviveReload: a reload's configuration does not
// name the admin listener (cmd/stund binds it once, at start); its port
// stays closed to the relay after the reload all the same.
func TestProtectedListenersSurviveReload(t *testing.T) {
	admin := netip.MustParseAddrPort("0.0.0.0:9641")
	s := startTURNServer(t, func(c *Config) {
		c.AllowPeers = mustPrefixes(t, "127.0.0.0/8")
		c.ProtectedListeners = []netip.AddrPort{admin}
	})
	cfg := s.cfg
	cfg.ProtectedListeners = nil
	if err := s.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	if s.live.load().AllowedAddrPort(netip.MustParseAddrPort("127.0.0.1:9641")) {
		t.Fatal("the admin port is open to the relay after a reload")
	}
	if !s.live.load().AllowedAddrPort(netip.MustParseAddrPort("127.0.0.1:9642")) {
		t.Fatal("127.0.0.1:9642 refused: the reload closed more than the listener ports")
	}
}
