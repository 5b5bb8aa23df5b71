package classifier

// sip.go reads the NAT's measured behaviour as a VoIP engineer needs it:
// each property of the seed's "Summary of how a NAT should BEHAVE with SIP"
// (../shared/seeds/, after RFC 4787 and RFC 6314) judged good, bad or
// unknown with the reason, the keep-alive interval to configure, and what
// the SIP server in front of these phones has to do (the seed's Kamailio
// list: symmetric response with rport, staying in the path with
// Record-Route, Contact fix-up, and a media relay when media cannot flow
// directly).

import (
	"fmt"
	"math"
	"strings"
)

// Status is a SIP/RTP judgement of one NAT property.
type Status string

// Status values.
const (
	StatusGood    Status = "good"
	StatusBad     Status = "bad"
	StatusUnknown Status = "unknown"
)

// SIPProperty is one line of the seed's list, judged.
type SIPProperty struct {
	Property string `json:"property"` // e.g. "endpoint-independent-mapping"
	Status   Status `json:"status"`
	Why      string `json:"why"`
}

// NeedStatus says whether the SIP server side must do something.
type NeedStatus string

// NeedStatus values. Conditional means "only if", with the condition in Why.
const (
	NeedRequired    NeedStatus = "required"
	NeedNotNeeded   NeedStatus = "not-needed"
	NeedConditional NeedStatus = "conditional"
	NeedUnknown     NeedStatus = "unknown"
)

// ServerNeed is one thing the SIP server (proxy, SBC) must do for phones
// behind this NAT.
type ServerNeed struct {
	Need   string     `json:"need"` // symmetric-response | record-route | contact-fixup | media-relay
	Status NeedStatus `json:"status"`
	Why    string     `json:"why"`
}

// SIPRTP is the sip_rtp object of the report.
type SIPRTP struct {
	Properties []SIPProperty `json:"properties"`
	// KeepaliveIntervalS is how often a phone behind this NAT should send
	// a keep-alive (CRLF, STUN or OPTIONS) on its SIP flow; 0 when none is
	// needed. KeepaliveBasis says where the figure comes from.
	KeepaliveIntervalS int          `json:"keepalive_interval_s"`
	KeepaliveBasis     string       `json:"keepalive_basis"`
	ServerNeeds        []ServerNeed `json:"server_needs"`
	Summary            string       `json:"summary"`
}

// defaultKeepaliveS is used when the mapping lifetime was not measured:
// ICE's keep-alive default Tr (RFC 5245 §10, RFC 8445 §11), which stays under
// the 30 s UDP timeout that the seed and RFC 4787 §4.3 report for some NATs
// (REQ-5 asks for at least 2 minutes; not every NAT honours it).
const defaultKeepaliveS = 15

// refreshGoalS is the seed's (and RFC 4787 §4.3's recommended) UDP mapping
// timer: 5 minutes.
const refreshGoalS = 300

// sipInputs is what the SIP verdict needs beyond the Report's fields.
type sipInputs struct {
	overloading      bool // two of our sockets shared one external address
	lifetimeMeasured bool // --lifetime ran
	reachable        bool
}

// sipVerdict draws the SIP/RTP reading from a finished report.
func sipVerdict(r *Report, in sipInputs) SIPRTP {
	if !in.reachable {
		return unreachableSIP()
	}
	j := &sipJudge{r: r, noNAT: r.NATDetected != nil && !*r.NATDetected}
	j.mappingFiltering()
	j.ports(in.overloading)
	j.refresh(in.lifetimeMeasured)
	j.beyondSummary()
	s := SIPRTP{Properties: j.props}
	s.KeepaliveIntervalS, s.KeepaliveBasis = keepalive(r, j.noNAT, in.lifetimeMeasured)
	s.ServerNeeds = serverNeeds(r, j.noNAT)
	s.Summary = sipSummary(r, j.noNAT, s)
	if h := ALGHeadline(r); h != "" {
		s.Summary = h + " " + s.Summary
	}
	return s
}

