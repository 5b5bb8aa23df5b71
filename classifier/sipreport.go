package classifier

// sipreport.go turns the SIP ALG test's evidence into verdicts (pure
// functions, tested in sipalg_test.go).

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// ALGVerdict is what one transport's ALG test found.
type ALGVerdict string

// ALGVerdict values.
const (
	// ALGNone: the request arrived unchanged on the SIP port and on the
	// control port.
	ALGNone ALGVerdict = "none"
	// ALGRewrites: fields changed on the way to the SIP port (Changed
	// says which).
	ALGRewrites ALGVerdict = "rewrites"
	// ALGDrops: the SIP port got no answer while the control port did,
	// beyond what loss explains: something eats SIP.
	ALGDrops ALGVerdict = "drops"
	// ALGInconclusive: the evidence did not settle it (Reason says why).
	ALGInconclusive ALGVerdict = "inconclusive"
	// ALGNotOffered: the server runs no SIP mirror.
	ALGNotOffered ALGVerdict = "not-offered"
)

// ALGResult is sip.alg.udp or sip.alg.tcp.
type ALGResult struct {
	Verdict ALGVerdict `json:"verdict"`
	// Changed names the fields rewritten on the way to the SIP port
	// (request-uri, via, from, to, contact, call-id, content-length,
	// sdp-o, sdp-c, sdp-m; "message" when the request no longer parsed);
	// Changes holds each one's value as sent and as received.
	Changed []string      `json:"changed"`
	Changes []FieldChange `json:"changes"`
	// ControlChanged: fields that also changed on the way to the control
	// port, where no ALG looks (a SIP-aware box on every port).
	ControlChanged []string `json:"control_changed,omitempty"`
	Reason         string   `json:"reason,omitempty"`
}

// SymmetricResponse is sip.symmetric_response: whether SIP from a phone's
// socket leaves by the mapping STUN sees and the answer comes back to it
// (RFC 3581), and what the SIP server must do about it.
type SymmetricResponse struct {
	// STUNMapped is the socket's reflexive address from STUN; SIPSource
	// the source the mirror saw for SIP from the same socket (control
	// port, where no ALG interferes).
	STUNMapped netip.AddrPort `json:"stun_mapped"`
	SIPSource  netip.AddrPort `json:"sip_source"`
	// SameMapping: SIP leaves by the mapping STUN learnt, so an address
	// learnt by STUN is the one the SIP server sees; null when either
	// was not measured.
	SameMapping *bool `json:"same_mapping"`
	// AnswerReachedSource: the mirror's answer, sent only to the
	// request's source address and port (RFC 3581 §4), reached the
	// socket that sent the request.
	AnswerReachedSource *bool `json:"answer_reached_source_port"`
	// ViaReceivedIntact: the answer's Via received=/rport= as delivered
	// equal the source the mirror saw; false when a box on the way back
	// rewrote them (an ALG turning them back into the private address).
	ViaReceivedIntact *bool  `json:"via_received_intact"`
	ServerMust        string `json:"server_must"`
}

// SIPReport is the sip object of the report.
type SIPReport struct {
	// Offered: the server runs a SIP mirror (its control port answered).
	Offered           bool                  `json:"offered"`
	ALG               map[string]*ALGResult `json:"alg"` // "udp", "tcp"
	SymmetricResponse *SymmetricResponse    `json:"symmetric_response"`
	RTP               *CallReport           `json:"rtp"`
	RTPRelay          *CallReport           `json:"rtp_relay"`
}

// portEvidence is one port's outcome of one transport's test.
type portEvidence struct {
	answered bool
	received []byte // the request as the mirror saw it
	failure  string // why it was not answered, when known
}

// algEvidence is one transport's evidence.
type algEvidence struct {
	offered       bool
	sent          []byte // the INVITE sent to the SIP port
	sentControl   []byte // and to the control port
	sip, control  portEvidence
	silenceIsDrop bool   // the SIP port's silence is beyond loss (UDP: Fisher test; TCP: every attempt failed while the control's succeeded)
	undecided     string // why the silence is not settled
}

