package classifier

import (
	"math"
	"net/netip"
	"strings"
	"testing"
	"time"
)

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

func one(s string) []netip.AddrPort { return []netip.AddrPort{ap(s)} }

// mev builds mapping evidence from the reflexive addresses reported by the
// primary/primary, primary/alt-port, alt-IP/primary-port and alt/alt server
// addresses ("" = no reply).
func mev(pp, pa, apr, aa string) mappingEvidence {
	ev := mappingEvidence{dst: [2][2]netip.AddrPort{
		{ap("1.2.3.4:3478"), ap("1.2.3.4:3479")}, {ap("1.2.3.5:3478"), ap("1.2.3.5:3479")},
	}}
	for i, s := range []string{pp, pa, apr, aa} {
		if s != "" {
			ev.seen[i/2][i%2] = one(s)
		}
	}
	return ev
}

func TestMappingVerdict(t *testing.T) {
	const x, y, z, w = "5.6.7.8:40000", "5.6.7.8:40001", "5.6.7.8:40002", "5.6.7.8:40003"
	contradictory := mev(x, "", "", "")
	contradictory.seen[0][0] = []netip.AddrPort{ap(x), ap(y)}
	for _, c := range []struct {
		name string
		ev   mappingEvidence
		want Mapping
		why  string // substring of the reason, for inconclusive ones
	}{
		{"EIM all four", mev(x, x, x, x), MappingEndpointIndependent, ""},
		{"EIM from tests I and II only (RFC 5780 §4.3)", mev(x, "", x, ""), MappingEndpointIndependent, ""},
		{"ADM", mev(x, x, y, y), MappingAddressDependent, ""},
		{"ADM keeping the port but changing the IP", mev("5.6.7.8:40000", "5.6.7.8:40000", "5.6.7.9:40000", "5.6.7.9:40000"), MappingAddressDependent, ""},
		{"ADM from tests I-III only", mev(x, "", y, y), MappingAddressDependent, ""},
		{"APDM all differ", mev(x, y, z, w), MappingAddressPortDependent, ""},
		{"APDM from the port alone", mev(x, y, "", ""), MappingAddressPortDependent, ""},
		{"APDM from tests I-III only", mev(x, "", y, z), MappingAddressPortDependent, ""},
		{"no reply from the primary", mev("", x, x, x), MappingInconclusive, "no reply from 1.2.3.4:3478"},
		{"only the primary", mev(x, "", "", ""), MappingInconclusive, "no reply from the alternate"},
		{"address dependence without test III", mev(x, "", y, ""), MappingInconclusive, "no reply from"},
		{"port independence alone", mev(x, x, "", ""), MappingInconclusive, "no reply from the alternate"},
		{"two answers to one request", contradictory, MappingInconclusive, "contradictory"},
		{"port dependence on one IP only", mev(x, x, y, z), MappingInconclusive, "contradictory"},
		{"address dependence on one port only", mev(x, y, x, z), MappingInconclusive, "contradictory"},
		{"port but not address dependence", mev(x, y, x, y), MappingInconclusive, "contradictory"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, why := mappingVerdict(c.ev)
			if got != c.want {
				t.Errorf("got %s (%s), want %s", got, why, c.want)
			}
			if c.why != "" && !strings.Contains(why, c.why) {
				t.Errorf("reason %q lacks %q", why, c.why)
			}
			if got == MappingInconclusive && why == "" {
				t.Error("inconclusive without a reason")
			}
		})
	}
}

