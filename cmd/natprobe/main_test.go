package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"encoding/pem"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stund/stund/classifier"
	"github.com/stund/stund/internal/testutil"
	"github.com/stund/stund/server"
)

const (
	testUser = "alice"
	testPass = "alice-pw"
)

// startStund runs the real server on 127.0.0.1 + 127.0.0.2 (RFC 5780 needs
// two addresses), or on 127.0.0.1 alone when singleIP.
func startStund(t *testing.T, singleIP bool) string {
	t.Helper()

	return startStundServer(t, singleIP, "").Grid()[0][0].String()
}

// startStundServer is startStund with a realm ("" = the server's default),
// returning the server.
func startStundServer(t *testing.T, singleIP bool, realm string) *server.Server {
	t.Helper()
	cfg := server.Config{
		Realm:       realm,
		PrimaryIP:   netip.MustParseAddr("127.0.0.1"),
		AlternateIP: netip.MustParseAddr("127.0.0.2"),
		Users:       map[string]string{testUser: testPass},
		AllowPeers:  []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
	}
	if singleIP {
		cfg.AlternateIP = netip.Addr{}
	}
	s, err := server.New(cfg)
	if err != nil {
		t.Fatalf("server.New: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })

	return s
}

type result struct {
	code           int
	stdout, stderr string
}

// natprobe runs the command in-process, as main would.
func natprobe(t *testing.T, args ...string) result {
	t.Helper()
	// A safety net, not an assertion: the run bounds itself.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var out, errb bytes.Buffer
	code := run(ctx, append([]string{"natprobe"}, args...), &out, &errb)

	return result{code, out.String(), errb.String()}
}

// decodeOne parses stdout as exactly one JSON object and nothing else.
func decodeOne(t *testing.T, s string) map[string]any {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(s))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		t.Fatalf("stdout is not a JSON object: %v\n%s", err, s)
	}
	if _, err := dec.Token(); err != io.EOF {
		t.Fatalf("stdout holds more than one JSON value: %q", s)
	}

	return m
}

// kind names a JSON value's type as the schema does.
func kind(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case bool:
		return "bool"
	case string:
		return "string"
	case json.Number:
		return "number"
	case map[string]any:
		return "object"
	case []any:
		return "array"
	}

	return "?"
}

// The natprobe/1 schema (docs/natprobe-json.md): field → allowed kinds.
var schema = map[string][]string{
	"schema":                 {"string"},
	"server":                 {"string"},
	"local_address":          {"string"},
	"mapped_address":         {"string"},
	"nat_detected":           {"bool", "null"},
	"mapping":                {"string"},
	"filtering":              {"string"},
	"hairpinning":            {"bool", "null"},
	"port_preservation":      {"bool", "null"},
	"port_parity":            {"bool", "null"},
	"port_contiguity":        {"bool", "null"},
	"ip_pooling":             {"string", "null"},
	"mapping_lifetime":       {"object", "null"},
	"alg_detected":           {"bool", "null"},
	"stun_payload_rewritten": {"bool", "null"},
	"sip":                    {"object", "null"},
	"legacy_type":            {"string"},
	"sip_rtp":                {"object"},
	"relay":                  {"object", "null"},
	"reasons":                {"object"},
	"duration_ms":            {"number"},
	"probe_id":               {"string"},
}

func checkSchema(t *testing.T, m map[string]any) {
	t.Helper()
	for field, kinds := range schema {
		v, ok := m[field]
		if !ok {
			t.Errorf("field %q missing", field)

			continue
		}
		found := false
		for _, k := range kinds {
			found = found || kind(v) == k
		}
		if !found {
			t.Errorf("field %q is %s (%v), want %v", field, kind(v), v, kinds)
		}
	}
	if m["schema"] != "natprobe/1" {
		t.Errorf("schema %v", m["schema"])
	}
}

