package server

import (
	"errors"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pion/stun/v4"
)

// TestBatchedBurstMixed sends one burst that fills several recvmmsg
// batches with Binding requests, junk, an oversized datagram and a TURN
// Allocate, and checks that every Binding request got its own reply
// (sendmmsg), the Allocate still reached pion (its 401), and the junk was
// counted, not answered.
func TestBatchedBurstMixed(t *testing.T) {
	s := startServer(t, Config{Realm: "r", Users: map[string]string{"u": "p"}})
	c := udpSocket(t)
	_ = c.SetReadBuffer(1 << 20)
	dst := s.Grid()[0][0]

	const nBind = 3*udpBatch + 5 // more than one batch, not a multiple
	want := map[[stun.TransactionIDSize]byte]bool{}
	alloc := stun.MustBuild(stun.TransactionID, stun.NewType(stun.MethodAllocate, stun.ClassRequest),
		stun.RawAttribute{Type: stun.AttrRequestedTransport, Value: []byte{17, 0, 0, 0}}, stun.Fingerprint)
	junk := 0
	for i := 0; i < nBind; i++ {
		req := stun.MustBuild(stun.TransactionID, stun.BindingRequest)
		want[req.TransactionID] = true
		if _, err := c.WriteToUDPAddrPort(req.Raw, dst); err != nil {
			t.Fatal(err)
		}
		switch i {
		case udpBatch / 2: // TURN in the middle of a batch
			if _, err := c.WriteToUDPAddrPort(alloc.Raw, dst); err != nil {
				t.Fatal(err)
			}
		case udpBatch + 1, 2*udpBatch - 1:
			if _, err := c.WriteToUDPAddrPort([]byte("junk junk"), dst); err != nil {
				t.Fatal(err)
			}
			junk++
		case 2 * udpBatch: // larger than pion's 1600-byte buffer
			if _, err := c.WriteToUDPAddrPort(make([]byte, udpBatchBuf+100), dst); err != nil {
				t.Fatal(err)
			}
			junk++
		}
	}

	buf := make([]byte, 1600)
	got, got401 := 0, false
	_ = c.SetReadDeadline(time.Now().Add(ioTimeout))
	for got < nBind || !got401 {
		n, err := c.Read(buf)
		if err != nil {
			t.Fatalf("after %d of %d Binding replies (401 seen: %v): %v", got, nBind, got401, err)
		}
		m := &stun.Message{Raw: append([]byte(nil), buf[:n]...)}
		if err := m.Decode(); err != nil {
			t.Fatalf("undecodable reply: %v", err)
		}
		switch {
		case m.Type == stun.BindingSuccess && want[m.TransactionID]:
			delete(want, m.TransactionID)
			got++
		case m.TransactionID == alloc.TransactionID:
			var ec stun.ErrorCodeAttribute
			if err := ec.GetFrom(m); err != nil || ec.Code != stun.CodeUnauthorized {
				t.Fatalf("Allocate answered %v (%v), want 401", m.Type, ec.Code)
			}
			got401 = true
		default:
			t.Fatalf("unexpected reply %v", m)
		}
	}
	if st, bs := s.Demux(), s.binder.Stats(); st.Junk+bs.Malformed != uint64(junk) {
		t.Errorf("junk counted %d+%d, sent %d", st.Junk, bs.Malformed, junk)
	}
	if s.Demux().SendErrors != 0 {
		t.Errorf("send errors: %d", s.Demux().SendErrors)
	}
}

// TestBatcherOnlyOnUDPConn: other PacketConns (vnet, fakes) keep the
// one-datagram path.
func TestBatcherOnlyOnUDPConn(t *testing.T) {
	if newUDPBatcher(&fakePacketConn{}, true, func() {}) != nil {
		t.Fatal("batcher built on a non-UDPConn")
	}
	c := udpSocket(t)
	if newUDPBatcher(c, true, func() {}) == nil {
		t.Fatal("no batcher on a *net.UDPConn")
	}
	var _ net.PacketConn = c
}