// unreachableSIP is the reading when no UDP reply came at all.
func unreachableSIP() SIPRTP {
	var s SIPRTP
	for _, p := range []string{"endpoint-independent-mapping", "address-independent-or-address-dependent-filtering",
		"paired-ip-pooling", "no-port-preservation", "no-port-overloading", "port-parity-preservation",
		"udp-refresh-5-min"} {
		s.Properties = append(s.Properties, SIPProperty{p, StatusUnknown, "no UDP reply from the server"})
	}
	s.KeepaliveBasis = "UDP does not get through, so there is no UDP mapping to keep alive"
	s.ServerNeeds = []ServerNeed{{"media-relay", NeedRequired, "UDP is blocked: SIP must use TCP or TLS, and media a TURN relay over TCP/TLS"}}
	s.Summary = "UDP is blocked: SIP over UDP and RTP cannot work from here; use SIP over TCP/TLS and a TURN relay over TCP/TLS."
	return s
}

// sipJudge collects the judged properties of one report, in the seed's
// order.
type sipJudge struct {
	r     *Report
	noNAT bool
	props []SIPProperty
}

func (j *sipJudge) add(prop string, st Status, why string) {
	j.props = append(j.props, SIPProperty{prop, st, why})
}

// unknownWhy is the report's reason for an unsettled field, or fallback.
func (j *sipJudge) unknownWhy(field, fallback string) string {
	if why := j.r.Reasons[field]; why != "" {
		return why
	}
	return fallback
}

// mappingFiltering judges the seed's items 1 and 2.
func (j *sipJudge) mappingFiltering() {
	r, noNAT := j.r, j.noNAT
	// 1. Endpoint-independent mapping.
	switch r.Mapping {
	case MappingEndpointIndependent:
		if noNAT {
			j.add("endpoint-independent-mapping", StatusGood, "no NAT: the local address is the public one")
		} else {
			j.add("endpoint-independent-mapping", StatusGood, "one external address per socket whatever the peer: an address learnt by STUN is valid in SDP toward every peer")
		}
	case MappingAddressDependent, MappingAddressPortDependent:
		j.add("endpoint-independent-mapping", StatusBad, fmt.Sprintf("%s: each peer sees another external port, so no address the phone can learn or put in SDP is the one the far end will see", r.Mapping))
	default:
		j.add("endpoint-independent-mapping", StatusUnknown, j.unknownWhy("mapping", "mapping not measured"))
	}

	// 2. Address-independent or address-dependent filtering.
	switch r.Filtering {
	case FilteringEndpointIndependent:
		j.add("address-independent-or-address-dependent-filtering", StatusGood, "endpoint-independent filtering: any peer can send to the phone's external address")
	case FilteringAddressDependent:
		j.add("address-independent-or-address-dependent-filtering", StatusGood, "address-dependent filtering: a peer gets in once the phone has sent to its IP, which symmetric RTP (RFC 4961) does at call start")
	case FilteringAddressPortDependent:
		j.add("address-independent-or-address-dependent-filtering", StatusBad, "address-and-port-dependent filtering: only the exact IP and port the phone sent to get in; a peer sending from another port than it advertised is dropped")
	default:
		j.add("address-independent-or-address-dependent-filtering", StatusUnknown, j.unknownWhy("filtering", "filtering not measured"))
	}

}

