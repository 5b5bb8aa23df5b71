package main

import (
	"fmt"
	"strings"
)

// The lab's fixed addressing. Every profile runs in its own three network
// namespaces, so these constants never collide between profiles.
//
//	client ns            router ns (nftables NAT)            server ns
//	c0 10.0.0.2/24 ---- r0 10.0.0.1/24
//	                     r1 198.51.100.1/24 (+ .2 pool) ---- s0 198.51.100.10/24
//	                        203.0.113.1/24                       203.0.113.10/24
//
// 198.51.100.0/24 and 203.0.113.0/24 are documentation ranges (RFC 5737);
// 10.0.0.0/24 exists only inside the client and router namespaces.
const (
	clientIP     = "10.0.0.2"
	routerInIP   = "10.0.0.1"
	routerPubIP  = "198.51.100.1"
	routerPubIP2 = "198.51.100.2" // second public address, pooling profiles only
	routerPubB   = "203.0.113.1"  // router presence in the alternate server's subnet
	serverIP     = "198.51.100.10"
	serverAltIP  = "203.0.113.10"
)

// tri is a ground-truth boolean that may also be "not asserted".
type tri int8

const (
	dontCare tri = iota // not asserted: the NAT does not fix this property
	yes
	no
	// unseen: the NAT does not do it, but no client behind it can see
	// that. Hairpinning behind an ADM/APDM mapping with ADF/APDF
	// filtering: the hairpinned packet arrives from the sender's mapping
	// toward the NAT's own address, which the receiving mapping never sent
	// to, so its filter drops it whether or not the NAT hairpins. natprobe
	// must say so (null, a reasons entry, not in inconclusive_fields:
	// docs/design.md) or say false; true is wrong. Tools that report
	// silence as "no hairpin" (natdiscovery, stun) read false.
	unseen
)

func (t tri) String() string {
	switch t {
	case yes:
		return "true"
	case no:
		return "false"
	case unseen:
		return "false|unmeasurable"
	}
	return "*"
}

// expect is the ground truth of a profile: what natprobe must report.
// An empty string or `any` means "not asserted" (the profile's NAT does not
// determine it, e.g. the parity of a hashed port).
type expect struct {
	Mapping   string // EIM | ADM | APDM
	Filtering string // EIF | ADF | APDF
	Hairpin   tri
	PortPres  tri
	Parity    tri
	Contig    tri
	Pooling   string // paired | arbitrary
	Legacy    string // full-cone | restricted-cone | port-restricted-cone | symmetric
	// LifetimeS is the router's UDP conntrack timeout when the profile
	// measures it (natprobe --lifetime); 0 means not measured (null).
	LifetimeS int
	// Relay gives natprobe TURN credentials and expects relay.ok with a
	// relayed address on the server, no loss: "auto" without --relay (the
	// mapping alone must make natprobe fall back to the relay), "forced"
	// with --relay (a NAT that needs no relay). "" gives no credentials.
	Relay string
	// SIPALG: Linux's SIP ALG is on in the router (sipHelper); natprobe
	// must report its rewrites, and none where it is off.
	SIPALG bool
}

func (e expect) String() string {
	s := fmt.Sprintf("%s/%s hp=%v pp=%v par=%v con=%v pool=%s %s",
		e.Mapping, e.Filtering, e.Hairpin, e.PortPres, e.Parity, e.Contig, orStar(e.Pooling), e.Legacy)
	if e.LifetimeS > 0 {
		s += fmt.Sprintf(" life=%ds", e.LifetimeS)
	}
	if e.Relay != "" {
		s += " relay=ok(" + e.Relay + ")"
	}
	return s + e.sipNote()
}

func orStar(s string) string {
	if s == "" {
		return "*"
	}
	return s
}

// profile is one NAT behaviour: the router's nftables ruleset and, right
// beside it, the ground truth that ruleset produces on a Linux kernel.
type profile struct {
	Name string
	Doc  string
	// Rules is the router's nftables ruleset (nft -f input).
	Rules string
	// Pool gives the router its second public address.
	Pool bool
	// Sysctls are set inside the router namespace after the ruleset is
	// loaded (netfilter sysctls are per network namespace).
	Sysctls map[string]string
	// LossPct is the random loss both ways (already in Rules); at 50 %
	// an inconclusive field is accepted, a wrong one never.
	LossPct int
	// Runs repeats the natprobe check (default once): the loss profiles
	// prove the verdicts are stable, not lucky.
	Runs int
	// Checks, when set, limits the profile to these checks (of those
	// chosen with -checks).
	Checks []string
	Want   expect
}

