package classifier

// vnet_test.go puts the real stund server (package server) and natprobe's
// engine into one emulated network (pion/transport vnet), in process, with
// no root: the server on a WAN router with two public IPs, the probe behind
// a vnet NAT router (or directly on the WAN for the no-NAT and firewall
// cases), and chunk filters for loss and blocking.
//
// What vnet's NAT can express (vnet/nat.go): mapping and filtering
// behaviours (endpoint-independent, address-dependent,
// address-and-port-dependent), 1:1 NAT, a mapping lifetime refreshed by
// outbound packets only. What it cannot, and the real-kernel lab
// (lab/natlab) covers instead: port preservation and parity (NAPT ports
// come from a counter starting at 49152), hairpinning proper (vnet routes a
// packet for the NAT's own address out to the WAN and back in, so it
// "hairpins" exactly when the inbound filter admits it), arbitrary IP
// pooling (vnet always uses the router's first public IP), port
// overloading, and ALGs.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/pion/logging"
	"github.com/pion/transport/v5/vnet"
	"github.com/stund/stund/server"
)

// Addresses of the emulated Internet (documentation-style, never routed:
// everything stays inside vnet).
const (
	srvPrimaryIP = "1.2.3.4"
	srvAltIP     = "1.2.3.5"
	natPublicIP  = "5.6.7.8"
	openHostIP   = "5.6.7.9" // the probe host when there is no NAT
	lanCIDR      = "192.168.1.0/24"
	lanHostIP    = "192.168.1.2"
)

// topoOpts describes one emulated network.
type topoOpts struct {
	nat *vnet.NATType // nil: the probe host sits on the WAN with a public IP
	// firewall, with nat nil, puts a stateful filter (address- or
	// address-and-port-dependent) in front of the public probe host.
	firewall *vnet.EndpointDependencyType
	loss     float64 // chance each datagram crossing the WAN is dropped, each direction
	seed     uint64  // loss randomness
	blockAll bool    // drop every datagram (UDP blocked)
	singleIP bool    // stund without an alternate IP
	// altIPDown drops everything to and from the server's alternate IP
	// (a server whose second address is dead or firewalled).
	altIPDown bool
	// quirks, when set, replaces stund with the test responder
	// (responder_test.go) misbehaving as described.
	quirks *responderQuirks
}

// topo is a running emulated network with stund in it.
type topo struct {
	wan    *vnet.Router
	client *vnet.Net
	stop   func() // stops the server
	addr   string // the server's primary address, host:port
}

func quietLogger() logging.LoggerFactory {
	f := logging.NewDefaultLoggerFactory()
	f.DefaultLogLevel = logging.LogLevelDisabled
	return f
}

// vnetBuildMu serialises building topologies: vnet's NewRouter and NewNet
// share an unguarded MAC address counter (vnet/net.go newMACAddress), a
// data race when parallel tests build networks at once.
var vnetBuildMu sync.Mutex