func TestJSONAgainstStund(t *testing.T) {
	addr := startStund(t, false)
	r := natprobe(t, "--json", addr)
	if r.code != exitClassified {
		t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
	}
	if r.stderr != "" {
		t.Errorf("stderr is not a terminal, yet it got %q", r.stderr)
	}
	m := decodeOne(t, r.stdout)
	checkSchema(t, m)
	// Loopback: no NAT, so EIM/EIF and the "open" legacy type.
	want := map[string]any{"server": addr, "nat_detected": false, "mapping": "EIM", "filtering": "EIF", "legacy_type": "open", "relay": nil}
	for k, v := range want {
		if m[k] != v {
			t.Errorf("%s = %v, want %v", k, m[k], v)
		}
	}
	if _, err := netip.ParseAddrPort(m["mapped_address"].(string)); err != nil {
		t.Errorf("mapped_address: %v", err)
	}
	if id, _ := m["probe_id"].(string); len(id) != 8 {
		t.Errorf("probe_id %q", id)
	}
	if d, _ := m["duration_ms"].(json.Number).Int64(); d <= 0 {
		t.Errorf("duration_ms %v", m["duration_ms"])
	}
}

func TestRelayForced(t *testing.T) {
	addr := startStund(t, false)
	// Credentials from the environment, as a support script would pass them.
	t.Setenv("NATPROBE_TURN_USER", testUser)
	t.Setenv("NATPROBE_TURN_PASS", testPass)
	r := natprobe(t, "--json", "--no-hairpin", "--relay", addr)
	if r.code != exitClassified {
		t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
	}
	m := decodeOne(t, r.stdout)
	checkSchema(t, m)
	rel, ok := m["relay"].(map[string]any)
	if !ok {
		t.Fatalf("relay = %v", m["relay"])
	}
	if rel["ok"] != true || rel["transport"] != "udp" {
		t.Fatalf("relay %v", rel)
	}
	checkRelayKeys(t, rel)
	if _, err := netip.ParseAddrPort(rel["relayed_address"].(string)); err != nil {
		t.Errorf("relayed_address: %v", err)
	}
	if rtt, _ := rel["rtt_ms"].(json.Number).Float64(); rtt <= 0 {
		t.Errorf("rtt_ms %v", rel["rtt_ms"])
	}
	if loss, _ := rel["loss"].(json.Number).Float64(); loss < 0 || loss > 1 {
		t.Errorf("loss %v", rel["loss"])
	}
	if m["hairpinning"] != nil {
		t.Errorf("--no-hairpin, yet hairpinning = %v", m["hairpinning"])
	}
}

func TestRelayWrongPassword(t *testing.T) {
	addr := startStund(t, false)
	r := natprobe(t, "--json", "--relay", "--turn-transport", "udp", "--turn-user", testUser, "--turn-pass", "nope", addr)
	if r.code != exitClassified {
		t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
	}
	rel, _ := decodeOne(t, r.stdout)["relay"].(map[string]any)
	if rel == nil || rel["ok"] != false || !strings.Contains(rel["error"].(string), "password") {
		t.Fatalf("relay %v, want ok=false with a credentials error", rel)
	}
	checkRelayKeys(t, rel)
	if rel["relayed_address"] != "" {
		t.Errorf("relayed_address %v after a refused allocation, want \"\"", rel["relayed_address"])
	}
}

// checkRelayKeys: the relay object always has the keys of the natprobe/1
// schema (docs/natprobe-json.md), failed or not, so that a script can read
// them without testing for their presence.
func checkRelayKeys(t *testing.T, rel map[string]any) {
	t.Helper()
	for k, kinds := range map[string]string{"ok": "bool", "transport": "string", "relayed_address": "string", "rtt_ms": "number", "loss": "number"} {
		if v, ok := rel[k]; !ok || kind(v) != kinds {
			t.Errorf("relay.%s = %v (present %v), want a %s", k, v, ok, kinds)
		}
	}
}

