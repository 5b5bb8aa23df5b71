package main

import (
	"bytes"
	"context"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/stund/stund/classifier"
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