// Shared rule fragments. Chain layout of every ruleset:
//   - track (prerouting, filter priority, before DNAT): records what the
//     client has contacted, for the filtering sets;
//   - pre (nat prerouting): the inbound DNAT that makes EIF/ADF;
//   - post (nat postrouting): the source NAT that makes the mapping;
//   - fwd (forward, policy drop): loss, then conntrack, outbound, DNATed;
//   - in (input, policy drop): unsolicited packets to the router's own
//     addresses vanish, as on a real NAT (no ICMP back to the sender).
const (
	masqOut = `oifname "r1" ip saddr 10.0.0.0/24 snat ip to 198.51.100.1`
)

// ruleset assembles a profile's table from its distinctive parts.
func ruleset(sets, track, pre, post, loss string) string {
	var b strings.Builder
	b.WriteString("table ip natlab {\n")
	if sets != "" {
		b.WriteString(sets + "\n")
	}
	fmt.Fprintf(&b, "  chain track {\n    type filter hook prerouting priority -150; policy accept;\n    %s\n  }\n", track)
	fmt.Fprintf(&b, "  chain dnat_in {\n    type nat hook prerouting priority dstnat; policy accept;\n    %s\n  }\n", pre)
	fmt.Fprintf(&b, "  chain snat_out {\n    type nat hook postrouting priority srcnat; policy accept;\n    %s\n  }\n", post)
	fmt.Fprintf(&b, "  chain forwarding {\n    type filter hook forward priority filter; policy drop;\n    %s\n"+
		"    ct state established,related accept\n"+
		"    iifname \"r0\" oifname \"r1\" accept\n"+
		"    ct status dnat accept\n  }\n", loss)
	b.WriteString("  chain router_input {\n    type filter hook input priority filter; policy drop;\n" +
		"    iifname \"lo\" accept\n    ct state established,related accept\n  }\n")
	b.WriteString("}\n")
	return b.String()
}

// lossRule drops pct % of forwarded packets, each direction independently
// (numgen works where the netem qdisc is missing).
func lossRule(pct int) string {
	// The first counter sees every forwarded packet, the second the
	// dropped ones: the lab check measures the rate it really gets.
	return fmt.Sprintf("counter\n    numgen random mod 100 < %d counter drop", pct)
}

// Filtering sets. EIF forwards an inbound packet to any port the client has
// used (its mapping, since these profiles preserve the port); ADF only from a
// remote address that this very mapping has sent to (RFC 4787 §5: filtering
// is per mapping, so the set keys on the remote address and the port).
const (
	eifSet   = "  set mapped { type inet_service; flags dynamic,timeout; timeout 120s; }"
	eifTrack = `iifname "r0" ip saddr 10.0.0.2 meta l4proto udp update @mapped { udp sport }`
	eifPre   = `iifname "r1" ip daddr 198.51.100.1 udp dport @mapped dnat ip to 10.0.0.2`

	adfSet   = "  set contacted { type ipv4_addr . inet_service; flags dynamic,timeout; timeout 120s; }"
	adfTrack = `iifname "r0" ip saddr 10.0.0.2 ip daddr != 198.51.100.1 meta l4proto udp update @contacted { ip daddr . udp sport }`
	adfPre   = `iifname "r1" ip daddr 198.51.100.1 ip saddr . udp dport @contacted dnat ip to 10.0.0.2`
)

// Ground truth of the Linux default (masquerade/plain SNAT): the kernel keeps
// the source port when the resulting tuple is unique and reuses the same
// external endpoint for every destination (EIM, port preserved); inbound
// packets pass only as replies of a conntrack entry (APDF).
var eimAPDFpp = expect{Mapping: "EIM", Filtering: "APDF", Hairpin: no,
	PortPres: yes, Parity: yes, Contig: yes, Pooling: "paired", Legacy: "port-restricted-cone"}

// Destination-dependent mappings without clashes. A port computed by a hash
// (`snat to ip : jhash ... mod N`) is a single-port range, so the kernel
// cannot move it when two local ports hash to the same external port toward
// the same server endpoint: the second flow's packets are dropped at
// conntrack confirm (insert_failed) for as long as its socket lives. In the
// lab that happened to 417 packets over 25 natprobe runs on one APDM router
// and made mapping, filtering or hairpinning inconclusive in 1 run of 25. A
// XOR with a constant is a bijection of the local port, so a constant per
// destination is address(-and-port)-dependent and can never clash. Every
// server endpoint a lab client talks to gets its own constant; other
// destinations (the TURN peer traffic to relay ports) fall back to the hash,
// one flow each.
var (
	admKeys  = []string{serverIP, serverAltIP}
	apdmKeys = func() []string {
		var k []string
		for _, ip := range []string{serverIP, serverAltIP} {
			for _, port := range []int{stundPort, stundAltPort, coturnPort, coturnAlt} {
				k = append(k, fmt.Sprintf("%s . %d", ip, port))
			}
		}
		return k
	}()
)

