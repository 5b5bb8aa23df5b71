package server

import (
	"github.com/stund/stund/internal/stunwire"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pion/stun/v4"
	"github.com/pion/turn/v5"

	"github.com/stund/stund/internal/testutil"
)

// IPv6 relays (RFC 6156, RFC 8656 §7.2) on a single-IP server on ::1 (the
// host has one IPv6 loopback address, so no RFC 5780 alternate).

var (
	v6Loopback = netip.MustParseAddr("::1")
	v4Loopback = netip.MustParseAddr("127.0.0.1")
)

func startIPServer(t *testing.T, ip netip.Addr, mod func(*Config)) *Server {
	t.Helper()
	if c, err := net.ListenPacket("udp6", "[::1]:0"); err != nil {
		testutil.SkipUnlessRequired(t, "no IPv6 loopback: %v", err)
	} else {
		c.Close()
	}
	return startTURNServer(t, func(c *Config) {
		c.PrimaryIP, c.AlternateIP = ip, netip.Addr{}
		if mod != nil {
			mod(c)
		}
	})
}

// requestedFamily is REQUESTED-ADDRESS-FAMILY (RFC 6156 §4.1.1): 0x01
// IPv4, 0x02 IPv6.
func requestedFamily(f byte) stun.Setter {
	return stun.RawAttribute{Type: stun.AttrRequestedAddressFamily, Value: []byte{f, 0, 0, 0}}
}

// TestTURNIPv6Relay: pion's client asks for an IPv6 relay
// (REQUESTED-ADDRESS-FAMILY IPv6) from ::1 and relays to a peer on ::1,
// opened with AllowPeers ::1/128; data goes both ways.
func TestTURNIPv6Relay(t *testing.T) {
	s := startIPServer(t, v6Loopback, func(c *Config) { c.AllowPeers = mustPrefixes(t, "::1/128") })
	pc, err := net.ListenPacket("udp6", "[::1]:0")
	if err != nil {
		t.Fatal(err)
	}
	c := newPionClient(t, &turn.ClientConfig{
		STUNServerAddr: serverAddr(s).String(), TURNServerAddr: serverAddr(s).String(),
		Username: "alice", Password: "alice-pw",
		Conn: pc, RTO: 100 * time.Millisecond,
		RequestedAddressFamily: turn.RequestedAddressFamilyIPv6,
	})
	relay, err := c.Allocate()
	if err != nil {
		t.Fatalf("Allocate IPv6: %v", err)
	}
	defer relay.Close()
	ra := stunwire.AddrPortOf(relay.LocalAddr())
	if ra.Addr() != v6Loopback {
		t.Fatalf("XOR-RELAYED-ADDRESS %v, want ::1", ra)
	}

	peer := udpPeer(t, "udp6")
	from := relayToPeer(t, relay, peer, "to-peer")
	if stunwire.AddrPortOf(from) != ra {
		t.Errorf("peer sees %v, the relayed address is %v", from, ra)
	}
	for range 3 {
		peerToClient(t, peer, relay, from, "to-client")
	}
}

// TestTURNAddressFamily: an Allocate naming a family the server cannot
// relay gets a signed 440 (RFC 6156 §4.2, RFC 8656 §7.2), both ways round
// (pion alone tried to bind the other family 32 times and answered 508).
// Without REQUESTED-ADDRESS-FAMILY the relay is of the server's family:
// RFC 6156 §4.2 says IPv4, which an IPv6-only server cannot give, and
// pion (like coturn) allocates the listener's family instead, which is
// what IPv6-only clients that omit the attribute need.
func TestTURNAddressFamily(t *testing.T) {
	for _, tc := range []struct {
		name  string
		ip    netip.Addr
		other byte // the family this server cannot relay
		same  byte
	}{
		{"ipv6-server", v6Loopback, 0x01, 0x02},
		{"ipv4-server", v4Loopback, 0x02, 0x01},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := startIPServer(t, tc.ip, nil)
			c := rawClientOn(t, s, tc.ip, "alice", "alice-pw")
			c.wantSignedError(c.signed(stun.MethodAllocate, requestedTransportUDP, requestedFamily(tc.other)), 440)
			c.wantSignedError(c.signed(stun.MethodAllocate, requestedTransportUDP, requestedFamily(0x03)), 440)
			if s.AllocationCount() != 0 {
				t.Fatal("allocated despite 440")
			}
			r := c.signed(stun.MethodAllocate, requestedTransportUDP, requestedFamily(tc.same))
			if r.Type.Class != stun.ClassSuccessResponse {
				t.Fatalf("Allocate in the server's family: %v code %d", r.Type, errorCode(r))
			}
			var relayed stun.XORMappedAddress
			if err := relayed.GetFromAs(r, stun.AttrXORRelayedAddress); err != nil || !netip.MustParseAddr(relayed.IP.String()).Unmap().Is4() != (tc.same == 0x02) {
				t.Fatalf("XOR-RELAYED-ADDRESS %v (%v), want family %d", relayed, err, tc.same)
			}

			// No attribute: the server's own family.
			c2 := rawClientOn(t, s, tc.ip, "bob", "bob-pw")
			r = c2.signed(stun.MethodAllocate, requestedTransportUDP)
			if r.Type.Class != stun.ClassSuccessResponse {
				t.Fatalf("Allocate without REQUESTED-ADDRESS-FAMILY: %v code %d", r.Type, errorCode(r))
			}
			if err := relayed.GetFromAs(r, stun.AttrXORRelayedAddress); err != nil || netip.MustParseAddr(relayed.IP.String()).Unmap() != tc.ip {
				t.Fatalf("XOR-RELAYED-ADDRESS %v (%v), want %v", relayed, err, tc.ip)
			}
		})
	}
}
