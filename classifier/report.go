package classifier

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/stund/stund/relay"
)

// Schema names the JSON layout of Report. Scripts key on it: bump it on any
// incompatible change to the fields below.
const Schema = "natprobe/1"

// Mapping is the NAT's mapping behaviour, RFC 4787 §4.1 (measured as in
// RFC 5780 §4.3).
type Mapping string

// Mapping values. Inconclusive is a result ("the replies did not settle it",
// with a reason in Report.Reasons); the empty string means "not measured".
const (
	MappingEndpointIndependent  Mapping = "EIM"
	MappingAddressDependent     Mapping = "ADM"
	MappingAddressPortDependent Mapping = "APDM"
	MappingInconclusive         Mapping = "inconclusive"
)

// Filtering is the NAT's filtering behaviour, RFC 4787 §5 (measured as in
// RFC 5780 §4.4).
type Filtering string

// Filtering values; Inconclusive and "" as for Mapping.
const (
	FilteringEndpointIndependent  Filtering = "EIF"
	FilteringAddressDependent     Filtering = "ADF"
	FilteringAddressPortDependent Filtering = "APDF"
	FilteringInconclusive         Filtering = "inconclusive"
)

// Pooling is the NAT's IP address pooling behaviour, RFC 4787 §4.1
// ("paired" keeps one external IP per internal IP).
type Pooling string

// Pooling values.
const (
	PoolingPaired    Pooling = "paired"
	PoolingArbitrary Pooling = "arbitrary"
)

// LegacyType is the RFC 3489 name of the NAT, kept because support tickets
// and older tools still speak it.
type LegacyType string

// Legacy names. SymmetricFirewall is "no NAT, but a filter that is not
// endpoint-independent" (RFC 3489 §10.1 "Symmetric UDP Firewall").
const (
	LegacyOpen               LegacyType = "open"
	LegacyFullCone           LegacyType = "full-cone"
	LegacyRestrictedCone     LegacyType = "restricted-cone"
	LegacyPortRestrictedCone LegacyType = "port-restricted-cone"
	LegacySymmetric          LegacyType = "symmetric"
	LegacySymmetricFirewall  LegacyType = "symmetric-firewall"
	LegacyUDPBlocked         LegacyType = "udp-blocked"
	LegacyInconclusive       LegacyType = "inconclusive"
)

// Lifetime is the bracket in which the UDP mapping expired when idle
// (RFC 4787 §4.3): still alive after MinS seconds, gone after MaxS. MaxS is
// nil (JSON null) when the mapping was still alive at the longest idle time
// the search tried (--lifetime-max): the bracket is then [MinS, ∞).
type Lifetime struct {
	MinS float64  `json:"min_s"`
	MaxS *float64 `json:"max_s"`
}

// RelayReport is what the TURN fallback proved (see package relay).
type RelayReport struct {
	OK             bool    `json:"ok"`
	Transport      string  `json:"transport"`       // udp, tcp or tls: how natprobe reached the TURN server
	RelayedAddress string  `json:"relayed_address"` // XOR-RELAYED-ADDRESS the server gave; "" when none (always present, so scripts need not test for the key)
	RTTMS          float64 `json:"rtt_ms"`          // median round trip through the relay
	Loss           float64 `json:"loss"`            // fraction of probe packets not echoed, 0..1
	Error          string  `json:"error,omitempty"` // why OK is false
}

