package main

// Tests of what people read: the markdown ticket report, the probe ID as it
// travels to stund's log, --watch, completion and --version.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stund/stund/classifier"
	"github.com/stund/stund/internal/testutil"
	"github.com/stund/stund/server"
)

// behaviourRows are the rows every report's behaviour table carries, in
// order (UDP and NAT only when the server answered, as it does here).
var behaviourRows = []string{"UDP", "NAT", "mapping", "filtering", "hairpinning", "port preservation",
	"port parity", "port contiguity", "IP pooling", "mapping lifetime", "SIP ALG (UDP)", "SIP ALG (TCP)", "legacy type", "TURN relay"}

// mdTable is one markdown table: its header cells and its rows.
type mdTable struct {
	header []string
	rows   [][]string
}

// splitRow splits "| a | b \| c |" into cells, honouring \| escapes.
func splitRow(line string) []string {
	line = strings.TrimSpace(line)
	line = strings.TrimSuffix(strings.TrimPrefix(line, "|"), "|")
	var cells []string
	var cur strings.Builder
	for i := 0; i < len(line); i++ {
		switch {
		case line[i] == '\\' && i+1 < len(line) && line[i+1] == '|':
			cur.WriteByte('|')
			i++
		case line[i] == '|':
			cells = append(cells, strings.TrimSpace(cur.String()))
			cur.Reset()
		default:
			cur.WriteByte(line[i])
		}
	}

	return append(cells, strings.TrimSpace(cur.String()))
}

// parseTables finds every GitHub-style table: a header line, a |---|
// delimiter line with as many cells, then rows with as many cells.
func parseTables(t *testing.T, md string) []mdTable {
	t.Helper()
	lines := strings.Split(md, "\n")
	var tables []mdTable
	delim := regexp.MustCompile(`^\|(-{3,}\|)+$`)
	for i := 0; i+1 < len(lines); i++ {
		if !strings.HasPrefix(lines[i], "|") || !delim.MatchString(lines[i+1]) {
			continue
		}
		tb := mdTable{header: splitRow(lines[i])}
		if n := len(splitRow(lines[i+1])); n != len(tb.header) {
			t.Fatalf("table at line %d: header has %d cells, delimiter %d", i+1, len(tb.header), n)
		}
		j := i + 2
		for ; j < len(lines) && strings.HasPrefix(lines[j], "|"); j++ {
			cells := splitRow(lines[j])
			if len(cells) != len(tb.header) {
				t.Fatalf("line %d has %d cells, want %d: %q", j+1, len(cells), len(tb.header), lines[j])
			}
			tb.rows = append(tb.rows, cells)
		}
		tables = append(tables, tb)
		i = j - 1
	}

	return tables
}