// ports judges items 3 to 6: pooling and the port assignment.
func (j *sipJudge) ports(overloading bool) {
	r, noNAT := j.r, j.noNAT
	// 3. Paired IP address pooling.
	switch {
	case noNAT:
		j.add("paired-ip-pooling", StatusGood, "no NAT: one address")
	case r.IPPooling != nil && *r.IPPooling == PoolingPaired:
		j.add("paired-ip-pooling", StatusGood, "every session from this host left from one external IP, so SIP and RTP share it")
	case r.IPPooling != nil:
		j.add("paired-ip-pooling", StatusBad, "sessions from this host left from different external IPs: RTP may leave from another IP than the one in SDP or the one the SIP server sees")
	default:
		j.add("paired-ip-pooling", StatusUnknown, j.unknownWhy("ip_pooling", "pooling not measured"))
	}

	// 4. Not port preservation.
	switch {
	case noNAT:
		j.add("no-port-preservation", StatusGood, "no NAT: no port is translated")
	case r.PortPreservation == nil:
		j.add("no-port-preservation", StatusUnknown, j.unknownWhy("port_preservation", "port assignment not measured"))
	case *r.PortPreservation:
		j.add("no-port-preservation", StatusBad, "the NAT keeps local ports: two phones on 5060 behind it collide, and the second gets different treatment (RFC 4787 §4.2.1)")
	default:
		j.add("no-port-preservation", StatusGood, "external ports are assigned by the NAT, the same way for every phone")
	}

	// 5. Not port overloading.
	switch {
	case noNAT:
		j.add("no-port-overloading", StatusGood, "no NAT: no port is shared")
	case overloading:
		j.add("no-port-overloading", StatusBad, "two sockets of this host got the same external address toward the same server: replies for one reach the other (RFC 4787 REQ-3)")
	default:
		j.add("no-port-overloading", StatusUnknown, "overloading shows when two internal hosts use the same local port toward the same server; one host cannot test it (RFC 5780 §4)")
	}

	// 6. Port parity preservation (helpful).
	switch {
	case noNAT:
		j.add("port-parity-preservation", StatusGood, "no NAT: ports are kept")
	case r.PortParity == nil:
		j.add("port-parity-preservation", StatusUnknown, j.unknownWhy("port_parity", "port parity not measured"))
	case *r.PortParity:
		j.add("port-parity-preservation", StatusGood, "even local ports stay even outside: RTP on even, RTCP on the next odd port survive")
	default:
		j.add("port-parity-preservation", StatusBad, "parity is not kept: use rtcp-mux (RFC 5761) or a=rtcp (RFC 3605) rather than RTCP on RTP+1")
	}

}

// refresh judges item 7, the UDP refresh timer.
func (j *sipJudge) refresh(lifetimeMeasured bool) {
	r, noNAT := j.r, j.noNAT
	// 7. UDP refresh timer of 5 minutes.
	lt := r.MappingLifetime
	switch {
	case noNAT && r.Filtering == FilteringEndpointIndependent:
		j.add("udp-refresh-5-min", StatusGood, "no NAT and no filter: nothing expires")
	case lt != nil && lt.MinS >= refreshGoalS:
		j.add("udp-refresh-5-min", StatusGood, fmt.Sprintf("idle mappings were still alive after %g s", lt.MinS))
	case lt != nil && lt.MaxS != nil && *lt.MaxS < refreshGoalS:
		j.add("udp-refresh-5-min", StatusBad, fmt.Sprintf("idle mappings expired within %g s (alive at %g s), under the 5 minutes RFC 4787 §4.3 recommends", *lt.MaxS, lt.MinS))
	case lt != nil:
		j.add("udp-refresh-5-min", StatusUnknown, fmt.Sprintf("alive after %g s, not tried past that (raise --lifetime-max to 300 s)", lt.MinS))
	case !lifetimeMeasured:
		j.add("udp-refresh-5-min", StatusUnknown, "not measured: run with --lifetime")
	default:
		j.add("udp-refresh-5-min", StatusUnknown, j.unknownWhy("mapping_lifetime", "the lifetime search was not decisive"))
	}

}

// beyondSummary judges what the seed adds past its summary list.
func (j *sipJudge) beyondSummary() {
	r, noNAT := j.r, j.noNAT
	// Beyond the summary list, from the same seed: hairpinning
	// ("beneficial"), contiguity ("positive") and ALGs ("turn it off").
	switch {
	case r.Hairpinning == nil:
		j.add("hairpinning", StatusUnknown, j.unknownWhy("hairpinning", "not measured (the hairpin test was skipped)"))
	case *r.Hairpinning:
		j.add("hairpinning", StatusGood, "a packet to this host's own external address comes back in: two phones at this site can reach each other's public addresses")
	default:
		j.add("hairpinning", StatusBad, "packets to the NAT's own external address are lost: calls between two phones at this site need media through a relay")
	}
	switch {
	case noNAT:
		j.add("port-contiguity", StatusGood, "no NAT: ports are kept")
	case r.PortContiguity == nil:
		j.add("port-contiguity", StatusUnknown, j.unknownWhy("port_contiguity", "not measured"))
	case *r.PortContiguity:
		j.add("port-contiguity", StatusGood, "consecutive local ports stay consecutive outside: RTCP on RTP+1 survives")
	default:
		j.add("port-contiguity", StatusBad, "consecutive local ports are not kept consecutive: announce RTCP explicitly (RFC 3605) or multiplex it (RFC 5761)")
	}
	st, why := noALGProperty(r)
	j.add("no-alg", st, why)

}

