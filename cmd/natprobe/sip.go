package main

// The SIP test's flags and its lines in the text and markdown reports.

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/stund/stund/classifier"
	"github.com/stund/stund/relay"
)

// maxCall bounds --call: the media echo serves a flow for 30 s.
const maxCall = 30 * time.Second

func sipFlags() []cli.Flag {
	return []cli.Flag{
		&cli.BoolFlag{Name: "no-sip", Usage: "skip the SIP ALG test (by default it runs when the server offers a SIP mirror, stund --sip-mirror)"},
		&cli.IntFlag{Name: "sip-port", Value: classifier.DefaultSIPPort, Usage: "the server's SIP mirror `PORT`, where ALGs look"},
		&cli.IntFlag{Name: "sip-control-port", Value: classifier.DefaultSIPControlPort, Usage: "the server's SIP mirror control `PORT`, where no ALG looks"},
		&cli.DurationFlag{Name: "call", Usage: "also run a G.711 call of `DURATION` (20 ms packets, e.g. 1s = 50 packets, at most 30s) to the server's media echo: loss, jitter, RTT, E-model MOS"},
	}
}

// sipOptions reads the SIP flags.
func sipOptions(c *cli.Context) (classifier.SIPConfig, error) {
	s := classifier.SIPConfig{Skip: c.Bool("no-sip"), Call: c.Duration("call")}
	for _, p := range []struct {
		flag string
		dst  *uint16
	}{{"sip-port", &s.Port}, {"sip-control-port", &s.ControlPort}} {
		v := c.Int(p.flag)
		if v < 1 || v > 65535 {
			return s, usageError{fmt.Sprintf("--%s %d: not a port (1-65535)", p.flag, v)}
		}
		*p.dst = uint16(v)
	}
	if s.Port == s.ControlPort {
		return s, usageError{fmt.Sprintf("--sip-port and --sip-control-port are both %d: the test compares the two", s.Port)}
	}
	if c.IsSet("call") && (s.Call < 20*time.Millisecond || s.Call > maxCall) {
		return s, usageError{fmt.Sprintf("--call %v: between 20ms (one packet) and %v", s.Call, maxCall)}
	}
	if s.Skip && s.Call > 0 {
		return s, usageError{"--call needs the SIP test: drop --no-sip"}
	}
	return s, nil
}

// sipRowsOf is the SIP test's rows of the behaviour table.
func sipRowsOf(rep *classifier.Report) []row {
	var out []row
	if rep.STUNPayloadRewritten != nil && *rep.STUNPayloadRewritten {
		out = append(out, row{"STUN payload", "rewritten", "a middlebox rewrote the address inside a STUN reply (MAPPED-ADDRESS ≠ XOR-MAPPED-ADDRESS)", toneBad})
	}
	s := rep.SIP
	if s == nil {
		return append(out, row{"SIP ALG", "not tested", reason(rep, "sip", "skipped"), toneNeutral})
	}
	for _, tr := range []string{"udp", "tcp"} {
		a := s.ALG[tr]
		if a == nil {
			continue
		}
		name := "SIP ALG (" + strings.ToUpper(tr) + ")"
		switch a.Verdict {
		case classifier.ALGNone:
			out = append(out, row{name, "none", "an INVITE reached the SIP port exactly as sent", toneGood})
		case classifier.ALGRewrites:
			var ch []string
			for _, c := range a.Changes {
				ch = append(ch, fmt.Sprintf("%s %q → %q", c.Field, c.Sent, c.Received))
			}
			out = append(out, row{name, "rewrites", strings.Join(ch, "; "), toneBad})
		case classifier.ALGDrops:
			out = append(out, row{name, "drops", a.Reason, toneBad})
		case classifier.ALGNotOffered:
			out = append(out, row{name, "not tested", "the server offers no SIP mirror (stund --sip-mirror)", toneNeutral})
		default:
			out = append(out, row{name, string(a.Verdict), a.Reason, toneUnknown})
		}
	}
	if sr := s.SymmetricResponse; sr != nil && sr.SIPSource.IsValid() {
		t, res := toneGood, "same mapping"
		if sr.SameMapping == nil {
			t, res = toneUnknown, "source "+sr.SIPSource.String()
		} else if !*sr.SameMapping {
			t, res = toneWarn, "other mapping"
		}
		out = append(out, row{"SIP symmetric response", res, sr.ServerMust, t})
	}
	for _, c := range []struct {
		name string
		r    *classifier.CallReport
	}{{"call test", s.RTP}, {"call test via relay", s.RTPRelay}} {
		if c.r != nil {
			out = append(out, callRow(c.name, c.r))
		}
	}
	return out
}

func callRow(name string, c *classifier.CallReport) row {
	if c.Error != "" {
		return row{name, "failed", c.Error, toneBad}
	}
	t := toneGood
	switch {
	case c.MOS < 3.6:
		t = toneBad
	case c.MOS < 4.0:
		t = toneWarn
	}
	return row{name, fmt.Sprintf("MOS %.1f", c.MOS), fmt.Sprintf("%d packets: loss %.1f%% out, %.1f%% back; jitter %.1f ms; rtt %.1f ms; R %.0f (ITU-T G.107)",
		c.Packets, c.LossPctOut, c.LossPctIn, c.JitterMS, c.RTTMS, c.RFactor), t}
}

// relayCall runs --call through the TURN relay natprobe just proved, over
// the transport that worked, into sip.rtp_relay: the media path a phone
// here would use when the NAT forces a relay.
func relayCall(ctx context.Context, o *options, software string, rep *classifier.Report, progress func(string)) {
	if o.sip.Call <= 0 || rep.SIP == nil || rep.Relay == nil || !rep.Relay.OK {
		return
	}
	progress(fmt.Sprintf("call test through the relay: %v of G.711", o.sip.Call))
	cfg := relayConfig(o, software)
	cfg.Transport = rep.Relay.Transport
	path, err := relay.OpenPath(ctx, cfg)
	if err != nil {
		rep.SIP.RTPRelay = &classifier.CallReport{Error: err.Error()}
		return
	}
	defer path.Close()
	rep.SIP.RTPRelay = classifier.RelayCall(ctx, path.Allocation(), path.Peer(), path.RelayedAddr(), o.sip.Call)
}