func newTopo(t testing.TB, o topoOpts) *topo {
	t.Helper()
	vnetBuildMu.Lock()
	defer vnetBuildMu.Unlock()
	lf := quietLogger()
	wan, err := vnet.NewRouter(&vnet.RouterConfig{CIDR: "0.0.0.0/0", LoggerFactory: lf})
	if err != nil {
		t.Fatal(err)
	}
	srvIPs := []string{srvPrimaryIP, srvAltIP}
	if o.singleIP {
		srvIPs = srvIPs[:1]
	}
	srvNet, err := vnet.NewNet(&vnet.NetConfig{StaticIPs: srvIPs})
	if err != nil {
		t.Fatal(err)
	}
	if err := wan.AddNet(srvNet); err != nil {
		t.Fatal(err)
	}

	var client *vnet.Net
	clientIP := net.ParseIP(openHostIP)
	if o.nat != nil {
		static := []string{natPublicIP}
		if o.nat.Mode == vnet.NATModeNAT1To1 {
			static = []string{natPublicIP + "/" + lanHostIP}
		}
		lan, err := vnet.NewRouter(&vnet.RouterConfig{CIDR: lanCIDR, StaticIPs: static, NATType: o.nat, LoggerFactory: lf})
		if err != nil {
			t.Fatal(err)
		}
		if err := wan.AddRouter(lan); err != nil {
			t.Fatal(err)
		}
		if client, err = vnet.NewNet(&vnet.NetConfig{StaticIPs: []string{lanHostIP}}); err != nil {
			t.Fatal(err)
		}
		if err := lan.AddNet(client); err != nil {
			t.Fatal(err)
		}
		clientIP = net.ParseIP(natPublicIP)
	} else {
		if client, err = vnet.NewNet(&vnet.NetConfig{StaticIPs: []string{openHostIP}}); err != nil {
			t.Fatal(err)
		}
		if err := wan.AddNet(client); err != nil {
			t.Fatal(err)
		}
	}

	// Chunk filters run on the WAN router's single goroutine, so the
	// random source and the firewall state need no lock.
	if o.blockAll {
		wan.AddChunkFilter(func(vnet.Chunk) bool { return false })
	}
	if o.loss > 0 {
		rng := rand.New(rand.NewPCG(o.seed, 0x6e617470726f6265))
		wan.AddChunkFilter(func(vnet.Chunk) bool { return rng.Float64() >= o.loss })
	}
	if o.firewall != nil {
		wan.AddChunkFilter(statefulFilter(clientIP, *o.firewall))
	}
	if o.altIPDown {
		alt := net.ParseIP(srvAltIP)
		wan.AddChunkFilter(func(c vnet.Chunk) bool {
			return !c.SourceAddr().(*net.UDPAddr).IP.Equal(alt) && !c.DestinationAddr().(*net.UDPAddr).IP.Equal(alt)
		})
	}

	if err := wan.Start(); err != nil {
		t.Fatal(err)
	}
	tp := &topo{wan: wan, client: client, addr: srvPrimaryIP + ":3478"}
	t.Cleanup(tp.close)
	if o.quirks != nil {
		r, err := newResponder(srvNet, [2]netip.Addr{netip.MustParseAddr(srvPrimaryIP), netip.MustParseAddr(srvAltIP)}, [2]uint16{3478, 3479}, *o.quirks)
		if err != nil {
			t.Fatal(err)
		}
		tp.stop = r.close
		return tp
	}
	cfg := server.Config{
		PrimaryIP: netip.MustParseAddr(srvPrimaryIP), Port: 3478, AltPort: 3479,
		DisableTCP: true, Net: srvNet, LoggerFactory: lf,
	}
	if !o.singleIP {
		cfg.AlternateIP = netip.MustParseAddr(srvAltIP)
	}
	srv, err := server.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	tp.stop = func() { _ = srv.Close() }
	return tp
}

func (tp *topo) close() {
	if tp.stop != nil {
		tp.stop()
	}
	_ = tp.wan.Stop()
}

// statefulFilter is a firewall without NAT in front of host: outbound
// packets pass and open the way back for their destination (its address,
// or address and port); unsolicited inbound packets are dropped.
func statefulFilter(host net.IP, kind vnet.EndpointDependencyType) vnet.ChunkFilter {
	open := map[string]bool{}
	key := func(local, remote net.Addr) string {
		r := remote.(*net.UDPAddr)
		if kind == vnet.EndpointAddrDependent {
			return fmt.Sprintf("%d|%s", local.(*net.UDPAddr).Port, r.IP)
		}
		return fmt.Sprintf("%d|%s", local.(*net.UDPAddr).Port, r)
	}
	return func(c vnet.Chunk) bool {
		src, dst := c.SourceAddr().(*net.UDPAddr), c.DestinationAddr().(*net.UDPAddr)
		switch {
		case src.IP.Equal(host):
			open[key(src, dst)] = true
			return true
		case dst.IP.Equal(host):
			return open[key(dst, src)]
		}
		return true
	}
}