func TestTextAndMarkdown(t *testing.T) {
	addr := startStund(t, false)
	r := natprobe(t, "--no-hairpin", addr)
	if r.code != exitClassified {
		t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
	}
	for _, s := range []string{"mapping", "EIM", "filtering", "EIF", "open", "SIP/RTP:", "endpoint-independent-mapping", "probe id"} {
		if !strings.Contains(r.stdout, s) {
			t.Errorf("text output lacks %q:\n%s", s, r.stdout)
		}
	}
	if strings.Contains(r.stdout, "\x1b[") {
		t.Errorf("colour on a non-terminal:\n%q", r.stdout)
	}
	t.Logf("\n%s", r.stdout)

	r = natprobe(t, "--format", "markdown", "--no-hairpin", addr)
	if r.code != exitClassified {
		t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
	}
	for _, s := range []string{"| mapping | **EIM** |", "| filtering | **EIF** |", "| server | `" + addr + "` |", "#### SIP/RTP"} {
		if !strings.Contains(r.stdout, s) {
			t.Errorf("markdown lacks %q:\n%s", s, r.stdout)
		}
	}
}

func TestNoColor(t *testing.T) {
	addr := startStund(t, false)
	defer func(f func(io.Writer) bool) { isTerminal = f }(isTerminal)
	isTerminal = func(io.Writer) bool { return true }

	t.Setenv("TERM", "xterm") // a colour terminal, whatever runs the tests
	t.Setenv("NO_COLOR", "")
	r := natprobe(t, "--no-hairpin", addr)
	if !strings.Contains(r.stdout, "\x1b[32m") {
		t.Errorf("no colour on a terminal:\n%q", r.stdout)
	}
	if !strings.Contains(r.stderr, "\r\x1b[K") {
		t.Errorf("no progress on a terminal stderr: %q", r.stderr)
	}

	t.Setenv("NO_COLOR", "1")
	r = natprobe(t, "--no-hairpin", addr)
	if r.code != exitClassified || strings.Contains(r.stdout, "\x1b[") {
		t.Errorf("NO_COLOR set, exit %d, output:\n%q", r.code, r.stdout)
	}
	// --json never carries colour, terminal or not.
	t.Setenv("NO_COLOR", "")
	r = natprobe(t, "--json", "--no-hairpin", addr)
	checkSchema(t, decodeOne(t, r.stdout))
}

func TestUsageErrors(t *testing.T) {
	for _, args := range [][]string{
		{},                               // missing HOST
		{"--bogus", "127.0.0.1"},         // unknown flag
		{"--format", "xml", "127.0.0.1"}, // bad value
		{"--json", "--format", "markdown", "127.0.0.1"},
		{"--lifetime-max", "soon", "127.0.0.1"},
		{"--turn-transport", "sctp", "127.0.0.1"},
		{"--relay", "127.0.0.1"}, // no credentials
		{"127.0.0.1:0"},
		{"127.0.0.1:99999"},
		{"[::1"},     // unclosed bracket: not [::1]:3478
		{"[::1]:0"},  // port out of range
		{":3478"},    // empty host
		{"[::1]foo"}, // junk after the bracket
		{"a", "b"},
		{"127.0.0.1", "--json"}, // flag after HOST
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			t.Setenv("NATPROBE_TURN_USER", "")
			t.Setenv("NATPROBE_TURN_PASS", "")
			t.Setenv("NATPROBE_TURN_SECRET", "")
			r := natprobe(t, args...)
			if r.code != exitUsage {
				t.Errorf("exit %d, want %d; stderr %q", r.code, exitUsage, r.stderr)
			}
			if r.stdout != "" {
				t.Errorf("usage error wrote to stdout: %q", r.stdout)
			}
			if !strings.Contains(r.stderr, "USAGE:") || !strings.HasPrefix(r.stderr, "natprobe: ") {
				t.Errorf("no message and usage on stderr: %q", r.stderr)
			}
		})
	}
}

func TestVersion(t *testing.T) {
	r := natprobe(t, "--version")
	if r.code != 0 || !strings.Contains(r.stdout, "natprobe version") {
		t.Errorf("exit %d, stdout %q", r.code, r.stdout)
	}
}

