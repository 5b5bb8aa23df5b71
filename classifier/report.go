package classifier

import "net/netip"

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
	RelayedAddress string  `json:"relayed_address"` // XOR-RELAYED-ADDRESS the server gave; "" when none (always present: issue 3)
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