// probe runs the engine against the topology.
func (tp *topo) probe(t testing.TB, mod func(*Config)) (*Report, error) {
	t.Helper()
	cfg := Config{Server: tp.addr, Net: tp.client, Hairpin: true, Software: "natprobe-test"}
	if mod != nil {
		mod(&cfg)
	}
	limit := 30 * time.Second
	if cfg.Lifetime {
		limit += cfg.LifetimeMax + 2*lifetimeProbeTimeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), limit)
	defer cancel()
	r, err := Probe(ctx, cfg)
	if r != nil {
		// Every report of the NAT matrix keeps the invariant.
		if cerr := r.Check(); cerr != nil {
			t.Errorf("report breaks its invariant: %v\n%+v", cerr, r)
		}
	}
	return r, err
}

// want is the expected verdict of a topology; nil pointers mean "null".
type want struct {
	nat       bool
	mapping   Mapping
	filtering Filtering
	hairpin   *bool
	pres      *bool
	parity    *bool
	contig    *bool
	legacy    LegacyType
}

// fieldCheck compares one field: exact, or (lenient) also accepting an
// unsettled value.
type fieldCheck struct {
	name        string
	got, expect any
	unsettled   bool // got is the field's inconclusive/null value
}

func checks(r *Report, w want) []fieldCheck {
	str := func(b *bool) any {
		if b == nil {
			return nil
		}
		return *b
	}
	return []fieldCheck{
		{"nat_detected", str(r.NATDetected), w.nat, r.NATDetected == nil},
		{"mapping", r.Mapping, w.mapping, r.Mapping == MappingInconclusive},
		{"filtering", r.Filtering, w.filtering, r.Filtering == FilteringInconclusive},
		{"hairpinning", str(r.Hairpinning), str(w.hairpin), r.Hairpinning == nil},
		{"port_preservation", str(r.PortPreservation), str(w.pres), r.PortPreservation == nil},
		{"port_parity", str(r.PortParity), str(w.parity), r.PortParity == nil},
		{"port_contiguity", str(r.PortContiguity), str(w.contig), r.PortContiguity == nil},
		{"ip_pooling", poolStr(r.IPPooling), PoolingPaired, r.IPPooling == nil},
		{"stun_payload_rewritten", str(r.STUNPayloadRewritten), false, r.STUNPayloadRewritten == nil},
		{"legacy_type", r.LegacyType, w.legacy, r.LegacyType == LegacyInconclusive},
	}
}

func poolStr(p *Pooling) any {
	if p == nil {
		return nil
	}
	return *p
}

// expectExact fails on any field that differs from w.
func expectExact(t *testing.T, r *Report, w want) {
	t.Helper()
	for _, c := range checks(r, w) {
		if c.got != c.expect {
			t.Errorf("%s = %v, want %v (reason: %q)", c.name, c.got, c.expect, r.Reasons[c.name])
		}
	}
	if t.Failed() {
		t.Logf("report: %+v", r)
	}
}

// expectCorrectOrUnsettled fails on any field that is settled and wrong;
// it returns how many fields were unsettled where a value was expected.
func expectCorrectOrUnsettled(t *testing.T, r *Report, w want) int {
	t.Helper()
	n := 0
	for _, c := range checks(r, w) {
		switch {
		case c.got == c.expect:
		case c.unsettled:
			n++
		default:
			t.Errorf("%s = %v, want %v or unsettled (reason: %q)", c.name, c.got, c.expect, r.Reasons[c.name])
		}
	}
	return n
}

var (
	yes = ptr(true)
	no  = ptr(false)
)

var depNames = map[vnet.EndpointDependencyType]string{
	vnet.EndpointIndependent: "EI", vnet.EndpointAddrDependent: "AD", vnet.EndpointAddrPortDependent: "APD",
}

var mappingOf = map[vnet.EndpointDependencyType]Mapping{
	vnet.EndpointIndependent: MappingEndpointIndependent, vnet.EndpointAddrDependent: MappingAddressDependent,
	vnet.EndpointAddrPortDependent: MappingAddressPortDependent,
}

