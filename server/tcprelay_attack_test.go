package server

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pion/stun/v4"
	"github.com/stund/stund/internal/stunwire"
)

// Attacks on the relays, against the real server over loopback: two
// tenants on one relayed address, and a flood of peer connections.

// tcpAllocate makes a TCP allocation (RFC 6062 §5.1) on a fresh TCP control
// connection as user and returns the client and the answer.
func tcpAllocate(t *testing.T, s *Server, user string) (*frontClient, *stun.Message) {
	t.Helper()
	c := dialFront(t, s, true, user, user+"-pw")
	return c, c.signed(stun.MethodAllocate, requestedTransportTCP)
}

// relayedAddr is the XOR-RELAYED-ADDRESS of a successful Allocate.
func relayedAddr(t *testing.T, r *stun.Message) netip.AddrPort {
	t.Helper()
	if r.Type.Class != stun.ClassSuccessResponse {
		t.Fatalf("Allocate: %v code %d", r.Type, errorCode(r))
	}
	var a stun.XORMappedAddress
	if err := a.GetFromAs(r, stun.AttrXORRelayedAddress); err != nil {
		t.Fatalf("Allocate answer without XOR-RELAYED-ADDRESS: %v", err)
	}
	ip, _ := netip.AddrFromSlice(a.IP)
	return netip.AddrPortFrom(ip.Unmap(), uint16(a.Port))
}

// connectionID is the CONNECTION-ID of a Connect answer or a
// ConnectionAttempt (RFC 6062 §6.2.1).
func connectionID(t *testing.T, r *stun.Message) stun.RawAttribute {
	t.Helper()
	v, err := r.Get(stun.AttrConnectionID)
	if err != nil || len(v) != 4 {
		t.Fatalf("%v without CONNECTION-ID", r.Type)
	}
	return stun.RawAttribute{Type: stun.AttrConnectionID, Value: v}
}

// bindData opens a data connection and binds it to cid (ConnectionBind,
// RFC 6062 §5.4); from then on it carries the peer's bytes.
func bindData(t *testing.T, s *Server, user string, cid stun.RawAttribute) net.Conn {
	t.Helper()
	d := dialFront(t, s, true, user, user+"-pw")
	if r := d.signed(stun.MethodConnectionBind, cid); r.Type.Class != stun.ClassSuccessResponse {
		t.Fatalf("ConnectionBind: %v code %d", r.Type, errorCode(r))
	}
	return d.conn
}

// indication reads frames off the control connection until an indication
// of method arrives.
func (c *frontClient) indication(method stun.Method) *stun.Message {
	c.t.Helper()
	_ = c.conn.SetReadDeadline(time.Now().Add(e2eTimeout))
	for {
		hdr, err := c.rd.Peek(4)
		if err != nil {
			c.t.Fatalf("waiting for a %v indication: %v", method, err)
		}
		n, _, err := stunwire.FrameLen(hdr)
		if err != nil {
			c.t.Fatalf("unframeable: %v", err)
		}
		frame := make([]byte, n)
		if _, err := io.ReadFull(c.rd, frame); err != nil {
			c.t.Fatalf("waiting for a %v indication: %v", method, err)
		}
		m := &stun.Message{Raw: frame}
		if m.Decode() == nil && m.Type == stun.NewType(method, stun.ClassIndication) {
			return m
		}
	}
}

// waitClosed reads conn until the other end closes it, and fails the test
// if it stays open for e2eTimeout.
func waitClosed(t *testing.T, conn net.Conn, what string) {
	t.Helper()
	_ = conn.SetReadDeadline(time.Now().Add(e2eTimeout))
	buf := make([]byte, 64)
	for {
		_, err := conn.Read(buf)
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("%s: still open after %v", what, e2eTimeout)
		}
		if err != nil {
			return
		}
	}
}

// freeLoopbackPort returns a port that is free for TCP and UDP on ip.
func freeLoopbackPort(t *testing.T, ip netip.Addr) uint16 {
	t.Helper()
	for try := 0; try < 20; try++ {
		ln, err := net.ListenTCP("tcp4", net.TCPAddrFromAddrPort(netip.AddrPortFrom(ip, 0)))
		if err != nil {
			t.Fatal(err)
		}
		port := uint16(ln.Addr().(*net.TCPAddr).Port)
		pc, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(ip, port)))
		ln.Close()
		if err == nil {
			pc.Close()
			return port
		}
	}
	t.Fatal("no port free for both TCP and UDP")
	return 0
}

