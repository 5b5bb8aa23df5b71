package server

import (
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pion/stun/v4"
)

func newClock() *fakeClock { return &fakeClock{t: time.Unix(1_800_000_000, 0)} }

func TestRateTableBucket(t *testing.T) {
	clk := newClock()
	tb := newRateTable(10, 4, 1024, clk.Now) // 10/s, burst 4
	for i := range 4 {
		if !tb.allow(42) {
			t.Fatalf("request %d of the burst refused", i+1)
		}
	}
	if tb.allow(42) {
		t.Fatal("fifth request of a 4-token burst allowed")
	}
	if !tb.allow(43) {
		t.Fatal("another key was limited by the first one's bucket")
	}
	clk.Add(99 * time.Millisecond)
	if tb.allow(42) {
		t.Fatal("a token appeared before 1/rate had passed")
	}
	clk.Add(time.Millisecond)
	if !tb.allow(42) {
		t.Fatal("no token after 1/rate")
	}
	if tb.allow(42) {
		t.Fatal("two tokens after 1/rate")
	}
	clk.Add(time.Hour) // refills to the burst, not beyond
	n := 0
	for range 100 {
		if tb.allow(42) {
			n++
		}
	}
	if n != 4 {
		t.Fatalf("after an hour idle %d requests allowed, want the burst (4)", n)
	}
	a, d, _ := tb.counts()
	if a != 4+1+1+4 || d != 3+96 {
		t.Fatalf("counters allowed %d dropped %d", a, d)
	}
	var nilTable *rateTable
	if !nilTable.allow(1) {
		t.Fatal("a nil (unlimited) table refused")
	}
	if newRateTable(-1, 4, 1024, nil) != nil || newRateTable(0, 4, 1024, nil) != nil {
		t.Fatal("rate <= 0 must mean unlimited (nil table)")
	}
}

// TestRateTableSprayBounded: an attacker spraying source addresses neither
// grows the table nor evicts a source that is being limited.
func TestRateTableSprayBounded(t *testing.T) {
	clk := newClock()
	tb := newRateTable(1, 4, 4096, clk.Now)
	slots := 0
	for i := range tb.shards {
		slots += len(tb.shards[i].slots)
	}
	seed := uint64(7)
	victim := ipKey(seed, netip.MustParseAddr("192.0.2.1"))
	for range 20 {
		tb.allow(victim)
	}
	for i := range 200_000 {
		a := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		tb.allow(ipKey(seed, a))
	}
	after := 0
	for i := range tb.shards {
		after += len(tb.shards[i].slots)
	}
	if after != slots {
		t.Fatalf("table grew from %d to %d slots", slots, after)
	}
	if tb.allow(victim) {
		t.Fatal("the spray evicted a limited source: its bucket came back full")
	}
}

func TestIPKeyGrouping(t *testing.T) {
	seed := randomSeed()
	k := func(s string) uint64 { return ipKey(seed, netip.MustParseAddr(s)) }
	if k("2001:db8:1:2::1") != k("2001:db8:1:2:ffff::9") {
		t.Error("two addresses of one IPv6 /64 are different sources")
	}
	if k("2001:db8:1:2::1") == k("2001:db8:1:3::1") {
		t.Error("two IPv6 /64s are one source")
	}
	if k("192.0.2.1") != k("::ffff:192.0.2.1") {
		t.Error("an IPv4-mapped address is not its IPv4 address")
	}
	if k("192.0.2.1") == k("192.0.2.2") {
		t.Error("two IPv4 addresses are one source")
	}
}

// TestUnauthRateOverUDP: Binding replies to one source IP stop at the
// burst (the clock stands still), and are counted; another source IP
// still gets its replies. Over the real server.
func TestUnauthRateOverUDP(t *testing.T) {
	clk := newClock()
	cfg := twoIPConfig()
	cfg.UnauthRate = 1 // burst minBurst = 8
	cfg.abuse = &abuseHooks{now: clk.Now, firstTimeout: time.Minute, idleTimeout: time.Minute, authedTimeout: time.Minute}
	s := startServer(t, cfg)
	dst := s.Grid()[0][0]

	// Many ports of one IP share the bucket.
	const sent = 20
	socks := make([]*net.UDPConn, 4)
	for i := range socks {
		socks[i] = udpSocket(t)
	}
	for i := range sent {
		req := stun.MustBuild(stun.TransactionID, stun.BindingRequest)
		if _, err := socks[i%len(socks)].WriteToUDPAddrPort(req.Raw, dst); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < 500; i++ {
		if st := s.Limits(); st.UnauthAllowed+st.UnauthDropped >= sent {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	st := s.Limits()
	if st.UnauthAllowed != minBurst || st.UnauthDropped != sent-minBurst {
		t.Fatalf("allowed %d dropped %d, want %d and %d", st.UnauthAllowed, st.UnauthDropped, minBurst, sent-minBurst)
	}
	got := 0
	buf := make([]byte, 1500)
	for _, c := range socks {
		_ = c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		for {
			if _, _, err := c.ReadFromUDPAddrPort(buf); err != nil {
				break
			}
			got++
		}
	}
	if got != minBurst {
		t.Fatalf("%d replies arrived, want %d", got, minBurst)
	}

	// Another source IP has its own bucket.
	other, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 3)})
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	exchange(t, other, dst)

	// Time passes: the limited IP gets a token back.
	clk.Add(time.Second)
	exchange(t, socks[0], dst)
}