// checkUDPBlocked checks the report of a run in which no UDP request got a
// reply: one JSON object, udp-blocked, mapping and filtering not measured
// inconclusive with the reason.
func checkUDPBlocked(t *testing.T, r result) map[string]any {
	t.Helper()
	m := decodeOne(t, r.stdout)
	checkSchema(t, m)
	if m["legacy_type"] != "udp-blocked" {
		t.Errorf("legacy_type %v", m["legacy_type"])
	}
	reasons, _ := m["reasons"].(map[string]any)
	for _, f := range []string{"mapping", "filtering"} {
		if m[f] != "inconclusive" {
			t.Errorf("%s = %v, want inconclusive (the schema's only non-verdict)", f, m[f])
		}
		if why, _ := reasons[f].(string); !strings.Contains(why, "no reply to") {
			t.Errorf("reasons.%s = %q, want the number of unanswered requests", f, why)
		}
	}
	if n, _ := m["inconclusive_fields"].([]any); len(n) != 2 {
		t.Errorf("inconclusive_fields %v, want filtering and mapping", n)
	}
	if m["nat_detected"] != nil || m["mapped_address"] != "" {
		t.Errorf("nat_detected %v, mapped_address %v: nothing was measured", m["nat_detected"], m["mapped_address"])
	}

	return m
}

// TestUnreachable: nothing answers over UDP and no relay is tried. The
// report still comes (udp-blocked), with exit 3 and the message saying it
// cannot tell a blocked UDP from a server that is down.
func TestUnreachable(t *testing.T) {
	addr := testutil.UDPBlackHole(t, "")
	t.Setenv("NATPROBE_TURN_USER", "")
	t.Setenv("NATPROBE_TURN_PASS", "")
	t.Setenv("NATPROBE_TURN_SECRET", "")
	r := natprobe(t, "--json", addr)
	if r.code != exitServer {
		t.Fatalf("exit %d, want %d; stderr %q", r.code, exitServer, r.stderr)
	}
	if !strings.Contains(r.stderr, "no reply over UDP (blocked, or server down)") {
		t.Errorf("message does not say no reply over UDP: %q", r.stderr)
	}
	m := checkUDPBlocked(t, r)
	if m["relay"] != nil {
		t.Errorf("relay %v without credentials", m["relay"])
	}
	if why, _ := m["reasons"].(map[string]any)["relay"].(string); !strings.Contains(why, "no TURN credentials") {
		t.Errorf("reasons.relay %q", why)
	}

	// Text: the report too, not only the message.
	r = natprobe(t, addr)
	if r.code != exitServer || !strings.Contains(r.stdout, "udp-blocked") {
		t.Errorf("text: exit %d, stdout:\n%s", r.code, r.stdout)
	}
}

// TestUDPBlockedNothingAnswers: credentials given, but neither UDP nor TCP
// nor TLS answers: exit 3, and the relay field says what was tried.
func TestUDPBlockedNothingAnswers(t *testing.T) {
	addr := testutil.UDPBlackHole(t, "")
	r := natprobe(t, "--json", "--turn-user", testUser, "--turn-pass", testPass, addr)
	if r.code != exitServer {
		t.Fatalf("exit %d, want %d; stderr %q", r.code, exitServer, r.stderr)
	}
	if !strings.Contains(r.stderr, "no reply over UDP (blocked, or server down)") {
		t.Errorf("message: %q", r.stderr)
	}
	m := checkUDPBlocked(t, r)
	rel, _ := m["relay"].(map[string]any)
	if rel == nil || rel["ok"] != false || !strings.Contains(rel["error"].(string), "tcp:") {
		t.Fatalf("relay %v, want a failed attempt over tcp (then tls)", rel)
	}
	checkRelayKeys(t, rel)
}