// algVerdictFor draws one transport's verdict. Only positive evidence
// gives none: both ports answered, both unchanged.
func algVerdictFor(ev algEvidence) *ALGResult {
	r := &ALGResult{Changed: []string{}, Changes: []FieldChange{}}
	if !ev.offered {
		r.Verdict, r.Reason = ALGNotOffered, "the server's SIP mirror control port did not answer"
		return r
	}
	var ctl []FieldChange
	if ev.control.answered {
		ctl = diffSIP(ev.sentControl, ev.control.received)
		for _, c := range ctl {
			r.ControlChanged = append(r.ControlChanged, c.Field)
		}
	}
	switch {
	case ev.sip.answered:
		r.Changes = diffSIP(ev.sent, ev.sip.received)
		for _, c := range r.Changes {
			r.Changed = append(r.Changed, c.Field)
		}
		switch {
		case len(r.Changes) > 0:
			r.Verdict = ALGRewrites
			if len(ctl) > 0 {
				r.Reason = "the control port's copy was changed too: a SIP-aware middlebox on every port, not only 5060"
			}
		case !ev.control.answered:
			r.Verdict, r.Reason = ALGInconclusive, "the SIP port's copy arrived unchanged, but the control port never answered: nothing to tell an ALG-free path from one that only altered the control flow"
		case len(ctl) > 0:
			r.Verdict, r.Reason = ALGInconclusive, "the control port's copy was changed but the SIP port's was not: "+strings.Join(r.ControlChanged, ", ")
		default:
			r.Verdict = ALGNone
		}
	case ev.control.answered && ev.silenceIsDrop:
		r.Verdict, r.Reason = ALGDrops, "the control port answered and the SIP port never did, beyond what the control's loss explains"
		if ev.sip.failure != "" {
			r.Reason += " (" + ev.sip.failure + ")"
		}
	case ev.control.answered:
		r.Verdict, r.Reason = ALGInconclusive, "the SIP port did not answer, but too few control answers to call that more than loss: "+ev.undecided
	default:
		r.Verdict, r.Reason = ALGInconclusive, "neither the SIP port nor the control port answered: "+ev.undecided
	}
	return r
}

// algDetected is the top-level alg_detected: true when any transport
// rewrites or drops on the SIP port, false when UDP and TCP were both
// tested clean, null otherwise.
func algDetected(s *SIPReport) (*bool, string) {
	if s == nil {
		return nil, "the SIP test did not run (--no-sip)"
	}
	clean := 0
	var why []string
	for _, tr := range []string{"udp", "tcp"} {
		a := s.ALG[tr]
		switch {
		case a == nil:
			why = append(why, tr+": not tested")
		case a.Verdict == ALGRewrites || a.Verdict == ALGDrops:
			return ptr(true), ""
		case a.Verdict == ALGNone:
			clean++
		default:
			why = append(why, fmt.Sprintf("%s: %s", tr, a.Verdict))
		}
	}
	if clean == 2 {
		return ptr(false), ""
	}
	if !s.Offered {
		return nil, "the server offers no SIP mirror (stund --sip-mirror), so SIP ALGs were not tested"
	}
	return nil, strings.Join(why, "; ")
}

// symmetricVerdict reads the symmetric-response evidence.
func symmetricVerdict(stunMapped, sipSource, local netip.AddrPort, answered bool, viaSrc netip.AddrPort) *SymmetricResponse {
	s := &SymmetricResponse{STUNMapped: stunMapped, SIPSource: sipSource}
	if stunMapped.IsValid() && sipSource.IsValid() {
		s.SameMapping = ptr(stunMapped == sipSource)
	}
	if sipSource.IsValid() {
		s.AnswerReachedSource = ptr(answered)
		s.ViaReceivedIntact = ptr(viaSrc == sipSource)
	}
	var must []string
	switch {
	case !sipSource.IsValid():
		s.ServerMust = "unknown: the mirror's control port did not answer SIP"
		return s
	case sipSource != local:
		must = append(must, fmt.Sprintf("answer to the request's source %s, not to the Via (rport, RFC 3581; Kamailio force_rport()), fix the Contact to that source (fix_nated_contact) and stay in the path (record_route())", sipSource))
	default:
		must = append(must, "nothing for NAT: SIP left with the phone's own address")
	}
	if s.SameMapping != nil && !*s.SameMapping {
		must = append(must, fmt.Sprintf("never trust a STUN-learnt address in Via or Contact: STUN saw %s, SIP from the same socket arrived from %s", stunMapped, sipSource))
	}
	if s.ViaReceivedIntact != nil && !*s.ViaReceivedIntact {
		must = append(must, "expect received=/rport= to be rewritten on the way back (an ALG in the path): phones here cannot learn their public address from SIP responses")
	}
	s.ServerMust = strings.Join(must, "; ")
	return s
}