// TestRelayPortOneTenant: with a one-port relay range, a second TCP
// allocation is refused with 508 (RFC 8656 §7.2) instead of sharing the
// first one's relayed address, and gets it once the first is deleted. The
// same holds for UDP relays, and RelayStats counts the port.
func TestRelayPortOneTenant(t *testing.T) {
	// Addresses of their own, so that no other test's relays take the port.
	ip := netip.MustParseAddr("127.0.0.21")
	port := freeLoopbackPort(t, ip)
	s := startTURNServer(t, func(c *Config) {
		c.PrimaryIP, c.AlternateIP = ip, netip.MustParseAddr("127.0.0.22")
		c.DisableTCP = false
		c.RelayPortMin, c.RelayPortMax = port, port
	})

	alice, r := tcpAllocate(t, s, "alice")
	if got := relayedAddr(t, r); got != netip.AddrPortFrom(ip, port) {
		t.Fatalf("alice's relayed address %v, want %v", got, netip.AddrPortFrom(ip, port))
	}
	bob, r := tcpAllocate(t, s, "bob")
	bob.wantSignedError(r, 508)
	if st := s.Relays(); st.TCPPortsInUse != 1 || st.PortsPerIP != 1 {
		t.Fatalf("Relays() = %+v, want 1 TCP port in use of 1", st)
	}

	// Refresh to 0 deletes alice's allocation before the answer
	// (RFC 8656 §7.3), and with it the port.
	if r := alice.signed(stun.MethodRefresh, lifetime(0)); r.Type.Class != stun.ClassSuccessResponse {
		t.Fatalf("Refresh 0: %v code %d", r.Type, errorCode(r))
	}
	if got := relayedAddr(t, bob.signed(stun.MethodAllocate, requestedTransportTCP)); got.Port() != port {
		t.Fatalf("bob got %v after alice left, want port %d", got, port)
	}

	// UDP: one port, one allocation.
	carol := dialFront(t, s, false, "carol", "carol-pw")
	if got := relayedAddr(t, carol.allocate()); got.Port() != port {
		t.Fatalf("carol's UDP relay %v, want port %d", got, port)
	}
	alice2 := dialFront(t, s, false, "alice", "alice-pw")
	alice2.wantSignedError(alice2.signed(stun.MethodAllocate, requestedTransportUDP), 508)
	if st := s.Relays(); st.UDPPortsInUse != 1 || st.TCPPortsInUse != 1 {
		t.Fatalf("Relays() = %+v, want one UDP and one TCP port in use", st)
	}
}

// TestConnectFloodBounded: one TCP allocation gets maxPeerConnsPerAllocation
// peer connections with Connect; the next Connect is answered 447 (RFC 6062
// §5.2) without a connection and counted; closing one (ConnectionBind, then
// the data connection closes) frees its slot for the next Connect.
func TestConnectFloodBounded(t *testing.T) {
	s := startTURNServer(t, func(c *Config) {
		c.DisableTCP = false
		c.AllowPeers = mustPrefixes(t, "127.0.0.0/8")
	})
	peers := make([]*net.TCPListener, maxPeerConnsPerAllocation+1)
	for i := range peers {
		peers[i] = tcpPeer(t)
	}
	ctl, r := tcpAllocate(t, s, "alice")
	relayedAddr(t, r)

	var first stun.RawAttribute
	for i, p := range peers[:maxPeerConnsPerAllocation] {
		r := ctl.signed(stun.MethodConnect, peerAddr(stunwire.AddrPortOf(p.Addr())))
		if r.Type.Class != stun.ClassSuccessResponse {
			t.Fatalf("Connect %d: %v code %d", i, r.Type, errorCode(r))
		}
		if i == 0 {
			first = connectionID(t, r)
		}
	}
	last := peerAddr(stunwire.AddrPortOf(peers[maxPeerConnsPerAllocation].Addr()))
	ctl.wantSignedError(ctl.signed(stun.MethodConnect, last), 447)
	if st := s.Relays(); st.PeerConnectionsRefusedOut != 1 || st.PeerConnections != maxPeerConnsPerAllocation {
		t.Fatalf("Relays() = %+v, want %d connections and 1 refused", st, maxPeerConnsPerAllocation)
	}
	if v := metricValue(t, s, "stund_peer_connections_refused_total", "direction=connect"); v != 1 {
		t.Errorf("stund_peer_connections_refused_total{direction=connect} = %v, want 1", v)
	}
	// The refused Connect reached no peer: the next connection the last
	// peer accepts is one this test opens itself.
	mine := dialMarker(t, peers[maxPeerConnsPerAllocation])
	if got := acceptOne(t, peers[maxPeerConnsPerAllocation]); got != mine {
		t.Fatalf("the peer of the refused Connect was connected from %v", got)
	}

	// Bind the first connection, then close it: the server closes the
	// peer's end after freeing the slot.
	peerEnd, err := peers[0].Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer peerEnd.Close()
	bindData(t, s, "alice", first).Close()
	waitClosed(t, peerEnd, "the peer end of a closed data connection")
	if r := ctl.signed(stun.MethodConnect, last); r.Type.Class != stun.ClassSuccessResponse {
		t.Fatalf("Connect after a connection closed: %v code %d", r.Type, errorCode(r))
	}
}

