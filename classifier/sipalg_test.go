package classifier

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stund/stund/internal/sipmsg"
	"github.com/stund/stund/internal/testutil"
	"github.com/stund/stund/server"
	"github.com/stund/stund/server/sipmirror"
)

var lo1 = netip.MustParseAddr("127.0.0.1")

// startLoopbackMirror runs stund with its SIP mirror on loopback, free
// ports, sharing the server's per-IP budget as cmd/stund wires it.
func startLoopbackMirror(tb testing.TB) (netip.AddrPort, sipmirror.Ports) {
	tb.Helper()
	srv, err := server.New(server.Config{
		PrimaryIP: lo1, AlternateIP: netip.MustParseAddr("127.0.0.2"),
		DisableTCP: true, LoggerFactory: quietLogger(),
	})
	if err != nil {
		testutil.SkipUnlessRequired(tb, "cannot bind stund on 127.0.0.1/127.0.0.2: %v", err)
	}
	tb.Cleanup(func() { _ = srv.Close() })
	m, err := sipmirror.New(sipmirror.Config{IPs: []netip.Addr{lo1}, Allow: srv.AllowUnauth})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { _ = m.Close() })
	return srv.Grid()[0][0], m.Ports()
}

func probeSIP(t *testing.T, addr netip.AddrPort, sip SIPConfig) *Report {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := Probe(ctx, Config{Server: addr.String(), Software: "natprobe-test", SIP: sip})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func verdicts(r *Report) string {
	if r.SIP == nil {
		return "no sip"
	}
	return string(r.SIP.ALG["udp"].Verdict) + "/" + string(r.SIP.ALG["tcp"].Verdict)
}

// With no ALG in the path both transports are clean, the top-level
// alg_detected is false and the no-alg property is good.
func TestSIPLoopbackClean(t *testing.T) {
	t.Parallel()
	addr, ports := startLoopbackMirror(t)
	r := probeSIP(t, addr, SIPConfig{Port: uint16(ports.SIP), ControlPort: uint16(ports.Control)})
	if verdicts(r) != "none/none" || r.ALGDetected == nil || *r.ALGDetected {
		t.Fatalf("verdicts %s alg_detected %v reasons %v", verdicts(r), fmtBool(r.ALGDetected), r.Reasons)
	}
	if !r.SIP.Offered || r.Inconclusive() {
		t.Errorf("offered %v inconclusive %v", r.SIP.Offered, r.InconclusiveFields)
	}
	sr := r.SIP.SymmetricResponse
	if sr == nil || sr.SameMapping == nil || !*sr.SameMapping || !*sr.AnswerReachedSource || !*sr.ViaReceivedIntact || sr.SIPSource.Addr() != lo1 {
		t.Errorf("symmetric response %+v", sr)
	}
	if p := propOf(r.SIPRTP, "no-alg"); p.Status != StatusGood {
		t.Errorf("no-alg %+v", p)
	}
}

// A server without a mirror: not-offered on both, alg_detected null with a
// reason, nothing inconclusive (a server limitation), no-alg unknown.
func TestSIPNotOffered(t *testing.T) {
	t.Parallel()
	addr := startLoopbackStund(t)
	port := closedPort(t)
	r := probeSIP(t, addr, SIPConfig{Port: port, ControlPort: port})
	if verdicts(r) != "not-offered/not-offered" || r.ALGDetected != nil || r.Reasons["alg_detected"] == "" {
		t.Fatalf("verdicts %s alg_detected %v reasons %v", verdicts(r), fmtBool(r.ALGDetected), r.Reasons)
	}
	if r.Inconclusive() {
		t.Errorf("inconclusive %v", r.InconclusiveFields)
	}
	if p := propOf(r.SIPRTP, "no-alg"); p.Status != StatusUnknown {
		t.Errorf("no-alg %+v, want unknown without a mirror", p)
	}
	// --no-sip: no sip object at all.
	r = probeSIP(t, addr, SIPConfig{Skip: true})
	if r.SIP != nil || r.ALGDetected != nil || propOf(r.SIPRTP, "no-alg").Status != StatusUnknown {
		t.Errorf("--no-sip: sip %+v alg %v", r.SIP, fmtBool(r.ALGDetected))
	}
}

// closedPort is a UDP and TCP port nothing listens on at the moment.
func closedPort(t *testing.T) uint16 {
	t.Helper()
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(lo1, 0)))
	if err != nil {
		t.Fatal(err)
	}
	p := c.LocalAddr().(*net.UDPAddr).Port
	_ = c.Close()
	return uint16(p)
}

