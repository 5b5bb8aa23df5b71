package classifier

import (
	"strings"
	"testing"

	"github.com/pion/transport/v5/vnet"
)

// needOf is the status of one server need of a SIP reading ("" if absent).
func needOf(s SIPRTP, n string) NeedStatus {
	for _, x := range s.ServerNeeds {
		if x.Need == n {
			return x.Status
		}
	}
	return ""
}

// propOf is one judged property of a SIP reading (zero if absent).
func propOf(s SIPRTP, n string) SIPProperty {
	for _, x := range s.Properties {
		if x.Property == n {
			return x
		}
	}
	return SIPProperty{}
}

// The SIP/RTP reading of each NAT property the older table left unguarded:
// ADM needs a media relay like APDM; unmeasured hairpinning is unknown,
// never good; pooling, parity and contiguity each way and unmeasured.
func TestSIPVerdictProperties(t *testing.T) {
	need, prop := needOf, propOf
	nat := func(m Mapping, f Filtering, mod func(*Report)) SIPRTP {
		yes := true
		r := &Report{NATDetected: &yes, Mapping: m, Filtering: f, Reasons: map[string]string{}}
		r.LegacyType, _ = legacyType(r.NATDetected, m, f)
		if mod != nil {
			mod(r)
		}
		return sipVerdict(r, sipInputs{reachable: true})
	}

	adm := nat(MappingAddressDependent, FilteringAddressPortDependent, nil)
	if need(adm, "media-relay") != NeedRequired || prop(adm, "endpoint-independent-mapping").Status != StatusBad {
		t.Errorf("ADM: media-relay %s, mapping %+v", need(adm, "media-relay"), prop(adm, "endpoint-independent-mapping"))
	}
	if !strings.Contains(adm.Summary, "media needs a relay") {
		t.Errorf("ADM summary %q", adm.Summary)
	}
	admEIF := nat(MappingAddressDependent, FilteringEndpointIndependent, nil)
	if need(admEIF, "media-relay") != NeedRequired {
		t.Errorf("ADM/EIF: media-relay %s, want required (the port differs per peer)", need(admEIF, "media-relay"))
	}

	for _, c := range []struct {
		name, prop string
		mod        func(*Report)
		want       Status
	}{
		{"hairpinning unmeasured", "hairpinning", func(r *Report) { r.Hairpinning = nil }, StatusUnknown},
		{"hairpinning unmeasured with a reason", "hairpinning", func(r *Report) { r.Reasons["hairpinning"] = "skipped (--no-hairpin)" }, StatusUnknown},
		{"hairpinning yes", "hairpinning", func(r *Report) { r.Hairpinning = ptr(true) }, StatusGood},
		{"hairpinning no", "hairpinning", func(r *Report) { r.Hairpinning = ptr(false) }, StatusBad},
		{"pooling paired", "paired-ip-pooling", func(r *Report) { p := PoolingPaired; r.IPPooling = &p }, StatusGood},
		{"pooling arbitrary", "paired-ip-pooling", func(r *Report) { p := PoolingArbitrary; r.IPPooling = &p }, StatusBad},
		{"pooling unmeasured", "paired-ip-pooling", nil, StatusUnknown},
		{"parity kept", "port-parity-preservation", func(r *Report) { r.PortParity = ptr(true) }, StatusGood},
		{"parity lost", "port-parity-preservation", func(r *Report) { r.PortParity = ptr(false) }, StatusBad},
		{"parity unmeasured", "port-parity-preservation", nil, StatusUnknown},
		{"contiguity kept", "port-contiguity", func(r *Report) { r.PortContiguity = ptr(true) }, StatusGood},
		{"contiguity lost", "port-contiguity", func(r *Report) { r.PortContiguity = ptr(false) }, StatusBad},
		{"contiguity unmeasured", "port-contiguity", nil, StatusUnknown},
	} {
		s := nat(MappingEndpointIndependent, FilteringAddressPortDependent, c.mod)
		p := prop(s, c.prop)
		if p.Status != c.want || p.Why == "" {
			t.Errorf("%s: %s = %+v, want %s with a reason", c.name, c.prop, p, c.want)
		}
	}
	// The reason of an unmeasured field is the report's own.
	s := nat(MappingEndpointIndependent, FilteringAddressPortDependent, func(r *Report) { r.Reasons["hairpinning"] = "skipped (--no-hairpin)" })
	if p := prop(s, "hairpinning"); p.Why != "skipped (--no-hairpin)" {
		t.Errorf("hairpinning why %q", p.Why)
	}
}

// A filtering stream cut by the deadline before its negative evidence
// could settle ends inconclusive: an undecided change-IP test is not a
// silent one, or a restricted cone's half-finished run would read as
// address-dependent filtering from no evidence. The same NAT with time to
// finish reads ADF, so the short run's verdict is the deadline's doing.
func TestFilteringCutByDeadline(t *testing.T) {
	t.Parallel()
	nat := vnet.NATType{MappingBehavior: vnet.EndpointIndependent, FilteringBehavior: vnet.EndpointAddrDependent}
	tp := newTopo(t, topoOpts{nat: &nat})
	r, err := tp.probe(t, func(c *Config) { c.Hairpin = false; c.SIP.Skip = true })
	if err != nil {
		t.Fatal(err)
	}
	if r.Filtering != FilteringAddressDependent {
		t.Fatalf("with time to finish: filtering %s (%s), want ADF", r.Filtering, r.Reasons["filtering"])
	}
	// negativeAlpha needs a dozen answered control copies at trialPace,
	// each settled for minSettle: no stream decides silence within
	// cut, whatever the machine's speed.
	cut := 12*trialPace + minSettle - 20*trialPace/10
	r, err = tp.probe(t, func(c *Config) { c.Hairpin = false; c.SIP.Skip = true; c.Timeout = cut })
	if err != nil && r == nil {
		t.Fatal(err)
	}
	if r.Filtering != FilteringInconclusive || !strings.Contains(strings.Join(r.InconclusiveFields, ","), "filtering") {
		t.Fatalf("cut at %v: filtering %s (%s), want inconclusive and listed", cut, r.Filtering, r.Reasons["filtering"])
	}
}