// fieldWhy is a reason for Report.Reasons and whether the field is
// unsettled (inconclusive_fields).
type fieldWhy struct {
	why       string
	unsettled bool
}

// sipReport fills r.SIP and r.ALGDetected from the SIP test and returns the
// reasons to record.
func (p *prober) sipReport(r *Report) map[string]fieldWhy {
	out := map[string]fieldWhy{}
	res := &p.sipRes
	if !res.ran {
		out["sip"] = fieldWhy{why: "skipped (--no-sip)"}
		out["alg_detected"] = fieldWhy{why: "the SIP test did not run (--no-sip)"}
		return out
	}
	s := &SIPReport{Offered: res.offered, ALG: map[string]*ALGResult{
		"udp": algVerdictFor(res.udp), "tcp": algVerdictFor(res.tcp),
	}, SymmetricResponse: res.sym, RTP: res.call}
	r.SIP = s
	alg, why := algDetected(s)
	r.ALGDetected = alg
	// Unsettled only when the mirror is there and the evidence was not
	// enough; a server without one is a limitation, not an ambiguity.
	out["alg_detected"] = fieldWhy{why: why, unsettled: alg == nil && s.Offered}
	for tr, a := range s.ALG {
		if a.Verdict == ALGInconclusive {
			out["sip.alg."+tr] = fieldWhy{why: a.Reason, unsettled: true}
		}
	}
	return out
}

// noALGProperty judges the seed's "no ALG" from the SIP test: good only
// when the test ran and found nothing over UDP and TCP.
func noALGProperty(r *Report) (Status, string) {
	switch {
	case r.ALGDetected != nil && *r.ALGDetected:
		return StatusBad, "a SIP ALG " + algFindings(r.SIP) + ": it breaks calls (one-way audio, dropped registrations)"
	case r.ALGDetected != nil:
		return StatusGood, "INVITEs over UDP and TCP reached the SIP port exactly as sent"
	case r.SIP == nil:
		return StatusUnknown, "the SIP ALG test was skipped (--no-sip)"
	}
	why := r.Reasons["alg_detected"]
	if why == "" {
		why = "the SIP ALG test did not settle"
	}
	return StatusUnknown, why
}

// algFindings says what the ALG did, per transport.
func algFindings(s *SIPReport) string {
	u, t := s.ALG["udp"], s.ALG["tcp"]
	if u != nil && t != nil && u.Verdict == ALGRewrites && t.Verdict == ALGRewrites && slices.Equal(u.Changed, t.Changed) {
		return "rewrites SIP over UDP and TCP (" + strings.Join(u.Changed, ", ") + ")"
	}
	var parts []string
	for _, tr := range []string{"udp", "tcp"} {
		a := s.ALG[tr]
		switch {
		case a == nil:
		case a.Verdict == ALGRewrites:
			parts = append(parts, fmt.Sprintf("rewrites SIP over %s (%s)", strings.ToUpper(tr), strings.Join(a.Changed, ", ")))
		case a.Verdict == ALGDrops:
			parts = append(parts, fmt.Sprintf("drops SIP over %s on the SIP port", strings.ToUpper(tr)))
		}
	}
	return strings.Join(parts, " and ")
}

// ALGHeadline is the first line of natprobe's text and markdown reports
// when a SIP ALG was found, with the plain advice; "" otherwise.
func ALGHeadline(r *Report) string {
	if r.ALGDetected == nil || !*r.ALGDetected {
		return ""
	}
	return "SIP ALG detected: the router " + algFindings(r.SIP) + ". Turn off \"SIP ALG\" / \"SIP helper\" / \"SIP transformations\" in the router, or move SIP to TLS (5061) or a non-standard port."
}