// xorConst is the k-th destination's constant: odd (parity always flips,
// contiguity always breaks), distinct, below 0x8000 (a local port in the
// ephemeral range stays above 32767).
func xorConst(k int) int { return (0x0111*(k+1))&0x7ffe | 1 }

// xorChains are the regular chains, one per destination key, each with its
// own constant; xorRule jumps to them from the postrouting chain.
func xorChains(name string, keys []string) string {
	var b strings.Builder
	for k := range keys {
		fmt.Fprintf(&b, "  chain %s_%d {\n    meta l4proto udp snat ip to 198.51.100.1 : udp sport ^ 0x%04x\n  }\n", name, k, xorConst(k))
	}
	return strings.TrimSuffix(b.String(), "\n")
}

func xorRule(keyExpr, name string, keys []string) string {
	var el []string
	for k, key := range keys {
		el = append(el, fmt.Sprintf("%s : jump %s_%d", key, name, k))
	}
	return fmt.Sprintf(`oifname "r1" ip saddr 10.0.0.2 meta l4proto udp %s vmap { %s }`, keyExpr, strings.Join(el, ", "))
}

// lossRuns: how often natprobe runs on each loss profile. At 25 % every
// one of 10 runs must agree; at 50 % each of 10 may only be right or
// inconclusive.
var lossRuns = map[int]int{10: 5, 25: 10, 50: 10}

// Hairpinning full cone: the DNAT of a mapped port applies to packets from
// inside too, and those are SNATed to the public address on their way back
// in (RFC 4787 §6: external source address and port).
const (
	hairpinPre  = `ip daddr 198.51.100.1 udp dport @mapped dnat ip to 10.0.0.2`
	hairpinPost = masqOut + `
    oifname "r0" ip saddr 10.0.0.0/24 ct status dnat snat ip to 198.51.100.1`
)

var hairpinFullCone = expect{Mapping: "EIM", Filtering: "EIF", Hairpin: yes,
	PortPres: yes, Parity: yes, Contig: yes, Pooling: "paired", Legacy: "full-cone"}

// lossy is the hairpinning full cone with random loss. Every verdict of
// that NAT is the most permissive one (EIM, EIF, hairpinning), each proven
// only by a reply arriving, so lost packets can push a verdict only toward
// a stricter one: exactly what natprobe must never report (loss gives
// inconclusive, not APDF or "no hairpinning"). On a port-restricted cone
// the same loss could not produce a wrong verdict at all.
func lossy(pct int) profile {
	return profile{
		Name:    fmt.Sprintf("loss-%d", pct),
		Doc:     fmt.Sprintf("hairpin-on (full cone, hairpinning) with %d%% random loss both ways", pct),
		Rules:   ruleset(eifSet, eifTrack, hairpinPre, hairpinPost, lossRule(pct)),
		LossPct: pct,
		Runs:    lossRuns[pct],
		Want:    hairpinFullCone,
	}
}