var filteringOf = map[vnet.EndpointDependencyType]Filtering{
	vnet.EndpointIndependent: FilteringEndpointIndependent, vnet.EndpointAddrDependent: FilteringAddressDependent,
	vnet.EndpointAddrPortDependent: FilteringAddressPortDependent,
}

// napt is a vnet NAPT case with the verdict it must produce.
type napt struct {
	name string
	nat  vnet.NATType
	want want
}

// naptMatrix is every mapping × filtering combination vnet supports.
func naptMatrix() []napt {
	var out []napt
	deps := []vnet.EndpointDependencyType{vnet.EndpointIndependent, vnet.EndpointAddrDependent, vnet.EndpointAddrPortDependent}
	for _, m := range deps {
		for _, f := range deps {
			w := want{
				nat: true, mapping: mappingOf[m], filtering: filteringOf[f],
				// vnet NAPT ports come from a counter, and portOrder
				// makes a counter fail parity and contiguity.
				pres: no, parity: no, contig: no,
			}
			// vnet loops a packet for its own public address out and
			// back in: it arrives when the target's filter admits the
			// sender, which it does under EIM (each socket sent to the
			// other's external address first) or EIF. Otherwise the
			// verdict must stay open (see hairpinVerdict).
			if m == vnet.EndpointIndependent || f == vnet.EndpointIndependent {
				w.hairpin = yes
			}
			switch {
			case m != vnet.EndpointIndependent:
				w.legacy = LegacySymmetric
			case f == vnet.EndpointIndependent:
				w.legacy = LegacyFullCone
			case f == vnet.EndpointAddrDependent:
				w.legacy = LegacyRestrictedCone
			default:
				w.legacy = LegacyPortRestrictedCone
			}
			out = append(out, napt{
				name: fmt.Sprintf("%sM-%sF", depNames[m], depNames[f]),
				nat:  vnet.NATType{MappingBehavior: m, FilteringBehavior: f},
				want: w,
			})
		}
	}
	return out
}

// TestMatrixLossless: every vnet NAPT behaviour, 1:1 NAT, no NAT, and a
// firewall without NAT, on a clean path: every field exact.
func TestMatrixLossless(t *testing.T) {
	t.Parallel()
	for _, c := range naptMatrix() {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			nat := c.nat
			tp := newTopo(t, topoOpts{nat: &nat})
			r, err := tp.probe(t, nil)
			if err != nil {
				t.Fatalf("Probe: %v", err)
			}
			expectExact(t, r, c.want)
			if c.want.hairpin == nil && (r.Hairpinning != nil || r.Reasons["hairpinning"] == "") {
				t.Errorf("hairpinning = %v with reason %q, want null with a reason", r.Hairpinning, r.Reasons["hairpinning"])
			}
			if r.MappedAddress.Addr() != netip.MustParseAddr(natPublicIP) {
				t.Errorf("mapped address %s, want the NAT's public IP %s", r.MappedAddress, natPublicIP)
			}
			if r.LocalAddress.Addr() != netip.MustParseAddr(lanHostIP) {
				t.Errorf("local address %s, want %s", r.LocalAddress, lanHostIP)
			}
		})
	}
	t.Run("1to1", func(t *testing.T) {
		t.Parallel()
		tp := newTopo(t, topoOpts{nat: &vnet.NATType{Mode: vnet.NATModeNAT1To1}})
		r, err := tp.probe(t, nil)
		if err != nil {
			t.Fatalf("Probe: %v", err)
		}
		// 1:1 NAT keeps every port: preservation, parity and contiguity.
		expectExact(t, r, want{nat: true, mapping: MappingEndpointIndependent, filtering: FilteringEndpointIndependent,
			hairpin: yes, pres: yes, parity: yes, contig: yes, legacy: LegacyFullCone})
	})
	t.Run("no-NAT", func(t *testing.T) {
		t.Parallel()
		tp := newTopo(t, topoOpts{})
		r, err := tp.probe(t, nil)
		if err != nil {
			t.Fatalf("Probe: %v", err)
		}
		expectExact(t, r, want{nat: false, mapping: MappingEndpointIndependent, filtering: FilteringEndpointIndependent,
			hairpin: yes, pres: yes, parity: yes, contig: yes, legacy: LegacyOpen})
		if r.MappedAddress != r.LocalAddress {
			t.Errorf("mapped %s != local %s with no NAT", r.MappedAddress, r.LocalAddress)
		}
		if r.Inconclusive() {
			t.Errorf("inconclusive fields %v: %v", r.InconclusiveFields, r.Reasons)
		}
	})
	for _, fw := range []vnet.EndpointDependencyType{vnet.EndpointAddrDependent, vnet.EndpointAddrPortDependent} {
		t.Run("firewall-"+depNames[fw]+"F", func(t *testing.T) {
			t.Parallel()
			tp := newTopo(t, topoOpts{firewall: &fw})
			r, err := tp.probe(t, nil)
			if err != nil {
				t.Fatalf("Probe: %v", err)
			}
			expectExact(t, r, want{nat: false, mapping: MappingEndpointIndependent, filtering: filteringOf[fw],
				hairpin: yes, pres: yes, parity: yes, contig: yes, legacy: LegacySymmetricFirewall})
		})
	}
}