// algProxy stands where a SIP ALG would: natprobe's "SIP port" is the
// proxy, which rewrites UDP requests (rewrite) on their way to the
// mirror's SIP port and relays the answers back, and closes every TCP
// connection after reading the INVITE (a SIP-aware firewall).
func algProxy(t *testing.T, mirror netip.AddrPort, rewrite func([]byte) []byte) uint16 {
	t.Helper()
	front, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(lo1, 0)))
	if err != nil {
		t.Fatal(err)
	}
	port := front.LocalAddr().(*net.UDPAddr).Port
	ln, err := net.Listen("tcp", netip.AddrPortFrom(lo1, uint16(port)).String())
	if err != nil {
		_ = front.Close()
		t.Skipf("TCP port %d taken: %v", port, err)
	}
	back, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(lo1, 0)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = front.Close(); _ = back.Close(); _ = ln.Close() })
	// Requests go to the mirror rewritten, answers back to the client.
	var client atomic.Pointer[netip.AddrPort]
	pump := func(from, to *net.UDPConn, dst func(src netip.AddrPort) netip.AddrPort, mod func([]byte) []byte) {
		buf := make([]byte, 65536)
		for {
			n, src, err := from.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			_, _ = to.WriteToUDPAddrPort(mod(bytes.Clone(buf[:n])), dst(src))
		}
	}
	go pump(front, back, func(src netip.AddrPort) netip.AddrPort { client.Store(&src); return mirror }, rewrite)
	go pump(back, front, func(netip.AddrPort) netip.AddrPort { return *client.Load() }, func(b []byte) []byte { return b })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			_ = c.SetDeadline(time.Now().Add(time.Second))
			_, _ = c.Read(make([]byte, 4096))
			_ = c.Close()
		}
	}()
	return uint16(port)
}

// A rewriting ALG on the SIP port over UDP, a dropping one over TCP:
// rewrites with the changed fields, drops, alg_detected true, and the
// advice first in the summary.
func TestSIPRewritesAndDrops(t *testing.T) {
	t.Parallel()
	addr, ports := startLoopbackMirror(t)
	rewrite := func(b []byte) []byte {
		// As nf_nat_sip does: the phone's address in Via, From, Contact
		// and SDP becomes the NAT's public one (same length here).
		return bytes.ReplaceAll(b, []byte("127.0.0.1"), []byte("192.0.2.1"))
	}
	proxy := algProxy(t, netip.AddrPortFrom(lo1, uint16(ports.SIP)), rewrite)
	r := probeSIP(t, addr, SIPConfig{Port: proxy, ControlPort: uint16(ports.Control)})
	if verdicts(r) != "rewrites/drops" || r.ALGDetected == nil || !*r.ALGDetected {
		t.Fatalf("verdicts %s alg_detected %v reasons %v", verdicts(r), fmtBool(r.ALGDetected), r.Reasons)
	}
	udp := r.SIP.ALG["udp"]
	for _, f := range []string{fieldRequestURI, fieldVia, fieldFrom, fieldContact, fieldSDPO, fieldSDPC} {
		if !slices.Contains(udp.Changed, f) {
			t.Errorf("changed %v lacks %s", udp.Changed, f)
		}
	}
	for _, f := range []string{fieldCallID, fieldContentLength, fieldSDPM} {
		if slices.Contains(udp.Changed, f) {
			t.Errorf("changed %v has %s, which the proxy left alone", udp.Changed, f)
		}
	}
	for _, c := range udp.Changes {
		if c.Field == fieldVia && (!strings.Contains(c.Sent, "127.0.0.1") || !strings.Contains(c.Received, "192.0.2.1")) {
			t.Errorf("via change %+v", c)
		}
	}
	if !strings.HasPrefix(r.SIPRTP.Summary, "SIP ALG detected") || propOf(r.SIPRTP, "no-alg").Status != StatusBad {
		t.Errorf("summary %q no-alg %+v", r.SIPRTP.Summary, propOf(r.SIPRTP, "no-alg"))
	}
}

