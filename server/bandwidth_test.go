package server

import (
	"errors"
	"net"
	"net/netip"
	"testing"
	"time"
)

// TestBandwidthBuckets: each user and each direction has its own bucket of
// one second at the cap; over it packets drop and are counted; time
// refills it.
func TestBandwidthBuckets(t *testing.T) {
	clk := newClock()
	b := newBandwidth(8*1_000_000, clk.Now) // 1 MB/s per direction
	alice, bob := b.acquire("alice"), b.acquire("bob")
	sent := 0
	for b.take(&alice.out, 1000) {
		sent += 1000
		if sent > 10_000_000 {
			t.Fatal("the bucket never ran dry")
		}
	}
	// One second of the cap (1 MB) plus the packet that starts it.
	if sent < 1_000_000 || sent > 1_001_000 {
		t.Fatalf("burst of %d bytes, want one second at the cap (1e6)", sent)
	}
	if !b.take(&alice.in, 1000) {
		t.Fatal("alice's inbound direction shares her outbound bucket")
	}
	if !b.take(&bob.out, 1000) {
		t.Fatal("bob is limited by alice's traffic")
	}
	if p, by := b.dropped(); p != 1 || by != 1000 {
		t.Fatalf("dropped %d packets %d bytes, want 1 and 1000", p, by)
	}
	clk.Add(time.Millisecond) // 1000 bytes at 1 MB/s
	if !b.take(&alice.out, 1000) {
		t.Fatal("no refill after 1 ms at 1 MB/s")
	}
	if b.take(&alice.out, 1000) {
		t.Fatal("more refill than the time allows")
	}
	b.release("alice", alice)
	b.release("bob", bob)
	if b.tracked() != 0 {
		t.Fatalf("%d users tracked after every socket closed", b.tracked())
	}
	if newBandwidth(0, nil) != nil {
		t.Fatal("MaxBPS 0 must mean no cap")
	}
}

// TestBandwidthSmallCapPassesWholePackets: the bucket holds at least
// minBandwidthBurst, so a tiny cap still relays full datagrams.
func TestBandwidthSmallCapPassesWholePackets(t *testing.T) {
	b := newBandwidth(800, newClock().Now) // 100 B/s
	u := b.acquire("x")
	if !b.take(&u.out, 1500) {
		t.Fatal("a 1500-byte datagram never fits a 100 B/s cap")
	}
}

