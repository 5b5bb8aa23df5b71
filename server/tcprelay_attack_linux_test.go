package server

import (
	"errors"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/pion/turn/v5"
)

// The dial side of a Connect toward a peer that never answers. Linux only:
// the black hole relies on Linux dropping SYNs to a listener whose accept
// queue is full.

// blackHolePeer is a TCP listener on 127.0.0.1 that drops further SYNs:
// its accept queue (backlog 0) is held full by one connection nobody
// accepts, so a connect to it neither succeeds nor fails: a peer that
// drops SYNs, on loopback.
func blackHolePeer(t *testing.T) netip.AddrPort {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	ap := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(sa.(*syscall.SockaddrInet4).Port))
	filler, err := net.DialTimeout("tcp4", ap.String(), e2eTimeout)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { filler.Close() })
	return ap
}

// TestPeerDialTimesOut: a Connect toward a peer that drops SYNs ends with
// an error when the dial timeout (RFC 6062 §5.2: 447) runs out, instead of
// the kernel's two minutes, and gives its connection slot back.
func TestPeerDialTimesOut(t *testing.T) {
	ip := netip.MustParseAddr("127.0.0.1")
	port := freeLoopbackPort(t, ip)
	var live livePolicy
	live.swap(NewPeerPolicy(mustPrefixes(t, "127.0.0.0/8"), nil, nil))
	var ops opsStats
	g := &relayGenerator{
		inner: &turn.RelayAddressGeneratorPortRange{
			RelayAddress: ip.AsSlice(), Address: ip.String(), MinPort: port, MaxPort: port,
		},
		min: port, max: port, live: &live, ops: &ops, local: ip, led: newLedger(),
		dialTimeout: 100 * time.Millisecond,
	}
	if err := g.Validate(); err != nil {
		t.Fatal(err)
	}
	ln, relayed, err := g.AllocateListener(turn.AllocateListenerConfig{Network: "tcp4", UserID: "u"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	peer := blackHolePeer(t)
	done := make(chan error, 1)
	go func() {
		conn, err := g.AllocateConn(turn.AllocateConnConfig{
			Network: "tcp4", UserID: "u", LocalAddr: relayed, RemoteAddr: net.TCPAddrFromAddrPort(peer),
		})
		if err == nil {
			conn.Close()
		}
		done <- err
	}()
	select {
	case err := <-done:
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			t.Fatalf("dial to a black hole: %v, want a timeout", err)
		}
	case <-time.After(e2eTimeout):
		t.Fatalf("dial to a black hole still running after %v", e2eTimeout)
	}
	if st := relays.stats(&live); st.PeerConnections != 0 || st.TCPPortsInUse != 1 {
		t.Fatalf("after the failed dial: %+v, want no peer connection and the listener's port", st)
	}
}
