package classifier

// verdict.go turns evidence into verdicts. Every function here is pure:
// evidence in, verdict and reason out, so that the rules can be read and
// tested on their own (verdict_test.go), including contradictory evidence.
// A verdict is only ever drawn from what the replies show; when they do not
// settle a behaviour the result is inconclusive (or nil) with the reason.

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// mappingEvidence is what one socket learnt from the server's four
// addresses (RFC 5780 §4.3 tests I-III, plus the primary IP on the
// alternate port so that port dependence is seen on both server IPs).
type mappingEvidence struct {
	// dst[ip][port]: 0 = primary, 1 = alternate (server addresses).
	dst [2][2]netip.AddrPort
	// seen[ip][port] lists the distinct reflexive addresses the replies
	// from dst[ip][port] reported; empty = no reply.
	seen [2][2][]netip.AddrPort
}

type relation int8

const (
	relUnknown relation = iota
	relSame
	relDiffer
)

func relate(a, b []netip.AddrPort) relation {
	if len(a) != 1 || len(b) != 1 {
		return relUnknown
	}
	if a[0] == b[0] {
		return relSame
	}
	return relDiffer
}

// mappingVerdict applies RFC 4787 §4.1 to the whole reflexive address (IP
// and port): a NAT that keeps the port but changes the external IP with the
// destination IP is address-dependent.
func mappingVerdict(ev mappingEvidence) (Mapping, string) {
	for i := range 2 {
		for p := range 2 {
			if s := ev.seen[i][p]; len(s) > 1 {
				return MappingInconclusive, fmt.Sprintf("contradictory replies: %s reported %s for one socket", ev.dst[i][p], joinAddrs(s))
			}
		}
	}
	pp, pa, ap, aa := ev.seen[0][0], ev.seen[0][1], ev.seen[1][0], ev.seen[1][1]
	if len(pp) == 0 {
		return MappingInconclusive, fmt.Sprintf("no reply from %s", ev.dst[0][0])
	}
	// Same server port, other server IP: does the mapping follow the IP?
	ipRel := []relation{relate(pp, ap), relate(pa, aa)}
	// Same server IP, other server port: does it follow the port?
	portRel := []relation{relate(pp, pa), relate(ap, aa)}
	addrDep, addrIndep := slices.Contains(ipRel, relDiffer), slices.Contains(ipRel, relSame)
	portDep, portIndep := slices.Contains(portRel, relDiffer), slices.Contains(portRel, relSame)
	switch {
	case addrDep && addrIndep, portDep && portIndep:
		return MappingInconclusive, "contradictory replies: the mapping depended on the destination for one server address but not for the other"
	case portDep && addrIndep:
		return MappingInconclusive, "contradictory replies: the mapping changed with the destination port but not with the destination IP (no RFC 4787 behaviour)"
	case portDep:
		return MappingAddressPortDependent, ""
	case addrDep && portIndep:
		return MappingAddressDependent, ""
	case addrDep:
		return MappingInconclusive, fmt.Sprintf("the mapping changed with the destination IP, but no reply from %s or %s told address- from address-and-port-dependent", ev.dst[1][1], ev.dst[0][1])
	case addrIndep:
		return MappingEndpointIndependent, ""
	}
	return MappingInconclusive, fmt.Sprintf("no reply from the alternate address %s", ev.dst[1][0])
}

// filteringEvidence is what the filtering socket, which only ever sent to
// the server's primary address, let in (RFC 5780 §4.4).
type filteringEvidence struct {
	newIP   bool // a reply from an IP the socket never sent to came in
	newPort bool // a reply from the contacted IP, on a port never sent to, came in
	// changeIPSilent / changePortSilent: the test requesting change-IP and
	// change-port (resp. change-port) went unanswered while the control
	// on the same socket was answered, beyond negativeAlpha.
	changeIPSilent, changePortSilent bool
	unchanged                        bool // a "changed" reply came from the address the request went to
	refused                          int  // error code answering CHANGE-REQUEST, 0 if none
	controlSent, controlHits         int
	// otherReaches / altPortReaches: the mapping socket got replies from
	// the alternate address (A:a) and from the primary IP's alternate port
	// (P:a), the sources of the change-IP-and-port and change-port
	// replies. Without that, silence may be the server's (or the path's)
	// fault, not the NAT's filter: an alternate IP that is down, or a
	// server behind a 1:1 NAT announcing a private OTHER-ADDRESS.
	otherReaches, altPortReaches bool
}

