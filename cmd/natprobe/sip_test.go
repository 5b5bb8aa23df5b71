package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/stund/stund/classifier"
	"github.com/stund/stund/server"
	"github.com/stund/stund/server/sipmirror"
)

// algReport is fakeReport with a SIP ALG rewriting UDP and dropping TCP.
func algReport() *classifier.Report {
	rep := fakeReport()
	yes := true
	rep.ALGDetected = &yes
	rep.SIP = &classifier.SIPReport{Offered: true, ALG: map[string]*classifier.ALGResult{
		"udp": {Verdict: classifier.ALGRewrites, Changed: []string{"via"}, Changes: []classifier.FieldChange{
			{Field: "via", Sent: "SIP/2.0/UDP 10.0.0.2:5060", Received: "SIP/2.0/UDP 203.0.113.1:5060"}}},
		"tcp": {Verdict: classifier.ALGDrops, Changed: []string{}, Reason: "the control port answered and the SIP port never did"},
	}}
	return rep
}

// An ALG is the first line of the text and the markdown report, with the
// advice, and its rewrite shows before and after.
func TestALGHeadlineFirst(t *testing.T) {
	for _, format := range []string{"text", "markdown"} {
		var b bytes.Buffer
		if err := render(&b, format, algReport(), runMeta{time: time.Now()}, false); err != nil {
			t.Fatal(err)
		}
		first, _, _ := strings.Cut(b.String(), "\n")
		if !strings.Contains(first, "SIP ALG detected") || !strings.Contains(first, "rewrites SIP over UDP (via)") ||
			!strings.Contains(first, "drops SIP over TCP") || !strings.Contains(first, "SIP helper") {
			t.Errorf("%s: first line %q", format, first)
		}
		if !strings.Contains(b.String(), `via \"SIP/2.0/UDP 10.0.0.2:5060\" → \"SIP/2.0/UDP 203.0.113.1:5060\"`) &&
			!strings.Contains(b.String(), `via "SIP/2.0/UDP 10.0.0.2:5060" → "SIP/2.0/UDP 203.0.113.1:5060"`) {
			t.Errorf("%s: no before/after of the Via in\n%s", format, b.String())
		}
	}
	// No ALG: no headline.
	var b bytes.Buffer
	if err := render(&b, "text", fakeReport(), runMeta{time: time.Now()}, false); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(b.String(), "SIP ALG detected") {
		t.Errorf("headline without an ALG:\n%s", b.String())
	}
}

// The SIP flags parse into the classifier's SIPConfig; misuse exits 2
// before anything is sent.
func TestSIPFlags(t *testing.T) {
	parse := func(args ...string) (classifier.SIPConfig, error) {
		var got classifier.SIPConfig
		var perr error
		app := &cli.App{Flags: sipFlags(), Writer: io.Discard, ErrWriter: io.Discard, Action: func(c *cli.Context) error {
			got, perr = sipOptions(c)
			return nil
		}}
		if err := app.Run(append([]string{"natprobe"}, args...)); err != nil {
			t.Fatal(err)
		}
		return got, perr
	}
	if got, err := parse("--sip-port", "5070", "--sip-control-port", "5072", "--call", "1s"); err != nil || got.Port != 5070 || got.ControlPort != 5072 || got.Call != time.Second || got.Skip {
		t.Errorf("cfg %+v err %v", got, err)
	}
	if got, err := parse(); err != nil || got.Port != 5060 || got.ControlPort != 5062 || got.Call != 0 || got.Skip {
		t.Errorf("defaults %+v err %v", got, err)
	}
	if got, err := parse("--no-sip"); err != nil || !got.Skip {
		t.Errorf("--no-sip: %+v err %v", got, err)
	}
	for _, bad := range [][]string{{"--sip-port", "0"}, {"--sip-control-port", "5060"}, {"--call", "1m"}, {"--no-sip", "--call", "1s"}} {
		var out, errb bytes.Buffer
		if code := run(context.Background(), append(append([]string{"natprobe"}, bad...), "127.0.0.1"), &out, &errb); code != exitUsage {
			t.Errorf("%v: code %d, want %d (%s)", bad, code, exitUsage, errb.String())
		}
	}
}

