package server

import (
	"github.com/stund/stund/internal/stunwire"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pion/logging"
	"github.com/pion/turn/v5"
)

// Helpers shared by the server's TURN tests: pion's client on each
// transport, loopback peers, and data through a relay both ways.

// newPionClient starts pion's TURN client from cfg with its logging off;
// the client and cfg.Conn are closed when the test ends.
func newPionClient(t *testing.T, cfg *turn.ClientConfig) *turn.Client {
	t.Helper()
	lf := logging.NewDefaultLoggerFactory()
	lf.DefaultLogLevel = logging.LogLevelDisabled
	cfg.LoggerFactory = lf
	c, err := turn.NewClient(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); cfg.Conn.Close() })
	if err := c.Listen(); err != nil {
		t.Fatal(err)
	}
	return c
}

// newStreamTURNClient is pion's client on a TCP or TLS connection to addr.
func newStreamTURNClient(t *testing.T, conn net.Conn, addr netip.AddrPort, user, pass string) *turn.Client {
	t.Helper()
	return newPionClient(t, &turn.ClientConfig{
		STUNServerAddr: addr.String(),
		TURNServerAddr: addr.String(),
		Username:       user, Password: pass,
		Conn: turn.NewSTUNConn(conn),
	})
}

// newTCPTURNClient is pion's client on a TCP control connection to addr.
func newTCPTURNClient(t *testing.T, addr netip.AddrPort, user, pass string) *turn.Client {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr.String(), e2eTimeout)
	if err != nil {
		t.Fatal(err)
	}
	return newStreamTURNClient(t, conn, addr, user, pass)
}

// allocClient is pion's client over "udp" (from 127.0.0.1) or "tcp" to s's
// primary address, as user with password user+"-pw".
func allocClient(t *testing.T, s *Server, network, user string) *turn.Client {
	t.Helper()
	c, _ := injectingClient(t, s, network, user)
	return c
}

// allocRelay is allocClient with an allocation made: the client and its
// relayed PacketConn, closed (Refresh 0) when the test ends.
func allocRelay(t *testing.T, s *Server, network, user string) (*turn.Client, net.PacketConn) {
	t.Helper()
	cl := allocClient(t, s, network, user)
	relay, err := cl.Allocate()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = relay.Close() })
	return cl, relay
}

// injectingClient is allocClient, with inject writing raw bytes to the
// server on the client's own socket or connection.
func injectingClient(t *testing.T, s *Server, network, user string) (c *turn.Client, inject func([]byte)) {
	t.Helper()
	var conn net.PacketConn
	addr := s.Grid()[0][0].String()
	if network == "tcp" {
		addr = s.TCPAddrs()[0].String()
		tc, err := net.DialTimeout("tcp4", addr, e2eTimeout)
		if err != nil {
			t.Fatal(err)
		}
		conn = turn.NewSTUNConn(tc)
		inject = func(b []byte) {
			if _, err := tc.Write(b); err != nil {
				t.Fatal(err)
			}
		}
	} else {
		pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		conn = pc
		inject = func(b []byte) {
			if _, err := pc.WriteTo(b, serverAddr(s)); err != nil {
				t.Fatal(err)
			}
		}
	}
	c = newPionClient(t, &turn.ClientConfig{
		STUNServerAddr: addr, TURNServerAddr: addr,
		Username: user, Password: user + "-pw",
		Conn: conn, RTO: 100 * time.Millisecond,
	})
	return c, inject
}

