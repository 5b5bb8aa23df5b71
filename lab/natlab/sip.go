package main

// The SIP part of the lab: Linux's SIP ALG in the router, stund's SIP mirror
// in the server namespace, and natprobe's SIP verdicts checked against what
// that ALG was found to do (lab/README.md, "The kernel's SIP ALG").

import (
	"fmt"
	"math"
	"slices"
	"strings"
	"time"
)

// sipHelper turns Linux's SIP ALG on (nf_conntrack_sip with nf_nat_sip for
// the router's SNAT) for SIP to port 5060 over UDP and TCP, in a table of
// its own beside the profile's NAT table. The helper is assigned in
// prerouting, so it sees the connection's first packet.
const sipHelper = `table ip natlab_sip {
  ct helper sip_udp { type "sip" protocol udp; }
  ct helper sip_tcp { type "sip" protocol tcp; }
  chain helpers {
    type filter hook prerouting priority filter; policy accept;
    iifname "r0" udp dport 5060 ct helper set "sip_udp"
    iifname "r0" tcp dport 5060 ct helper set "sip_tcp"
  }
}
`

// algRewrites is what the kernel ALG was found to change in natprobe's
// INVITE, over UDP and TCP alike: every field that carries the phone's
// private address. It leaves the request-URI, To and Call-ID alone; m=
// changes only when the NAT moves the RTP port.
var (
	algMustChange = []string{"via", "from", "contact", "content-length", "sdp-o", "sdp-c"}
	algMayChange  = []string{"sdp-m"}
)

// sipJSON is natprobe's sip object, the fields the lab checks.
type sipJSON struct {
	Offered bool `json:"offered"`
	ALG     map[string]struct {
		Verdict string   `json:"verdict"`
		Changed []string `json:"changed"`
		Reason  string   `json:"reason"`
	} `json:"alg"`
	RTP      *callJSON `json:"rtp"`
	RTPRelay *callJSON `json:"rtp_relay"`
}

// callJSON is sip.rtp or sip.rtp_relay.
type callJSON struct {
	Packets    int     `json:"packets"`
	LossPctOut float64 `json:"loss_pct_out"`
	LossPctIn  float64 `json:"loss_pct_in"`
	JitterMS   float64 `json:"jitter_ms"`
	MOS        float64 `json:"mos"`
	Error      string  `json:"error"`
}

// sipObserved is the SIP verdict in one word per transport, for the table.
func sipObserved(s *sipJSON) string {
	if s == nil {
		return "sip=null"
	}
	return "sip=" + s.ALG["udp"].Verdict + "/" + s.ALG["tcp"].Verdict
}

// checkSIP compares natprobe's SIP verdicts with the profile's truth: with
// the ALG, rewrites of exactly the fields it rewrites, over UDP and TCP;
// without, none. Loss may turn a verdict inconclusive, never into a wrong
// one: no rewrites or drops without the ALG, never none with it.
func checkSIP(p profile, s *sipJSON, algDetected *bool) []string {
	if s == nil || !s.Offered {
		return []string{"sip: the mirror was not found (want offered: stund runs --sip-mirror)"}
	}
	var bad []string
	lossy := p.LossPct > 0
	for _, tr := range []string{"udp", "tcp"} {
		a := s.ALG[tr]
		switch {
		case lossy && a.Verdict == "inconclusive":
			if a.Reason == "" {
				bad = append(bad, "sip.alg."+tr+": inconclusive without a reason")
			}
		case p.Want.SIPALG && a.Verdict != "rewrites":
			bad = append(bad, fmt.Sprintf("sip.alg.%s: %s (%s), want rewrites", tr, a.Verdict, a.Reason))
		case p.Want.SIPALG:
			for _, f := range algMustChange {
				if !slices.Contains(a.Changed, f) {
					bad = append(bad, fmt.Sprintf("sip.alg.%s.changed %v lacks %s", tr, a.Changed, f))
				}
			}
			for _, f := range a.Changed {
				if !slices.Contains(algMustChange, f) && !slices.Contains(algMayChange, f) {
					bad = append(bad, fmt.Sprintf("sip.alg.%s.changed %v has %s, which this ALG leaves alone", tr, a.Changed, f))
				}
			}
		case a.Verdict != "none":
			bad = append(bad, fmt.Sprintf("sip.alg.%s: %s %v (%s), want none (no ALG)", tr, a.Verdict, a.Changed, a.Reason))
		}
	}
	switch {
	case algDetected == nil && !lossy:
		bad = append(bad, "alg_detected null on a lossless path")
	case algDetected != nil && *algDetected != p.Want.SIPALG:
		bad = append(bad, fmt.Sprintf("alg_detected %v, want %v", *algDetected, p.Want.SIPALG))
	}
	return bad
}

// lossyCall is the call test's length on the loss profiles: 250 packets
// put each direction's loss estimate within 4.5 standard deviations of the
// configured rate at about ±14 points even at 50 %. relayCall is the
// lossless relay fallback's: there every packet must come back.
const (
	lossyCall = 5 * time.Second
	relayCall = time.Second
)