// TestUDPBlockedRelayOverTCP is the audit's case: UDP to the server is
// dropped, TCP on the same port reaches stund. natprobe must print the
// udp-blocked report and, UDP being blocked, prove the relay over TCP
// without being asked (no --relay): a diagnosed network with a working
// path, whose UDP behaviours stay inconclusive: exit 1, not 3.
func TestUDPBlockedRelayOverTCP(t *testing.T) {
	s := startStundServer(t, false, "")
	addr := testutil.UDPBlackHole(t, s.TCPAddrs()[0].String())
	r := natprobe(t, "--json", "--turn-user", testUser, "--turn-pass", testPass, addr)
	if r.code != exitInconclusive {
		t.Fatalf("exit %d, want %d; stderr %q\n%s", r.code, exitInconclusive, r.stderr, r.stdout)
	}
	m := checkUDPBlocked(t, r)
	rel, _ := m["relay"].(map[string]any)
	if rel == nil || rel["ok"] != true || rel["transport"] != "tcp" {
		t.Fatalf("relay %v, want ok over tcp", rel)
	}
	if _, err := netip.ParseAddrPort(rel["relayed_address"].(string)); err != nil {
		t.Errorf("relayed_address: %v", err)
	}
	if why, _ := m["reasons"].(map[string]any)["legacy_type"].(string); !strings.Contains(why, "answers over tcp") {
		t.Errorf("reasons.legacy_type %q", why)
	}
}

func TestNotRFC5780(t *testing.T) {
	addr := startStund(t, true)
	r := natprobe(t, "--json", "--no-hairpin", addr)
	if r.code != exitServer {
		t.Fatalf("exit %d, want %d; stderr %q", r.code, exitServer, r.stderr)
	}
	if !strings.Contains(r.stderr, "not RFC 5780") {
		t.Errorf("message does not say not RFC 5780: %q", r.stderr)
	}
	// The mapping-lite results still come, as one JSON object.
	m := decodeOne(t, r.stdout)
	checkSchema(t, m)
	if _, err := netip.ParseAddrPort(m["mapped_address"].(string)); err != nil {
		t.Errorf("mapped_address: %v", err)
	}
	if m["nat_detected"] != false {
		t.Errorf("nat_detected %v", m["nat_detected"])
	}
	// What one address can tell is there; what it cannot is said exactly.
	if la, err := netip.ParseAddrPort(m["local_address"].(string)); err != nil || la.String() != m["mapped_address"] {
		t.Errorf("local_address %v, mapped_address %v: equal without a NAT", m["local_address"], m["mapped_address"])
	}
	for _, f := range []string{"port_preservation", "port_parity", "port_contiguity", "stun_payload_rewritten"} {
		if _, ok := m[f].(bool); !ok {
			t.Errorf("%s = %v: measurable on one address", f, m[f])
		}
	}
	reasons, _ := m["reasons"].(map[string]any)
	for _, f := range []string{"mapping", "filtering"} {
		if m[f] != "inconclusive" {
			t.Errorf("%s = %v", f, m[f])
		}
		if why, _ := reasons[f].(string); !strings.Contains(why, "RFC 5780 §6") {
			t.Errorf("reasons.%s = %q, want why (RFC 5780 §6)", f, why)
		}
	}
	if !strings.Contains(r.stderr, "OTHER-ADDRESS") || !strings.Contains(r.stderr, "420") {
		t.Errorf("message does not say why: %q", r.stderr)
	}
}

// TestRelayLongRealm: a realm too long for a 401 to a bare Allocate under
// stund's UDP amplification budget (twice the request, against
// reflection); natprobe's SOFTWARE makes the request big enough, so the
// relay works over UDP.
func TestRelayLongRealm(t *testing.T) {
	s := startStundServer(t, false, "voip.telecom-provider.example.net")
	r := natprobe(t, "--json", "--no-hairpin", "--relay", "--turn-transport", "udp",
		"--turn-user", testUser, "--turn-pass", testPass, s.Grid()[0][0].String())
	if r.code != exitClassified {
		t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
	}
	rel, _ := decodeOne(t, r.stdout)["relay"].(map[string]any)
	if rel == nil || rel["ok"] != true || rel["transport"] != "udp" {
		t.Fatalf("relay %v, want ok over udp", rel)
	}
}