// startMirror runs stund and its SIP mirror on loopback, sharing the
// server's per-IP budget as cmd/stund wires them.
func startMirror(t *testing.T) (*server.Server, sipmirror.Ports) {
	t.Helper()
	s := startStundServer(t, false, "")
	m, err := sipmirror.New(sipmirror.Config{IPs: []netip.Addr{s.Grid()[0][0].Addr()}, Allow: s.AllowUnauth})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Close() })
	return s, m.Ports()
}

// natprobe against stund with its SIP mirror on loopback: the sip object
// as docs/natprobe-json.md describes it, both transports clean, and the
// call's figures with --call.
func TestSIPJSONAgainstMirror(t *testing.T) {
	s, p := startMirror(t)
	r := natprobe(t, "--json", "--no-hairpin", "--sip-port", strconv.Itoa(p.SIP), "--sip-control-port", strconv.Itoa(p.Control),
		"--call", "200ms", s.Grid()[0][0].String())
	if r.code != exitClassified {
		t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
	}
	out := decodeOne(t, r.stdout)
	checkSchema(t, out)
	if out["alg_detected"] != false {
		t.Errorf("alg_detected %v", out["alg_detected"])
	}
	sip, _ := out["sip"].(map[string]any)
	alg, _ := sip["alg"].(map[string]any)
	for _, tr := range []string{"udp", "tcp"} {
		a, _ := alg[tr].(map[string]any)
		if a["verdict"] != "none" || kind(a["changed"]) != "array" {
			t.Errorf("sip.alg.%s = %v", tr, a)
		}
	}
	sr, _ := sip["symmetric_response"].(map[string]any)
	if sr["same_mapping"] != true || sr["answer_reached_source_port"] != true {
		t.Errorf("symmetric_response %v", sr)
	}
	rtp, _ := sip["rtp"].(map[string]any)
	for _, f := range []string{"loss_pct_out", "loss_pct_in", "jitter_ms", "rtt_ms", "r_factor", "mos", "packets"} {
		if kind(rtp[f]) != "number" {
			t.Errorf("sip.rtp.%s = %v", f, rtp[f])
		}
	}
	if n, _ := rtp["packets"].(json.Number).Int64(); n != 10 {
		t.Errorf("--call 200ms sent %v packets, want 10", rtp["packets"])
	}
	if sip["rtp_relay"] != nil {
		t.Errorf("rtp_relay %v without a relay", sip["rtp_relay"])
	}
}

// With --relay and --call the call also runs through the TURN relay:
// sip.rtp_relay beside sip.rtp, every packet back on loopback, and no
// parity or adjacency claim for a path whose ports natprobe did not pick.
func TestRelayCallAgainstMirror(t *testing.T) {
	s, p := startMirror(t)
	r := natprobe(t, "--json", "--no-hairpin", "--relay", "--turn-user", testUser, "--turn-pass", testPass,
		"--sip-port", strconv.Itoa(p.SIP), "--sip-control-port", strconv.Itoa(p.Control), "--call", "400ms", s.Grid()[0][0].String())
	if r.code != exitClassified {
		t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
	}
	out := decodeOne(t, r.stdout)
	sip, _ := out["sip"].(map[string]any)
	for _, f := range []string{"rtp", "rtp_relay"} {
		c, _ := sip[f].(map[string]any)
		if n, _ := c["packets"].(json.Number).Int64(); n != 20 || c["error"] != nil {
			t.Errorf("sip.%s = %v, want 20 packets and no error", f, c)
		}
		if lo, _ := c["loss_pct_out"].(json.Number).Float64(); lo != 0 {
			t.Errorf("sip.%s.loss_pct_out %v on loopback", f, lo)
		}
	}
	relayCall, _ := sip["rtp_relay"].(map[string]any)
	if relayCall["rtp_parity_kept"] != nil || relayCall["rtcp_adjacent"] != nil {
		t.Errorf("rtp_relay claims parity/adjacency: %v", relayCall)
	}
}