func TestFilteringVerdict(t *testing.T) {
	for _, c := range []struct {
		name string
		ev   filteringEvidence
		want Filtering
		why  string
	}{
		{"EIF", filteringEvidence{newIP: true, controlHits: 3}, FilteringEndpointIndependent, ""},
		{"EIF, test III also answered", filteringEvidence{newIP: true, newPort: true}, FilteringEndpointIndependent, ""},
		{"EIF though the mapping socket never heard A:a", filteringEvidence{newIP: true, changePortSilent: false}, FilteringEndpointIndependent, ""},
		{"ADF", filteringEvidence{newPort: true, changeIPSilent: true, otherReaches: true}, FilteringAddressDependent, ""},
		{"APDF", filteringEvidence{changeIPSilent: true, changePortSilent: true, otherReaches: true, altPortReaches: true}, FilteringAddressPortDependent, ""},
		{"silent, but the alternate IP never answered anyone", filteringEvidence{changeIPSilent: true, changePortSilent: true, altPortReaches: true}, FilteringInconclusive, "other address at all"},
		{"silent, but the alternate port never answered anyone", filteringEvidence{changeIPSilent: true, changePortSilent: true, otherReaches: true}, FilteringInconclusive, "alternate port at all"},
		{"ADF evidence, alternate IP never answered anyone", filteringEvidence{newPort: true, changeIPSilent: true}, FilteringInconclusive, "other address at all"},
		{"new IP in, new port silent", filteringEvidence{newIP: true, changePortSilent: true, otherReaches: true, altPortReaches: true}, FilteringInconclusive, "contradictory"},
		{"new port in, change-IP undecided", filteringEvidence{newPort: true, otherReaches: true}, FilteringInconclusive, "neither answered nor decisively silent"},
		{"change-IP silent, change-port undecided", filteringEvidence{changeIPSilent: true, controlHits: 5, controlSent: 9, otherReaches: true}, FilteringInconclusive, "too few"},
		{"nothing came back at all", filteringEvidence{controlSent: 40}, FilteringInconclusive, "no reply to 40 control"},
		{"loss: control answered, tests undecided", filteringEvidence{controlHits: 4, controlSent: 30}, FilteringInconclusive, "too few"},
		{"server refuses CHANGE-REQUEST", filteringEvidence{refused: 420, changeIPSilent: true, changePortSilent: true, otherReaches: true, altPortReaches: true}, FilteringInconclusive, "420"},
		{"server ignores CHANGE-REQUEST", filteringEvidence{unchanged: true, newIP: true}, FilteringInconclusive, "ignored"},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, why := filteringVerdict(c.ev)
			if got != c.want {
				t.Errorf("got %s (%s), want %s", got, why, c.want)
			}
			if c.why != "" && !strings.Contains(why, c.why) {
				t.Errorf("reason %q lacks %q", why, c.why)
			}
		})
	}
}

func TestHairpinVerdict(t *testing.T) {
	for _, c := range []struct {
		name             string
		received, silent bool
		m                Mapping
		f                Filtering
		want             *bool
		unsettled        bool
	}{
		{"received", true, false, MappingAddressPortDependent, FilteringAddressPortDependent, yes, false},
		{"silent under EIM", false, true, MappingEndpointIndependent, FilteringAddressPortDependent, no, false},
		{"silent under EIF", false, true, MappingAddressPortDependent, FilteringEndpointIndependent, no, false},
		{"silent under APDM/APDF: not measurable", false, true, MappingAddressPortDependent, FilteringAddressPortDependent, nil, false},
		{"silent under ADM/ADF: not measurable", false, true, MappingAddressDependent, FilteringAddressDependent, nil, false},
		{"silent, mapping unsettled", false, true, MappingInconclusive, FilteringAddressDependent, nil, true},
		{"too little evidence", false, false, MappingEndpointIndependent, FilteringEndpointIndependent, nil, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, why, unsettled := hairpinVerdict(c.received, c.silent, c.m, c.f)
			if (got == nil) != (c.want == nil) || (got != nil && *got != *c.want) || unsettled != c.unsettled {
				t.Errorf("got %v unsettled=%v (%s), want %v unsettled=%v", fmtBool(got), unsettled, why, fmtBool(c.want), c.unsettled)
			}
			if got == nil && why == "" {
				t.Error("null without a reason")
			}
		})
	}
}

func fmtBool(b *bool) any {
	if b == nil {
		return nil
	}
	return *b
}

// allocate runs the port test's send order against a NAT port allocator
// and returns the samples natprobe would see.
func allocate(base uint16, alloc func(local uint16) uint16) []portSample {
	s := make([]portSample, portTestSockets)
	for _, i := range portOrder {
		l := base + uint16(i)
		s[i] = portSample{local: netip.AddrPortFrom(netip.MustParseAddr("192.168.1.2"), l),
			mapped: netip.AddrPortFrom(netip.MustParseAddr("5.6.7.8"), alloc(l))}
	}
	return s
}