// Report is everything one natprobe run measured. Every pointer or empty
// value means "not measured"; an Inconclusive value means "measured, but the
// replies did not settle it", and Reasons says why.
type Report struct {
	Schema        string         `json:"schema"`
	ProbeID       string         `json:"probe_id,omitempty"` // sent in SOFTWARE so the operator can find the run in stund's log
	Server        string         `json:"server"`             // the address probed, host:port
	LocalAddress  netip.AddrPort `json:"local_address"`      // our socket's address as the OS reports it
	MappedAddress netip.AddrPort `json:"mapped_address"`     // XOR-MAPPED-ADDRESS from the primary server address
	NATDetected   *bool          `json:"nat_detected"`       // mapped != local

	Mapping          Mapping    `json:"mapping"`
	Filtering        Filtering  `json:"filtering"`
	Hairpinning      *bool      `json:"hairpinning"`       // RFC 4787 §6
	PortPreservation *bool      `json:"port_preservation"` // RFC 4787 §4.2.1: mapped port == local port
	PortParity       *bool      `json:"port_parity"`       // RFC 4787 §4.2.2
	PortContiguity   *bool      `json:"port_contiguity"`   // RFC 4787 §4.2.3
	IPPooling        *Pooling   `json:"ip_pooling"`        // RFC 4787 §4.1
	MappingLifetime  *Lifetime  `json:"mapping_lifetime"`  // RFC 4787 §4.3, only with --lifetime
	ALGDetected      *bool      `json:"alg_detected"`      // a SIP ALG rewrites or drops SIP on some transport (SIP.ALG); false only when UDP and TCP tested clean
	LegacyType       LegacyType `json:"legacy_type"`

	// STUNPayloadRewritten: MAPPED-ADDRESS and XOR-MAPPED-ADDRESS
	// disagree, a middlebox rewrote an address inside a STUN reply.
	STUNPayloadRewritten *bool `json:"stun_payload_rewritten"`
	// SIP is the SIP ALG, symmetric-response and call test (sipalg.go);
	// nil with --no-sip.
	SIP *SIPReport `json:"sip"`

	SIPRTP SIPRTP       `json:"sip_rtp"`
	Relay  *RelayReport `json:"relay"`

	// Reasons maps a JSON field name to why it is inconclusive (or why it
	// was not measured when that is not obvious).
	Reasons map[string]string `json:"reasons"`
	// InconclusiveFields lists the JSON names of the fields that were
	// measured but not settled (each has its entry in Reasons); a field
	// only in Reasons was not measured. Sorted.
	InconclusiveFields []string `json:"inconclusive_fields"`

	// ServerOtherAddress is the OTHER-ADDRESS the server announced
	// (RFC 5780 §7.4), empty for a single-IP server.
	ServerOtherAddress netip.AddrPort `json:"server_other_address"`
	// Anomalies are facts that do not fit a field but matter to whoever
	// reads the report: replies whose RESPONSE-ORIGIN is not their real
	// source (a middlebox), port overloading, a server ignoring
	// CHANGE-REQUEST.
	Anomalies []string `json:"anomalies"`
	// Stats counts the datagrams of the run; malformed and unmatched ones
	// were dropped.
	Stats Stats `json:"stats"`

	DurationMS int64 `json:"duration_ms"`
}

// Inconclusive reports whether any measured field was left unsettled
// (natprobe exits 1).
func (r *Report) Inconclusive() bool {
	return len(r.InconclusiveFields) > 0
}

// MarkInconclusive lists field (a JSON name) among InconclusiveFields,
// keeping them sorted, with why as its reason unless one is already given
// or why is empty.
func (r *Report) MarkInconclusive(field, why string) {
	if r.Reasons == nil {
		r.Reasons = map[string]string{}
	}
	if why != "" && r.Reasons[field] == "" {
		r.Reasons[field] = why
	}
	if !slices.Contains(r.InconclusiveFields, field) {
		r.InconclusiveFields = append(r.InconclusiveFields, field)
		slices.Sort(r.InconclusiveFields)
	}
}

// SetUDPBlocked makes r the report of a run in which no UDP request got a
// reply, why saying what was sent: the legacy type udp-blocked, and the UDP
// behaviours (mapping, filtering) inconclusive with the reason. The schema
// allows only a verdict or "inconclusive" there, and with no UDP reply the
// NAT's behaviour is exactly what the evidence could not settle.
func (r *Report) SetUDPBlocked(why string) {
	r.LegacyType = LegacyUDPBlocked
	r.Mapping, r.Filtering = MappingInconclusive, FilteringInconclusive
	if r.Reasons == nil {
		r.Reasons = map[string]string{}
	}
	r.Reasons["legacy_type"] = why
	r.Reasons["mapping"] = "no UDP path to measure: " + why
	r.Reasons["filtering"] = "no UDP path to measure: " + why
	r.MarkInconclusive("mapping", "")
	r.MarkInconclusive("filtering", "")
}

// UDPBlocked reports whether no UDP request of the run got a reply.
func (r *Report) UDPBlocked() bool { return r.LegacyType == LegacyUDPBlocked }

// NeedsRelay reports whether media from this host needs a TURN relay: the
// mapping differs per peer (ADM, APDM: RFC 4787 §4.1), or UDP gets no
// reply at all.
func (r *Report) NeedsRelay() bool {
	return r.UDPBlocked() || r.Mapping == MappingAddressDependent || r.Mapping == MappingAddressPortDependent
}

// SetRelayNotTried records why a needed relay was not proved: natprobe was
// given no TURN credentials.
func (r *Report) SetRelayNotTried() {
	if r.Reasons == nil {
		r.Reasons = map[string]string{}
	}
	const creds = "no TURN credentials were given (--turn-user/--turn-pass or --turn-secret)"
	if r.UDPBlocked() {
		r.Reasons["relay"] = "not tried: UDP gets no reply, so media needs a TURN relay over TCP or TLS, but " + creds
		return
	}
	r.Reasons["relay"] = fmt.Sprintf("not tried: the %s mapping needs a relay for media, but %s", r.Mapping, creds)
}