func TestHostPort(t *testing.T) {
	for in, want := range map[string]string{
		"example.net":        "example.net:3478",
		"example.net:3480":   "example.net:3480",
		"192.0.2.1":          "192.0.2.1:3478",
		"2001:db8::1":        "[2001:db8::1]:3478",
		"[2001:db8::1]":      "[2001:db8::1]:3478",
		"[2001:db8::1]:3479": "[2001:db8::1]:3479",
		"[::1]":              "[::1]:3478",
		"[fe80::1%eth0]:1":   "[fe80::1%eth0]:1",
		"127.0.0.1:65535":    "127.0.0.1:65535",
		"stun.example.net:1": "stun.example.net:1",
	} {
		if got, err := hostPort(in); err != nil || got != want {
			t.Errorf("%q: %q %v, want %q", in, got, err, want)
		}
	}
	// Each bad input, and what the message must say about it.
	for bad, why := range map[string]string{
		"":                   "empty HOST",
		":3478":              "empty host",
		"[]:3478":            "not an IPv6 address",
		"[]":                 "not an IPv6 address",
		"h:0":                "out of range",
		"h:65536":            "out of range",
		"[::1]:99999":        "out of range",
		"h:-1":               "not a number",
		"h:+3478":            "not a number",
		"h:x":                "not a number",
		"h:":                 "empty port",
		"[::1]:":             "empty port",
		"a b":                "not allowed",
		"a/b":                "not allowed",
		"[::1":               `without a closing "]"`,
		"[::1]x":             `only ":PORT"`,
		"::1]":               "not an IPv6 address",
		"[example.net]":      "not an IPv6 address",
		"[127.0.0.1]:80":     "not an IPv6 address",
		"a:b:c":              "not an IPv6 address",
		"2001:db8::1:3478:x": "not an IPv6 address",
		"h]:3478":            "not allowed",
	} {
		got, err := hostPort(bad)
		if err == nil {
			t.Errorf("%q accepted as %q", bad, got)
		} else if !strings.Contains(err.Error(), why) {
			t.Errorf("%q: %v, want it to say %q", bad, err, why)
		}
	}
}

// helpExitStatuses parses the "Exit status:" block of --help: status →
// its text, continuation lines joined.
func helpExitStatuses(t *testing.T, help string) map[int]string {
	t.Helper()
	_, block, ok := strings.Cut(help, "Exit status:\n")
	if !ok {
		t.Fatalf("--help has no exit status block:\n%s", help)
	}
	out := map[int]string{}
	last := -1
	for _, line := range strings.Split(block, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			break
		}
		if n, err := strconv.Atoi(f[0]); err == nil {
			last = n
			out[n] = strings.Join(f[1:], " ")
		} else if last >= 0 {
			out[last] += " " + strings.Join(f, " ")
		}
	}

	return out
}

// TestHelpExitStatus: what --help says each case exits with is what natprobe
// really returns in that case (the audit found "udp-blocked, 0" while the
// run exits 1).
func TestHelpExitStatus(t *testing.T) {
	h := natprobe(t, "--help")
	if h.code != 0 {
		t.Fatalf("--help exit %d", h.code)
	}
	statuses := helpExitStatuses(t, h.stdout)
	// statusFor returns the status whose line holds phrase.
	statusFor := func(phrase string) int {
		t.Helper()
		found := -1
		for n, text := range statuses {
			if strings.Contains(text, phrase) {
				if found >= 0 {
					t.Fatalf("%q is under both %d and %d: %v", phrase, found, n, statuses)
				}
				found = n
			}
		}
		if found < 0 {
			t.Fatalf("--help does not say the status for %q: %v", phrase, statuses)
		}

		return found
	}

	s := startStundServer(t, false, "")
	single := startStund(t, true)
	blocked := testutil.UDPBlackHole(t, s.TCPAddrs()[0].String())
	t.Setenv("NATPROBE_TURN_USER", testUser)
	t.Setenv("NATPROBE_TURN_PASS", testPass)
	for _, c := range []struct {
		phrase string
		args   []string
	}{
		{"classified", []string{"--no-hairpin", s.Grid()[0][0].String()}},
		{"UDP blocked while the server answers over TCP/TLS", []string{blocked}},
		{"usage error", []string{"--bogus", "127.0.0.1"}},
		{"not RFC 5780 capable", []string{"--no-hairpin", single}},
	} {
		want := statusFor(c.phrase)
		if r := natprobe(t, c.args...); r.code != want {
			t.Errorf("%s: --help says %d, natprobe exits %d (stderr %q)", c.phrase, want, r.code, r.stderr)
		}
	}
}