// TestRelayConnVerdictCache: the relay's cached "allowed" verdict for a
// peer holds only under the policy that gave it; after a reload that
// denies the peer the very next packet is refused, and a refused peer is
// never cached.
func TestRelayConnVerdictCache(t *testing.T) {
	peer := udpSocket(t)
	relay := udpSocket(t)
	peerAddr := peer.LocalAddr().(*net.UDPAddr)
	var live livePolicy
	live.cur.Store(NewPeerPolicy([]netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}, nil, nil))
	var ops opsStats
	rc := testRelaySocket(t, relay, "alice", newLedger(), &live, &ops, nil)
	for i := 0; i < 3; i++ {
		if _, err := rc.WriteTo([]byte("x"), peerAddr); err != nil {
			t.Fatalf("write %d to an allowed peer: %v", i, err)
		}
	}
	live.swap(NewPeerPolicy(nil, []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}, nil))
	for i := 0; i < 2; i++ {
		if _, err := rc.WriteTo([]byte("x"), peerAddr); !errors.Is(err, ErrPeerRefused) {
			t.Fatalf("write %d after the reload denied the peer: %v", i, err)
		}
	}
	if got := ops.relayPktsOut.Load(); got != 3 {
		t.Errorf("relayed %d packets, want 3", got)
	}
	if got := ops.relayRefused.Load(); got != 2 {
		t.Errorf("refused %d packets, want 2", got)
	}
}

// BenchmarkRelayPolicyCheck: the per-packet peer check toward a peer,
// walked in full (Uncached) and as relaySocket.WriteTo does it with the
// verdict cached (Cached, without the sendto).
func BenchmarkRelayPolicyCheck(b *testing.B) {
	pol := NewPeerPolicy([]netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}, nil, nil)
	ap := netip.MustParseAddrPort("127.0.0.1:40000")
	b.Run("Uncached", func(b *testing.B) {
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			if !pol.AllowedAddrPort(ap) {
				b.Fatal("refused")
			}
		}
	})
	b.Run("Cached", func(b *testing.B) {
		var live livePolicy
		live.cur.Store(pol)
		var last atomic.Pointer[relayVerdict]
		last.Store(&relayVerdict{pol: pol, to: ap})
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			if v := last.Load(); v == nil || v.pol != live.load() || v.to != ap {
				b.Fatal("miss")
			}
		}
	})
}

// TestRelayConnReadFromPeers: the relay's allocation-free read names each
// datagram's real sender, also when peers alternate, and reuses one
// address value only while the sender stays the same.
func TestRelayConnReadFromPeers(t *testing.T) {
	relay := udpSocket(t)
	p1, p2 := udpSocket(t), udpSocket(t)
	var live livePolicy
	live.cur.Store(NewPeerPolicy(nil, nil, nil))
	var ops opsStats
	rc := testRelaySocket(t, relay, "alice", newLedger(), &live, &ops, nil, netip.MustParseAddr("127.0.0.1"))
	to := relay.LocalAddr().(*net.UDPAddr).AddrPort()
	order := []*net.UDPConn{p1, p1, p2, p1, p2, p2}
	for _, p := range order {
		if _, err := p.WriteToUDPAddrPort([]byte("hi"), to); err != nil {
			t.Fatal(err)
		}
	}
	_ = relay.SetReadDeadline(time.Now().Add(ioTimeout))
	buf := make([]byte, 64)
	var prev net.Addr
	var prevAP netip.AddrPort
	for i, p := range order {
		n, from, err := rc.ReadFrom(buf)
		if err != nil || n != 2 {
			t.Fatalf("read %d: %d bytes, %v", i, n, err)
		}
		want := p.LocalAddr().(*net.UDPAddr).AddrPort()
		got := from.(*net.UDPAddr).AddrPort()
		if got != want {
			t.Fatalf("read %d: from %v, want %v", i, got, want)
		}
		if prev != nil && (prev == from) != (prevAP == got) {
			t.Errorf("read %d: address value reused %v for a sender change %v", i, prev == from, prevAP != got)
		}
		prev, prevAP = from, got
	}
	if ops.relayPktsIn.Load() != uint64(len(order)) || ops.relayBytesIn.Load() != uint64(2*len(order)) {
		t.Errorf("counted %d packets %d bytes", ops.relayPktsIn.Load(), ops.relayBytesIn.Load())
	}
}