// The markdown report is for a ticket: it names the server, the time (UTC,
// RFC 3339), natprobe's version and the probe ID, says the verdict and the
// relay result, and has a row for every behaviour.
func TestMarkdownReport(t *testing.T) {
	addr := startStund(t, false)
	before := time.Now().Add(-time.Second)
	r := natprobe(t, "--format", "markdown", addr)
	if r.code != exitClassified {
		t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
	}
	tables := parseTables(t, r.stdout)
	if len(tables) < 4 {
		t.Fatalf("%d tables, want the summary, behaviours, SIP/RTP and server side:\n%s", len(tables), r.stdout)
	}

	summary := map[string]string{}
	for _, row := range tables[0].rows {
		summary[row[0]] = row[1]
	}
	if summary["server"] != "`"+addr+"`" {
		t.Errorf("server %q, want `%s`", summary["server"], addr)
	}
	if !regexp.MustCompile("^`[0-9a-f]{8}`$").MatchString(summary["probe id"]) {
		t.Errorf("probe id %q", summary["probe id"])
	}
	if summary["natprobe"] != appVersion() {
		t.Errorf("natprobe version %q, want %q", summary["natprobe"], appVersion())
	}
	ts, err := time.Parse(time.RFC3339, summary["time"])
	if err != nil || !strings.HasSuffix(summary["time"], "Z") {
		t.Errorf("time %q is not RFC 3339 UTC: %v", summary["time"], err)
	} else if ts.Before(before.Truncate(time.Second)) || ts.After(time.Now()) {
		t.Errorf("time %v is not the time of the run (started after %v)", ts, before)
	}
	if v := summary["verdict"]; !strings.Contains(v, "(EIM/EIF)") || !strings.Contains(v, "SIP") {
		t.Errorf("verdict %q", v)
	}
	if v := summary["relay"]; !strings.HasPrefix(v, "not needed") {
		t.Errorf("relay %q: EIM needs no relay", v)
	}

	bt := tables[1]
	if strings.Join(bt.header, ",") != "behaviour,result,meaning" {
		t.Fatalf("behaviour table header %v", bt.header)
	}
	var got []string
	results := map[string]string{}
	for _, row := range bt.rows {
		got = append(got, row[0])
		results[row[0]] = strings.Trim(row[1], "*")
		if row[1] == "" || row[2] == "" && row[0] != "hairpinning" {
			t.Errorf("row %v has an empty cell", row)
		}
	}
	if strings.Join(got, ",") != strings.Join(behaviourRows, ",") {
		t.Errorf("behaviour rows\n got %v\nwant %v", got, behaviourRows)
	}
	for k, v := range map[string]string{"mapping": "EIM", "filtering": "EIF", "NAT": "no", "hairpinning": "yes", "legacy type": "open", "TURN relay": "not needed"} {
		if results[k] != v {
			t.Errorf("%s = %q, want %q", k, results[k], v)
		}
	}
	if h := strings.Join(tables[2].header, ","); h != "property,verdict,why" || len(tables[2].rows) == 0 {
		t.Errorf("SIP/RTP table %v with %d rows", tables[2].header, len(tables[2].rows))
	}
}

// A cell holding "|" stays one cell.
func TestMarkdownEscapesPipes(t *testing.T) {
	rep := fakeReport()
	rep.Relay = &classifier.RelayReport{Transport: "udp", Error: "a | b"}
	var b bytes.Buffer
	if err := renderMarkdown(&b, rep, runMeta{time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	for _, tb := range parseTables(t, b.String()) {
		for _, row := range tb.rows {
			if row[0] == "TURN relay" && row[2] != "a | b" {
				t.Errorf("relay row %q", row)
			}
		}
	}
}

// startStundLogged is startStund with stund's log captured (JSON lines).
func startStundLogged(t *testing.T) (string, *testutil.SyncBuffer) {
	t.Helper()
	logs := &testutil.SyncBuffer{}
	s, err := server.New(server.Config{
		PrimaryIP:   netip.MustParseAddr("127.0.0.1"),
		AlternateIP: netip.MustParseAddr("127.0.0.2"),
		Users:       map[string]string{testUser: testPass},
		AllowPeers:  []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
		Logger:      slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelInfo})),
	})
	if err != nil {
		t.Fatalf("server.New: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })

	return s.Grid()[0][0].String(), logs
}

// probeLines returns stund's "natprobe probe" log lines.
func probeLines(t *testing.T, logs string) []map[string]any {
	t.Helper()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(logs), "\n") {
		var m map[string]any
		if l == "" || json.Unmarshal([]byte(l), &m) != nil {
			continue
		}
		if m["msg"] == "natprobe probe" {
			out = append(out, m)
		}
	}

	return out
}

// The probe ID natprobe prints is the one it sent in SOFTWARE: stund logs
// it once per run, at info, with the client address and natprobe's
// version, so an operator finds the customer's run by the ID in the ticket.
func TestProbeIDInStundLog(t *testing.T) {
	addr, logs := startStundLogged(t)

	r := natprobe(t, "--json", addr)
	if r.code != exitClassified {
		t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
	}
	m := decodeOne(t, r.stdout)
	id, _ := m["probe_id"].(string)
	if m["natprobe_version"] != appVersion() {
		t.Errorf("natprobe_version %v", m["natprobe_version"])
	}

	r2 := natprobe(t, addr) // text: the ID is printed for people
	m2 := regexp.MustCompile(`\(probe id ([0-9a-f]{8})\)`).FindStringSubmatch(r2.stdout)
	if m2 == nil {
		t.Fatalf("text report prints no probe id:\n%s", r2.stdout)
	}
	id2 := m2[1]
	if id == id2 {
		t.Fatalf("two runs share the probe id %s", id)
	}

	lines := probeLines(t, logs.String())
	count := map[string]int{}
	for _, l := range lines {
		pid, _ := l["probe_id"].(string)
		count[pid]++
		if l["level"] != "INFO" || l["natprobe"] != appVersion() || !strings.HasPrefix(fmt.Sprint(l["client"]), "127.0.0.1:") {
			t.Errorf("log line %v", l)
		}
	}
	if count[id] != 1 || count[id2] != 1 || len(count) != 2 {
		t.Errorf("probe log lines by id %v, want exactly one for %s (json run) and %s (text run)\n%s", count, id, id2, logs.String())
	}
}

