package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Server ports inside the lab: stund and coturn run side by side on both
// server addresses, so that natprobe can be compared against both on the
// very same NAT.
const (
	stundPort    = 3478
	stundAltPort = 3479
	coturnPort   = 5478
	coturnAlt    = 5479
	turnUser     = "lab"
	turnPass     = "labpass"
	turnRealm    = "natlab"
)

// server is a daemon running in the lab's server namespace.
type server struct {
	name string
	cmd  *exec.Cmd
	out  *bytes.Buffer
	done chan struct{}
}

// startServer starts argv inside ns and waits until every addr in ready is
// bound for UDP (seen with ss), at most 5 s.
func startServer(ctx context.Context, name, ns string, ready []string, argv ...string) (*server, error) {
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns}, argv...)...)
	out := &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	s := &server{name: name, cmd: cmd, out: out, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); close(s.done) }()
	deadline := time.Now().Add(5 * time.Second)
	for {
		select {
		case <-s.done:
			return nil, fmt.Errorf("%s exited at start: %s", name, tail(out.String()))
		case <-ctx.Done():
			s.stop()
			return nil, ctx.Err()
		default:
		}
		ss, _ := exec.Command("ip", "netns", "exec", ns, "ss", "-Huln").Output()
		all := true
		for _, a := range ready {
			if !bytes.Contains(ss, []byte(a+" ")) {
				all = false
			}
		}
		if all {
			return s, nil
		}
		if time.Now().After(deadline) {
			s.stop()
			return nil, fmt.Errorf("%s did not bind %v within 5s: %s", name, ready, tail(out.String()))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// stop ends the server's process group: SIGTERM, then SIGKILL after 2 s.
func (s *server) stop() {
	if s == nil || s.cmd.Process == nil {
		return
	}
	_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(2 * time.Second):
		_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
		<-s.done
	}
}

func tail(s string) string {
	s = strings.TrimSpace(s)
	if len(s) > 400 {
		s = "…" + s[len(s)-400:]
	}
	return strings.ReplaceAll(s, "\n", " | ")
}

func startStund(ctx context.Context, bin, ns string, port, altPort int, extra ...string) (*server, error) {
	return startServer(ctx, "stund", ns,
		[]string{fmt.Sprintf("%s:%d", serverIP, port), fmt.Sprintf("%s:%d", serverAltIP, altPort)},
		append([]string{bin, "--primary-ip", serverIP, "--alternate-ip", serverAltIP,
			"--port", fmt.Sprint(port), "--alt-port", fmt.Sprint(altPort)}, extra...)...)
}

// stundArgs are the flags every lab stund gets.
var stundArgs = []string{
	// The TURN peer in the lab is the client's NATed address.
	"--allow-peer", "198.51.100.0/24",
	"--user", turnUser + ":" + turnPass, "--realm", turnRealm, "--log-level", "warn"}

// startCoturn runs coturn with two listening IPs: with -L given twice and
// RFC 5780 left on, it answers CHANGE-REQUEST from the other IP/port.
func startCoturn(ctx context.Context, ns, dir string) (*server, error) {
	return startServer(ctx, "coturn", ns,
		[]string{fmt.Sprintf("%s:%d", serverIP, coturnPort), fmt.Sprintf("%s:%d", serverAltIP, coturnAlt)},
		"turnserver", "-n", "-L", serverIP, "-L", serverAltIP,
		"--listening-port", fmt.Sprint(coturnPort), "--alt-listening-port", fmt.Sprint(coturnAlt),
		"--min-port", "40000", "--max-port", "40999",
		"--no-cli", "--no-tls", "--no-dtls", "-a", "-u", turnUser+":"+turnPass, "-r", turnRealm,
		"--log-file=stdout", "--simple-log", "--no-software-attribute",
		"--pidfile", filepath.Join(dir, "coturn.pid"), "--userdb", filepath.Join(dir, "turndb"))
}

// clientRun runs one client command in the client namespace, bounded.
func clientRun(parent context.Context, ns string, limit time.Duration, argv ...string) (stdout, stderr string, code int, err error) {
	if parent.Err() != nil {
		return "", "", -1, fmt.Errorf("%s not run: %w", argv[0], context.Cause(parent))
	}
	ctx, cancel := context.WithTimeout(parent, limit)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns}, argv...)...)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err = cmd.Run()
	code = cmd.ProcessState.ExitCode()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		err = nil // a non-zero exit is a result, not a failure to run
	}
	switch {
	case parent.Err() != nil:
		err = fmt.Errorf("%s stopped: %w", argv[0], context.Cause(parent))
	case ctx.Err() != nil:
		err = fmt.Errorf("%s: no result within %v", argv[0], limit)
	}
	return o.String(), e.String(), code, err
}