func filteringVerdict(ev filteringEvidence) (Filtering, string) {
	switch {
	case ev.refused != 0:
		return FilteringInconclusive, fmt.Sprintf("the server refused CHANGE-REQUEST (error %d): it cannot send from its other address (RFC 5780 §6)", ev.refused)
	case ev.unchanged:
		return FilteringInconclusive, "the server ignored CHANGE-REQUEST (it replied from the address the request went to), so the filter was never tested"
	case ev.changeIPSilent && !ev.otherReaches && !ev.newIP:
		return FilteringInconclusive, "no reply from the server's other address at all (not even to the mapping socket, which sent to it), so its silence says nothing about the NAT's filter"
	case ev.changePortSilent && !ev.altPortReaches && !ev.newIP && !ev.newPort:
		return FilteringInconclusive, "no reply from the server's alternate port at all (not even to the mapping socket, which sent to it), so its silence says nothing about the NAT's filter"
	case ev.newIP && ev.changePortSilent:
		return FilteringInconclusive, "contradictory replies: a reply from a new IP came in, yet replies from a new port on the same IP never did"
	case ev.newIP:
		return FilteringEndpointIndependent, ""
	case ev.newPort && ev.changeIPSilent:
		return FilteringAddressDependent, ""
	case ev.newPort:
		return FilteringInconclusive, "a reply from a new port came in (so not address-and-port-dependent), but the change-IP test was neither answered nor decisively silent"
	case ev.changeIPSilent && ev.changePortSilent:
		return FilteringAddressPortDependent, ""
	case ev.controlHits == 0:
		return FilteringInconclusive, fmt.Sprintf("no reply to %d control requests on the filtering socket", ev.controlSent)
	}
	return FilteringInconclusive, fmt.Sprintf("no reply from the server's other address, but %d answered control requests (of %d) are too few to tell silence from loss", ev.controlHits, ev.controlSent)
}

// hairpinVerdict: received means a packet one of our sockets sent to the
// other's mapped address came in (RFC 5780 §3.4 / RFC 4787 §6); silent
// means neither direction did while the control was answered, beyond
// negativeAlpha. Each socket had first sent to the other's mapped address,
// which opens its own filter to that address when the mapping is
// endpoint-independent, so silence then means no hairpinning. Under ADM or
// APDM that outbound packet used another mapping, and unless filtering is
// endpoint-independent the NAT drops a hairpinned packet at the filter
// whether or not it hairpins: the method cannot measure such a NAT
// (unmeasurable, not unsettled: running again would not help).
func hairpinVerdict(received, silent bool, m Mapping, f Filtering) (v *bool, why string, unsettled bool) {
	switch {
	case received:
		return ptr(true), "", false
	case !silent:
		return nil, "neither socket received the other's packet, but the control replies were too few to call that silence decisive", true
	case m == MappingEndpointIndependent || f == FilteringEndpointIndependent:
		return ptr(false), "", false
	case m == MappingInconclusive || f == FilteringInconclusive || m == "" || f == "":
		return nil, "no packet came back, and with mapping or filtering unsettled a missing hairpin cannot be told from the filter dropping it", true
	}
	return nil, fmt.Sprintf("not measurable behind this NAT: with %s mapping and %s filtering the filter drops a hairpinned packet whether or not the NAT hairpins", m, f), false
}

// portSample is one socket of the port-assignment test.
type portSample struct {
	local, mapped netip.AddrPort
}