// SetRelay records what relay.Prove proved (p, err) as r.Relay, and
// returns whether the server gave a STUN answer on the way (the relay
// works, or the server refused a request): the server is then up on that
// transport. Prove moves to the next transport only when one got no
// answer, so the last attempt's allocation or refusal is the server's
// answer. When UDP got no reply but the server answered over TCP or TLS,
// UDP alone is blocked on this path, and legacy_type's reason says so.
func (r *Report) SetRelay(p *relay.Proof, err error) (answered bool) {
	rr := &RelayReport{
		OK:        p.OK,
		Transport: p.Transport,
		Loss:      p.Loss,
		RTTMS:     float64(p.RTT.Microseconds()) / 1000,
	}
	if p.RelayedAddr.IsValid() {
		rr.RelayedAddress = p.RelayedAddr.String()
	}
	if err != nil {
		rr.Error = err.Error()
	}
	r.Relay = rr
	var refused *relay.RefusedError
	answered = p.OK || p.RelayedAddr.IsValid() || errors.As(err, &refused)
	if answered && r.UDPBlocked() {
		if r.Reasons == nil {
			r.Reasons = map[string]string{}
		}
		why := fmt.Sprintf("no reply over UDP, while the server answers over %s: UDP is blocked on this path", rr.Transport)
		r.Reasons["legacy_type"] = why + " (" + r.Reasons["legacy_type"] + ")"
	}
	return answered
}

// settled says, per field that can be inconclusive (its JSON name), whether
// the report holds a verdict for it.
var settled = map[string]func(r *Report) bool{
	"nat_detected":      func(r *Report) bool { return r.NATDetected != nil },
	"mapping":           func(r *Report) bool { return r.Mapping != "" && r.Mapping != MappingInconclusive },
	"filtering":         func(r *Report) bool { return r.Filtering != "" && r.Filtering != FilteringInconclusive },
	"hairpinning":       func(r *Report) bool { return r.Hairpinning != nil },
	"port_preservation": func(r *Report) bool { return r.PortPreservation != nil },
	"port_parity":       func(r *Report) bool { return r.PortParity != nil },
	"port_contiguity":   func(r *Report) bool { return r.PortContiguity != nil },
	"ip_pooling":        func(r *Report) bool { return r.IPPooling != nil },
	"mapping_lifetime":  func(r *Report) bool { return r.MappingLifetime != nil },
	"alg_detected":      func(r *Report) bool { return r.ALGDetected != nil },
	"legacy_type":       func(r *Report) bool { return r.LegacyType != "" && r.LegacyType != LegacyInconclusive },
}

// Check verifies the report's invariant: a field is settled or
// inconclusive with a reason, never both. Every entry of InconclusiveFields
// names a field that can be inconclusive, has a reason and no verdict; the
// list is sorted without duplicates; mapping, filtering and legacy_type are
// never empty, and when they read "inconclusive" they are listed.
func (r *Report) Check() error {
	var errs []error
	for i, f := range r.InconclusiveFields {
		isSettled, ok := settled[f]
		switch {
		case !ok:
			errs = append(errs, fmt.Errorf("%q: not a field that can be inconclusive", f))
		case isSettled(r):
			errs = append(errs, fmt.Errorf("%s: both settled and inconclusive", f))
		}
		if r.Reasons[f] == "" {
			errs = append(errs, fmt.Errorf("%s: inconclusive without a reason", f))
		}
		if i > 0 && r.InconclusiveFields[i-1] >= f {
			errs = append(errs, fmt.Errorf("inconclusive_fields %v: not sorted, or %s twice", r.InconclusiveFields, f))
		}
	}
	for _, c := range []struct {
		field        string
		value        string
		inconclusive bool
	}{
		{"mapping", string(r.Mapping), r.Mapping == MappingInconclusive},
		{"filtering", string(r.Filtering), r.Filtering == FilteringInconclusive},
		{"legacy_type", string(r.LegacyType), r.LegacyType == LegacyInconclusive},
	} {
		switch {
		case c.value == "":
			errs = append(errs, fmt.Errorf("%s: empty; a verdict or inconclusive", c.field))
		case c.inconclusive && !slices.Contains(r.InconclusiveFields, c.field):
			errs = append(errs, fmt.Errorf("%s: inconclusive but not in inconclusive_fields", c.field))
		}
	}
	return errors.Join(errs...)
}