// callFor is the call natprobe's run i on p makes (0: none): on the first
// run of a loss profile, and of a profile whose NAT makes natprobe fall
// back to the relay by itself, where the call then also runs through it.
func callFor(p profile, i int) time.Duration {
	switch {
	case i > 0:
		return 0
	case p.LossPct > 0:
		return lossyCall
	case p.Want.Relay == "auto":
		return relayCall
	}
	return 0
}

// checkCall compares the call test's loss each way with the profile's
// configured loss: within 4.5 binomial standard deviations (for the packets
// that direction saw), so that a correct measurement fails about once in
// 150 000 checks.
func checkCall(p profile, s *sipJSON) ([]string, string) {
	if s == nil {
		return []string{"sip missing with --call"}, ""
	}
	q := float64(p.LossPct) / 100
	bad, line := callLoss("sip.rtp", s.RTP, q)
	if p.Want.Relay == "auto" {
		// Through the relay each leg crosses the router twice: from
		// the peer socket out to the relayed address, and from the
		// TURN server in to natprobe's allocation.
		b, l := callLoss("sip.rtp_relay", s.RTPRelay, 1-(1-q)*(1-q))
		bad, line = append(bad, b...), line+"; relay "+l
	}
	return bad, line
}

// callLoss checks one call's loss each way against the rate q.
func callLoss(name string, c *callJSON, q float64) ([]string, string) {
	if c == nil {
		return []string{name + " missing with --call"}, ""
	}
	if c.Error != "" {
		return []string{name + ".error: " + c.Error}, ""
	}
	var bad []string
	nOut := float64(c.Packets)
	nIn := nOut * (1 - q)
	for _, d := range []struct {
		name string
		got  float64
		n    float64
	}{{"loss_pct_out", c.LossPctOut, nOut}, {"loss_pct_in", c.LossPctIn, nIn}} {
		tol := 100 * 4.5 * math.Sqrt(q*(1-q)/d.n)
		tol = max(tol, 2)
		if math.Abs(d.got-100*q) > tol {
			bad = append(bad, fmt.Sprintf("%s.%s %.1f, want %.0f ± %.1f", name, d.name, d.got, 100*q, tol))
		}
	}
	return bad, fmt.Sprintf("call %d pkts: loss out %.1f%% in %.1f%%, jitter %.2f ms, MOS %.2f", c.Packets, c.LossPctOut, c.LossPctIn, c.JitterMS, c.MOS)
}

// sipProfiles are the kernel-ALG profiles: EIM and APDM, lossless and
// lossy. The lossy ones sit on the full cone, like the loss profiles, so
// that loss cannot make a NAT verdict wrong, only the SIP one uncertain.
//
// They run the natprobe check only: their NAT rulesets are those of
// eim-apdf-pp, random-apdf and hairpin-on, which the third-party clients
// already validate, and the lab stays within its time budget.
func sipProfiles() []profile {
	eim := profile{
		Name:  "sipalg-eim",
		Doc:   "eim-apdf-pp with Linux's SIP ALG on 5060 (nf_nat_sip): rewrites SIP over UDP and TCP",
		Rules: ruleset("", "", "", masqOut, "") + sipHelper,
		Want:  withALG(eimAPDFpp),
	}
	apdm := profile{
		Name: "sipalg-apdm",
		Doc:  "random-apdf (APDM) with Linux's SIP ALG on 5060",
		Rules: ruleset("", "", "",
			`oifname "r1" ip saddr 10.0.0.0/24 snat ip to 198.51.100.1 random`, "") + sipHelper,
		Want: withALG(expect{Mapping: "APDM", Filtering: "APDF", Hairpin: unseen,
			PortPres: no, Parity: dontCare, Contig: dontCare, Pooling: "paired", Legacy: "symmetric"}),
	}
	lossyALG := profile{
		Name:    "sipalg-loss-25",
		Doc:     "hairpin-on (full cone) with Linux's SIP ALG and 25% random loss both ways",
		Rules:   ruleset(eifSet, eifTrack, hairpinPre, hairpinPost, lossRule(25)) + sipHelper,
		LossPct: 25,
		Runs:    3,
		Want:    withALG(hairpinFullCone),
	}
	lossyAPDM := profile{
		Name: "sipalg-apdm-loss-10",
		Doc:  "random-apdf (APDM) with Linux's SIP ALG and 10% random loss both ways",
		Rules: ruleset("", "", "",
			`oifname "r1" ip saddr 10.0.0.0/24 snat ip to 198.51.100.1 random`, lossRule(10)) + sipHelper,
		LossPct: 10,
		Runs:    3,
		// No TURN credentials: under loss the relay proof itself is not
		// reliable yet (a lost CreatePermission answer fails it: "no
		// answer from the TURN server in time"), so the call through
		// the relay is checked on the lossless apdm-apdf only.
		Want: apdm.Want,
	}
	ps := []profile{eim, apdm, lossyALG, lossyAPDM}
	for i := range ps {
		ps[i].Checks = []string{"natprobe"}
	}
	return ps
}

func withALG(e expect) expect {
	e.SIPALG = true
	return e
}

// sipNote is the profile's SIP truth for the ground-truth listing.
func (e expect) sipNote() string {
	if e.SIPALG {
		return " sip=rewrites(" + strings.Join(algMustChange, ",") + ")"
	}
	return " sip=none"
}
