package classifier

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/pion/transport/v5/vnet"
	"github.com/stund/stund/server"

	"github.com/stund/stund/internal/testutil"
)

// startLoopbackStund runs the real stund on the host's own sockets, on
// 127.0.0.1 and 127.0.0.2 (Linux routes all of 127/8 to lo), free ports.
func startLoopbackStund(tb testing.TB) netip.AddrPort {
	tb.Helper()
	srv, err := server.New(server.Config{
		PrimaryIP: netip.MustParseAddr("127.0.0.1"), AlternateIP: netip.MustParseAddr("127.0.0.2"),
		DisableTCP: true, LoggerFactory: quietLogger(),
	})
	if err != nil {
		testutil.SkipUnlessRequired(tb, "cannot bind stund on 127.0.0.1/127.0.0.2: %v", err)
	}
	tb.Cleanup(func() { _ = srv.Close() })
	return srv.Grid()[0][0]
}

// TestLoopback runs the engine on real UDP sockets (stdnet) against the real
// server on loopback: no NAT, nothing filtered, every field settled.
func TestLoopback(t *testing.T) {
	t.Parallel()
	addr := startLoopbackStund(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := Probe(ctx, Config{Server: addr.String(), Hairpin: true, Software: "natprobe-test"})
	if err != nil {
		t.Fatal(err)
	}
	expectExact(t, r, want{nat: false, mapping: MappingEndpointIndependent, filtering: FilteringEndpointIndependent,
		hairpin: yes, pres: yes, parity: yes, contig: yes, legacy: LegacyOpen})
	if r.LocalAddress.Addr() != netip.MustParseAddr("127.0.0.1") || r.ServerOtherAddress.Addr() != netip.MustParseAddr("127.0.0.2") {
		t.Errorf("local %s other %s", r.LocalAddress, r.ServerOtherAddress)
	}
	if err := r.Check(); err != nil {
		t.Error(err)
	}
	if r.Inconclusive() || len(r.Anomalies) > 0 || r.Stats.Malformed > 0 {
		t.Errorf("inconclusive %v anomalies %v stats %+v", r.InconclusiveFields, r.Anomalies, r.Stats)
	}
	t.Logf("loopback probe: %d ms, %d datagrams sent, %d received", r.DurationMS, r.Stats.Sent, r.Stats.Received)
}

// BenchmarkProbe measures the default probe's wall time on a lossless path
// against the target of at most one second (a support engineer waits for it
// at a customer's desk): ns/op is the wall time of one whole run, and
// target-ratio is that time over 1 s. The sub-benchmarks cover real sockets
// on loopback and vnet NATs whose verdicts rest on positive evidence only
// (EIM/EIF) or on the slowest negative evidence (APDM/APDF: filtering
// silence on both tests).
func BenchmarkProbe(b *testing.B) {
	run := func(b *testing.B, cfg Config) {
		b.Helper()
		var sent int64
		for b.Loop() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			r, err := Probe(ctx, cfg)
			cancel()
			if err != nil || r.Inconclusive() && r.Mapping != MappingAddressPortDependent {
				b.Fatalf("%v %v", err, r.InconclusiveFields)
			}
			sent += r.Stats.Sent
		}
		b.ReportMetric(float64(b.Elapsed())/float64(b.N)/float64(time.Second), "target-ratio")
		b.ReportMetric(float64(sent)/float64(b.N), "datagrams/op")
	}
	b.Run("loopback", func(b *testing.B) {
		addr := startLoopbackStund(b)
		run(b, Config{Server: addr.String(), Hairpin: true})
	})
	for _, c := range []struct {
		name string
		nat  vnet.NATType
	}{
		{"vnet-EIM-EIF", vnet.NATType{MappingBehavior: vnet.EndpointIndependent, FilteringBehavior: vnet.EndpointIndependent}},
		{"vnet-APDM-APDF", vnet.NATType{MappingBehavior: vnet.EndpointAddrPortDependent, FilteringBehavior: vnet.EndpointAddrPortDependent}},
	} {
		b.Run(c.name, func(b *testing.B) {
			tp := newTopo(b, topoOpts{nat: &c.nat})
			run(b, Config{Server: tp.addr, Net: tp.client, Hairpin: true})
		})
	}
}