func TestPortVerdicts(t *testing.T) {
	sequential := func(start uint16) func(uint16) uint16 {
		next := start
		return func(uint16) uint16 { next++; return next - 1 }
	}
	for _, c := range []struct {
		name                 string
		samples              []portSample
		pres, parity, contig *bool
	}{
		{"preserving NAT", allocate(40000, func(l uint16) uint16 { return l }), yes, yes, yes},
		{"sequential from even", allocate(40000, sequential(49152)), no, no, no},
		{"sequential from odd", allocate(40000, sequential(49153)), no, no, no},
		{"parity and contiguity kept, port shifted", allocate(40000, func(l uint16) uint16 { return l + 1000 }), no, yes, yes},
		{"parity kept, pairs scattered", allocate(40000, func(l uint16) uint16 { return 50000 + (l-40000)*3 }), no, yes, no},
		{"preserved except a port in use", func() []portSample {
			s := allocate(40000, func(l uint16) uint16 { return l })
			s[3].mapped = netip.AddrPortFrom(s[3].mapped.Addr(), 50001)
			return s
		}(), yes, yes, no},
		{"too few for parity", allocate(40000, func(l uint16) uint16 { return l })[:4], yes, nil, yes},
		{"one socket", allocate(40000, func(l uint16) uint16 { return l })[:1], nil, nil, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			pres, parity, contig, reasons := portVerdicts(c.samples)
			for _, f := range []struct {
				name      string
				got, want *bool
			}{{"port_preservation", pres, c.pres}, {"port_parity", parity, c.parity}, {"port_contiguity", contig, c.contig}} {
				if fmtBool(f.got) != fmtBool(f.want) {
					t.Errorf("%s = %v, want %v", f.name, fmtBool(f.got), fmtBool(f.want))
				}
				if f.got == nil && reasons[f.name] == "" {
					t.Errorf("%s null without a reason", f.name)
				}
			}
		})
	}
}

func TestPoolingAndOverloading(t *testing.T) {
	o := func(local, dst, mapped string) observation { return observation{ap(local), ap(dst), ap(mapped)} }
	paired := []observation{
		o("10.0.0.2:5000", "1.2.3.4:3478", "5.6.7.8:40000"),
		o("10.0.0.2:5000", "1.2.3.5:3478", "5.6.7.8:40001"),
		o("10.0.0.2:5001", "1.2.3.4:3478", "5.6.7.8:40002"),
	}
	if p, why := poolingVerdict(paired); p == nil || *p != PoolingPaired {
		t.Errorf("paired: got %v (%s)", p, why)
	}
	arbitrary := append(paired[:2:2], o("10.0.0.2:5001", "1.2.3.4:3478", "5.6.7.9:40002"))
	if p, _ := poolingVerdict(arbitrary); p == nil || *p != PoolingArbitrary {
		t.Errorf("arbitrary: got %v", p)
	}
	oneDst := []observation{paired[0], paired[2]}
	if p, why := poolingVerdict(oneDst); p != nil || why == "" {
		t.Errorf("one destination IP: got %v (%q), want null with a reason", p, why)
	}
	if overloadingSeen(paired) {
		t.Error("overloading seen in distinct mappings")
	}
	over := append(paired, o("10.0.0.2:5002", "1.2.3.4:3478", "5.6.7.8:40000"))
	if !overloadingSeen(over) {
		t.Error("two sockets on one external address toward one server: overloading not seen")
	}
}

func TestALGVerdict(t *testing.T) {
	if v, why := algVerdict(nil); v != nil || why == "" {
		t.Errorf("no pairs: %v %q", v, why)
	}
	same := algPair{ap("5.6.7.8:40000"), ap("5.6.7.8:40000")}
	if v, _ := algVerdict([]algPair{same, same}); v == nil || *v {
		t.Errorf("equal pairs: %v", fmtBool(v))
	}
	rewritten := algPair{ap("192.168.1.2:5000"), ap("5.6.7.8:40000")}
	if v, _ := algVerdict([]algPair{same, rewritten}); v == nil || !*v {
		t.Errorf("a rewritten MAPPED-ADDRESS: %v", fmtBool(v))
	}
}

func TestLegacyType(t *testing.T) {
	for _, c := range []struct {
		nat  *bool
		m    Mapping
		f    Filtering
		want LegacyType
	}{
		{no, MappingEndpointIndependent, FilteringEndpointIndependent, LegacyOpen},
		{no, MappingEndpointIndependent, FilteringAddressDependent, LegacySymmetricFirewall},
		{no, MappingEndpointIndependent, FilteringAddressPortDependent, LegacySymmetricFirewall},
		{no, MappingEndpointIndependent, FilteringInconclusive, LegacyInconclusive},
		{yes, MappingEndpointIndependent, FilteringEndpointIndependent, LegacyFullCone},
		{yes, MappingEndpointIndependent, FilteringAddressDependent, LegacyRestrictedCone},
		{yes, MappingEndpointIndependent, FilteringAddressPortDependent, LegacyPortRestrictedCone},
		{yes, MappingEndpointIndependent, FilteringInconclusive, LegacyInconclusive},
		{yes, MappingAddressDependent, FilteringEndpointIndependent, LegacySymmetric},
		{yes, MappingAddressPortDependent, FilteringAddressPortDependent, LegacySymmetric},
		{yes, MappingAddressPortDependent, FilteringInconclusive, LegacySymmetric},
		{yes, MappingInconclusive, FilteringEndpointIndependent, LegacyInconclusive},
		{nil, MappingEndpointIndependent, FilteringEndpointIndependent, LegacyInconclusive},
	} {
		got, why := legacyType(c.nat, c.m, c.f)
		if got != c.want {
			t.Errorf("nat=%v %s/%s: got %s, want %s", fmtBool(c.nat), c.m, c.f, got, c.want)
		}
		if got == LegacyInconclusive && why == "" {
			t.Errorf("nat=%v %s/%s: inconclusive without a reason", fmtBool(c.nat), c.m, c.f)
		}
	}
}

