package server

import (
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"testing"
	"time"

	"github.com/pion/stun/v4"

	"github.com/stund/stund/internal/stunwire"
	"github.com/stund/stund/internal/udpio"
)

func (s *Server) relaySocketAt(t *testing.T, addr string) *relaySocket {
	t.Helper()
	s.led.mu.RLock()
	defer s.led.mu.RUnlock()
	for ap, rs := range s.led.sockets {
		if ap.String() == addr {
			return rs
		}
	}
	return nil
}

func (p *relayPoller) has(rs *relaySocket) bool {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return p.socks[rs.token] == rs
}

// A UDP client's relay socket is read by a poller, a TCP client's by its
// own goroutine (a stream write may block); both relay both ways, and an
// allocation's end takes its socket off the poller.
func TestRelayPolling(t *testing.T) {
	s := startTURNServer(t, func(c *Config) {
		c.AllowPeers = mustPrefixes(t, "127.0.0.0/8")
		c.DisableTCP = false
	})
	if s.polls == nil {
		t.Skip("no epoll here: every relay socket has its own goroutine")
	}
	peer := udpPeer(t, "udp4")
	var sockets []*relaySocket
	for _, tc := range []struct {
		network, user string
		polled        bool
	}{{"udp4", "alice", true}, {"tcp", "bob", false}} {
		cl, relay := allocRelay(t, s, tc.network, tc.user)
		relayToPeer(t, relay, peer, "hello from "+tc.user)
		for i := 0; i < 20; i++ { // more than one pass, batches of several
			if _, err := peer.WriteTo([]byte("to "+tc.user), relay.LocalAddr()); err != nil {
				t.Fatal(err)
			}
		}
		peerToClient(t, peer, relay, relay.LocalAddr(), "to "+tc.user)
		rs := s.relaySocketAt(t, stunwire.AddrPortOf(relay.LocalAddr()).String())
		if rs == nil {
			t.Fatalf("%s: no relay socket for %v", tc.network, relay.LocalAddr())
		}
		if rs.polled != tc.polled || (rs.poller != nil && !rs.poller.has(rs)) {
			t.Fatalf("%s client: polled %v (on its poller: %v), want %v", tc.network, rs.polled, rs.poller != nil, tc.polled)
		}
		sockets = append(sockets, rs)
		if err := relay.Close(); err != nil { // Refresh with lifetime 0
			t.Fatal(err)
		}
		cl.Close()
	}
	waitFor(t, "the relay sockets to close", func() bool {
		for _, rs := range sockets {
			if s.relaySocketAt(t, rs.addr.String()) != nil {
				return false
			}
		}
		return true
	})
	if p := sockets[0].poller; p.has(sockets[0]) {
		t.Fatal("a closed relay socket is still on its poller")
	}
}

// The data plane allocates nothing per relayed packet: ChannelData and
// Send indications from a client, ChannelData and Data indications back,
// through the real listener, relay socket and poller, counted by the Go
// runtime over a thousand round trips of each kind.
func TestRelayNoAllocationsPerPacket(t *testing.T) {
	s := startTURNServer(t, func(c *Config) { c.AllowPeers = mustPrefixes(t, "127.0.0.0/8") })
	c := dialFront(t, s, false, "alice", "alice-pw")
	peer := udpPeer(t, "udp4").(*net.UDPConn)
	peerAP := stunwire.AddrPortOf(peer.LocalAddr())
	relayed := allocateChannel(t, c, 0x4000, peerAP)
	payload := make([]byte, 160)
	cd := append([]byte{0x40, 0x00, 0, byte(len(payload))}, payload...)
	send := stun.MustBuild(stun.TransactionID, stun.NewType(stun.MethodSend, stun.ClassIndication), peerAddr(peerAP),
		stun.RawAttribute{Type: stun.AttrData, Value: payload}).Raw
	srv := c.srv.AddrPort()
	buf := make([]byte, 2048)
	_ = c.udp.SetReadDeadline(time.Now().Add(30 * time.Second))
	_ = peer.SetReadDeadline(time.Now().Add(30 * time.Second))
	roundTrip := func(msg []byte) {
		if _, err := c.udp.WriteToUDPAddrPort(msg, srv); err != nil {
			t.Fatal(err)
		}
		n, _, err := peer.ReadFromUDPAddrPort(buf)
		if err != nil || n != len(payload) {
			t.Fatalf("peer read %d bytes: %v", n, err)
		}
		if _, err := peer.WriteToUDPAddrPort(buf[:n], relayed); err != nil {
			t.Fatal(err)
		}
		if n, _, err := c.udp.ReadFromUDPAddrPort(buf); err != nil || n < len(payload) {
			t.Fatalf("client read %d bytes: %v", n, err)
		}
	}
	for i := 0; i < 100; i++ { // warm: buffers, pools, the policy cache
		roundTrip(cd)
		roundTrip(send)
	}
	const n = 1000
	var m0, m1 runtime.MemStats
	runtime.ReadMemStats(&m0)
	for i := 0; i < n; i++ {
		roundTrip(cd)
		roundTrip(send)
	}
	runtime.ReadMemStats(&m1)
	// 4n packets relayed; what is left is the process's background (the
	// runtime, timers), a few dozen at most.
	allocs := m1.Mallocs - m0.Mallocs
	t.Logf("%d allocations for %d relayed packets", allocs, 4*n)
	if allocs > n/10 {
		t.Fatalf("%d allocations for %d relayed packets: the data plane allocates per packet", allocs, 4*n)
	}
}