// Minimum evidence for the port-assignment verdicts.
const (
	// minParitySamples: a NAT that ignores parity matches it on all n
	// sockets with chance 2^-n; 6 sockets make a false "true" 1.6 %.
	minParitySamples = 6
	// minContiguityPairs: two consecutive local pairs must both map to
	// consecutive external ports.
	minContiguityPairs = 2
)

// portVerdicts judges RFC 4787 §4.2: preservation (the external port is the
// local port), parity (§4.2.2) and contiguity (§4.2.3: local p, p+1 map to
// external q, q+1). The sockets' first packets were sent in an order that
// makes a NAT handing out sequential ports fail both parity and contiguity
// (see portOrder), so that sequential allocation is not mistaken for either.
func portVerdicts(samples []portSample) (pres, parity, contig *bool, reasons map[string]string) {
	reasons = map[string]string{}
	if len(samples) < 2 {
		msg := fmt.Sprintf("only %d of the port-test sockets got a reply", len(samples))
		reasons["port_preservation"], reasons["port_parity"], reasons["port_contiguity"] = msg, msg, msg
		return nil, nil, nil, reasons
	}
	preserved, parityKept := 0, 0
	byLocal := map[uint16]netip.AddrPort{}
	for _, s := range samples {
		if s.mapped.Port() == s.local.Port() {
			preserved++
		}
		if s.mapped.Port()%2 == s.local.Port()%2 {
			parityKept++
		}
		byLocal[s.local.Port()] = s.mapped
	}
	// A NAT that tries to preserve ports may fail for a port already in
	// use; one preserved port out of a few is no coincidence (a random
	// port equals ours with chance 1/64512).
	pres = ptr(preserved > 0)
	switch {
	case parityKept < len(samples):
		parity = ptr(false)
	case len(samples) >= minParitySamples:
		parity = ptr(true)
	default:
		reasons["port_parity"] = fmt.Sprintf("parity held on all %d sockets that answered, too few to rule out chance (need %d)", len(samples), minParitySamples)
	}
	pairs, contiguous := 0, 0
	for lp, m := range byLocal {
		if lp%2 != 0 {
			continue
		}
		m2, ok := byLocal[lp+1]
		if !ok {
			continue
		}
		pairs++
		if m2.Addr() == m.Addr() && m2.Port() == m.Port()+1 {
			contiguous++
		}
	}
	switch {
	case pairs > contiguous:
		contig = ptr(false)
	case pairs >= minContiguityPairs:
		contig = ptr(true)
	default:
		reasons["port_contiguity"] = fmt.Sprintf("only %d consecutive local port pairs answered (need %d)", pairs, minContiguityPairs)
	}
	return pres, parity, contig, reasons
}

// observation is one reflexive address: a socket's plain Binding request
// to a server address, and the XOR-MAPPED-ADDRESS it got.
type observation struct {
	local, dst, mapped netip.AddrPort
}

// poolingVerdict judges RFC 4787 §4.1 IP address pooling: "paired" keeps one
// external IP for an internal IP whatever the session; "arbitrary" does not.
func poolingVerdict(obs []observation) (*Pooling, string) {
	mappedIPs := map[netip.Addr]bool{}
	dstIPs := map[netip.Addr]bool{}
	for _, o := range obs {
		mappedIPs[o.mapped.Addr()] = true
		dstIPs[o.dst.Addr()] = true
	}
	switch {
	case len(mappedIPs) > 1:
		return ptr(PoolingArbitrary), ""
	case len(obs) == 0:
		return nil, "no reflexive address was learnt"
	case len(dstIPs) < 2:
		return nil, "only one server IP answered; pooling needs sessions to two destination IPs"
	}
	return ptr(PoolingPaired), ""
}

// overloadingSeen reports two of our sockets sharing one external address
// toward one destination: port overloading (RFC 4787 §4.2.1), which breaks
// the second flow. Not seeing it proves little: overloading usually shows
// between different internal hosts.
func overloadingSeen(obs []observation) bool {
	type k struct{ dst, mapped netip.AddrPort }
	owner := map[k]netip.AddrPort{}
	for _, o := range obs {
		key := k{o.dst, o.mapped}
		if l, ok := owner[key]; ok && l != o.local {
			return true
		}
		owner[key] = o.local
	}
	return false
}