// fakeReport is a settled EIM/EIF report, as from a host without NAT.
func fakeReport() *classifier.Report {
	yes, no := true, false
	paired := classifier.PoolingPaired

	return &classifier.Report{
		Schema: classifier.Schema, Server: "127.0.0.1:3478",
		LocalAddress:  netip.MustParseAddrPort("127.0.0.1:40000"),
		MappedAddress: netip.MustParseAddrPort("127.0.0.1:40000"),
		NATDetected:   &no, Mapping: classifier.MappingEndpointIndependent, Filtering: classifier.FilteringEndpointIndependent,
		Hairpinning: &yes, PortPreservation: &yes, PortParity: &yes, PortContiguity: &yes, IPPooling: &paired,
		ALGDetected: &no, LegacyType: classifier.LegacyOpen,
		SIPRTP:  classifier.SIPRTP{Summary: "No NAT."},
		Reasons: map[string]string{}, InconclusiveFields: []string{}, Anomalies: []string{},
	}
}

// fakeProbe returns reports from script, one per call (run n gets
// script(n)); every run moves the local and mapped port, as real runs do,
// which --watch must not report.
type fakeProbe struct {
	mu       sync.Mutex
	runs     int
	script   func(run int, rep *classifier.Report) error
	software []string
}

func (f *fakeProbe) probe(_ context.Context, cfg classifier.Config) (*classifier.Report, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.runs++
	f.software = append(f.software, cfg.Software)
	rep := fakeReport()
	rep.ProbeID = cfg.ProbeID
	port := uint16(40000 + 2*f.runs)
	rep.LocalAddress = netip.AddrPortFrom(rep.LocalAddress.Addr(), port)
	rep.MappedAddress = netip.AddrPortFrom(rep.MappedAddress.Addr(), port)
	if err := f.script(f.runs, rep); err != nil {
		if errors.Is(err, classifier.ErrUnreachable) {
			// As the classifier does: a udp-blocked report with the error.
			blocked := &classifier.Report{Schema: classifier.Schema, ProbeID: cfg.ProbeID, Server: cfg.Server}
			blocked.SetUDPBlocked("no reply to 90 requests in 3s")

			return blocked, err
		}

		return nil, err
	}

	return rep, nil
}

func watchOptions(format string, count int, f *fakeProbe) *options {
	return &options{
		server: "127.0.0.1:3478", format: format, hairpin: true, lifetimeMax: defaultLifetimeMax,
		timeout: 5 * time.Second, watch: time.Millisecond, watchCount: count, probeFn: f.probe,
	}
}

// hairpinOffFrom3 turns hairpinning off from the third run on.
func hairpinOffFrom3(run int, rep *classifier.Report) error {
	if run >= 3 {
		no := false
		rep.Hairpinning = &no
	}

	return nil
}