// Over TCP the frames one read brings in leave toward the peer in one
// batch and a burst from the peer comes back in one write: every frame
// arrives, whole, in order, both ways.
func TestStreamRelayBatchesInOrder(t *testing.T) {
	for _, padded := range []bool{false, true} {
		s := startTURNServer(t, func(c *Config) {
			c.AllowPeers = mustPrefixes(t, "127.0.0.0/8")
			c.DisableTCP = false
		})
		c := dialFront(t, s, true, "alice", "alice-pw")
		peer := udpPeer(t, "udp4").(*net.UDPConn)
		relayed := allocateChannel(t, c, 0x4000, stunwire.AddrPortOf(peer.LocalAddr()))
		const n = 40
		var burst []byte
		sizes := make([]int, n)
		for i := 0; i < n; i++ {
			size := 1 + i*7%97
			if padded {
				size = 4 * (1 + i%25)
			}
			sizes[i] = size
			p := payload(i, size)
			burst = append(burst, 0x40, 0x00, 0, byte(size))
			burst = append(burst, p...)
			for len(burst)%4 != 0 { // RFC 8656 §12.5: padded over streams
				burst = append(burst, 0)
			}
		}
		if _, err := c.conn.Write(burst); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 2048)
		_ = peer.SetReadDeadline(time.Now().Add(e2eTimeout))
		for i := 0; i < n; i++ {
			k, _, err := peer.ReadFromUDPAddrPort(buf)
			if err != nil || string(buf[:k]) != string(payload(i, sizes[i])) {
				t.Fatalf("padded %v: peer datagram %d: %d bytes %v", padded, i, k, err)
			}
		}
		for i := 0; i < n; i++ {
			if _, err := peer.WriteToUDPAddrPort(payload(i, 10+i), relayed); err != nil {
				t.Fatal(err)
			}
		}
		_ = c.conn.SetReadDeadline(time.Now().Add(e2eTimeout))
		for i := 0; i < n; i++ {
			var hdr [4]byte
			if _, err := io.ReadFull(c.rd, hdr[:]); err != nil {
				t.Fatalf("frame %d: %v", i, err)
			}
			size := int(hdr[2])<<8 | int(hdr[3])
			body := make([]byte, (size+3)&^3)
			if _, err := io.ReadFull(c.rd, body); err != nil {
				t.Fatal(err)
			}
			if hdr[0] != 0x40 || string(body[:size]) != string(payload(i, 10+i)) {
				t.Fatalf("frame %d to the client: channel %x, %d bytes, want %d", i, hdr[:2], size, 10+i)
			}
		}
	}
}

// payload i of size n: distinct bytes, so a reordered datagram shows.
func payload(i, n int) []byte {
	b := make([]byte, n)
	for j := range b {
		b[j] = byte(i*7 + j)
	}
	return b
}