// TestUDPBlocked: nothing gets through; the engine says so, with a report.
func TestUDPBlocked(t *testing.T) {
	t.Parallel()
	tp := newTopo(t, topoOpts{nat: &vnet.NATType{}, blockAll: true})
	r, err := tp.probe(t, nil)
	if !errors.Is(err, ErrUnreachable) {
		t.Fatalf("err = %v, want ErrUnreachable", err)
	}
	t.Logf("gave up after %d ms and %d datagrams", r.DurationMS, r.Stats.Sent)
	if r == nil || r.LegacyType != LegacyUDPBlocked || r.Stats.Sent == 0 || r.Stats.Received != 0 {
		t.Fatalf("report %+v: want udp-blocked after some requests and no replies", r)
	}
}

// lossCases picks, from the matrix, the cases whose verdicts rest on
// negative evidence (filtering silence, hairpin silence) as well as the
// positive ones.
func lossCases() []napt {
	var out []napt
	for _, c := range naptMatrix() {
		switch c.name {
		case "EIM-EIF", "EIM-APDF", "ADM-ADF", "APDM-APDF", "APDM-EIF":
			out = append(out, c)
		}
	}
	return out
}

// lossSeeds sets how many seeds each loss case runs; CI keeps the default,
// a longer soak is `go test ./classifier -run Loss -args -loss-seeds=50`.
var lossSeeds = flag.Int("loss-seeds", 4, "seeds per case in TestLoss25 (half as many in TestLoss50)")

// TestLoss25: 25 % random loss each way; the verdicts must be exactly those
// of the clean path, on every seed.
func TestLoss25(t *testing.T) {
	t.Parallel()
	seeds := *lossSeeds
	for _, c := range lossCases() {
		for seed := range seeds {
			t.Run(fmt.Sprintf("%s/seed%d", c.name, seed), func(t *testing.T) {
				t.Parallel()
				nat := c.nat
				tp := newTopo(t, topoOpts{nat: &nat, loss: 0.25, seed: uint64(seed) + 1})
				r, err := tp.probe(t, nil)
				if err != nil {
					t.Fatalf("Probe: %v", err)
				}
				expectExact(t, r, c.want)
				t.Logf("%d ms, %d datagrams sent", r.DurationMS, r.Stats.Sent)
			})
		}
	}
}

