package server

import (
	"github.com/stund/stund/internal/stunwire"
	"github.com/stund/stund/server/admin"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pion/stun/v4"
)

// TCP allocations (RFC 6062) against the real server over loopback: pion's
// client allocates a TCP relay on a TCP control connection, opens a peer
// data connection with Connect + ConnectionBind on a second TCP connection
// (§4.3), and accepts one that the peer opens toward the relay through a
// ConnectionAttempt (§4.4).

// TestTURNTCPAllocation: a TCP relay to a TCP peer on 127.0.0.1, data both
// ways on a connection the client opened (Connect, ConnectionBind) and on
// one the peer opened (ConnectionAttempt, ConnectionBind).
func TestTURNTCPAllocation(t *testing.T) {
	s := startTURNServer(t, func(c *Config) {
		c.DisableTCP = false
		c.AllowPeers = mustPrefixes(t, "127.0.0.0/8")
	})
	peerLn := tcpPeer(t)

	c := newTCPTURNClient(t, s.TCPAddrs()[0], "alice", "alice-pw")
	alloc, err := c.AllocateTCP()
	if err != nil {
		t.Fatalf("AllocateTCP: %v", err)
	}
	defer alloc.Close()
	relay := stunwire.AddrPortOf(alloc.Addr())
	if relay.Addr() != netip.MustParseAddr("127.0.0.1") || relay.Port() < DefaultRelayPortMin {
		t.Fatalf("relayed address %v, want 127.0.0.1 in the relay range", relay)
	}
	if s.AllocationCount() != 1 {
		t.Fatalf("server has %d allocations, want 1", s.AllocationCount())
	}

	// Client-initiated: Connect, then ConnectionBind on a new connection.
	dc, pc := dialPeer(t, alloc, peerLn)
	if got := stunwire.AddrPortOf(pc.RemoteAddr()); got != relay {
		t.Errorf("peer sees the connection from %v, want the relayed address %v", got, relay)
	}
	echoBothWays(t, dc, pc, "outbound")

	// Peer-initiated: the peer connects to the relayed address (permitted
	// by the Dial's CreatePermission for 127.0.0.1); the server announces
	// it with a ConnectionAttempt and the client binds it.
	inbound := make(chan net.Conn, 1)
	go func() {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)}, Timeout: e2eTimeout}
		conn, err := d.Dial("tcp4", relay.String())
		if err != nil {
			close(inbound)
			return
		}
		inbound <- conn
	}()
	_ = alloc.SetDeadline(time.Now().Add(e2eTimeout))
	ac, err := alloc.Accept()
	if err != nil {
		t.Fatalf("Accept (ConnectionAttempt): %v", err)
	}
	defer ac.Close()
	var ic net.Conn
	select {
	case ic = <-inbound:
	case <-time.After(e2eTimeout):
	}
	if ic == nil {
		t.Fatal("the peer could not connect to the relayed address")
	}
	defer ic.Close()
	echoBothWays(t, ac, ic, "inbound")

	// The allocation's usage counts what its peer connections carried,
	// as a UDP relay's does (usage records).
	out := len("outbound: client to peer") + len("inbound: client to peer")
	in := len("outbound: peer to client") + len("inbound: peer to client")
	var as []admin.Allocation
	// A write is counted just after the peer could read it.
	for i := 0; i < 200; i++ {
		if as = s.Allocations("alice"); len(as) == 1 && as[0].BytesOut >= uint64(out) && as[0].BytesIn >= uint64(in) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if len(as) != 1 {
		t.Fatalf("Allocations(alice) = %+v", as)
	}
	if as[0].BytesOut != uint64(out) || as[0].BytesIn != uint64(in) || as[0].Transport != "tcp" {
		t.Fatalf("usage %d bytes to peers, %d from (%s), want %d and %d (tcp)", as[0].BytesOut, as[0].BytesIn, as[0].Transport, out, in)
	}
}

// TestTURNTCPConnectDefaultPolicy: with no --allow-peer, Connect toward a
// loopback peer is refused with a signed 403 (RFC 6062 §5.2, RFC 8656
// §9.2) and no connection reaches the peer.
func TestTURNTCPConnectDefaultPolicy(t *testing.T) {
	s := startTURNServer(t, func(c *Config) { c.DisableTCP = false })
	peerLn := tcpPeer(t)
	c := dialFront(t, s, true, "alice", "alice-pw")
	r := c.signed(stun.MethodAllocate, requestedTransportTCP)
	if r.Type.Class != stun.ClassSuccessResponse {
		t.Fatalf("Allocate TCP: %v code %d", r.Type, errorCode(r))
	}
	peer := peerAddr(stunwire.AddrPortOf(peerLn.Addr()))
	c.wantSignedError(c.signed(stun.MethodConnect, peer), 403)
	c.wantSignedError(c.signed(stun.MethodConnect, peerAddr(netip.MustParseAddrPort("169.254.169.254:80"))), 403)

	_ = peerLn.SetDeadline(time.Now().Add(300 * time.Millisecond)) // a safety margin: loopback connects in microseconds
	if conn, err := peerLn.Accept(); err == nil {
		conn.Close()
		t.Fatalf("a refused peer got a connection from %v", conn.RemoteAddr())
	}
}

// requestedTransportTCP is REQUESTED-TRANSPORT = 6 (RFC 6062 §6.1).
var requestedTransportTCP = stun.RawAttribute{Type: stun.AttrRequestedTransport, Value: []byte{6, 0, 0, 0}}
