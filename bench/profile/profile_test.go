// Package profile runs the load generator against an in-process stund so
// that `go test -cpuprofile` shows where the server spends its CPU:
//
//	STUND_BENCH_PROFILE=1 go test -run Relay -cpuprofile cpu.out ./bench/profile/
//	go tool pprof -top bench/profile/profile.test cpu.out
//
// It is skipped unless STUND_BENCH_PROFILE is set: it measures, it does
// not assert, and it would only slow CI down.
package profile

import (
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/stund/stund/bench/loadgen"
	"github.com/stund/stund/server"
)

func start(t *testing.T) (*server.Server, *loadgen.EchoServer) {
	if os.Getenv("STUND_BENCH_PROFILE") == "" {
		t.Skip("set STUND_BENCH_PROFILE=1 to profile (see the package comment)")
	}
	s, err := server.New(server.Config{
		PrimaryIP:    netip.MustParseAddr("127.0.0.1"),
		DisableTCP:   true,
		Realm:        "bench",
		Users:        map[string]string{"u": "p"},
		AllowPeers:   []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
		UserQuota:    -1,
		TotalQuota:   -1,
		RelayPortMin: 40000,
		RelayPortMax: 59999,
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	peer, err := loadgen.NewEcho(1)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(peer.Close)
	return s, peer
}

func dur() time.Duration {
	if d, err := time.ParseDuration(os.Getenv("STUND_BENCH_DUR")); err == nil {
		return d
	}
	return 3 * time.Second
}

func TestRelay(t *testing.T) {
	s, peer := start(t)
	as, _, err := loadgen.Allocs(s.Grid()[0][0], "u", "p", 8, 4, 10*time.Second)
	t.Cleanup(func() { loadgen.Release(as, 4) })
	if err != nil {
		t.Fatal(err)
	}
	kind := os.Getenv("STUND_BENCH_KIND") != "send"
	fs, err := loadgen.RelayFlows(as, peer.Addr(), kind, 100)
	if err != nil {
		t.Fatal(err)
	}
	res := loadgen.Run(fs, 8, dur(), 16)
	t.Logf("relay (channel=%v) 8 allocs: %.0f round trips/s, loss %.3f%%", kind, res.Rate(), res.Loss()*100)
}

func TestBinding(t *testing.T) {
	s, _ := start(t)
	fs, closeFs, err := loadgen.BindingFlows(s.Grid()[0][0], 8)
	if err != nil {
		t.Fatal(err)
	}
	defer closeFs()
	res := loadgen.Run(fs, 32, dur(), 16)
	t.Logf("binding: %.0f req/s, loss %.3f%%", res.Rate(), res.Loss()*100)
}