// udpPeer is a UDP peer on loopback ("udp4": 127.0.0.1, "udp6": ::1),
// closed when the test ends.
func udpPeer(t *testing.T, network string) net.PacketConn {
	t.Helper()
	host := "127.0.0.1"
	if network == "udp6" {
		host = "::1"
	}
	pc, err := net.ListenPacket(network, net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	return pc
}

// tcpPeer is a TCP peer listening on 127.0.0.1, closed when the test ends.
func tcpPeer(t *testing.T) *net.TCPListener {
	t.Helper()
	ln, err := net.ListenTCP("tcp4", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// reachPeer writes msg through relay toward peer until the peer receives it,
// at most tries times, 50 ms apart (pion installs the permission first),
// and returns the address the peer saw it from, or nil if it never arrived.
func reachPeer(t *testing.T, relay, peer net.PacketConn, msg string, tries int) net.Addr {
	t.Helper()
	buf := make([]byte, 1500)
	for i := 0; i < tries; i++ {
		if _, err := relay.WriteTo([]byte(msg), peer.LocalAddr()); err != nil {
			t.Fatalf("relay write: %v", err)
		}
		_ = peer.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		if n, from, err := peer.ReadFrom(buf); err == nil && string(buf[:n]) == msg {
			return from
		}
	}
	return nil
}

// relayToPeer is reachPeer for up to e2eTimeout (100 tries), failing the
// test if msg never reached the peer.
func relayToPeer(t *testing.T, relay, peer net.PacketConn, msg string) net.Addr {
	t.Helper()
	from := reachPeer(t, relay, peer, msg, 100)
	if from == nil {
		t.Fatalf("peer %v received nothing through the relay", peer.LocalAddr())
	}
	return from
}

// peerToClient writes msg from peer to the relayed address and expects the
// client to read it on relay, from the peer's address.
func peerToClient(t *testing.T, peer, relay net.PacketConn, relayed net.Addr, msg string) {
	t.Helper()
	if _, err := peer.WriteTo([]byte(msg), relayed); err != nil {
		t.Fatal(err)
	}
	_ = relay.SetReadDeadline(time.Now().Add(e2eTimeout))
	buf := make([]byte, 1500)
	n, src, err := relay.ReadFrom(buf)
	if err != nil || string(buf[:n]) != msg || stunwire.AddrPortOf(src) != stunwire.AddrPortOf(peer.LocalAddr()) {
		t.Fatalf("client read %q from %v: %v", buf[:n], src, err)
	}
}

// peerDialer is a TCP allocation (pion's client.TCPAllocation).
type peerDialer interface {
	Dial(network, addr string) (net.Conn, error)
}

// dialPeer opens a connection from the TCP allocation to the peer listening
// on ln (Connect + ConnectionBind, RFC 6062 §4.3) and returns the client's
// end and the peer's; both are closed when the test ends.
func dialPeer(t *testing.T, alloc peerDialer, ln net.Listener) (client, peer net.Conn) {
	t.Helper()
	accepted := make(chan net.Conn, 1)
	go func() {
		pc, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- pc
	}()
	client, err := alloc.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatalf("Connect/ConnectionBind to %v: %v", ln.Addr(), err)
	}
	t.Cleanup(func() { client.Close() })
	select {
	case peer = <-accepted:
	case <-time.After(e2eTimeout):
	}
	if peer == nil {
		t.Fatal("the peer saw no connection")
	}
	t.Cleanup(func() { peer.Close() })
	return client, peer
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

// testRelaySocket wraps relay as the generator does, records an allocation
// of user for it in led (on a made-up 5-tuple) and gives the permitted
// peers a permission, as pion's events would.
func testRelaySocket(t *testing.T, relay net.PacketConn, user string, led *ledger, live *livePolicy, ops *opsStats, bw *bandwidth, permitted ...netip.Addr) *relaySocket {
	t.Helper()
	rs := newRelaySocket(relay, stunwire.AddrPortOf(relay.LocalAddr()), user, led, live, ops, bw, nil)
	tuple := fiveTuple{src: netip.AddrPortFrom(netip.MustParseAddr("192.0.2.1"), rs.addr.Port()), dst: netip.MustParseAddrPort("192.0.2.2:3478")}
	led.created(tuple, "udp", user, "", rs.addr)
	for _, p := range permitted {
		led.permCreated(tuple, p)
	}
	return rs
}