var profiles = []profile{
	{
		Name: "eim-eif-pp",
		Doc:  "full cone: port-preserving SNAT, inbound to a mapped port from anyone is DNATed back; no hairpin",
		Rules: ruleset(eifSet, eifTrack, eifPre,
			masqOut, ""),
		Want: expect{Mapping: "EIM", Filtering: "EIF", Hairpin: no,
			PortPres: yes, Parity: yes, Contig: yes, Pooling: "paired", Legacy: "full-cone"},
	},
	{
		Name: "eim-adf-pp",
		Doc:  "restricted cone: inbound only from an address this mapping sent to",
		Rules: ruleset(adfSet, adfTrack, adfPre,
			masqOut, ""),
		Want: expect{Mapping: "EIM", Filtering: "ADF", Hairpin: no,
			PortPres: yes, Parity: yes, Contig: yes, Pooling: "paired", Legacy: "restricted-cone"},
	},
	{
		Name:  "eim-apdf-pp",
		Doc:   "port-restricted cone: the Linux default, plain SNAT + conntrack",
		Rules: ruleset("", "", "", masqOut, ""),
		Want:  eimAPDFpp,
	},
	{
		Name: "eim-apdf-nopp",
		Doc:  "EIM without port preservation: external port = local port XOR 0x1001 (a fixed bijection: same for every destination, flips parity, breaks contiguity)",
		Rules: ruleset("", "", "",
			`oifname "r1" ip saddr 10.0.0.2 meta l4proto udp snat ip to 198.51.100.1 : udp sport ^ 0x1001
    `+masqOut, ""),
		Want: expect{Mapping: "EIM", Filtering: "APDF", Hairpin: no,
			PortPres: no, Parity: no, Contig: no, Pooling: "paired", Legacy: "port-restricted-cone"},
	},
	{
		Name: "adm-apdf",
		Doc:  "address-dependent mapping: external port = local port XOR a constant chosen by the destination IP (a hash for other destinations)",
		Rules: ruleset(xorChains("adm", admKeys), "", "",
			xorRule("ip daddr", "adm", admKeys)+`
    oifname "r1" ip saddr 10.0.0.2 meta l4proto udp snat ip to 198.51.100.1 : jhash ip daddr . udp sport mod 20000 offset 40000
    `+masqOut, ""),
		// Odd XOR constants: parity always flips, consecutive ports
		// never stay consecutive.
		Want: expect{Mapping: "ADM", Filtering: "APDF", Hairpin: unseen,
			PortPres: no, Parity: no, Contig: no, Pooling: "paired", Legacy: "symmetric"},
	},
	{
		Name: "apdm-apdf",
		Doc:  "address-and-port-dependent mapping: external port = local port XOR a constant chosen by destination IP and port (a hash for other destinations); TURN fallback proven",
		Rules: ruleset(xorChains("apdm", apdmKeys), "", "",
			xorRule("ip daddr . udp dport", "apdm", apdmKeys)+`
    oifname "r1" ip saddr 10.0.0.2 meta l4proto udp snat ip to 198.51.100.1 : jhash ip daddr . udp dport . udp sport mod 20000 offset 40000
    `+masqOut, ""),
		Want: expect{Mapping: "APDM", Filtering: "APDF", Hairpin: unseen,
			PortPres: no, Parity: no, Contig: no, Pooling: "paired", Legacy: "symmetric", Relay: "auto"},
	},
	{
		Name: "random-apdf",
		Doc:  "random port per flow (snat ... random: the kernel draws a new port for every conntrack entry), i.e. APDM",
		Rules: ruleset("", "", "",
			`oifname "r1" ip saddr 10.0.0.0/24 snat ip to 198.51.100.1 random`, ""),
		Want: expect{Mapping: "APDM", Filtering: "APDF", Hairpin: unseen,
			PortPres: no, Parity: dontCare, Contig: dontCare, Pooling: "paired", Legacy: "symmetric"},
	},
	{
		Name:  "hairpin-on",
		Doc:   "full cone with hairpinning: the DNAT also applies to packets from inside, which are SNATed to the public address on the way back in",
		Rules: ruleset(eifSet, eifTrack, hairpinPre, hairpinPost, ""),
		Want:  hairpinFullCone,
	},
	{
		Name: "pool-paired",
		Doc:  "two public addresses, snat to a range with 'persistent' (address chosen from the source IP only): paired pooling, EIM",
		Rules: ruleset("", "", "",
			`oifname "r1" ip saddr 10.0.0.0/24 snat ip to 198.51.100.1-198.51.100.2 persistent`, ""),
		Pool: true,
		Want: expect{Mapping: "EIM", Filtering: "APDF", Hairpin: no,
			PortPres: yes, Parity: yes, Contig: yes, Pooling: "paired", Legacy: "port-restricted-cone"},
	},
	{
		Name: "pool-arbitrary",
		Doc:  "two public addresses, chosen by destination IP, port kept: arbitrary pooling, which RFC 4787 §4.1 counts as ADM",
		Rules: ruleset("", "", "",
			`oifname "r1" ip saddr 10.0.0.0/24 snat ip to ip daddr map { 198.51.100.10 : 198.51.100.1, 203.0.113.10 : 198.51.100.2 }
    `+masqOut, ""),
		Pool: true,
		Want: expect{Mapping: "ADM", Filtering: "APDF", Hairpin: unseen,
			PortPres: yes, Parity: yes, Contig: yes, Pooling: "arbitrary", Legacy: "symmetric"},
	},
	{
		Name:  "lifetime-short",
		Doc:   "eim-apdf-pp with the router's UDP conntrack timeouts at 8 s",
		Rules: ruleset("", "", "", masqOut, ""),
		Sysctls: map[string]string{
			"net.netfilter.nf_conntrack_udp_timeout":        "8",
			"net.netfilter.nf_conntrack_udp_timeout_stream": "8",
		},
		Want: func() expect { e := eimAPDFpp; e.LifetimeS = 8; return e }(),
	},
	lossy(10),
	lossy(25),
	lossy(50),
}

func init() { profiles = append(profiles, sipProfiles()...) }