// keepalive picks the interval: half the shortest idle time at which the
// mapping was seen alive (so that one lost keep-alive is survived), or the
// ICE default when the lifetime was not measured.
func keepalive(r *Report, noNAT, measured bool) (int, string) {
	lt := r.MappingLifetime
	switch {
	case noNAT && r.Filtering == FilteringEndpointIndependent:
		return 0, "not needed: no NAT and no filter between this host and the server"
	case lt != nil && lt.MinS >= 2:
		k := int(math.Floor(lt.MinS / 2))
		return k, fmt.Sprintf("half of the %g s an idle mapping was seen to survive, so one lost keep-alive is tolerated", lt.MinS)
	case lt != nil:
		return 1, fmt.Sprintf("idle mappings were gone within %g s: keep-alives every second, and have the NAT's UDP timeout raised", *lt.MaxS)
	case measured:
		return defaultKeepaliveS, fmt.Sprintf("the lifetime search was not decisive (%s); %d s is ICE's default keep-alive (RFC 8445 §11) and stays under the 30 s UDP timeout of the worst common NATs", r.Reasons["mapping_lifetime"], defaultKeepaliveS)
	}
	return defaultKeepaliveS, fmt.Sprintf("lifetime not measured (run with --lifetime); %d s is ICE's default keep-alive (RFC 8445 §11) and stays under the 30 s UDP timeout of the worst common NATs", defaultKeepaliveS)
}

// serverNeeds is the seed's Kamailio list applied to the measured NAT.
func serverNeeds(r *Report, noNAT bool) []ServerNeed {
	var out []ServerNeed
	nat := r.NATDetected != nil && *r.NATDetected
	filtered := r.Filtering == FilteringAddressDependent || r.Filtering == FilteringAddressPortDependent

	switch {
	case nat:
		out = append(out, ServerNeed{"symmetric-response", NeedRequired, "the Via carries a private address: answer to the request's real source (rport, RFC 3581; Kamailio force_rport() for phones that omit ;rport)"})
	case noNAT:
		out = append(out, ServerNeed{"symmetric-response", NeedNotNeeded, "no NAT: the Via address is reachable (rport is still good practice)"})
	default:
		out = append(out, ServerNeed{"symmetric-response", NeedUnknown, "NAT presence unknown"})
	}

	switch {
	case nat:
		out = append(out, ServerNeed{"record-route", NeedRequired, "only the proxy the phone keeps a mapping open to can reach it: stay in the path for the whole dialog (record_route())"})
	case noNAT && filtered:
		out = append(out, ServerNeed{"record-route", NeedRequired, "a firewall admits only the hosts the phone contacted: in-dialog requests must come through the proxy (record_route())"})
	case noNAT && r.Filtering == FilteringEndpointIndependent:
		out = append(out, ServerNeed{"record-route", NeedNotNeeded, "no NAT and no filter: any host can reach the phone"})
	default:
		out = append(out, ServerNeed{"record-route", NeedUnknown, "NAT or filtering not settled"})
	}

	switch {
	case nat:
		out = append(out, ServerNeed{"contact-fixup", NeedRequired, "the Contact (and SDP) carry the private address: rewrite them to the source address on REGISTER and INVITE (fix_nated_contact/fix_nated_register) or use SIP Outbound (RFC 5626)"})
	case noNAT:
		out = append(out, ServerNeed{"contact-fixup", NeedNotNeeded, "no NAT: the Contact address is the public one"})
	default:
		out = append(out, ServerNeed{"contact-fixup", NeedUnknown, "NAT presence unknown"})
	}

	switch {
	case r.Mapping == MappingAddressDependent || r.Mapping == MappingAddressPortDependent:
		out = append(out, ServerNeed{"media-relay", NeedRequired, fmt.Sprintf("%s mapping: the external RTP port differs per peer, so only a relay that latches on the real source (rtpengine/rtpproxy) or a TURN relay carries the media", r.Mapping)})
	case r.Mapping == MappingEndpointIndependent && r.Filtering == FilteringAddressPortDependent:
		out = append(out, ServerNeed{"media-relay", NeedConditional, "not needed if the phone puts its STUN/ICE address in SDP and the far end does symmetric RTP (RFC 4961) from the port it advertised, or both run ICE; otherwise the filter drops the far end's RTP and a relay is needed"})
	case r.Mapping == MappingEndpointIndependent && (r.Filtering == FilteringEndpointIndependent || r.Filtering == FilteringAddressDependent):
		why := "endpoint-independent mapping and filtering that symmetric RTP opens: media can flow directly once the phone advertises its STUN address (the SDP carries a private one otherwise: then rewrite it)"
		if noNAT {
			why = "no NAT: media flows directly"
		}
		out = append(out, ServerNeed{"media-relay", NeedNotNeeded, why})
	default:
		out = append(out, ServerNeed{"media-relay", NeedUnknown, "mapping or filtering not settled"})
	}
	return out
}

