package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/stund/stund/classifier"
)

// isTerminal says whether w is a character device (a terminal). A variable
// so tests can pretend.
var isTerminal = func(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()

	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// dumbTerminal says whether TERM names a terminal that understands no
// escape sequences at all ("dumb": Emacs shell buffers, some CI logs).
func dumbTerminal() bool {
	return os.Getenv("TERM") == "dumb"
}

// colorFor says whether to colour output to w: only on a terminal, never on
// a dumb one, and never when NO_COLOR is set to anything
// (https://no-color.org).
func colorFor(w io.Writer) bool {
	return os.Getenv("NO_COLOR") == "" && !dumbTerminal() && isTerminal(w)
}

// progress shows what the probe is doing on one rewritten stderr line, and
// only when stderr is a terminal that can erase a line: a log, a pipe or a
// dumb terminal gets nothing.
type progress struct {
	mu    sync.Mutex
	w     io.Writer
	shown bool
}

func newProgress(stderr io.Writer) *progress {
	if !isTerminal(stderr) || dumbTerminal() {
		return &progress{}
	}

	return &progress{w: stderr}
}

func (p *progress) update(msg string) {
	if p.w == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	// \r and "erase line" (ECMA-48 EL): rewrite the same line.
	fmt.Fprintf(p.w, "\r\x1b[K%s…", msg)
	p.shown = true
}

func (p *progress) done() {
	if p.w == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.shown {
		fmt.Fprint(p.w, "\r\x1b[K")
		p.shown = false
	}
}

// jsonReport is the natprobe/1 object: the classifier's Report plus what
// the command knows about the run (fields added without a schema bump, as
// docs/natprobe-json.md allows).
type jsonReport struct {
	*classifier.Report
	Time            string `json:"time"`             // start of the run, UTC, RFC 3339
	NatprobeVersion string `json:"natprobe_version"` // also in SOFTWARE
}

func newJSONReport(rep *classifier.Report, meta runMeta) jsonReport {
	return jsonReport{Report: rep, Time: rfc3339(meta.time), NatprobeVersion: appVersion()}
}

// rfc3339 is how natprobe writes times: UTC, RFC 3339, whole seconds, so
// a ticket and the server's log compare at a glance.
func rfc3339(t time.Time) string {
	return t.UTC().Format(time.RFC3339)
}

// render prints rep in the chosen format.
func render(w io.Writer, format string, rep *classifier.Report, meta runMeta, color bool) error {
	switch format {
	case "json":
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")

		return enc.Encode(newJSONReport(rep, meta))
	case "markdown":
		return renderMarkdown(w, rep, meta)
	default:
		return renderText(w, rep, meta, color)
	}
}

// tone is how a result reads for real-time media; it picks the colour.
type tone int

const (
	toneNeutral tone = iota
	toneGood
	toneWarn
	toneBad
	toneUnknown
)

// ANSI SGR colours per tone.
var toneSGR = map[tone]string{
	toneGood:    "32", // green
	toneWarn:    "33", // yellow
	toneBad:     "31", // red
	toneUnknown: "35", // magenta: inconclusive
}

// row is one line of the behaviour table.
type row struct {
	behaviour, result, meaning string
	tone                       tone
}

func boolResult(b *bool, yes, no string) (string, bool) {
	switch {
	case b == nil:
		return "not measured", false
	case *b:
		return yes, true
	default:
		return no, true
	}
}

// rows turns a report into the behaviour table shared by text and markdown.
func rows(rep *classifier.Report) []row {
	var rs []row
	add := func(b, r, m string, t tone) { rs = append(rs, row{b, r, m, t}) }
	for _, part := range []func(*classifier.Report, func(b, r, m string, t tone)){
		addressRows, mappingRows, portRows, poolingLifetimeRows,
	} {
		part(rep, add)
	}
	rs = append(rs, sipRowsOf(rep)...)
	legacyRelayRows(rep, add)
	return rs
}

// addressRows: UDP reachability and whether there is a NAT.
func addressRows(rep *classifier.Report, add func(b, r, m string, t tone)) {
	if rep.MappedAddress.IsValid() {
		add("UDP", "reachable", fmt.Sprintf("local %s, public %s", rep.LocalAddress, rep.MappedAddress), toneGood)
	}
	if rep.NATDetected != nil {
		if *rep.NATDetected {
			add("NAT", "yes", "the public address differs from the local one", toneNeutral)
		} else {
			add("NAT", "no", "the public address is the local one", toneGood)
		}
	}
}

// mappingRows: mapping, filtering and hairpinning (RFC 4787 §4.1, §5, §6).
func mappingRows(rep *classifier.Report, add func(b, r, m string, t tone)) {
	mt, mm := toneUnknown, reason(rep, "mapping", "not measured")
	switch rep.Mapping {
	case classifier.MappingEndpointIndependent:
		mt, mm = toneGood, "endpoint-independent: one public address for every destination (RFC 4787 REQ-1)"
	case classifier.MappingAddressDependent:
		mt, mm = toneBad, "address-dependent: a new public address per destination IP; peers cannot reuse it"
	case classifier.MappingAddressPortDependent:
		mt, mm = toneBad, "address-and-port-dependent (symmetric): a new public address per destination"
	case "":
		mt = toneNeutral
	}
	add("mapping", orNot(string(rep.Mapping)), mm, mt)

	ft, fm := toneUnknown, reason(rep, "filtering", "not measured")
	switch rep.Filtering {
	case classifier.FilteringEndpointIndependent:
		ft, fm = toneGood, "endpoint-independent: anyone may send to the public address"
	case classifier.FilteringAddressDependent:
		ft, fm = toneWarn, "address-dependent: only IPs we sent to may answer"
	case classifier.FilteringAddressPortDependent:
		ft, fm = toneWarn, "address-and-port-dependent: only the exact address:port we sent to may answer"
	case "":
		ft = toneNeutral
	}
	add("filtering", orNot(string(rep.Filtering)), fm, ft)

	if r, ok := boolResult(rep.Hairpinning, "yes", "no"); ok {
		t, m := toneGood, "two hosts behind this NAT reach each other on their public addresses"
		if !*rep.Hairpinning {
			t, m = toneWarn, "hosts behind this NAT cannot reach each other's public address (RFC 4787 REQ-9)"
		}
		add("hairpinning", r, m, t)
	} else {
		add("hairpinning", r, reason(rep, "hairpinning", ""), toneNeutral)
	}
}

// portRows: port preservation, parity and contiguity (RFC 4787 §4.2).
func portRows(rep *classifier.Report, add func(b, r, m string, t tone)) {
	addBool := func(name, field string, b *bool, yes, no string) {
		r, ok := boolResult(b, "yes", "no")
		m := reason(rep, field, "")
		if ok {
			m = no
			if *b {
				m = yes
			}
		}
		add(name, r, m, toneNeutral)
	}
	addBool("port preservation", "port_preservation", rep.PortPreservation, "the public port is the local port", "the NAT picks another public port")
	addBool("port parity", "port_parity", rep.PortParity, "even local ports map to even public ports (RFC 4787 §4.2.2)", "parity is not kept")
	addBool("port contiguity", "port_contiguity", rep.PortContiguity, "consecutive local ports map to consecutive public ports", "consecutive local ports are not kept together")
}

// poolingLifetimeRows: IP pooling (RFC 4787 §4.1) and the mapping
// lifetime (§4.3).
func poolingLifetimeRows(rep *classifier.Report, add func(b, r, m string, t tone)) {
	if rep.IPPooling != nil {
		t, m := toneGood, "one public IP per host"
		if *rep.IPPooling == classifier.PoolingArbitrary {
			t, m = toneWarn, "the public IP changes with the destination (RFC 4787 REQ-2 asks for paired)"
		}
		add("IP pooling", string(*rep.IPPooling), m, t)
	} else {
		add("IP pooling", "not measured", reason(rep, "ip_pooling", ""), toneNeutral)
	}
	lt := rep.MappingLifetime
	switch {
	case lt == nil:
		add("mapping lifetime", "not measured", reason(rep, "mapping_lifetime", "use --lifetime to measure it"), toneNeutral)
	case lt.MaxS == nil:
		// Still alive at the longest idle time tried.
		t := toneGood
		if lt.MinS < 120 {
			t = toneWarn
		}
		add("mapping lifetime", fmt.Sprintf("> %g s", lt.MinS), "the mapping outlived the longest idle time tried (--lifetime-max)", t)
	default:
		t := toneGood
		if *lt.MaxS < 120 {
			t = toneWarn // RFC 4787 REQ-5: at least 2 minutes
		}
		add("mapping lifetime", fmt.Sprintf("%g-%g s", lt.MinS, *lt.MaxS), "an idle mapping expires in this bracket; keep-alives must come more often", t)
	}
}

// legacyRelayRows: the RFC 3489 name and the TURN relay's proof.
func legacyRelayRows(rep *classifier.Report, add func(b, r, m string, t tone)) {
	lt := toneNeutral
	switch rep.LegacyType {
	case classifier.LegacySymmetric, classifier.LegacyUDPBlocked:
		lt = toneBad
	case classifier.LegacyInconclusive:
		lt = toneUnknown
	case classifier.LegacyOpen, classifier.LegacyFullCone:
		lt = toneGood
	}
	add("legacy type", orNot(string(rep.LegacyType)), "RFC 3489 name, for older tools and tickets", lt)

	if r := rep.Relay; r != nil {
		if r.OK {
			add("TURN relay", "works", fmt.Sprintf("over %s via %s: rtt %.1f ms, loss %.0f%%", r.Transport, r.RelayedAddress, r.RTTMS, 100*r.Loss), toneGood)
		} else {
			add("TURN relay", "failed", r.Error, toneBad)
		}
	} else {
		r, why, t := relayNotTried(rep)
		add("TURN relay", r, why, t)
	}
}

// relayNotTried says why there is no relay result: not needed, or needed
// but not tried (the report's reason).
func relayNotTried(rep *classifier.Report) (result, why string, t tone) {
	if why, ok := rep.Reasons["relay"]; ok {
		return "not tried", why, toneWarn
	}
	switch rep.Mapping {
	case classifier.MappingEndpointIndependent:
		return "not needed", "the mapping is endpoint-independent: media can flow directly (--relay proves the relay anyway)", toneGood
	default:
		return "not tried", "the mapping was not settled; --relay with TURN credentials proves the relay", toneNeutral
	}
}

// relayLine is the relay result in one line, for the report's header.
func relayLine(rep *classifier.Report) string {
	if r := rep.Relay; r != nil {
		if r.OK {
			return fmt.Sprintf("works over %s via %s: rtt %.1f ms, loss %.0f%%", r.Transport, r.RelayedAddress, r.RTTMS, 100*r.Loss)
		}

		return "failed over " + r.Transport + ": " + r.Error
	}
	r, why, _ := relayNotTried(rep)

	return r + ": " + why
}

// verdict is the report's conclusion in one line: the SIP/RTP summary
// (which names the NAT in legacy and RFC 4787 terms), or those terms alone.
func verdict(rep *classifier.Report) string {
	v := rep.SIPRTP.Summary
	if v == "" {
		v = fmt.Sprintf("%s/%s (%s)", orNot(string(rep.Mapping)), orNot(string(rep.Filtering)), orNot(string(rep.LegacyType)))
	}
	if rep.Inconclusive() {
		v += " Inconclusive: " + strings.Join(rep.InconclusiveFields, ", ") + "."
	}

	return v
}

func orNot(s string) string {
	if s == "" {
		return "not measured"
	}

	return s
}

// reason returns the report's reason for field, or def.
func reason(rep *classifier.Report, field, def string) string {
	if r, ok := rep.Reasons[field]; ok && r != "" {
		return r
	}

	return def
}

func renderText(w io.Writer, rep *classifier.Report, meta runMeta, color bool) error {
	paint := func(t tone, s string) string {
		if !color || toneSGR[t] == "" {
			return s
		}

		return "\x1b[" + toneSGR[t] + "m" + s + "\x1b[0m"
	}
	bold := func(s string) string {
		if !color || s == "" {
			return s
		}

		return "\x1b[1m" + s + "\x1b[0m"
	}
	if h := classifier.ALGHeadline(rep); h != "" {
		fmt.Fprintf(w, "%s\n\n", paint(toneBad, bold(h)))
	}
	fmt.Fprintf(w, "natprobe %s: %s at %s (probe id %s)\n\n", appVersion(), rep.Server, rfc3339(meta.time), rep.ProbeID)

	header := row{"behaviour", "result", "meaning", toneNeutral}
	if err := table(w, &header, rows(rep), "", paint, bold); err != nil {
		return err
	}

	props, needs := sipRows(rep.SIPRTP)
	if len(props) > 0 || rep.SIPRTP.Summary != "" {
		fmt.Fprintf(w, "\n%s %s\n", bold("SIP/RTP:"), rep.SIPRTP.Summary)
		if err := table(w, nil, props, "  ", paint, bold); err != nil {
			return err
		}
		if k := keepalive(rep.SIPRTP); k != "" {
			fmt.Fprintf(w, "  %s\n", k)
		}
	}
	if len(needs) > 0 {
		fmt.Fprintf(w, "\n%s\n", bold("SIP server side needs:"))
		if err := table(w, nil, needs, "  ", paint, bold); err != nil {
			return err
		}
	}
	if len(rep.Anomalies) > 0 {
		fmt.Fprintf(w, "\n%s\n", bold("anomalies"))
		for _, a := range rep.Anomalies {
			fmt.Fprintf(w, "  %s\n", a)
		}
	}
	if extra := otherReasons(rep); len(extra) > 0 {
		fmt.Fprintf(w, "\n%s\n", bold("inconclusive or not measured"))
		for _, l := range extra {
			fmt.Fprintf(w, "  %s\n", l)
		}
	}
	_, err := fmt.Fprintf(w, "\ntook %s\n", time.Duration(rep.DurationMS)*time.Millisecond)

	return err
}

// table prints rs, under header when there is one (in bold), as aligned
// columns two spaces apart. Each cell is padded on its visible width before
// it is coloured: the escape sequences take bytes but no columns, so they
// must never count in the padding (text/tabwriter would count them).
func table(w io.Writer, header *row, rs []row, indent string, paint func(tone, string) string, bold func(string) string) error {
	all := rs
	if header != nil {
		all = append([]row{*header}, rs...)
	}
	wb, wr := 0, 0
	for _, r := range all {
		wb, wr = max(wb, visibleWidth(r.behaviour)), max(wr, visibleWidth(r.result))
	}
	// cells pads the first two cells of a row, and the second only when a
	// third follows it: no line ends in spaces.
	cells := func(r row) (string, string) {
		res := r.result
		if r.meaning != "" {
			res = pad(res, wr)
		}

		return pad(r.behaviour, wb), res
	}
	line := func(b, r, m string) error {
		if m != "" {
			m = "  " + m
		}
		_, err := fmt.Fprintf(w, "%s%s  %s%s\n", indent, b, r, m)

		return err
	}
	if header != nil {
		b, r := cells(*header)
		if err := line(bold(b), bold(r), bold(header.meaning)); err != nil {
			return err
		}
	}
	for _, row := range rs {
		b, r := cells(row)
		if err := line(b, paint(row.tone, r), row.meaning); err != nil {
			return err
		}
	}

	return nil
}

// visibleWidth is how many columns s takes on a terminal: one per rune (the
// table's cells are plain text; the colour is added after padding).
func visibleWidth(s string) int {
	return utf8.RuneCountInString(s)
}

func pad(s string, width int) string {
	if n := visibleWidth(s); n < width {
		return s + strings.Repeat(" ", width-n)
	}

	return s
}

// otherReasons lists the reasons not already shown in the table.
func otherReasons(rep *classifier.Report) []string {
	shown := map[string]bool{"mapping": true, "filtering": true, "hairpinning": true, "port_preservation": true,
		"port_parity": true, "port_contiguity": true, "ip_pooling": true, "mapping_lifetime": true, "relay": true}
	var out []string
	for k, v := range rep.Reasons {
		if !shown[k] {
			out = append(out, k+": "+v)
		}
	}
	sort.Strings(out)

	return out
}

// statusTone colours a SIP/RTP judgement.
func statusTone(st string) tone {
	switch st {
	case string(classifier.StatusGood), string(classifier.NeedNotNeeded):
		return toneGood
	case string(classifier.StatusBad), string(classifier.NeedRequired):
		return toneBad
	case string(classifier.NeedConditional):
		return toneWarn
	default:
		return toneUnknown
	}
}

// sipRows are the SIP/RTP verdict lines: each property of the seed's list,
// then what the SIP server side needs.
func sipRows(s classifier.SIPRTP) (props, needs []row) {
	for _, p := range s.Properties {
		props = append(props, row{p.Property, string(p.Status), p.Why, statusTone(string(p.Status))})
	}
	for _, n := range s.ServerNeeds {
		needs = append(needs, row{n.Need, string(n.Status), n.Why, statusTone(string(n.Status))})
	}

	return props, needs
}

// keepalive is the keep-alive advice in one line.
func keepalive(s classifier.SIPRTP) string {
	if s.KeepaliveIntervalS > 0 {
		return fmt.Sprintf("keep-alive every %d s (%s)", s.KeepaliveIntervalS, s.KeepaliveBasis)
	}
	if s.KeepaliveBasis != "" {
		return "keep-alive: " + s.KeepaliveBasis
	}

	return ""
}

// mdEscape keeps a table cell in one piece.
func mdEscape(s string) string {
	return strings.NewReplacer("|", `\|`, "\n", " ").Replace(s)
}

// renderMarkdown prints a report to paste into a ticket: the run's
// identity and the verdict first, then the behaviour table, the SIP/RTP
// reading and what the SIP server side needs.
func renderMarkdown(w io.Writer, rep *classifier.Report, meta runMeta) error {
	if h := classifier.ALGHeadline(rep); h != "" {
		fmt.Fprintf(w, "**%s**\n\n", mdEscape(h))
	}
	fmt.Fprintf(w, "### natprobe report: %s\n\n", mdEscape(rep.Server))
	fmt.Fprintf(w, "| | |\n|---|---|\n")
	fmt.Fprintf(w, "| verdict | %s |\n", mdEscape(verdict(rep)))
	fmt.Fprintf(w, "| relay | %s |\n", mdEscape(relayLine(rep)))
	fmt.Fprintf(w, "| server | `%s` |\n", mdEscape(rep.Server))
	fmt.Fprintf(w, "| time | %s |\n", rfc3339(meta.time))
	fmt.Fprintf(w, "| natprobe | %s |\n", mdEscape(appVersion()))
	fmt.Fprintf(w, "| probe id | `%s` |\n", mdEscape(rep.ProbeID))
	fmt.Fprintf(w, "| duration | %d ms |\n\n", rep.DurationMS)

	fmt.Fprintf(w, "| behaviour | result | meaning |\n|---|---|---|\n")
	for _, r := range rows(rep) {
		fmt.Fprintf(w, "| %s | **%s** | %s |\n", mdEscape(r.behaviour), mdEscape(r.result), mdEscape(r.meaning))
	}
	props, needs := sipRows(rep.SIPRTP)
	if len(props) > 0 || rep.SIPRTP.Summary != "" {
		fmt.Fprintf(w, "\n#### SIP/RTP\n\n%s\n\n", mdEscape(rep.SIPRTP.Summary))
		fmt.Fprintf(w, "| property | verdict | why |\n|---|---|---|\n")
		for _, r := range props {
			fmt.Fprintf(w, "| %s | **%s** | %s |\n", mdEscape(r.behaviour), mdEscape(r.result), mdEscape(r.meaning))
		}
		if k := keepalive(rep.SIPRTP); k != "" {
			fmt.Fprintf(w, "\n%s\n", mdEscape(k))
		}
	}
	if len(needs) > 0 {
		fmt.Fprintf(w, "\n#### SIP server side\n\n| need | status | why |\n|---|---|---|\n")
		for _, r := range needs {
			fmt.Fprintf(w, "| %s | **%s** | %s |\n", mdEscape(r.behaviour), mdEscape(r.result), mdEscape(r.meaning))
		}
	}
	if len(rep.Anomalies) > 0 {
		fmt.Fprintf(w, "\n#### Anomalies\n\n")
		for _, a := range rep.Anomalies {
			fmt.Fprintf(w, "- %s\n", mdEscape(a))
		}
	}
	if extra := otherReasons(rep); len(extra) > 0 {
		fmt.Fprintf(w, "\n#### Inconclusive or not measured\n\n")
		for _, l := range extra {
			fmt.Fprintf(w, "- %s\n", mdEscape(l))
		}
	}

	return nil
}
