package server

import (
	"github.com/stund/stund/internal/stunwire"
	"net/netip"
	"testing"

	"github.com/pion/stun/v4"
)

// Behind a cloud 1:1 NAT (--advertise): the host binds the private
// address, clients must be told the public one. Here 127.0.0.1 plays the
// private address and 198.51.100.7 (TEST-NET-2) the public one; the
// alternate IP 127.0.0.2 has no mapping.

var (
	advPrivate = netip.MustParseAddr("127.0.0.1")
	advPublic  = netip.MustParseAddr("198.51.100.7")
)

func startAdvertised(t *testing.T) *Server {
	return startTURNServer(t, func(c *Config) {
		c.DisableTCP = false
		c.Advertise = map[netip.Addr]netip.Addr{advPrivate: advPublic}
		c.AllowPeers = mustPrefixes(t, "127.0.0.0/8")
	})
}

// TestAdvertiseBinding: over real sockets, RESPONSE-ORIGIN carries the
// public form of the socket that answered, OTHER-ADDRESS the alternate's
// (unmapped) address (RFC 5780 §7.3), XOR-MAPPED-ADDRESS the client as seen.
func TestAdvertiseBinding(t *testing.T) {
	s := startAdvertised(t)
	c := dialFront(t, s, false, "", "")
	// A zero CHANGE-REQUEST makes it an RFC 5780 request.
	r := c.rt(stun.TransactionID, stun.BindingRequest,
		stun.RawAttribute{Type: stun.AttrChangeRequest, Value: []byte{0, 0, 0, 0}}, stun.Fingerprint)
	if r.Type != stun.BindingSuccess {
		t.Fatalf("Binding: %v", r.Type)
	}
	var xm stun.XORMappedAddress
	if err := xm.GetFrom(r); err != nil || xm.String() != c.local().String() {
		t.Errorf("XOR-MAPPED-ADDRESS %v (%v), want %v", xm, err, c.local())
	}
	var ro stun.ResponseOrigin
	if err := ro.GetFrom(r); err != nil {
		t.Fatalf("RESPONSE-ORIGIN: %v", err)
	}
	if want := netip.AddrPortFrom(advPublic, s.Grid()[0][0].Port()); ro.String() != want.String() {
		t.Errorf("RESPONSE-ORIGIN %v, want the public %v", ro, want)
	}
	var oa stun.OtherAddress
	if err := oa.GetFrom(r); err != nil {
		t.Fatalf("OTHER-ADDRESS: %v", err)
	}
	if want := s.Grid()[1][1]; oa.String() != want.String() {
		t.Errorf("OTHER-ADDRESS %v, want %v (no mapping for the alternate IP)", oa, want)
	}
}

// TestAdvertiseRelayedAddress: XOR-RELAYED-ADDRESS carries the public IP,
// while the relay is bound on the private one: a peer on 127.0.0.1 sees
// the relay there, on the announced port, and data goes both ways.
func TestAdvertiseRelayedAddress(t *testing.T) {
	s := startAdvertised(t)
	c, _ := newTURNClient(t, s, "alice", "alice-pw")
	relay, err := c.Allocate()
	if err != nil {
		t.Fatalf("Allocate: %v", err)
	}
	defer relay.Close()
	announced := stunwire.AddrPortOf(relay.LocalAddr())
	if announced.Addr() != advPublic {
		t.Fatalf("XOR-RELAYED-ADDRESS %v, want IP %v", announced, advPublic)
	}

	peer := udpPeer(t, "udp4")
	from := relayToPeer(t, relay, peer, "to-peer")
	if got, want := stunwire.AddrPortOf(from), netip.AddrPortFrom(advPrivate, announced.Port()); got != want {
		t.Fatalf("peer sees the relay at %v, want %v (private IP, announced port)", got, want)
	}
	peerToClient(t, peer, relay, from, "to-client")
}

// TestAdvertiseTCPRelay: a TCP allocation announces the public IP too, and
// Connect still reaches the peer: the outgoing connection must be bound
// on the private address the host has, not the announced one (RFC 6062
// §5.2).
func TestAdvertiseTCPRelay(t *testing.T) {
	s := startAdvertised(t)
	peerLn := tcpPeer(t)
	c := newTCPTURNClient(t, s.TCPAddrs()[0], "alice", "alice-pw")
	alloc, err := c.AllocateTCP()
	if err != nil {
		t.Fatalf("AllocateTCP: %v", err)
	}
	defer alloc.Close()
	announced := stunwire.AddrPortOf(alloc.Addr())
	if announced.Addr() != advPublic {
		t.Fatalf("XOR-RELAYED-ADDRESS %v, want IP %v", announced, advPublic)
	}
	dc, pc := dialPeer(t, alloc, peerLn)
	if got, want := stunwire.AddrPortOf(pc.RemoteAddr()), netip.AddrPortFrom(advPrivate, announced.Port()); got != want {
		t.Errorf("peer sees the connection from %v, want %v", got, want)
	}
	echoBothWays(t, dc, pc, "advertised")
}