func sipSummary(r *Report, noNAT bool, s SIPRTP) string {
	name := map[LegacyType]string{
		LegacyOpen: "No NAT, no filter", LegacyFullCone: "Full-cone NAT", LegacyRestrictedCone: "Restricted-cone NAT",
		LegacyPortRestrictedCone: "Port-restricted-cone NAT", LegacySymmetric: "Symmetric NAT",
		LegacySymmetricFirewall: "No NAT, but a firewall",
	}[r.LegacyType]
	if name == "" {
		return "NAT behaviour not settled (see reasons): treat it as symmetric until a clean run says otherwise; rport, Record-Route, Contact fix-up and a media relay are the safe setup."
	}
	var relay NeedStatus
	for _, n := range s.ServerNeeds {
		if n.Need == "media-relay" {
			relay = n.Status
		}
	}
	behaviour := fmt.Sprintf("%s (%s/%s)", name, r.Mapping, r.Filtering)
	if noNAT && r.Filtering == FilteringEndpointIndependent {
		return behaviour + ": SIP and RTP need no NAT traversal help."
	}
	var b strings.Builder
	b.WriteString(behaviour)
	if noNAT {
		b.WriteString(": SIP works if the proxy stays in the path (Record-Route)")
	} else {
		b.WriteString(": SIP works with rport, Record-Route and Contact fix-up at the server")
	}
	switch relay {
	case NeedRequired:
		b.WriteString("; media needs a relay (rtpengine or TURN)")
	case NeedConditional:
		b.WriteString("; direct media needs symmetric RTP or ICE from the far end, else a relay")
	default:
		b.WriteString("; media can flow directly")
	}
	if s.KeepaliveIntervalS > 0 {
		fmt.Fprintf(&b, "; keep-alive every %d s", s.KeepaliveIntervalS)
	}
	b.WriteString(".")
	return b.String()
}

// Lines renders the SIP/RTP reading for natprobe's human output, one line
// per judgement.
func (s SIPRTP) Lines() []string {
	var out []string
	for _, p := range s.Properties {
		out = append(out, fmt.Sprintf("%-7s %s: %s", p.Status, p.Property, p.Why))
	}
	if s.KeepaliveIntervalS > 0 {
		out = append(out, fmt.Sprintf("keep-alive every %d s: %s", s.KeepaliveIntervalS, s.KeepaliveBasis))
	} else if s.KeepaliveBasis != "" {
		out = append(out, "keep-alive: "+s.KeepaliveBasis)
	}
	for _, n := range s.ServerNeeds {
		out = append(out, fmt.Sprintf("server %s: %s: %s", n.Need, n.Status, n.Why))
	}
	if s.Summary != "" {
		out = append(out, s.Summary)
	}
	return out
}