// observed is what one tool reported, in the ground truth's vocabulary;
// "" means the tool does not measure it, "null"/"inconclusive" that it
// measured and could not tell.
type observed struct {
	Mapping, Filtering, Hairpin, PortPres, Parity, Contig, Pooling, Legacy string
	Lifetime                                                               string // "[min,max]" or null
	lifeMin, lifeMax                                                       float64
	Relay                                                                  string // ok | fail | null
	sip                                                                    string // the SIP verdicts, lossless profiles only
	durationMs                                                             float64
	extra                                                                  []string
}

func (o observed) String() string {
	s := fmt.Sprintf("%s/%s hp=%s pp=%s par=%s con=%s pool=%s %s",
		dash(o.Mapping), dash(o.Filtering), dash(o.Hairpin), dash(o.PortPres), dash(o.Parity), dash(o.Contig), dash(o.Pooling), dash(o.Legacy))
	if o.Lifetime != "" && o.Lifetime != "null" {
		s += " life=" + o.Lifetime
	}
	if o.Relay != "" && o.Relay != "null" {
		s += " relay=" + o.Relay
	}
	if o.sip != "" {
		s += " " + o.sip
	}
	return s
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// natprobeJSON is the natprobe/1 schema (docs/natprobe-json.md), the fields
// the lab checks.
type natprobeJSON struct {
	Schema           string  `json:"schema"`
	Mapping          string  `json:"mapping"`
	Filtering        string  `json:"filtering"`
	Hairpinning      *bool   `json:"hairpinning"`
	PortPreservation *bool   `json:"port_preservation"`
	PortParity       *bool   `json:"port_parity"`
	PortContiguity   *bool   `json:"port_contiguity"`
	IPPooling        *string `json:"ip_pooling"`
	MappingLifetime  *struct {
		MinS float64  `json:"min_s"`
		MaxS *float64 `json:"max_s"` // null: still alive at --lifetime-max
	} `json:"mapping_lifetime"`
	LegacyType string `json:"legacy_type"`
	Relay      *struct {
		OK             bool    `json:"ok"`
		Transport      string  `json:"transport"`
		RelayedAddress string  `json:"relayed_address"`
		RTTms          float64 `json:"rtt_ms"`
		Loss           float64 `json:"loss"`
		Error          string  `json:"error"`
	} `json:"relay"`
	ALGDetected        *bool             `json:"alg_detected"`
	SIP                *sipJSON          `json:"sip"`
	STUNRewritten      *bool             `json:"stun_payload_rewritten"`
	NATDetected        *bool             `json:"nat_detected"`
	MappedAddress      string            `json:"mapped_address"`
	LocalAddress       string            `json:"local_address"`
	Reasons            map[string]string `json:"reasons"`
	InconclusiveFields []string          `json:"inconclusive_fields"`
	DurationMs         float64           `json:"duration_ms"`
}

func boolStr(b *bool) string {
	if b == nil {
		return "null"
	}
	return fmt.Sprint(*b)
}

// runNatprobe runs natprobe --json against host:port from the client
// namespace and translates its report; problems with the report itself
// (schema, addresses, exit status) come back as extra mismatches. relay is
// the profile's expect.Relay ("" none, "auto", "forced").
func runNatprobe(ctx context.Context, bin, ns string, port int, p profile, relay string, withLifetime bool, call time.Duration) (observed, []string, error) {
	args, limit := natprobeArgs(bin, port, relay, withLifetime, call)
	out, errOut, code, err := clientRun(ctx, ns, limit, args...)
	var o observed
	if err != nil {
		return o, nil, err
	}
	var r natprobeJSON
	if jerr := json.Unmarshal([]byte(out), &r); jerr != nil {
		return o, nil, fmt.Errorf("natprobe exit %d, output is not one JSON object (%v): %s %s", code, jerr, tail(out), tail(errOut))
	}
	listed := map[string]bool{}
	for _, f := range r.InconclusiveFields {
		listed[f] = true
	}
	o = observedOf(&r, listed)
	bad := reportMismatches(&r, &o, p, relay)
	bad = append(bad, contractMismatches(&r, &o, listed, code, errOut)...)
	if port == stundPort {
		// Only the stund beside the mirror: SIP verdicts against the
		// kernel ALG's truth, the call's loss against the configured loss.
		bad = append(bad, checkSIP(p, r.SIP, r.ALGDetected)...)
		if p.LossPct == 0 {
			o.sip = sipObserved(r.SIP)
		} else {
			o.extra = append(o.extra, sipObserved(r.SIP))
		}
		if call > 0 {
			cb, line := checkCall(p, r.SIP)
			bad = append(bad, cb...)
			o.extra = append(o.extra, line)
		}
	}
	if len(bad) > 0 || code != 0 {
		rs, _ := json.Marshal(r.Reasons)
		o.extra = append(o.extra, fmt.Sprintf("exit=%d inconclusive=%v reasons=%s duration_ms=%g", code, r.InconclusiveFields, rs, r.DurationMs))
	}
	o.durationMs = r.DurationMs
	return o, bad, nil
}

// natprobeArgs is natprobe's command line for a profile, and how long the
// run may take.
func natprobeArgs(bin string, port int, relay string, withLifetime bool, call time.Duration) ([]string, time.Duration) {
	args := []string{bin, "--json"}
	limit := 30 * time.Second
	if call > 0 {
		args = append(args, "--call", call.String())
		limit += 2 * call
	}
	switch relay {
	case "forced":
		args = append(args, "--relay")
		fallthrough
	case "auto":
		args = append(args, "--turn-user", turnUser, "--turn-pass", turnPass)
	}
	if withLifetime {
		args = append(args, "--lifetime", "--lifetime-max", "30s")
		limit = 90 * time.Second
	}
	return append(args, fmt.Sprintf("%s:%d", serverIP, port)), limit
}

// observedOf translates natprobe's report into the fields compare checks;
// listed holds its inconclusive fields.
func observedOf(r *natprobeJSON, listed map[string]bool) observed {
	o := observed{Mapping: r.Mapping, Filtering: r.Filtering, Hairpin: boolStr(r.Hairpinning),
		PortPres: boolStr(r.PortPreservation), Parity: boolStr(r.PortParity), Contig: boolStr(r.PortContiguity),
		Pooling: "null", Legacy: r.LegacyType, Lifetime: "null", Relay: "null"}
	// A null with a reason that is not among the inconclusive fields is
	// natprobe saying "not measurable behind this NAT" (docs/design.md).
	if o.Hairpin == "null" && r.Reasons["hairpinning"] != "" && !listed["hairpinning"] {
		o.Hairpin = "unmeasurable"
	}
	if r.IPPooling != nil {
		o.Pooling = *r.IPPooling
	}
	if r.MappingLifetime != nil {
		o.lifeMin, o.lifeMax = r.MappingLifetime.MinS, math.Inf(1)
		if r.MappingLifetime.MaxS != nil {
			o.lifeMax = *r.MappingLifetime.MaxS
		}
		o.Lifetime = fmt.Sprintf("[%g,%g]", o.lifeMin, o.lifeMax)
	}
	if r.Relay != nil {
		o.Relay = "fail"
		if r.Relay.OK {
			o.Relay = "ok"
		}
	}
	return o
}

// reportMismatches checks what the lab itself fixes: the schema, the
// addresses, no STUN payload rewriting, and the relay's address, transport and loss; a failed
// relay's error goes to o.extra.
func reportMismatches(r *natprobeJSON, o *observed, p profile, relay string) []string {
	var bad []string
	if r.Schema != "natprobe/1" {
		bad = append(bad, fmt.Sprintf("schema %q, want natprobe/1", r.Schema))
	}
	if r.NATDetected == nil || !*r.NATDetected {
		bad = append(bad, "nat_detected "+boolStr(r.NATDetected)+", want true")
	}
	if ap, perr := netip.ParseAddrPort(r.MappedAddress); perr != nil ||
		(ap.Addr().String() != routerPubIP && !(p.Pool && ap.Addr().String() == routerPubIP2)) {
		bad = append(bad, fmt.Sprintf("mapped_address %q, want a router public address", r.MappedAddress))
	}
	// No lab ruleset rewrites STUN payloads: a rewrite seen here is a
	// false alarm (null is accepted only where loss may have hidden the
	// evidence).
	if (r.STUNRewritten != nil && *r.STUNRewritten) || (r.STUNRewritten == nil && p.LossPct < 50) {
		bad = append(bad, "stun_payload_rewritten "+boolStr(r.STUNRewritten)+", want false (nothing rewrites STUN in the lab)")
	}
	if ap, perr := netip.ParseAddrPort(r.LocalAddress); perr != nil || ap.Addr().String() != clientIP {
		bad = append(bad, fmt.Sprintf("local_address %q, want %s:port", r.LocalAddress, clientIP))
	}
	if relay == "" || r.Relay == nil {
		return bad
	}
	if ap, perr := netip.ParseAddrPort(r.Relay.RelayedAddress); perr != nil ||
		(ap.Addr().String() != serverIP && ap.Addr().String() != serverAltIP) {
		bad = append(bad, fmt.Sprintf("relay.relayed_address %q, want a server address", r.Relay.RelayedAddress))
	}
	if r.Relay.Transport != "udp" {
		bad = append(bad, fmt.Sprintf("relay.transport %q, want udp (UDP is open in the lab)", r.Relay.Transport))
	}
	if p.LossPct == 0 && r.Relay.Loss != 0 {
		bad = append(bad, fmt.Sprintf("relay.loss %g on a lossless path, want 0", r.Relay.Loss))
	}
	if !r.Relay.OK {
		o.extra = append(o.extra, "relay.error="+r.Relay.Error)
	}
	return bad
}

// contractMismatches checks the exit-status contract (docs/natprobe-json.md):
// 1 exactly when inconclusive_fields is non-empty; every "inconclusive"
// enum is listed there, every null the profile asserts carries a reason.
func contractMismatches(r *natprobeJSON, o *observed, listed map[string]bool, code int, errOut string) []string {
	var bad []string
	for f, v := range map[string]string{"mapping": o.Mapping, "filtering": o.Filtering, "legacy_type": o.Legacy} {
		if v == "inconclusive" && !listed[f] {
			bad = append(bad, f+" is inconclusive but not in inconclusive_fields")
		}
	}
	for f, v := range map[string]string{"hairpinning": o.Hairpin, "port_preservation": o.PortPres,
		"port_parity": o.Parity, "port_contiguity": o.Contig, "ip_pooling": o.Pooling} {
		if v == "null" && r.Reasons[f] == "" {
			bad = append(bad, f+" is null without a reason")
		}
	}
	switch {
	case code == 0 && len(r.InconclusiveFields) > 0:
		bad = append(bad, fmt.Sprintf("exit 0 with inconclusive_fields %v (contract: exit 1)", r.InconclusiveFields))
	case code == 1 && len(r.InconclusiveFields) == 0:
		bad = append(bad, "exit 1 with no inconclusive_fields (contract: exit 0)")
	case code != 0 && code != 1:
		bad = append(bad, fmt.Sprintf("exit %d: %s", code, tail(errOut)))
	}
	return bad
}

// runNatdiscovery runs coturn's RFC 5780 client (mapping, filtering,
// hairpinning) and reads its verdict lines.
func runNatdiscovery(ctx context.Context, ns string, port int) (observed, error) {
	out, errOut, _, err := clientRun(ctx, ns, 40*time.Second,
		"turnutils_natdiscovery", "-m", "-f", "-H", "-p", fmt.Sprint(port), serverIP)
	o := observed{Hairpin: "false"}
	if err != nil {
		return o, err
	}
	all := out + errOut
	switch {
	case strings.Contains(all, "Endpoint Independent Mapping"):
		o.Mapping = "EIM"
	case strings.Contains(all, "Address Dependent Mapping"):
		o.Mapping = "ADM"
	case strings.Contains(all, "Address and Port Dependent Mapping"):
		o.Mapping = "APDM"
	default:
		o.Mapping = "inconclusive"
	}
	switch {
	case strings.Contains(all, "Endpoint Independent Filtering"):
		o.Filtering = "EIF"
	case strings.Contains(all, "Address Dependent Filtering"):
		o.Filtering = "ADF"
	case strings.Contains(all, "Address and Port Dependent Filtering"):
		o.Filtering = "APDF"
	default:
		o.Filtering = "inconclusive"
	}
	if strings.Contains(all, "successful hairpinning") {
		o.Hairpin = "true"
	}
	// Pooling from the reflexive addresses it printed: more than one
	// external IP across its tests (which reach both server IPs) is
	// arbitrary pooling.
	ips := map[string]bool{}
	for _, l := range strings.Split(all, "\n") {
		if _, a, ok := strings.Cut(l, "UDP reflexive addr: "); ok {
			if ap, err := netip.ParseAddrPort(strings.TrimSpace(a)); err == nil {
				ips[ap.Addr().String()] = true
			}
		}
	}
	switch {
	case len(ips) == 1:
		o.Pooling = "paired"
	case len(ips) > 1:
		o.Pooling = "arbitrary"
	}
	return o, nil
}

// natdiscoveryLifetime asks coturn's client whether a binding survives
// idle seconds (RFC 5780 §4.6 with RESPONSE-PORT): true when the second
// response arrived.
func natdiscoveryLifetime(ctx context.Context, ns string, port, idle int) (bool, error) {
	out, errOut, _, err := clientRun(ctx, ns, time.Duration(idle+15)*time.Second,
		"turnutils_natdiscovery", "-t", "-T", fmt.Sprint(idle), "-p", fmt.Sprint(port), serverIP)
	if err != nil {
		return false, err
	}
	return strings.Contains(out+errOut, "RFC 5780 response 2"), nil
}

// measureLoss sends n UDP datagrams from the client to the server's discard
// port with bash's /dev/udp and reads the router's counters: the fraction
// of forwarded packets its loss rule dropped.
func measureLoss(ctx context.Context, client, router string, n int) (float64, error) {
	script := fmt.Sprintf("for i in $(seq %d); do echo x > /dev/udp/%s/9; done", n, serverIP)
	if _, errOut, code, err := clientRun(ctx, client, 20*time.Second, "bash", "-c", script); err != nil || code != 0 {
		return 0, fmt.Errorf("sending the loss sample: %v %s", err, tail(errOut))
	}
	out, err := exec.CommandContext(ctx, "ip", "netns", "exec", router, "nft", "list", "chain", "ip", "natlab", "forwarding").Output()
	if err != nil {
		return 0, fmt.Errorf("reading the loss counters: %w", err)
	}
	var seen, dropped float64
	for _, l := range strings.Split(string(out), "\n") {
		f := strings.Fields(l)
		for i := 0; i+2 < len(f); i++ {
			if f[i] == "counter" && f[i+1] == "packets" {
				var v float64
				fmt.Sscan(f[i+2], &v)
				if strings.Contains(l, "numgen") {
					dropped = v
				} else if strings.HasPrefix(strings.TrimSpace(l), "counter") {
					seen = v
				}
			}
		}
	}
	if seen < float64(n) {
		return 0, fmt.Errorf("loss counters saw %v packets, sent %d", seen, n)
	}
	return dropped / seen, nil
}

// runClassicStun runs the classic RFC 3489 `stun` client and reads its
// "Primary:" line, e.g. "Independent Mapping, Port Dependent Filter,
// preserves ports, no hairpin". It cannot tell ADM from APDM.
func runClassicStun(ctx context.Context, ns string, port int) (observed, error) {
	out, errOut, _, err := clientRun(ctx, ns, 20*time.Second, "stun", fmt.Sprintf("%s:%d", serverIP, port))
	var o observed
	if err != nil {
		return o, err
	}
	var line string
	for _, l := range strings.Split(out+errOut, "\n") {
		if strings.HasPrefix(l, "Primary:") {
			line = l
		}
	}
	if line == "" {
		return o, fmt.Errorf("stun printed no verdict: %s", tail(out+errOut))
	}
	o.Legacy = strings.TrimSpace(strings.TrimPrefix(line, "Primary:"))
	switch {
	case strings.Contains(line, "Independent Mapping"):
		o.Mapping = "EIM"
	case strings.Contains(line, "Dependent Mapping"):
		o.Mapping = "ADM|APDM"
	}
	switch {
	case strings.Contains(line, "Independent Filter"):
		o.Filtering = "EIF"
	case strings.Contains(line, "Port Dependent Filter"):
		o.Filtering = "APDF"
	case strings.Contains(line, "Address Dependent Filter"), strings.Contains(line, " Dependent Filter"):
		o.Filtering = "ADF"
	}
	switch {
	case strings.Contains(line, "preserves ports"):
		o.PortPres = "true"
	case strings.Contains(line, "random port"):
		o.PortPres = "false"
	}
	switch {
	case strings.Contains(line, "will hairpin"):
		o.Hairpin = "true"
	case strings.Contains(line, "no hairpin"):
		o.Hairpin = "false"
	}
	return o, nil
}

// compare checks every measured field against the ground truth. At high
// loss (tolerant) an inconclusive/null field is accepted, a wrong one never.
func compare(w expect, o observed, tolerant bool) []string {
	var bad []string
	chk := func(field, want, got string) {
		if want == "" || got == "" { // not asserted, or not measured by this tool
			return
		}
		if got == want {
			return
		}
		if want == "ADM" || want == "APDM" {
			if got == "ADM|APDM" {
				return
			}
		}
		if tolerant && (got == "inconclusive" || got == "null") {
			return
		}
		bad = append(bad, fmt.Sprintf("%s: want %s, got %s", field, want, got))
	}
	triS := func(t tri) string {
		if t == dontCare {
			return ""
		}
		return t.String()
	}
	chk("mapping", w.Mapping, o.Mapping)
	if !(o.Mapping == "ADM|APDM") { // classic stun reports no filter for symmetric NATs
		chk("filtering", w.Filtering, o.Filtering)
	}
	switch {
	case w.Hairpin == unseen && (o.Hairpin == "false" || o.Hairpin == "unmeasurable"):
	case w.Hairpin == unseen:
		chk("hairpinning", "false or unmeasurable", o.Hairpin)
	default:
		chk("hairpinning", triS(w.Hairpin), o.Hairpin)
	}
	chk("port_preservation", triS(w.PortPres), o.PortPres)
	chk("port_parity", triS(w.Parity), o.Parity)
	chk("port_contiguity", triS(w.Contig), o.Contig)
	chk("ip_pooling", w.Pooling, o.Pooling)
	if o.Legacy != "" && !strings.Contains(o.Legacy, ",") && !strings.Contains(o.Legacy, "Mapping") {
		chk("legacy_type", w.Legacy, o.Legacy)
	}
	bad = append(bad, compareLifetime(w, o, tolerant)...)
	if w.Relay != "" && o.Relay != "" && o.Relay != "ok" {
		bad = append(bad, "relay: want ok, got "+o.Relay)
	}
	return bad
}

// compareLifetime checks the mapping lifetime bracket against the
// profile's conntrack timeout; "" means the tool does not measure it.
func compareLifetime(w expect, o observed, tolerant bool) []string {
	switch {
	case o.Lifetime == "":
	case w.LifetimeS == 0 && o.Lifetime != "null":
		return []string{"mapping_lifetime: want null (not measured), got " + o.Lifetime}
	case w.LifetimeS > 0 && o.Lifetime == "null":
		if !tolerant {
			return []string{fmt.Sprintf("mapping_lifetime: want a bracket around %ds, got null", w.LifetimeS)}
		}
	case w.LifetimeS > 0:
		// One second of slack either side: conntrack's timer runs
		// from the last packet, natprobe's from its last send.
		if o.lifeMin > float64(w.LifetimeS)+1 || o.lifeMax < float64(w.LifetimeS)-1 {
			return []string{fmt.Sprintf("mapping_lifetime: want a bracket around %ds, got %s", w.LifetimeS, o.Lifetime)}
		}
	}
	return nil
}

func tempDir(prefix string) (string, error) { return os.MkdirTemp("", prefix) }
