package main

import (
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stund/stund/internal/sipmsg"
)

var sipRE = regexp.MustCompile(`SIP mirror on [0-9. ]+: sip (\d+), control (\d+)`)

// --sip-mirror starts the mirror beside the server, its answers show in
// the stund_sip_* metrics and it spends the server's per-IP budget.
func TestSIPMirrorFlag(t *testing.T) {
	admin, _, out := startStund(t, "--sip-mirror", "--sip-port", "0", "--sip-control-port", "0", "--sip-media-port", "0")
	m := sipRE.FindStringSubmatch(out.String())
	if m == nil {
		t.Fatalf("no SIP mirror line in %q", out.String())
	}
	port, _ := strconv.Atoi(m[1])
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:0")))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	req := sipmsg.Invite{Transport: "UDP", Local: c.LocalAddr().(*net.UDPAddr).AddrPort(), Server: netip.MustParseAddrPort("127.0.0.1:5060"),
		RTPPort: 4000, CallID: "x", Branch: "z9hG4bK1", Tag: "t", PadTo: 1200}.Build()
	if _, err := c.WriteToUDPAddrPort(req, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port))); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(testTimeout))
	buf := make([]byte, 2048)
	n, _, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatalf("no answer from the mirror: %v", err)
	}
	if !strings.HasPrefix(string(buf[:n]), "SIP/2.0 200 OK\r\n") {
		t.Fatalf("answer %q", buf[:n])
	}
	waitSeries(t, admin, `stund_sip_answers_total{transport="udp"}`, 1)
	waitSeries(t, admin, `stund_sip_requests_total{transport="udp"}`, 1)
}

// Off by default: nothing listens on a SIP port and no mirror line.
func TestSIPMirrorOffByDefault(t *testing.T) {
	_, _, out := startStund(t)
	if strings.Contains(out.String(), "SIP mirror") {
		t.Fatalf("mirror started without --sip-mirror: %q", out.String())
	}
}

// Bad SIP settings exit 2 naming the key, and the YAML line.
func TestSIPMirrorBadConfig(t *testing.T) {
	yml := filepath.Join(t.TempDir(), "stund.yaml")
	if err := os.WriteFile(yml, []byte("realm: x\nsip-mirror: true\nsip-media-port: 5063\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, _, errOut := runArgs(t, "--config", yml)
	if code != exitUsage || !strings.Contains(errOut, "sip-media-port") || !strings.Contains(errOut, "line 3") {
		t.Errorf("odd media port in YAML: code %d, stderr %q", code, errOut)
	}
	code, _, errOut = runArgs(t, "--sip-mirror", "--sip-control-port", "5060")
	if code != exitUsage || !strings.Contains(errOut, "sip-control-port") {
		t.Errorf("control port = SIP port: code %d, stderr %q", code, errOut)
	}
	t.Setenv("STUND_SIP_PORT", "70000")
	code, _, errOut = runArgs(t, "--sip-mirror")
	if code != exitUsage || !strings.Contains(errOut, "sip-port") {
		t.Errorf("STUND_SIP_PORT=70000: code %d, stderr %q", code, errOut)
	}
}