// The diff ignores what any SIP element may change (header order, case,
// compact forms, whitespace around values) and catches what an ALG does.
func TestDiffSIP(t *testing.T) {
	sent := sipmsg.Invite{Transport: "UDP", Local: netip.MustParseAddrPort("10.0.0.2:5060"), Server: netip.MustParseAddrPort("198.51.100.10:5060"),
		RTPPort: 49170, CallID: "abc@natprobe", Branch: "z9hG4bK1", Tag: "t1"}.Build()
	s := string(sent)
	head, body, _ := strings.Cut(s, "\r\n\r\n")
	lines := strings.Split(head, "\r\n")
	// Reordered, re-cased and compact: From last, "CALL-ID" as "i".
	var re []string
	var from string
	for _, l := range lines {
		switch {
		case strings.HasPrefix(l, "From:"):
			from = l
		case strings.HasPrefix(l, "Call-ID:"):
			re = append(re, "i:"+strings.TrimPrefix(l, "Call-ID:"))
		case strings.HasPrefix(l, "Contact:"):
			re = append(re, "CONTACT:   "+strings.TrimPrefix(l, "Contact: "))
		default:
			re = append(re, l)
		}
	}
	re = append(re, from)
	if d := diffSIP(sent, []byte(strings.Join(re, "\r\n")+"\r\n\r\n"+body)); len(d) != 0 {
		t.Errorf("reordered/re-cased headers reported as changes: %+v", d)
	}

	// nf_nat_sip's rewrite: a longer public address in Via, Contact and
	// SDP, and Content-Length fixed to the longer body.
	alg := strings.ReplaceAll(s, "10.0.0.2", "203.0.113.201")
	newBody := strings.ReplaceAll(body, "10.0.0.2", "203.0.113.201")
	alg = strings.Replace(alg, "Content-Length: "+strconv.Itoa(len(body)), "Content-Length: "+strconv.Itoa(len(newBody)), 1)
	d := diffSIP(sent, []byte(alg))
	var got []string
	for _, c := range d {
		got = append(got, c.Field)
	}
	want := []string{fieldVia, fieldFrom, fieldContact, fieldContentLength, fieldSDPO, fieldSDPC}
	if !slices.Equal(got, want) {
		t.Errorf("changed %v, want %v", got, want)
	}
	// Only the media port: the m= line.
	mOnly := strings.Replace(s, "m=audio 49170", "m=audio 10240", 1)
	if d := diffSIP(sent, []byte(mOnly)); len(d) != 1 || d[0].Field != fieldSDPM || d[0].Received != "audio 10240 RTP/AVP 0 8" {
		t.Errorf("m= rewrite: %+v", d)
	}
	// Garbage is a change, never a clean result.
	if d := diffSIP(sent, []byte("garbage")); len(d) != 1 || d[0].Field != fieldMessage {
		t.Errorf("garbage: %+v", d)
	}
}

