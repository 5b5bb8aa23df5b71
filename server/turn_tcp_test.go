package server

import (
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pion/logging"
	"github.com/pion/stun/v4"
	"github.com/pion/turn/v5"
)

// TCP allocations (RFC 6062) against the real server over loopback: pion's
// client allocates a TCP relay on a TCP control connection, opens a peer
// data connection with Connect + ConnectionBind on a second TCP connection
// (§4.3), and accepts one that the peer opens toward the relay through a
// ConnectionAttempt (§4.4).

// newTCPTURNClient is pion's client on a TCP control connection to addr.
func newTCPTURNClient(t *testing.T, addr netip.AddrPort, user, pass string) *turn.Client {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr.String(), e2eTimeout)
	if err != nil {
		t.Fatal(err)
	}
	lf := logging.NewDefaultLoggerFactory()
	lf.DefaultLogLevel = logging.LogLevelDisabled
	c, err := turn.NewClient(&turn.ClientConfig{
		STUNServerAddr: addr.String(),
		TURNServerAddr: addr.String(),
		Username:       user, Password: pass,
		Conn:          turn.NewSTUNConn(conn),
		LoggerFactory: lf,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Listen(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); conn.Close() })
	return c
}

// echoBothWays writes msg on a and expects it on b, then the reverse.
func echoBothWays(t *testing.T, a, b net.Conn, what string) {
	t.Helper()
	for _, d := range []struct {
		from, to net.Conn
		msg      string
	}{{a, b, what + ": client to peer"}, {b, a, what + ": peer to client"}} {
		if _, err := d.from.Write([]byte(d.msg)); err != nil {
			t.Fatalf("%s: write: %v", d.msg, err)
		}
		buf := make([]byte, len(d.msg))
		_ = d.to.SetReadDeadline(time.Now().Add(e2eTimeout))
		if _, err := io.ReadFull(d.to, buf); err != nil {
			t.Fatalf("%s: read: %v", d.msg, err)
		}
		if string(buf) != d.msg {
			t.Fatalf("%s: got %q", d.msg, buf)
		}
	}
}

// TestTURNTCPAllocation: a TCP relay to a TCP peer on 127.0.0.1, data both
// ways on a connection the client opened (Connect, ConnectionBind) and on
// one the peer opened (ConnectionAttempt, ConnectionBind).
func TestTURNTCPAllocation(t *testing.T) {
	s := startTURNServer(t, func(c *Config) {
		c.DisableTCP = false
		c.AllowPeers = mustPrefixes(t, "127.0.0.0/8")
	})
	peerLn, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer peerLn.Close()

	c := newTCPTURNClient(t, s.TCPAddrs()[0], "alice", "alice-pw")
	alloc, err := c.AllocateTCP()
	if err != nil {
		t.Fatalf("AllocateTCP: %v", err)
	}
	defer alloc.Close()
	relay := addrPortOf(alloc.Addr())
	if relay.Addr() != netip.MustParseAddr("127.0.0.1") || relay.Port() < DefaultRelayPortMin {
		t.Fatalf("relayed address %v, want 127.0.0.1 in the relay range", relay)
	}
	if s.AllocationCount() != 1 {
		t.Fatalf("server has %d allocations, want 1", s.AllocationCount())
	}

	// Client-initiated: Connect, then ConnectionBind on a new connection.
	accepted := make(chan net.Conn, 1)
	go func() {
		pc, err := peerLn.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- pc
	}()
	dc, err := alloc.Dial("tcp4", peerLn.Addr().String())
	if err != nil {
		t.Fatalf("Connect/ConnectionBind to %v: %v", peerLn.Addr(), err)
	}
	defer dc.Close()
	var pc net.Conn
	select {
	case pc = <-accepted:
	case <-time.After(e2eTimeout):
	}
	if pc == nil {
		t.Fatal("the peer saw no connection")
	}
	defer pc.Close()
	if got := addrPortOf(pc.RemoteAddr()); got != relay {
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
}

// TestTURNTCPConnectDefaultPolicy: with no --allow-peer, Connect toward a
// loopback peer is refused with a signed 403 (RFC 6062 §5.2, RFC 8656
// §9.2) and no connection reaches the peer.
func TestTURNTCPConnectDefaultPolicy(t *testing.T) {
	s := startTURNServer(t, func(c *Config) { c.DisableTCP = false })
	peerLn, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer peerLn.Close()
	c := dialFront(t, s, true, "alice", "alice-pw")
	r := c.signed(stun.MethodAllocate, requestedTransportTCP)
	if r.Type.Class != stun.ClassSuccessResponse {
		t.Fatalf("Allocate TCP: %v code %d", r.Type, errorCode(r))
	}
	peer := peerAddr(addrPortOf(peerLn.Addr()))
	c.wantSignedError(c.signed(stun.MethodConnect, peer), 403)
	c.wantSignedError(c.signed(stun.MethodConnect, peerAddr(netip.MustParseAddrPort("169.254.169.254:80"))), 403)

	_ = peerLn.(*net.TCPListener).SetDeadline(time.Now().Add(300 * time.Millisecond)) // a safety margin: loopback connects in microseconds
	if conn, err := peerLn.Accept(); err == nil {
		conn.Close()
		t.Fatalf("a refused peer got a connection from %v", conn.RemoteAddr())
	}
}

// requestedTransportTCP is REQUESTED-TRANSPORT = 6 (RFC 6062 §6.1).
var requestedTransportTCP = stun.RawAttribute{Type: stun.AttrRequestedTransport, Value: []byte{6, 0, 0, 0}}