// A listener batch interleaving allocations goes out by the right relay
// sockets, each socket's datagrams in their order, every one counted:
// with one sendmmsg per socket run, and with one io_uring submission for
// all (when the kernel has io_uring).
func TestRelayQueueKeepsOrderPerSocket(t *testing.T) {
	ring, err := udpio.NewRing()
	if err != nil {
		t.Logf("no io_uring here (%v): the sendmmsg path only", err)
	} else {
		defer ring.Close()
	}
	// A retired ring (closed here; in production, one the kernel stopped
	// completing) falls back to the socket's own sends, losing nothing.
	retired, err := udpio.NewRing()
	if err == nil {
		retired.Close()
	}
	for _, r := range []*udpio.Ring{nil, ring, retired} {
		var live livePolicy
		live.cur.Store(NewPeerPolicy([]netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}, nil, nil))
		var ops opsStats
		led := newLedger()
		a := testRelaySocket(t, udpSocket(t), "alice", led, &live, &ops, nil)
		b := testRelaySocket(t, udpSocket(t), "bob", led, &live, &ops, nil)
		peer := udpSocket(t)
		to := stunwire.AddrPortOf(peer.LocalAddr())
		var d dataPlane
		q := relayQueue{wb: udpio.NewBatch(), ring: r}
		order := []struct {
			s   *relaySocket
			msg string
		}{{a, "a1"}, {b, "b1"}, {a, "a2"}, {b, "b2"}, {a, "a3"}, {a, "a4"}}
		for _, o := range order {
			q.add(&d, o.s, []byte(o.msg), to)
		}
		// a peer the policy refuses: dropped before the ring, counted
		q.add(&d, b, []byte("refused"), netip.MustParseAddrPort("192.0.2.1:9"))
		q.flush()
		if r == retired && r != nil && q.ring != nil {
			t.Fatal("a retired ring is still in use")
		}
		if d.relayed.Load() != uint64(len(order)) || ops.relayRefused.Load() != 1 {
			t.Fatalf("ring %v: relayed %d (want %d), refused %d", r != nil, d.relayed.Load(), len(order), ops.relayRefused.Load())
		}
		got := map[netip.AddrPort][]string{}
		buf := make([]byte, 64)
		_ = peer.SetReadDeadline(time.Now().Add(ioTimeout))
		for i := 0; i < len(order); i++ {
			n, from, err := peer.ReadFromUDPAddrPort(buf)
			if err != nil {
				t.Fatal(err)
			}
			got[from] = append(got[from], string(buf[:n]))
		}
		if fmt.Sprint(got[a.addr]) != "[a1 a2 a3 a4]" || fmt.Sprint(got[b.addr]) != "[b1 b2]" {
			t.Fatalf("ring %v: peer got %v from a, %v from b", r != nil, got[a.addr], got[b.addr])
		}
		if ops.relayPktsOut.Load() != uint64(len(order)) || a.usage.pktsOut.Load() != 4 || b.usage.bytesOut.Load() != 4 {
			t.Fatalf("ring %v: counted %d packets, a %d, b %d bytes", r != nil, ops.relayPktsOut.Load(), a.usage.pktsOut.Load(), b.usage.bytesOut.Load())
		}
	}
}

// A server that stops gives back the descriptors its data plane opened
// (epoll pollers, io_uring rings): a process that starts and stops servers
// (tests, embedding) does not run out of them.
func TestDataPlaneReleasesDescriptors(t *testing.T) {
	count := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Skip("no /proc/self/fd")
		}
		return len(ents)
	}
	start := func() {
		s, err := New(Config{PrimaryIP: netip.MustParseAddr("127.0.0.1"), Realm: testRealm,
			Users: map[string]string{"alice": "alice-pw"}, DisableTCP: true})
		if err != nil {
			t.Fatal(err)
		}
		s.Close()
	}
	start() // first: lazily opened process-wide things
	before := count()
	for i := 0; i < 10; i++ {
		start()
	}
	time.Sleep(100 * time.Millisecond) // read loops unwind after Close
	if after := count(); after > before+2 {
		t.Fatalf("%d descriptors open after ten servers came and went, %d before", after, before)
	}
}

// allocateChannel allocates for c and binds channel ch to peer (RFC 8656
// §7, §11); it returns the relayed address.
func allocateChannel(t *testing.T, c *frontClient, ch uint16, peer netip.AddrPort) netip.AddrPort {
	t.Helper()
	relayed := relayedAddr(t, c.allocate())
	num := stun.RawAttribute{Type: stun.AttrChannelNumber, Value: []byte{byte(ch >> 8), byte(ch), 0, 0}}
	if b := c.signed(stun.MethodChannelBind, num, peerAddr(peer)); b.Type.Class != stun.ClassSuccessResponse {
		t.Fatalf("ChannelBind %#x: %v code %d", ch, b.Type, errorCode(b))
	}
	return relayed
}