// The verdict never calls missing evidence clean.
func TestALGVerdictFromEvidence(t *testing.T) {
	sent := sipmsg.Invite{Transport: "UDP", Local: netip.MustParseAddrPort("10.0.0.2:5060"), Server: netip.MustParseAddrPort("198.51.100.10:5060"),
		RTPPort: 49170, CallID: "c", Branch: "z9hG4bK1", Tag: "t"}.Build()
	changed := bytes.ReplaceAll(sent, []byte("10.0.0.2"), []byte("10.0.0.9"))
	ok := portEvidence{answered: true, received: sent}
	cases := []struct {
		name string
		ev   algEvidence
		want ALGVerdict
	}{
		{"clean both", algEvidence{offered: true, sip: ok, control: ok}, ALGNone},
		{"clean sip, control silent", algEvidence{offered: true, sip: ok}, ALGInconclusive},
		{"control changed only", algEvidence{offered: true, sip: ok, control: portEvidence{answered: true, received: changed}}, ALGInconclusive},
		{"rewritten", algEvidence{offered: true, sip: portEvidence{answered: true, received: changed}, control: ok}, ALGRewrites},
		{"rewritten, control silent", algEvidence{offered: true, sip: portEvidence{answered: true, received: changed}}, ALGRewrites},
		{"silent beyond loss", algEvidence{offered: true, control: ok, silenceIsDrop: true}, ALGDrops},
		{"silent within loss", algEvidence{offered: true, control: ok}, ALGInconclusive},
		{"both silent", algEvidence{offered: true}, ALGInconclusive},
		{"no mirror", algEvidence{}, ALGNotOffered},
	}
	for _, c := range cases {
		c.ev.sent, c.ev.sentControl = sent, sent
		if got := algVerdictFor(c.ev); got.Verdict != c.want || (got.Verdict == ALGInconclusive && got.Reason == "") {
			t.Errorf("%s: %s (%q), want %s", c.name, got.Verdict, got.Reason, c.want)
		}
	}
	// alg_detected: true on any rewrite or drop, false only when both
	// transports are clean.
	mk := func(u, tc ALGVerdict) *SIPReport {
		return &SIPReport{Offered: true, ALG: map[string]*ALGResult{"udp": {Verdict: u}, "tcp": {Verdict: tc}}}
	}
	for _, c := range []struct {
		s    *SIPReport
		want string
	}{
		{mk(ALGNone, ALGNone), "false"}, {mk(ALGRewrites, ALGNone), "true"}, {mk(ALGNone, ALGDrops), "true"},
		{mk(ALGInconclusive, ALGRewrites), "true"}, {mk(ALGNone, ALGInconclusive), "null"}, {nil, "null"},
		{&SIPReport{ALG: map[string]*ALGResult{"udp": {Verdict: ALGNotOffered}, "tcp": {Verdict: ALGNotOffered}}}, "null"},
	} {
		got, why := algDetected(c.s)
		if str := fmt.Sprint(fmtBool(got)); (str != c.want && !(got == nil && c.want == "null")) || (got == nil && why == "") {
			t.Errorf("%+v: alg_detected %s (%q), want %s", c.s, fmtBool(got), why, c.want)
		}
	}
}

// Captured on the lab's real Linux SIP ALG (nf_nat_sip, lab/README.md):
// the INVITE as it left natprobe (router's inside interface) and as it
// reached the server. The helper rewrote every 10.0.0.2 in Via, From,
// Contact and SDP o=/c= into the NAT's 198.51.100.1 and fixed
// Content-Length; it left the request-URI, To, Call-ID and m= alone.
func TestDiffSIPCapturedLinuxALG(t *testing.T) {
	sent, err1 := os.ReadFile("testdata/alg/nf_nat_sip-udp.sent")
	got, err2 := os.ReadFile("testdata/alg/nf_nat_sip-udp.received")
	if err := errors.Join(err1, err2); err != nil {
		t.Fatal(err)
	}
	var fields []string
	for _, c := range diffSIP(sent, got) {
		fields = append(fields, c.Field)
		if c.Field != fieldContentLength && (!strings.Contains(c.Sent, "10.0.0.2") || !strings.Contains(c.Received, "198.51.100.1")) {
			t.Errorf("%s: %q → %q", c.Field, c.Sent, c.Received)
		}
	}
	want := []string{fieldVia, fieldFrom, fieldContact, fieldContentLength, fieldSDPO, fieldSDPC}
	if !slices.Equal(fields, want) {
		t.Errorf("changed %v, want %v", fields, want)
	}
}

// A box that eats SIP on the SIP port over UDP too: drops on both
// transports, decided by the exact test against the control port's
// answers, and the advice first.
func TestSIPDropsUDP(t *testing.T) {
	t.Parallel()
	addr, ports := startLoopbackMirror(t)
	proxy := algProxy(t, netip.AddrPortFrom(lo1, uint16(ports.SIP)), func([]byte) []byte { return nil })
	r := probeSIP(t, addr, SIPConfig{Port: proxy, ControlPort: uint16(ports.Control)})
	if verdicts(r) != "drops/drops" || r.ALGDetected == nil || !*r.ALGDetected {
		t.Fatalf("verdicts %s alg_detected %v reasons %v", verdicts(r), fmtBool(r.ALGDetected), r.Reasons)
	}
	if !strings.Contains(r.SIPRTP.Summary, "drops SIP over UDP") {
		t.Errorf("summary %q", r.SIPRTP.Summary)
	}
}
