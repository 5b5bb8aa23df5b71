package classifier

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/stund/stund/relay"
)

// settledReport is a report with every field settled.
func settledReport() *Report {
	paired := PoolingPaired
	return &Report{
		Schema: Schema, NATDetected: ptr(true), Mapping: MappingEndpointIndependent,
		Filtering: FilteringAddressPortDependent, Hairpinning: ptr(true), PortPreservation: ptr(false),
		PortParity: ptr(true), PortContiguity: ptr(false), IPPooling: &paired,
		MappingLifetime: &Lifetime{MinS: 30, MaxS: ptr(60.0)}, ALGDetected: ptr(false),
		LegacyType: LegacyPortRestrictedCone, Reasons: map[string]string{}, InconclusiveFields: []string{},
	}
}

func TestReportCheck(t *testing.T) {
	if err := settledReport().Check(); err != nil {
		t.Fatalf("settled report: %v", err)
	}
	ok := settledReport()
	ok.Hairpinning = nil
	ok.MarkInconclusive("hairpinning", "control replies too few")
	ok.Mapping = MappingInconclusive
	ok.MarkInconclusive("mapping", "two answers disagree")
	if err := ok.Check(); err != nil || !slices.Equal(ok.InconclusiveFields, []string{"hairpinning", "mapping"}) {
		t.Fatalf("inconclusive with reasons: %v %v", err, ok.InconclusiveFields)
	}

	for _, c := range []struct {
		name  string
		spoil func(r *Report)
		want  string
	}{
		{"settled and inconclusive", func(r *Report) { r.MarkInconclusive("hairpinning", "why") }, "hairpinning: both settled and inconclusive"},
		{"verdict listed as inconclusive", func(r *Report) { r.MarkInconclusive("mapping", "why") }, "mapping: both settled and inconclusive"},
		{"inconclusive without a reason", func(r *Report) {
			r.NATDetected = nil
			r.InconclusiveFields = []string{"nat_detected"}
		}, "nat_detected: inconclusive without a reason"},
		{"inconclusive value not listed", func(r *Report) {
			r.Filtering = FilteringInconclusive
			r.Reasons["filtering"] = "why"
		}, "filtering: inconclusive but not in inconclusive_fields"},
		{"empty mapping", func(r *Report) { r.Mapping = "" }, "mapping: empty"},
		{"unknown field", func(r *Report) {
			r.InconclusiveFields = []string{"colour"}
			r.Reasons["colour"] = "why"
		}, `"colour": not a field`},
		{"not sorted", func(r *Report) {
			r.PortParity, r.PortContiguity = nil, nil
			r.Reasons["port_parity"], r.Reasons["port_contiguity"] = "a", "b"
			r.InconclusiveFields = []string{"port_parity", "port_contiguity"}
		}, "not sorted"},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := settledReport()
			c.spoil(r)
			if err := r.Check(); err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("Check() = %v, want an error with %q", err, c.want)
			}
		})
	}
}

func TestSetUDPBlocked(t *testing.T) {
	r := &Report{Schema: Schema}
	r.SetUDPBlocked("no reply to 90 requests in 3s")
	if err := r.Check(); err != nil {
		t.Fatal(err)
	}
	if !r.UDPBlocked() || !r.NeedsRelay() || r.Reasons["legacy_type"] != "no reply to 90 requests in 3s" ||
		r.Reasons["mapping"] != "no UDP path to measure: no reply to 90 requests in 3s" ||
		!slices.Equal(r.InconclusiveFields, []string{"filtering", "mapping"}) {
		t.Errorf("%+v", r)
	}
}

func TestNeedsRelay(t *testing.T) {
	for m, want := range map[Mapping]bool{
		MappingEndpointIndependent: false, MappingAddressDependent: true,
		MappingAddressPortDependent: true, MappingInconclusive: false,
	} {
		r := settledReport()
		r.Mapping = m
		if r.NeedsRelay() != want {
			t.Errorf("%s: NeedsRelay %v", m, !want)
		}
	}
}

func TestSetRelay(t *testing.T) {
	relayed := netip.MustParseAddrPort("192.0.2.9:50000")
	refused := fmt.Errorf("tcp: %w", &relay.RefusedError{Step: "allocate", Code: 401, Reason: "401 Unauthorized"})
	for _, c := range []struct {
		name     string
		p        relay.Proof
		err      error
		answered bool
	}{
		{"works", relay.Proof{OK: true, Transport: relay.TCP, RelayedAddr: relayed}, nil, true},
		{"allocated, no echo", relay.Proof{Transport: relay.TCP, RelayedAddr: relayed}, errors.New("tcp: no echo"), true},
		{"refused", relay.Proof{Transport: relay.TCP}, refused, true},
		{"silent", relay.Proof{Transport: relay.TLS}, errors.New("tls: timeout"), false},
	} {
		t.Run(c.name, func(t *testing.T) {
			r := &Report{}
			r.SetUDPBlocked("no reply to 9 requests in 3s")
			got := r.SetRelay(&c.p, c.err)
			if got != c.answered || r.Relay == nil || r.Relay.OK != c.p.OK || r.Relay.Transport != c.p.Transport {
				t.Fatalf("answered %v, relay %+v", got, r.Relay)
			}
			if c.p.RelayedAddr.IsValid() != (r.Relay.RelayedAddress == relayed.String()) || (c.err != nil) != (r.Relay.Error != "") {
				t.Errorf("relay %+v", r.Relay)
			}
			want := "no reply to 9 requests in 3s"
			if c.answered {
				want = "no reply over UDP, while the server answers over " + c.p.Transport + ": UDP is blocked on this path (" + want + ")"
			}
			if r.Reasons["legacy_type"] != want {
				t.Errorf("legacy_type reason %q, want %q", r.Reasons["legacy_type"], want)
			}
			if err := r.Check(); err != nil {
				t.Error(err)
			}
		})
	}
}