// dialMarker connects to ln from a port of its own and returns that
// address, so that acceptOne can tell the test's own connection apart.
func dialMarker(t *testing.T, ln *net.TCPListener) netip.AddrPort {
	t.Helper()
	c, err := net.DialTimeout("tcp4", ln.Addr().String(), e2eTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return stunwire.AddrPortOf(c.LocalAddr())
}

// acceptOne returns the source of the next connection ln accepts.
func acceptOne(t *testing.T, ln *net.TCPListener) netip.AddrPort {
	t.Helper()
	_ = ln.SetDeadline(time.Now().Add(e2eTimeout))
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return stunwire.AddrPortOf(c.RemoteAddr())
}

// TestConnectFloodPerUser: a user's peer connections are bounded over all
// the user's TCP allocations (maxPeerConnsPerUser), not only per
// allocation.
func TestConnectFloodPerUser(t *testing.T) {
	s := startTURNServer(t, func(c *Config) {
		c.DisableTCP = false
		c.AllowPeers = mustPrefixes(t, "127.0.0.0/8")
	})
	peers := make([]*net.TCPListener, maxPeerConnsPerAllocation)
	for i := range peers {
		peers[i] = tcpPeer(t)
	}
	allocs := maxPeerConnsPerUser / maxPeerConnsPerAllocation
	for a := 0; a < allocs; a++ {
		ctl, r := tcpAllocate(t, s, "alice")
		relayedAddr(t, r)
		for i, p := range peers {
			if r := ctl.signed(stun.MethodConnect, peerAddr(stunwire.AddrPortOf(p.Addr()))); r.Type.Class != stun.ClassSuccessResponse {
				t.Fatalf("allocation %d, Connect %d: %v code %d (dial failures by reason: %v; relays: %+v)", a, i, r.Type, errorCode(r), s.dialFailures(), s.Relays())
			}
		}
	}
	ctl, r := tcpAllocate(t, s, "alice")
	relayedAddr(t, r)
	ctl.wantSignedError(ctl.signed(stun.MethodConnect, peerAddr(stunwire.AddrPortOf(peers[0].Addr()))), 447)
	// Another user is not held back by alice.
	other, r := tcpAllocate(t, s, "bob")
	relayedAddr(t, r)
	if r := other.signed(stun.MethodConnect, peerAddr(stunwire.AddrPortOf(peers[0].Addr()))); r.Type.Class != stun.ClassSuccessResponse {
		t.Fatalf("bob's Connect: %v code %d", r.Type, errorCode(r))
	}
	if st := s.Relays(); st.PeerConnectionsRefusedOut != 1 || st.PeerConnections != maxPeerConnsPerUser+1 {
		t.Fatalf("Relays() = %+v, want %d connections and 1 refused", st, maxPeerConnsPerUser+1)
	}
}

// TestAcceptFloodBounded: peers connecting to a relayed address are
// announced (ConnectionAttempt, RFC 6062 §5.3) up to
// maxPeerConnsPerAllocation; the next one is closed at once and counted.
func TestAcceptFloodBounded(t *testing.T) {
	s := startTURNServer(t, func(c *Config) {
		c.DisableTCP = false
		c.AllowPeers = mustPrefixes(t, "127.0.0.0/8")
	})
	ctl, r := tcpAllocate(t, s, "alice")
	relay := relayedAddr(t, r)
	if r := ctl.signed(stun.MethodCreatePermission, peerAddr(netip.MustParseAddrPort("127.0.0.1:9"))); r.Type.Class != stun.ClassSuccessResponse {
		t.Fatalf("CreatePermission: %v code %d", r.Type, errorCode(r))
	}
	dial := func() net.Conn {
		c, err := net.DialTimeout("tcp4", relay.String(), e2eTimeout)
		if err != nil {
			t.Fatalf("peer connect to %v: %v", relay, err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	for i := 0; i < maxPeerConnsPerAllocation; i++ {
		c := dial()
		var from stun.XORMappedAddress
		m := ctl.indication(stun.MethodConnectionAttempt)
		if err := from.GetFromAs(m, stun.AttrXORPeerAddress); err != nil || from.Port != int(stunwire.AddrPortOf(c.LocalAddr()).Port()) {
			t.Fatalf("ConnectionAttempt %d names %v (%v), want %v", i, from, err, c.LocalAddr())
		}
	}
	waitClosed(t, dial(), "a peer connection over the bound")
	if st := s.Relays(); st.PeerConnectionsRefusedIn != 1 || st.PeerConnections != maxPeerConnsPerAllocation {
		t.Fatalf("Relays() = %+v, want %d connections and 1 refused", st, maxPeerConnsPerAllocation)
	}
}

// TestPeerConnReleasedOnce: pion closes a bound peer connection twice;
// the slot is given back once, so the counts never go below what is open.
func TestPeerConnReleasedOnce(t *testing.T) {
	k := portKey{ip: netip.MustParseAddr("127.0.0.31"), tcp: true, port: 1}
	owner := new(livePolicy)
	relays.mu.Lock()
	relays.held[k] = &heldPort{owner: owner, user: "u", open: true}
	relays.mu.Unlock()
	defer relays.release(k, false)
	var conns [2]*peerConn
	for i := range conns {
		if err := relays.openConn(k); err != nil {
			t.Fatal(err)
		}
		a, b := net.Pipe()
		defer b.Close()
		conns[i] = &peerConn{Conn: a, key: k}
	}
	for i := 0; i < 3; i++ {
		_ = conns[0].Close()
	}
	if st := relays.stats(owner); st.PeerConnections != 1 {
		t.Fatalf("%d peer connections after closing one of two three times, want 1", st.PeerConnections)
	}
	relays.mu.Lock()
	users := relays.users[userKey{owner, "u"}]
	relays.mu.Unlock()
	if users != 1 {
		t.Fatalf("user count %d, want 1", users)
	}
	_ = conns[1].Close()
	if st := relays.stats(owner); st.PeerConnections != 0 {
		t.Fatalf("%d peer connections after closing both, want 0", st.PeerConnections)
	}
}

// TestConnectFailureCounted: a Connect whose peer refuses gets 447 (RFC
// 6062 §5.2) and the failure is counted by reason for the operator.
func TestConnectFailureCounted(t *testing.T) {
	s := startTURNServer(t, func(c *Config) {
		c.DisableTCP = false
		c.AllowPeers = mustPrefixes(t, "127.0.0.0/8")
	})
	closed := tcpPeer(t)
	to := stunwire.AddrPortOf(closed.Addr())
	closed.Close() // nothing listens there now: the dial is refused
	ctl, r := tcpAllocate(t, s, "alice")
	relayedAddr(t, r)
	ctl.wantSignedError(ctl.signed(stun.MethodConnect, peerAddr(to)), 447)
	if got := s.ops.peerDialFailed[dialRefused].Load(); got != 1 {
		t.Fatalf("refused dials counted %d, want 1 (by reason: %v)", got, s.dialFailures())
	}
}

// dialFailures is the Connect dial failures by reason, for test messages.
func (s *Server) dialFailures() map[string]uint64 {
	m := map[string]uint64{}
	for r := dialFailure(0); r < numDialFailures; r++ {
		m[r.String()] = s.ops.peerDialFailed[r].Load()
	}
	return m
}