// --watch prints the full report once, then only what changed: a field
// that changes on the third of five runs gives exactly one line, and the
// ports that move on every run give none.
func TestWatchPrintsOnlyChanges(t *testing.T) {
	for _, format := range formats {
		t.Run(format, func(t *testing.T) {
			f := &fakeProbe{script: hairpinOffFrom3}
			var out, errb bytes.Buffer
			code, err := probe(context.Background(), watchOptions(format, 5, f), &out, &errb)
			if err != nil || code != exitClassified {
				t.Fatalf("exit %d: %v; stderr %q", code, err, errb.String())
			}
			if f.runs != 5 {
				t.Errorf("%d runs, want 5 (--watch-count 5)", f.runs)
			}
			// One probe ID for the whole session, in every request.
			for _, s := range f.software[1:] {
				if s != f.software[0] || !strings.Contains(s, " probe-id=") {
					t.Errorf("SOFTWARE %q, first run %q", s, f.software[0])
				}
			}
			s := out.String()
			switch format {
			case "text":
				if n := strings.Count(s, "behaviour "); n != 1 {
					t.Errorf("%d full reports, want 1:\n%s", n, s)
				}
				tail := s[strings.Index(s, "changes follow\n")+len("changes follow\n"):]
				lines := strings.Split(strings.TrimSpace(tail), "\n")
				re := regexp.MustCompile(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  hairpinning  yes → no$`)
				if len(lines) != 1 || !re.MatchString(lines[0]) {
					t.Errorf("change lines %q, want one hairpinning yes → no", lines)
				}
			case "markdown":
				tables := parseTables(t, s)
				last := tables[len(tables)-1]
				if strings.Join(last.header, ",") != "time,field,old,new" || len(last.rows) != 1 ||
					strings.Join(last.rows[0][1:], ",") != "hairpinning,yes,no" {
					t.Errorf("changes table %v %v", last.header, last.rows)
				}
			case "json":
				lines := strings.Split(strings.TrimSpace(s), "\n")
				if len(lines) != 2 {
					t.Fatalf("%d NDJSON lines, want the report and one change:\n%s", len(lines), s)
				}
				checkSchema(t, decodeOne(t, lines[0]))
				ch := decodeOne(t, lines[1])
				want := map[string]any{"schema": changeSchema, "field": "hairpinning", "old": true, "new": false,
					"probe_id": decodeOne(t, lines[0])["probe_id"], "run": json.Number("3")}
				for k, v := range want {
					if ch[k] != v {
						t.Errorf("change %s = %v, want %v", k, ch[k], v)
					}
				}
				if _, err := time.Parse(time.RFC3339, fmt.Sprint(ch["time"])); err != nil {
					t.Errorf("change time: %v", err)
				}
			}
		})
	}
}

// A server that stops answering is a change, and so is its return; the
// other fields keep their values through the outage.
func TestWatchUnreachable(t *testing.T) {
	f := &fakeProbe{script: func(run int, _ *classifier.Report) error {
		if run == 2 || run == 3 {
			return fmt.Errorf("no STUN reply: %w", classifier.ErrUnreachable)
		}

		return nil
	}}
	var out, errb bytes.Buffer
	code, err := probe(context.Background(), watchOptions("text", 4, f), &out, &errb)
	if err != nil || code != exitClassified {
		t.Fatalf("exit %d: %v", code, err)
	}
	tail := out.String()[strings.Index(out.String(), "changes follow\n")+len("changes follow\n"):]
	lines := strings.Split(strings.TrimSpace(tail), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], "reachable  yes → no (") || !strings.Contains(lines[0], "no reply over UDP") ||
		!strings.HasSuffix(lines[1], "reachable  no → yes") {
		t.Errorf("change lines %q", lines)
	}
}

// Ctrl-C (the context ending) stops --watch between runs or within one,
// without a half-printed line and with the last completed run's status.
func TestWatchStopsOnInterrupt(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	f := &fakeProbe{}
	f.script = func(run int, _ *classifier.Report) error {
		if run == 3 {
			cancel() // as SIGINT does through signal.NotifyContext
		}

		return nil
	}
	var out, errb bytes.Buffer
	o := watchOptions("json", 0, f) // unbounded: only the interrupt ends it
	done := make(chan struct{})
	var code int
	var err error
	go func() {
		defer close(done)
		code, err = probe(ctx, o, &out, &errb)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second): // safety net, not an assertion of speed
		t.Fatal("--watch did not stop on interrupt")
	}
	if err != nil || code != exitClassified {
		t.Errorf("exit %d: %v", code, err)
	}
	if f.runs != 3 {
		t.Errorf("%d runs, want 3", f.runs)
	}
	if lines := strings.Split(strings.TrimSpace(out.String()), "\n"); len(lines) != 1 {
		t.Errorf("output %q, want only the first report", out.String())
	}
}

// A session whose server never answered ends with the server's error.
func TestWatchNeverReachable(t *testing.T) {
	f := &fakeProbe{script: func(int, *classifier.Report) error { return classifier.ErrUnreachable }}
	var out, errb bytes.Buffer
	code, err := probe(context.Background(), watchOptions("text", 2, f), &out, &errb)
	if code != exitServer || err == nil || out.Len() != 0 {
		t.Errorf("exit %d, err %v, stdout %q", code, err, out.String())
	}
	if n := strings.Count(errb.String(), "retrying"); n != 2 {
		t.Errorf("stderr %q: want one line per failed run", errb.String())
	}
}

func TestWatchUsage(t *testing.T) {
	for _, args := range [][]string{
		{"--watch", "10ms", "127.0.0.1"},
		{"--watch", "soon", "127.0.0.1"},
		{"--watch-count", "3", "127.0.0.1"},
		{"--watch", "5s", "--watch-count", "0", "127.0.0.1"},
	} {
		r := natprobe(t, args...)
		if r.code != exitUsage || r.stdout != "" || !strings.Contains(r.stderr, "USAGE:") {
			t.Errorf("%v: exit %d, stdout %q, stderr %q", args, r.code, r.stdout, r.stderr)
		}
	}
}

func TestBashCompletion(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "--json\n--format\n"}, // a prefix of the full list
		{[]string{"--fo"}, "--format\n"},
		{[]string{"--watch"}, "--watch\n--watch-count\n"},
		{[]string{"--format"}, "text\njson\nmarkdown\n"},
		{[]string{"--format", "m"}, "markdown\n"},
		{[]string{"--turn-transport", "t"}, "tcp\ntls\n"},
	} {
		r := natprobe(t, append(tc.args, "--generate-bash-completion")...)
		if r.code != 0 || !strings.HasPrefix(r.stdout, tc.want) || (tc.args != nil && r.stdout != tc.want) {
			t.Errorf("%v: exit %d, completions %q, want %q", tc.args, r.code, r.stdout, tc.want)
		}
		if tc.args == nil && !strings.Contains(r.stdout, "--watch-count\n") {
			t.Errorf("all flags: %q lacks --watch-count", r.stdout)
		}
	}
}

// The built binary: -ldflags -X main.version sets what --version prints,
// the version in SOFTWARE (stund logs it) and natprobe_version in JSON;
// and SIGINT stops --watch cleanly (exit 0 after a report).
func TestBinaryVersionAndSIGINT(t *testing.T) {
	if testing.Short() {
		t.Skip("builds natprobe")
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go command to build natprobe")
	}
	bin := filepath.Join(t.TempDir(), "natprobe")
	const ver = "9.8.7-test"
	build := exec.Command(goBin, "build", "-ldflags", "-X main.version="+ver, "-o", bin, ".")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out, err := exec.Command(bin, "--version").Output()
	if err != nil || string(out) != "natprobe version "+ver+"\n" {
		t.Fatalf("--version: %q %v", out, err)
	}

	addr, logs := startStundLogged(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second) // safety net
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, "--json", "--watch", "1s", addr)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// The first NDJSON line is the full report; then interrupt.
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		t.Fatalf("no first report: %v (stderr %q)", err, stderr.String())
	}
	var rep map[string]any
	if err := json.Unmarshal([]byte(line), &rep); err != nil {
		t.Fatalf("first line %q: %v", line, err)
	}
	if rep["natprobe_version"] != ver {
		t.Errorf("natprobe_version %v, want %s", rep["natprobe_version"], ver)
	}
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	rest, _ := io.ReadAll(stdout)
	err = cmd.Wait()
	var ee *exec.ExitError
	if errors.As(err, &ee) || err != nil {
		t.Errorf("after SIGINT: %v (stderr %q)", err, stderr.String())
	}
	// Loopback does not change: nothing after the first report.
	if len(bytes.TrimSpace(rest)) != 0 {
		t.Errorf("changes printed on an unchanging path: %q", rest)
	}
	found := false
	for _, l := range probeLines(t, logs.String()) {
		found = found || (l["probe_id"] == rep["probe_id"] && l["natprobe"] == ver)
	}
	if !found {
		t.Errorf("stund logged no probe line with id %v and version %s:\n%s", rep["probe_id"], ver, logs.String())
	}
	_ = os.Remove(bin)
}