// TestLoss50: 50 % random loss each way: fields may be unsettled, never
// wrong.
func TestLoss50(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	unsettled, total := 0, 0
	// Unsettled is allowed, giving up is not: at 50 % loss each way the
	// default deadline leaves room to settle nearly everything (0 of 100
	// fields unsettled when this bound was set), so more than
	// maxUnsettledRun fields in one run, or over a tenth of all, means
	// the probe stopped gathering evidence it had time for.
	const maxUnsettledRun, maxUnsettledShare = 3, 0.10
	t.Cleanup(func() {
		t.Logf("50%% loss: %d of %d fields unsettled", unsettled, total)
		if float64(unsettled) > maxUnsettledShare*float64(total) {
			t.Errorf("50%% loss: %d of %d fields unsettled, more than %.0f%%", unsettled, total, 100*maxUnsettledShare)
		}
	})
	for _, c := range lossCases() {
		for seed := range max(1, *lossSeeds/2) {
			t.Run(fmt.Sprintf("%s/seed%d", c.name, seed), func(t *testing.T) {
				t.Parallel()
				nat := c.nat
				tp := newTopo(t, topoOpts{nat: &nat, loss: 0.5, seed: uint64(seed) + 1000})
				r, err := tp.probe(t, nil)
				if err != nil {
					t.Fatalf("Probe: %v", err)
				}
				n := expectCorrectOrUnsettled(t, r, c.want)
				t.Logf("%d ms, %d datagrams sent, %d fields unsettled", r.DurationMS, r.Stats.Sent, n)
				if n > maxUnsettledRun {
					t.Errorf("%d fields unsettled (%v), at most %d", n, r.InconclusiveFields, maxUnsettledRun)
				}
				mu.Lock()
				unsettled += n
				total += len(checks(r, c.want))
				mu.Unlock()
			})
		}
	}
}

// TestSingleIPServer: stund without an alternate IP answers, refuses
// CHANGE-REQUEST (420), names no OTHER-ADDRESS: ErrNotRFC5780 with the
// mapping-lite results.
func TestSingleIPServer(t *testing.T) {
	t.Parallel()
	tp := newTopo(t, topoOpts{nat: &vnet.NATType{MappingBehavior: vnet.EndpointIndependent, FilteringBehavior: vnet.EndpointAddrPortDependent}, singleIP: true})
	r, err := tp.probe(t, nil)
	if !errors.Is(err, ErrNotRFC5780) {
		t.Fatalf("err = %v, want ErrNotRFC5780", err)
	}
	if r == nil {
		t.Fatal("no partial report")
	}
	if r.NATDetected == nil || !*r.NATDetected || r.MappedAddress.Addr() != netip.MustParseAddr(natPublicIP) {
		t.Errorf("mapping-lite: nat %v mapped %s", r.NATDetected, r.MappedAddress)
	}
	if r.Mapping != MappingInconclusive || r.Filtering != FilteringInconclusive || r.Reasons["mapping"] == "" || r.Reasons["filtering"] == "" {
		t.Errorf("mapping %q filtering %q reasons %v: want both inconclusive with reasons", r.Mapping, r.Filtering, r.Reasons)
	}
	if r.PortPreservation == nil || *r.PortPreservation || r.Hairpinning == nil || !*r.Hairpinning {
		t.Errorf("port preservation %v hairpinning %v: one address still measures these", r.PortPreservation, r.Hairpinning)
	}
	if !r.Inconclusive() {
		t.Error("Inconclusive() = false")
	}
}

// TestAlternateIPDown: the server announces an alternate IP that nothing
// gets to or from. Its silence must not read as the NAT filtering it.
func TestAlternateIPDown(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		name string
		nat  vnet.NATType
	}{
		{"EIM-EIF", vnet.NATType{MappingBehavior: vnet.EndpointIndependent, FilteringBehavior: vnet.EndpointIndependent}},
		{"EIM-APDF", eimAPDF},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			nat := c.nat
			tp := newTopo(t, topoOpts{nat: &nat, altIPDown: true})
			r, err := tp.probe(t, func(c *Config) { c.Timeout = 2 * time.Second })
			if err != nil {
				t.Fatal(err)
			}
			if r.Filtering != FilteringInconclusive || r.Mapping != MappingInconclusive {
				t.Errorf("%s/%s (%v), want both inconclusive", r.Mapping, r.Filtering, r.Reasons)
			}
			if r.PortPreservation == nil || r.NATDetected == nil || !*r.NATDetected {
				t.Error("what the primary address alone tells is lost")
			}
		})
	}
}