// TestAllocRatePerUser: one user's Allocates beyond the rate get 486 and
// are counted, another user is unaffected; over UDP and TCP.
func TestAllocRatePerUser(t *testing.T) {
	for _, network := range []string{"udp", "tcp"} {
		t.Run(network, func(t *testing.T) {
			clk := newClock()
			s := startTURNServer(t, func(c *Config) {
				c.DisableTCP = false
				c.AllocRate = 1 // burst minBurst
				c.UserQuota = -1
				c.abuse = &abuseHooks{now: clk.Now, firstTimeout: time.Minute, idleTimeout: time.Minute, authedTimeout: time.Minute}
			})
			for i := range minBurst {
				if _, err := allocClient(t, s, network, "alice").Allocate(); err != nil {
					t.Fatalf("alice #%d within the burst: %v", i+1, err)
				}
			}
			_, err := allocClient(t, s, network, "alice").Allocate()
			if turnErrorCode(err) != 486 {
				t.Fatalf("alice over her Allocate rate: %v, want 486", err)
			}
			if _, err := allocClient(t, s, network, "bob").Allocate(); err != nil {
				t.Fatalf("bob, while alice is limited: %v", err)
			}
			if got := s.Limits().AllocRateRefused; got != 1 {
				t.Fatalf("AllocRateRefused = %d, want 1", got)
			}
			clk.Add(time.Second)
			if _, err := allocClient(t, s, network, "alice").Allocate(); err != nil {
				t.Fatalf("alice a second later: %v", err)
			}
		})
	}
}

// TestStreamConnsPerIP: connections beyond the per-IP cap are closed at
// accept and counted; closing one frees its place.
func TestStreamConnsPerIP(t *testing.T) {
	cfg := twoIPConfig()
	cfg.MaxConnsPerIP = 2
	s := startServer(t, cfg)
	tcp := s.TCPAddrs()[0].String()
	dial := func() net.Conn {
		c, err := net.DialTimeout("tcp4", tcp, ioTimeout)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	binding := func(c net.Conn) error {
		req := stun.MustBuild(stun.TransactionID, stun.BindingRequest)
		_ = c.SetDeadline(time.Now().Add(ioTimeout))
		if _, err := c.Write(req.Raw); err != nil {
			return err
		}
		buf := make([]byte, 20)
		_, err := io.ReadFull(c, buf)
		return err
	}
	a, b := dial(), dial()
	if err := binding(a); err != nil {
		t.Fatalf("first connection: %v", err)
	}
	if err := binding(b); err != nil {
		t.Fatalf("second connection: %v", err)
	}
	if err := binding(dial()); err == nil {
		t.Fatal("a third connection from one IP was served")
	}
	if got := s.Limits().StreamRefused; got != 1 {
		t.Fatalf("StreamRefused = %d, want 1", got)
	}
	// Another IP is not affected.
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 3)}, Timeout: ioTimeout}
	o, err := d.Dial("tcp4", tcp)
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	if err := binding(o); err != nil {
		t.Fatalf("another IP: %v", err)
	}
	a.Close()
	lo := netip.MustParseAddr("127.0.0.1")
	for i := 0; i < 500 && s.limits.conns.openFrom(lo) > 1; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if err := binding(dial()); err != nil {
		t.Fatalf("a connection after one closed: %v", err)
	}
}

// TestStreamSlowloris: a connection that sends half a frame, or nothing,
// is closed by its read deadline (shortened here) and counted; a
// connection that keeps sending whole frames is not.
func TestStreamSlowloris(t *testing.T) {
	cfg := twoIPConfig()
	cfg.abuse = &abuseHooks{firstTimeout: 300 * time.Millisecond, idleTimeout: 300 * time.Millisecond, authedTimeout: time.Minute}
	s := startServer(t, cfg)
	tcp := s.TCPAddrs()[0].String()
	req := stun.MustBuild(stun.TransactionID, stun.BindingRequest)
	for _, tc := range []struct {
		name string
		send []byte
	}{
		{"nothing", nil},
		{"half a header", req.Raw[:10]},
		{"a header promising more", req.Raw[:20]}, // length 0: a whole frame; then silence
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := s.Limits().StreamIdle
			c, err := net.DialTimeout("tcp4", tcp, ioTimeout)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if tc.send != nil {
				if _, err := c.Write(tc.send); err != nil {
					t.Fatal(err)
				}
			}
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			buf := make([]byte, 100)
			for {
				if _, err := c.Read(buf); err != nil {
					if ne, ok := err.(net.Error); ok && ne.Timeout() {
						t.Fatal("the server kept an idle connection open")
					}
					break // closed by the server
				}
			}
			for i := 0; i < 500 && s.Limits().StreamIdle == before; i++ {
				time.Sleep(10 * time.Millisecond)
			}
			if s.Limits().StreamIdle != before+1 {
				t.Fatalf("StreamIdle %d, want %d", s.Limits().StreamIdle, before+1)
			}
		})
	}
}