func TestLifetimeVerdict(t *testing.T) {
	pt := func(s float64, o outcome) lifetimePoint {
		return lifetimePoint{idle: time.Duration(s * float64(time.Second)), state: o}
	}
	for _, c := range []struct {
		name     string
		points   []lifetimePoint
		min, max float64 // max < 0: null
		null     bool
	}{
		{"bracket", []lifetimePoint{pt(5, positive), pt(10, positive), pt(20.1, positive), pt(30.2, negative)}, 20.1, 30.2, false},
		{"an undecided point in between", []lifetimePoint{pt(5, positive), pt(10, undecided), pt(20, negative)}, 5, 20, false},
		{"outlived the search", []lifetimePoint{pt(5, positive), pt(60, positive)}, 60, -1, false},
		{"gone at once", []lifetimePoint{pt(5, negative)}, 0, 5, false},
		{"contradictory", []lifetimePoint{pt(5, negative), pt(10, positive)}, 0, 0, true},
		{"nothing decided", []lifetimePoint{pt(5, undecided)}, 0, 0, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			lt, why := lifetimeVerdict(c.points)
			if c.null {
				if lt != nil || why == "" {
					t.Errorf("got %+v %q, want null with a reason", lt, why)
				}
				return
			}
			if lt == nil {
				t.Fatalf("null (%s)", why)
			}
			if lt.MinS != c.min || (c.max < 0) != (lt.MaxS == nil) || (lt.MaxS != nil && *lt.MaxS != c.max) {
				t.Errorf("got [%v, %v], want [%v, %v]", lt.MinS, fmtFloat(lt.MaxS), c.min, c.max)
			}
		})
	}
}

func fmtFloat(f *float64) any {
	if f == nil {
		return nil
	}
	return *f
}

func TestHypergeomZero(t *testing.T) {
	// C(24,12) = 2704156: twelve answered control rounds and twelve silent
	// tests on a clean path.
	if got, want := hypergeomZero(12, 12, 12), 1/2704156.0; math.Abs(got-want) > 1e-15 {
		t.Errorf("hypergeomZero(12,12,12) = %g, want %g", got, want)
	}
	if hypergeomZero(12, 11, 12) >= negativeAlpha == (hypergeomZero(12, 12, 12) >= negativeAlpha) {
		t.Error("eleven answers out of twelve should not decide, twelve should")
	}
	if hypergeomZero(50, 0, 50) != 1 || hypergeomZero(0, 0, 0) != 1 || hypergeomZero(10, 5, 0) != 1 {
		t.Error("no evidence must give 1")
	}
	// More control answers (or more silent tests) are stronger evidence.
	for c := 1; c < 40; c++ {
		if hypergeomZero(80, c+1, 80) >= hypergeomZero(80, c, 80) || hypergeomZero(80, c, 81) >= hypergeomZero(80, c, 80) {
			t.Fatalf("not monotone at c=%d", c)
		}
	}
	// At 50 % loss each way (a quarter of the copies answered), eighty
	// rounds decide; at twenty rounds five answers are not enough.
	if hypergeomZero(80, 20, 80) >= negativeAlpha || hypergeomZero(20, 5, 20) < negativeAlpha {
		t.Error("unexpected decision thresholds at 50 % loss")
	}
}