// startStundTLS runs stund with TURN over TLS on a free port (never 5349),
// with a self-signed certificate for 127.0.0.1; it returns the server and a
// PEM file holding that certificate.
func startStundTLS(t *testing.T) (*server.Server, string) {
	t.Helper()
	cert, _ := testutil.SelfSigned(t)
	s, err := server.New(server.Config{
		PrimaryIP:   netip.MustParseAddr("127.0.0.1"),
		AlternateIP: netip.MustParseAddr("127.0.0.2"),
		Users:       map[string]string{testUser: testPass},
		AllowPeers:  []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
		TLSConfig:   &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
	})
	if err != nil {
		t.Fatalf("server.New: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Leaf.Raw}), 0o600); err != nil {
		t.Fatal(err)
	}

	return s, ca
}

// TestRelayTLSPortAndCA: TURN over TLS on a port other than 5349, with a
// self-signed certificate. --turn-tls-port finds it, --turn-ca verifies it
// (flags or environment); without --turn-ca verification fails: there is no
// insecure default.
func TestRelayTLSPortAndCA(t *testing.T) {
	s, ca := startStundTLS(t)
	addr := s.Grid()[0][0].String()
	tlsPort := strconv.Itoa(int(s.TLSAddrs()[0].Port()))
	if tlsPort == "5349" {
		t.Skip("the free port picked is the default one")
	}
	creds := []string{"--turn-user", testUser, "--turn-pass", testPass}
	base := append([]string{"--json", "--no-hairpin", "--relay", "--turn-transport", "tls"}, creds...)

	check := func(name string, r result, wantOK bool, wantErr string) {
		t.Helper()
		if r.code != exitClassified {
			t.Fatalf("%s: exit %d, stderr %q", name, r.code, r.stderr)
		}
		rel, _ := decodeOne(t, r.stdout)["relay"].(map[string]any)
		if rel == nil || rel["ok"] != wantOK || rel["transport"] != "tls" {
			t.Fatalf("%s: relay %v, want ok=%v over tls", name, rel, wantOK)
		}
		if e, _ := rel["error"].(string); !strings.Contains(e, wantErr) {
			t.Errorf("%s: relay error %q, want %q in it", name, e, wantErr)
		}
	}
	check("flags", natprobe(t, append(base, "--turn-tls-port", tlsPort, "--turn-ca", ca, addr)...), true, "")

	t.Setenv("NATPROBE_TURN_TLS_PORT", tlsPort)
	t.Setenv("NATPROBE_TURN_CA", ca)
	check("environment", natprobe(t, append(base, addr)...), true, "")

	// The right port, but nothing to trust the self-signed certificate.
	t.Setenv("NATPROBE_TURN_CA", "")
	check("no CA", natprobe(t, append(base, addr)...), false, "certificate")
}

func TestTURNTLSUsageErrors(t *testing.T) {
	notPEM := filepath.Join(t.TempDir(), "not.pem")
	if err := os.WriteFile(notPEM, []byte("hello\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		args []string
		msg  string
	}{
		{[]string{"--turn-tls-port", "0", "127.0.0.1"}, "--turn-tls-port 0"},
		{[]string{"--turn-tls-port", "65536", "127.0.0.1"}, "--turn-tls-port 65536"},
		{[]string{"--turn-tls-port", "tls", "127.0.0.1"}, "turn-tls-port"},
		{[]string{"--turn-ca", filepath.Join(t.TempDir(), "missing.pem"), "127.0.0.1"}, "missing.pem"},
		{[]string{"--turn-ca", notPEM, "127.0.0.1"}, "no PEM certificate"},
	} {
		r := natprobe(t, c.args...)
		if r.code != exitUsage || r.stdout != "" || !strings.Contains(r.stderr, c.msg) {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want exit %d and %q", c.args, r.code, r.stdout, r.stderr, exitUsage, c.msg)
		}
	}
}

// ansi matches the SGR escapes natprobe colours with.
var ansi = regexp.MustCompile("\x1b\\[[0-9;]*m")

// TestColourKeepsAlignment: colour must not move a column. The same report
// printed with and without colour is the same text once the escapes are
// taken out (the audit found the header row shifted: the padding counted
// the escape bytes), and in it every row of the behaviour table starts its
// result and meaning where the header does.
func TestColourKeepsAlignment(t *testing.T) {
	addr := startStund(t, false)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second) // safety net
	defer cancel()
	o := &options{server: addr, format: "text", lifetimeMax: defaultLifetimeMax, timeout: 20 * time.Second}
	rep, meta, _, err := measure(ctx, o, newProbeID(), io.Discard)
	if err != nil || rep == nil {
		t.Fatalf("measure: %v", err)
	}
	// Some tones besides the loopback's greens: warn, bad and none.
	rep.Filtering = classifier.FilteringAddressPortDependent
	rep.Relay = &classifier.RelayReport{Transport: "udp", Error: "relay: allocate: refused"}
	rep.Hairpinning = nil
	delete(rep.Reasons, "hairpinning") // a row with no meaning: no trailing pad

	var plain, colour bytes.Buffer
	if err := render(&plain, "text", rep, meta, false); err != nil {
		t.Fatal(err)
	}
	if err := render(&colour, "text", rep, meta, true); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(colour.String(), "\x1b[1m") || !strings.Contains(colour.String(), "\x1b[33m") {
		t.Fatalf("no colour to test:\n%q", colour.String())
	}
	if got := ansi.ReplaceAllString(colour.String(), ""); got != plain.String() {
		t.Errorf("colour changes the layout:\n--- without colour\n%s\n--- with colour, escapes removed\n%s", plain.String(), got)
	}

	lines := strings.Split(plain.String(), "\n")
	h := slices.IndexFunc(lines, func(l string) bool { return strings.HasPrefix(l, "behaviour ") })
	if h < 0 {
		t.Fatalf("no header row:\n%s", plain.String())
	}
	res, mean := strings.Index(lines[h], "result"), strings.Index(lines[h], "meaning")
	n := 0
	for _, l := range lines[h+1:] {
		if l == "" {
			break
		}
		n++
		if strings.HasSuffix(l, " ") {
			t.Errorf("trailing spaces: %q", l)
		}
		if strings.HasPrefix(l, "hairpinning ") {
			continue // no meaning to align
		}
		if len(l) <= mean || l[res-1] != ' ' || l[res] == ' ' || l[mean-1] != ' ' || l[mean] == ' ' {
			t.Errorf("row not aligned with the header (result at %d, meaning at %d):\n%s\n%s", res, mean, lines[h], l)
		}
	}
	if n < len(behaviourRows)-2 {
		t.Errorf("%d rows under the header, want the behaviour table", n)
	}
}

// TestDumbTerminal: TERM=dumb cannot show colour or rewrite a line, so it
// gets plain output, as with NO_COLOR.
func TestDumbTerminal(t *testing.T) {
	addr := startStund(t, false)
	defer func(f func(io.Writer) bool) { isTerminal = f }(isTerminal)
	isTerminal = func(io.Writer) bool { return true }
	t.Setenv("NO_COLOR", "")

	t.Setenv("TERM", "dumb")
	r := natprobe(t, "--no-hairpin", addr)
	if r.code != exitClassified || strings.Contains(r.stdout, "\x1b[") || strings.Contains(r.stderr, "\x1b[") {
		t.Errorf("TERM=dumb: exit %d, stdout:\n%q\nstderr %q", r.code, r.stdout, r.stderr)
	}

	t.Setenv("TERM", "xterm-256color")
	r = natprobe(t, "--no-hairpin", addr)
	if !strings.Contains(r.stdout, "\x1b[32m") {
		t.Errorf("TERM=xterm-256color: no colour:\n%q", r.stdout)
	}
}