// TestBandwidthConnBothDirections: the relay socket wrapper drops writes
// toward the peer (with errBandwidth, so the relayed counters do not count
// them) and reads from the peer over the cap, and shares the bucket among
// one user's sockets.
func TestBandwidthConnBothDirections(t *testing.T) {
	clk := newClock()
	b := newBandwidth(8*minBandwidthBurst, clk.Now) // burst = 1 s = minBandwidthBurst
	listen := func() net.PacketConn {
		c, err := net.ListenPacket("udp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	peer := listen()
	led := newLedger()
	var live livePolicy
	live.swap(NewPeerPolicy([]netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}, nil, nil))
	var ops opsStats
	lo := netip.MustParseAddr("127.0.0.1")
	r1 := testRelaySocket(t, listen(), "alice", led, &live, &ops, b, lo)
	r2 := testRelaySocket(t, listen(), "alice", led, &live, &ops, b, lo)
	pkt := make([]byte, 1024)
	ok := 0
	for i := 0; i < 100; i++ {
		c := r1
		if i%2 == 1 {
			c = r2 // a second allocation of the same user
		}
		_, err := c.WriteTo(pkt, peer.LocalAddr())
		if err == nil {
			ok++
		} else if !errors.Is(err, errBandwidth) {
			t.Fatal(err)
		}
	}
	if want := minBandwidthBurst/1024 + 1; ok != want {
		t.Fatalf("%d writes passed over two sockets, want %d (one shared bucket)", ok, want)
	}

	// Peer to client: datagrams over the cap are skipped by ReadFrom.
	for range 20 {
		if _, err := peer.WriteTo(pkt, r1.LocalAddr()); err != nil {
			t.Fatal(err)
		}
	}
	marker := []byte("last")
	read := 0
	buf := make([]byte, 2048)
	_ = r1.SetReadDeadline(time.Now().Add(ioTimeout))
	// Fill the inbound bucket: the first minBandwidthBurst/1024+1 pass.
	for read < minBandwidthBurst/1024+1 {
		if _, _, err := r1.ReadFrom(buf); err != nil {
			t.Fatalf("after %d reads: %v", read, err)
		}
		read++
	}
	// The rest of the 20 are dropped; the marker arrives after time passed.
	wantDropped := uint64(100 - ok + 20 - read)
	go func() {
		for i := 0; i < 500; i++ { // until ReadFrom has dropped them all
			if pk, _ := b.dropped(); pk >= wantDropped {
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		clk.Add(time.Second)
		_, _ = peer.WriteTo(marker, r1.LocalAddr())
	}()
	n, _, err := r1.ReadFrom(buf)
	if err != nil || string(buf[:n]) != "last" {
		t.Fatalf("after the dropped datagrams: %q, %v; want the marker", buf[:n], err)
	}
	if pk, _ := b.dropped(); pk != wantDropped {
		t.Fatalf("dropped %d, want %d", pk, wantDropped)
	}
	r1.Close()
	r1.Close() // twice: released once
	if b.tracked() != 1 {
		t.Fatalf("tracked %d users with one socket of alice's open, want 1", b.tracked())
	}
	r2.Close()
	if b.tracked() != 0 {
		t.Fatalf("tracked %d users after all closed", b.tracked())
	}
}

// TestBandwidthCapPerUserOverServer: through the real server, a user over
// the cap loses datagrams (counted) while another user's all arrive.
func TestBandwidthCapPerUserOverServer(t *testing.T) {
	clk := newClock()
	s := startTURNServer(t, func(c *Config) {
		c.AllowPeers = mustPrefixes(t, "127.0.0.0/8")
		c.MaxBPS = 8 * minBandwidthBurst // a burst of minBandwidthBurst, then nothing: the clock stands still
		c.abuse = &abuseHooks{now: clk.Now, firstTimeout: time.Minute, idleTimeout: time.Minute, authedTimeout: time.Minute}
	})
	peer, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	send := func(user string, n int) {
		c, _ := newTURNClient(t, s, user, user+"-pw")
		relay, err := c.Allocate()
		if err != nil {
			t.Fatalf("%s Allocate: %v", user, err)
		}
		t.Cleanup(func() { relay.Close() })
		pkt := make([]byte, 1024)
		for i := 0; i < n; i++ {
			if _, err := relay.WriteTo(pkt, peer.LocalAddr()); err != nil {
				t.Fatalf("%s WriteTo: %v", user, err)
			}
		}
	}
	recv := func() int {
		got := 0
		buf := make([]byte, 2048)
		for {
			_ = peer.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
			if _, _, err := peer.ReadFrom(buf); err != nil {
				return got
			}
			got++
		}
	}
	const aliceSent = 40
	send("alice", aliceSent)
	passed := minBandwidthBurst/1024 + 1
	for i := 0; i < 500; i++ {
		if p, _ := s.limits.bw.dropped(); p >= aliceSent-uint64(passed) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if got := recv(); got != passed {
		t.Fatalf("peer got %d of alice's datagrams, want %d (the burst)", got, passed)
	}
	if st := s.Limits(); st.BandwidthDroppedPackets != aliceSent-uint64(passed) {
		t.Fatalf("dropped %d, want %d", st.BandwidthDroppedPackets, aliceSent-passed)
	}
	send("bob", 10)
	if got := recv(); got != 10 {
		t.Fatalf("peer got %d of bob's 10 datagrams while alice is capped", got)
	}
}

// TestBandwidthWait: a stream is slowed, never dropped: within the bucket
// it waits nothing, past it exactly as long as the excess takes at the cap.
func TestBandwidthWait(t *testing.T) {
	clk := newClock()
	b := newBandwidth(8*minBandwidthBurst, clk.Now) // minBandwidthBurst bytes/s, 1 s bucket
	var k bucket
	if d := b.wait(&k, minBandwidthBurst); d != 0 {
		t.Fatalf("a full bucket's worth waited %v", d)
	}
	if d := b.wait(&k, minBandwidthBurst/2); d != 500*time.Millisecond {
		t.Fatalf("half a second over the bucket waited %v, want 500ms", d)
	}
	clk.Add(2 * time.Second)
	if d := b.wait(&k, 1024); d != 0 {
		t.Fatalf("after the bucket drained, waited %v", d)
	}
}