func TestSIPVerdict(t *testing.T) {
	need := needOf
	prop := func(s SIPRTP, n string) Status { return propOf(s, n).Status }
	base := func(nat bool, m Mapping, f Filtering) *Report {
		r := &Report{NATDetected: &nat, Mapping: m, Filtering: f, Reasons: map[string]string{}}
		r.LegacyType, _ = legacyType(r.NATDetected, m, f)
		return r
	}

	open := sipVerdict(base(false, MappingEndpointIndependent, FilteringEndpointIndependent), sipInputs{reachable: true})
	if open.KeepaliveIntervalS != 0 || need(open, "media-relay") != NeedNotNeeded || need(open, "contact-fixup") != NeedNotNeeded {
		t.Errorf("open internet: %+v", open)
	}
	sym := sipVerdict(base(true, MappingAddressPortDependent, FilteringAddressPortDependent), sipInputs{reachable: true})
	if need(sym, "media-relay") != NeedRequired || need(sym, "symmetric-response") != NeedRequired ||
		prop(sym, "endpoint-independent-mapping") != StatusBad || sym.KeepaliveIntervalS != defaultKeepaliveS {
		t.Errorf("symmetric: %+v", sym)
	}
	prc := sipVerdict(base(true, MappingEndpointIndependent, FilteringAddressPortDependent), sipInputs{reachable: true})
	if need(prc, "media-relay") != NeedConditional || prop(prc, "address-independent-or-address-dependent-filtering") != StatusBad {
		t.Errorf("port-restricted cone: %+v", prc)
	}
	rc := sipVerdict(base(true, MappingEndpointIndependent, FilteringAddressDependent), sipInputs{reachable: true})
	if need(rc, "media-relay") != NeedNotNeeded || prop(rc, "address-independent-or-address-dependent-filtering") != StatusGood {
		t.Errorf("restricted cone: %+v", rc)
	}
	fw := sipVerdict(base(false, MappingEndpointIndependent, FilteringAddressPortDependent), sipInputs{reachable: true})
	if need(fw, "record-route") != NeedRequired || need(fw, "contact-fixup") != NeedNotNeeded {
		t.Errorf("firewall without NAT: %+v", fw)
	}
	unk := sipVerdict(base(true, MappingInconclusive, FilteringInconclusive), sipInputs{reachable: true})
	if need(unk, "media-relay") != NeedUnknown || !strings.Contains(unk.Summary, "not settled") {
		t.Errorf("unsettled: %+v", unk)
	}

	// Every property of the seed's list is judged, and each has a reason.
	for _, p := range []string{"endpoint-independent-mapping", "address-independent-or-address-dependent-filtering",
		"paired-ip-pooling", "no-port-preservation", "no-port-overloading", "port-parity-preservation", "udp-refresh-5-min"} {
		if prop(sym, p) == "" {
			t.Errorf("property %s missing", p)
		}
	}
	for _, p := range sym.Properties {
		if p.Why == "" {
			t.Errorf("%s without a reason", p.Property)
		}
	}
	if prop(sym, "no-port-overloading") != StatusUnknown {
		t.Error("port overloading cannot be seen from one host")
	}
	over := sipVerdict(base(true, MappingEndpointIndependent, FilteringEndpointIndependent), sipInputs{reachable: true, overloading: true})
	if prop(over, "no-port-overloading") != StatusBad {
		t.Error("observed overloading not judged bad")
	}

	// Keep-alive from a measured lifetime: half the lower bound.
	lr := base(true, MappingEndpointIndependent, FilteringEndpointIndependent)
	lr.MappingLifetime = &Lifetime{MinS: 45, MaxS: ptr(60.0)}
	ls := sipVerdict(lr, sipInputs{reachable: true, lifetimeMeasured: true})
	if ls.KeepaliveIntervalS != 22 || prop(ls, "udp-refresh-5-min") != StatusBad {
		t.Errorf("lifetime 45-60 s: keepalive %d, refresh %s", ls.KeepaliveIntervalS, prop(ls, "udp-refresh-5-min"))
	}
	lr.MappingLifetime = &Lifetime{MinS: 300}
	if s := sipVerdict(lr, sipInputs{reachable: true, lifetimeMeasured: true}); prop(s, "udp-refresh-5-min") != StatusGood || s.KeepaliveIntervalS != 150 {
		t.Errorf("lifetime >= 300 s: keepalive %d, refresh %s", s.KeepaliveIntervalS, prop(s, "udp-refresh-5-min"))
	}

	blocked := sipVerdict(&Report{Reasons: map[string]string{}}, sipInputs{})
	if need(blocked, "media-relay") != NeedRequired || !strings.Contains(blocked.Summary, "UDP is blocked") {
		t.Errorf("UDP blocked: %+v", blocked)
	}
	if len(sym.Lines()) < len(sym.Properties)+len(sym.ServerNeeds) {
		t.Error("Lines() drops judgements")
	}
}