// algPair is a MAPPED-ADDRESS and an XOR-MAPPED-ADDRESS for the same
// mapping (the same reply, or two replies to one socket from one server
// address). RFC 5780 §3.6: a generic ALG rewrites the plain one.
type algPair struct {
	mapped, xorMapped netip.AddrPort
}

func algVerdict(pairs []algPair) (*bool, string) {
	if len(pairs) == 0 {
		return nil, "the server sent no MAPPED-ADDRESS to compare with XOR-MAPPED-ADDRESS (neither beside it nor to an RFC 3489 request)"
	}
	for _, p := range pairs {
		if p.mapped != p.xorMapped {
			return ptr(true), ""
		}
	}
	return ptr(false), ""
}

// legacyType names the NAT in RFC 3489 terms (the seed's "Legacy
// Classification"). Any mapping that is not endpoint-independent is
// "symmetric" whatever the filtering, as RFC 3489 §5 defines it by the
// mapping alone.
func legacyType(nat *bool, m Mapping, f Filtering) (LegacyType, string) {
	if nat == nil {
		return LegacyInconclusive, "no reflexive address, so NAT presence is unknown"
	}
	if !*nat {
		switch f {
		case FilteringEndpointIndependent:
			return LegacyOpen, ""
		case FilteringAddressDependent, FilteringAddressPortDependent:
			return LegacySymmetricFirewall, ""
		}
		return LegacyInconclusive, "no NAT, but the filtering is not settled (open internet or a firewall)"
	}
	switch m {
	case MappingAddressDependent, MappingAddressPortDependent:
		return LegacySymmetric, ""
	case MappingEndpointIndependent:
		switch f {
		case FilteringEndpointIndependent:
			return LegacyFullCone, ""
		case FilteringAddressDependent:
			return LegacyRestrictedCone, ""
		case FilteringAddressPortDependent:
			return LegacyPortRestrictedCone, ""
		}
		return LegacyInconclusive, "endpoint-independent mapping, but the filtering is not settled"
	}
	return LegacyInconclusive, "the mapping is not settled"
}

// lifetimePoint is one idle time tried by the lifetime search.
type lifetimePoint struct {
	idle  time.Duration // how long the mapping had been idle when it was probed
	state outcome       // positive = still alive, negative = gone, undecided = unknown
}

// lifetimeVerdict turns the probed points into the bracket of RFC 4787
// §4.3's mapping timer: alive at MinS, gone at MaxS (nil: still alive at
// the longest idle time tried).
func lifetimeVerdict(points []lifetimePoint) (*Lifetime, string) {
	var alive, dead []time.Duration
	for _, p := range points {
		switch p.state {
		case positive:
			alive = append(alive, p.idle)
		case negative:
			dead = append(dead, p.idle)
		}
	}
	if len(alive) == 0 && len(dead) == 0 {
		return nil, "no idle time tried gave a decisive answer"
	}
	lt := &Lifetime{}
	if len(alive) > 0 {
		lt.MinS = seconds(slices.Max(alive))
	}
	if len(dead) > 0 {
		d := slices.Min(dead)
		if len(alive) > 0 && slices.Max(alive) >= d {
			return nil, fmt.Sprintf("contradictory: the mapping was gone after %s idle but alive after %s", d.Round(time.Millisecond), slices.Max(alive).Round(time.Millisecond))
		}
		lt.MaxS = ptr(seconds(d))
	}
	return lt, ""
}

func ptr[T any](v T) *T { return &v }

// seconds rounds a duration to milliseconds, the precision of the timers
// behind it.
func seconds(d time.Duration) float64 { return d.Round(time.Millisecond).Seconds() }

func joinAddrs(a []netip.AddrPort) string {
	s := make([]string, len(a))
	for i, x := range a {
		s[i] = x.String()
	}
	return strings.Join(s, ", ")
}
