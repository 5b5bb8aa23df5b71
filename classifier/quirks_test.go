package classifier

import (
	"errors"
	"strings"
	"testing"

	"github.com/pion/transport/v5/vnet"
)

// eimAPDF is a port-restricted cone: its filter makes a server that ignores
// CHANGE-REQUEST look like an endpoint-independent one to a naive client.
var eimAPDF = vnet.NATType{MappingBehavior: vnet.EndpointIndependent, FilteringBehavior: vnet.EndpointAddrPortDependent}

// A server that answers CHANGE-REQUEST from the address the request went to
// (pion/turn does, for one) must not make the filter look open.
func TestServerIgnoringChangeRequest(t *testing.T) {
	t.Parallel()
	nat := eimAPDF
	tp := newTopo(t, topoOpts{nat: &nat, quirks: &responderQuirks{ignoreChange: true}})
	r, err := tp.probe(t, nil)
	if !errors.Is(err, ErrNotRFC5780) {
		t.Fatalf("err = %v, want ErrNotRFC5780", err)
	}
	if r.Filtering != FilteringInconclusive || !strings.Contains(r.Reasons["filtering"], "ignored CHANGE-REQUEST") {
		t.Errorf("filtering %s (%q), want inconclusive: the filter was never tested", r.Filtering, r.Reasons["filtering"])
	}
	if r.Mapping != MappingEndpointIndependent {
		t.Errorf("mapping %s: the alternate address still answers plain requests", r.Mapping)
	}
}

// A middlebox rewriting MAPPED-ADDRESS (a generic ALG, RFC 5780 §3.6).
func TestSTUNPayloadRewritten(t *testing.T) {
	t.Parallel()
	nat := eimAPDF
	tp := newTopo(t, topoOpts{nat: &nat, quirks: &responderQuirks{algRewrite: ap(lanHostIP + ":5000")}})
	r, err := tp.probe(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	if r.STUNPayloadRewritten == nil || !*r.STUNPayloadRewritten {
		t.Errorf("stun_payload_rewritten = %v (%q)", fmtBool(r.STUNPayloadRewritten), r.Reasons["stun_payload_rewritten"])
	}
	// A STUN rewrite says nothing about SIP: the SIP verdict stays unmeasured.
	if r.ALGDetected != nil {
		t.Errorf("alg_detected = %v from a STUN rewrite, want null (no SIP mirror)", fmtBool(r.ALGDetected))
	}
	if r.MappedAddress.Addr().String() != natPublicIP {
		t.Errorf("mapped address %s: XOR-MAPPED-ADDRESS must win over a rewritten MAPPED-ADDRESS", r.MappedAddress)
	}
}

// RESPONSE-ORIGIN that is not the real source is recorded, and does not
// change a verdict drawn from the real sources.
func TestOriginMismatchRecorded(t *testing.T) {
	t.Parallel()
	nat := eimAPDF
	tp := newTopo(t, topoOpts{nat: &nat, quirks: &responderQuirks{originLie: ap("10.9.9.9:3478")}})
	r, err := tp.probe(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	if r.Stats.OriginMismatch == 0 || len(r.Anomalies) == 0 || !strings.Contains(r.Anomalies[0], "RESPONSE-ORIGIN") {
		t.Errorf("stats %+v anomalies %v: the mismatch is not recorded", r.Stats, r.Anomalies)
	}
	if r.Mapping != MappingEndpointIndependent || r.Filtering != FilteringAddressPortDependent {
		t.Errorf("%s/%s, want EIM/APDF", r.Mapping, r.Filtering)
	}
}

// Junk datagrams before every reply are dropped and counted.
func TestMalformedRepliesCounted(t *testing.T) {
	t.Parallel()
	nat := eimAPDF
	tp := newTopo(t, topoOpts{nat: &nat, quirks: &responderQuirks{junkFirst: true}})
	r, err := tp.probe(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	if r.Stats.Malformed == 0 {
		t.Errorf("stats %+v: junk not counted", r.Stats)
	}
	if r.Mapping != MappingEndpointIndependent || r.Filtering != FilteringAddressPortDependent || r.Inconclusive() {
		t.Errorf("%s/%s inconclusive %v: junk must not change the verdict", r.Mapping, r.Filtering, r.InconclusiveFields)
	}
}
