package sipmirror

import (
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stund/stund/internal/sipmsg"
	"github.com/stund/stund/internal/testutil"
)

var lo = netip.MustParseAddr("127.0.0.1")

// padTo is natprobe's padding (classifier.sipPadTo); the tests check that
// it is enough for the mirror's answer.
const padTo = 1200

func newMirror(t *testing.T, cfg Config) *Mirror {
	t.Helper()
	cfg.IPs = []netip.Addr{lo}
	m, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

func invite(local netip.AddrPort, transport string, pad int) []byte {
	return sipmsg.Invite{
		Transport: transport, Local: local, Server: netip.AddrPortFrom(lo, 5060), RTPPort: 40000,
		CallID: "c1@natprobe", Branch: "z9hG4bK-1", Tag: "t1", PadTo: pad,
	}.Build()
}

// udpExchange sends req from a fresh socket and returns the answer, or nil
// after a wait in which the loopback would certainly have delivered one.
func udpExchange(t *testing.T, port int, req []byte) ([]byte, netip.AddrPort) {
	t.Helper()
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(lo, 0)))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.WriteToUDPAddrPort(req, netip.AddrPortFrom(lo, uint16(port))); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	buf := make([]byte, 65536)
	n, _, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		return nil, c.LocalAddr().(*net.UDPAddr).AddrPort()
	}
	return buf[:n], c.LocalAddr().(*net.UDPAddr).AddrPort()
}

func TestUDPAnswerMirrorsRequest(t *testing.T) {
	m := newMirror(t, Config{})
	for _, port := range []struct {
		name string
		n    int
	}{{portSIP, m.Ports().SIP}, {portControl, m.Ports().Control}} {
		req := invite(netip.MustParseAddrPort("10.0.0.2:5060"), "UDP", padTo)
		ans, src := udpExchange(t, port.n, req)
		if ans == nil {
			t.Fatalf("%s: no answer to a %d-byte INVITE", port.name, len(req))
		}
		if len(ans) > len(req) {
			t.Fatalf("%s: answer %d bytes > request %d", port.name, len(ans), len(req))
		}
		msg, err := sipmsg.Parse(ans, false)
		if err != nil || msg.Status != 200 {
			t.Fatalf("%s: answer %q: %v", port.name, ans, err)
		}
		via, _ := msg.Get("via")
		wantVia := "SIP/2.0/UDP 10.0.0.2:5060;branch=z9hG4bK-1;received=127.0.0.1;rport=" + strconv.Itoa(int(src.Port()))
		if via != wantVia {
			t.Errorf("%s: Via %q, want %q (RFC 3581 §4)", port.name, via, wantVia)
		}
		if to, _ := msg.Get("to"); !strings.Contains(to, ";tag=") {
			t.Errorf("%s: To %q has no tag (RFC 3261 §8.2.6.2)", port.name, to)
		}
		for _, h := range []string{"from", "call-id", "cseq"} {
			a, _ := msg.Get(h)
			rq, _ := sipmsg.Parse(req, false)
			b, _ := rq.Get(h)
			if a != b {
				t.Errorf("%s: %s %q, request had %q", port.name, h, a, b)
			}
		}
		rep, err := sipmsg.ParseReport(msg.Body)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(rep.Request, req) || rep.Source != src || rep.Transport != "udp" || rep.Port != port.name {
			t.Errorf("%s: report %+v, want the request as sent from %s", port.name, rep, src)
		}
		if rep.MediaPort != uint16(m.Ports().Media) || rep.MediaPort%2 != 0 {
			t.Errorf("%s: media port %d, bound %d (must be even)", port.name, rep.MediaPort, m.Ports().Media)
		}
	}
}

// The UDP answer is never larger than the request: an unpadded INVITE,
// whose answer would be larger, gets nothing.
func TestUDPNoAmplification(t *testing.T) {
	m := newMirror(t, Config{})
	req := invite(netip.MustParseAddrPort("10.0.0.2:5060"), "UDP", 0)
	if ans, _ := udpExchange(t, m.Ports().SIP, req); ans != nil {
		t.Fatalf("answered a %d-byte request with %d bytes", len(req), len(ans))
	}
	if got := m.Stats().Drops[DropAmplify]; got != 1 {
		t.Fatalf("drops %v, want one %s", m.Stats().Drops, DropAmplify)
	}
}

func TestUDPDropsMalformedAndNonSIP(t *testing.T) {
	m := newMirror(t, Config{})
	good := string(invite(netip.MustParseAddrPort("10.0.0.2:5060"), "UDP", padTo))
	cases := []struct {
		name, in, reason string
	}{
		{"stun", "\x00\x01\x00\x00\x21\x12\xa4\x42abcdefghijkl" + strings.Repeat("\x00", 1200), DropNotSIP},
		{"http", "GET / HTTP/1.1\r\nHost: x\r\n\r\n" + strings.Repeat("x", 1200), DropNotSIP},
		{"no call-id", strings.Replace(good, "Call-ID:", "X-Call:", 1), DropMalformed},
		{"cseq mismatch", strings.Replace(good, "CSeq: 1 INVITE", "CSeq: 1 BYE", 1), DropMalformed},
		{"bad content-length", strings.Replace(good, "Content-Length: ", "Content-Length: x", 1), DropMalformed},
		{"response", strings.Replace(good, "INVITE sip:mirror@127.0.0.1:5060 SIP/2.0", "SIP/2.0 200 OK", 1), DropResponse},
		{"ack", strings.Replace(strings.Replace(good, "INVITE sip:", "ACK sip:", 1), "1 INVITE", "1 ACK", 1), DropACK},
		{"huge header", "OPTIONS sip:x@y SIP/2.0\r\nX: " + strings.Repeat("x", 9000) + "\r\n\r\n", DropTooLarge},
	}
	for _, c := range cases {
		before := m.Stats().Drops[c.reason]
		if ans, _ := udpExchange(t, m.Ports().SIP, []byte(c.in)); ans != nil {
			t.Errorf("%s: answered: %q", c.name, ans[:min(len(ans), 60)])
		}
		if m.Stats().Drops[c.reason] != before+1 {
			t.Errorf("%s: drops %v, want one more %s", c.name, m.Stats().Drops, c.reason)
		}
	}
	if a := m.Stats().Answers["udp"]; a != 0 {
		t.Fatalf("%d answers to bad input", a)
	}
}

// Every answer takes a token from Config.Allow, over every transport.
func TestAllowBudget(t *testing.T) {
	var budget atomic.Int32
	budget.Store(1)
	var asked atomic.Int32
	m := newMirror(t, Config{Allow: func(a netip.Addr) bool {
		asked.Add(1)
		if a != lo {
			t.Errorf("Allow(%v), want the source %v", a, lo)
		}
		return budget.Add(-1) >= 0
	}})
	req := invite(netip.MustParseAddrPort("10.0.0.2:5060"), "UDP", padTo)
	if ans, _ := udpExchange(t, m.Ports().SIP, req); ans == nil {
		t.Fatal("no answer within budget")
	}
	if ans, _ := udpExchange(t, m.Ports().SIP, req); ans != nil {
		t.Fatal("answered past the budget")
	}
	if _, err := tcpExchange(t, m.Ports().Control, invite(netip.MustParseAddrPort("10.0.0.2:5060"), "TCP", 0)); err == nil {
		t.Fatal("TCP answered past the budget")
	}
	if got := m.Stats().Drops[DropRateLimited]; got != 2 || asked.Load() != 3 {
		t.Fatalf("rate-limited %d (want 2), Allow called %d times (want 3)", got, asked.Load())
	}
}

func tcpExchange(t *testing.T, port int, req []byte) ([]byte, error) {
	t.Helper()
	c, err := net.Dial("tcp", netip.AddrPortFrom(lo, uint16(port)).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(req); err != nil {
		return nil, err
	}
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	var buf []byte
	tmp := make([]byte, 4096)
	for {
		n, err := c.Read(tmp)
		buf = append(buf, tmp[:n]...)
		if m, perr := sipmsg.Parse(buf, true); perr == nil {
			return buf[:m.Len], nil
		}
		if err != nil {
			return nil, err
		}
	}
}

func TestTCPAnswer(t *testing.T) {
	m := newMirror(t, Config{})
	req := invite(netip.MustParseAddrPort("10.0.0.2:5060"), "TCP", 0)
	ans, err := tcpExchange(t, m.Ports().SIP, req)
	if err != nil {
		t.Fatal(err)
	}
	msg, _ := sipmsg.Parse(ans, true)
	rep, err := sipmsg.ParseReport(msg.Body)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(rep.Request, req) || rep.Transport != "tcp" || rep.Port != portSIP {
		t.Fatalf("report %+v", rep)
	}
}

// A stream without Content-Length, or with headers past the limit, is
// closed unanswered.
func TestTCPBadFraming(t *testing.T) {
	m := newMirror(t, Config{})
	noCL := strings.Replace(string(invite(netip.MustParseAddrPort("10.0.0.2:5060"), "TCP", 0)), "Content-Length:", "X-Length:", 1)
	if _, err := tcpExchange(t, m.Ports().SIP, []byte(noCL)); err == nil {
		t.Error("answered a stream message without Content-Length")
	}
	big := "OPTIONS sip:x@y SIP/2.0\r\nX: " + strings.Repeat("x", 20000)
	if _, err := tcpExchange(t, m.Ports().SIP, []byte(big)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("oversized header: %v, want the connection closed", err)
	}
	if d := m.Stats().Drops; d[DropMalformed] != 1 || d[DropTooLarge] != 1 {
		t.Fatalf("drops %v", d)
	}
}

// One IP cannot hold more than MaxConnsPerIP connections.
func TestTCPConnLimit(t *testing.T) {
	m := newMirror(t, Config{MaxConnsPerIP: 2})
	addr := netip.AddrPortFrom(lo, uint16(m.Ports().SIP)).String()
	var held []net.Conn
	for range 2 {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		held = append(held, c)
	}
	// Let the mirror accept both before the third arrives.
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		m.mu.Lock()
		n := m.perIP[lo]
		m.mu.Unlock()
		if n == 2 {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("third connection: %v, want it closed", err)
	}
	if m.Stats().Drops[DropConnLimit] != 1 {
		t.Fatalf("drops %v", m.Stats().Drops)
	}
	// The held ones still work.
	if _, err := held[0].Write(invite(netip.MustParseAddrPort("10.0.0.2:5060"), "TCP", 0)); err != nil {
		t.Fatal(err)
	}
}

func rtp(seq uint16, ts uint32, size int) []byte {
	p := make([]byte, size)
	p[0] = 0x80
	binary.BigEndian.PutUint16(p[2:], seq)
	binary.BigEndian.PutUint32(p[4:], ts)
	return p
}

// The media echo answers only after a SIP exchange from the same IP, with
// the same size, stamped with its receive count.
func TestMediaEcho(t *testing.T) {
	m := newMirror(t, Config{})
	c, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(lo, 0)))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	media := netip.AddrPortFrom(lo, uint16(m.Ports().Media))
	recv := func() []byte {
		_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		b := make([]byte, 2048)
		n, from, err := c.ReadFromUDPAddrPort(b)
		if err != nil {
			return nil
		}
		if from != media {
			t.Fatalf("echo from %v, want %v", from, media)
		}
		return b[:n]
	}
	_, _ = c.WriteToUDPAddrPort(rtp(1, 160, 172), media)
	if got := recv(); got != nil {
		t.Fatal("echoed media to an IP without a SIP exchange")
	}
	if m.Stats().Drops[DropMediaNoSIP] != 1 {
		t.Fatalf("drops %v", m.Stats().Drops)
	}
	if ans, _ := udpExchange(t, m.Ports().SIP, invite(netip.MustParseAddrPort("10.0.0.2:5060"), "UDP", padTo)); ans == nil {
		t.Fatal("no SIP answer")
	}
	_, _ = c.WriteToUDPAddrPort(rtp(2, 320, 12), media)
	if recv() != nil {
		t.Fatal("echoed a packet too short for the stamp")
	}
	for i := range 3 {
		_, _ = c.WriteToUDPAddrPort(rtp(uint16(3+i), uint32(480+160*i), 172), media)
		got := recv()
		if len(got) != 172 {
			t.Fatalf("echo %d: %d bytes, want 172", i, len(got))
		}
		if n := binary.BigEndian.Uint32(got[StampOffset:]); n != uint32(i+1) {
			t.Fatalf("echo %d: receive count %d, want %d", i, n, i+1)
		}
		if p := binary.BigEndian.Uint16(got[StampOffset+8:]); p != uint16(c.LocalAddr().(*net.UDPAddr).Port) {
			t.Fatalf("echo %d: source port %d, sent from %v", i, p, c.LocalAddr())
		}
	}
}

// The flow's rate and age bounds, on the stamp function directly so that
// no test waits 30 s.
func TestMediaBounds(t *testing.T) {
	m := newMirror(t, Config{})
	e := m.media
	src := netip.MustParseAddrPort("127.0.0.9:4000")
	t0 := time.Unix(1000, 0)
	e.sawSIP(src.Addr(), t0)
	echoed := 0
	for i := range 300 { // 300 packets in 1 s: three times the rate
		if e.stamp(rtp(uint16(i), uint32(i*160), 172), src, false, t0.Add(time.Duration(i)*time.Second/300)) {
			echoed++
		}
	}
	if echoed > int(mediaBurst+mediaRate)+1 || echoed < int(mediaRate) {
		t.Fatalf("echoed %d of 300 in 1 s, want about %v+%v", echoed, mediaBurst, mediaRate)
	}
	e.sawSIP(src.Addr(), t0.Add(mediaFlowMax))
	if e.stamp(rtp(1, 1, 172), src, false, t0.Add(mediaFlowMax+time.Second)) {
		t.Fatal("echoed past the flow's 30 s")
	}
	other := netip.MustParseAddrPort("127.0.0.10:4000")
	e.sawSIP(other.Addr(), t0)
	if e.stamp(rtp(1, 1, 172), other, false, t0.Add(sipWindow+time.Second)) {
		t.Fatal("echoed to an IP whose SIP exchange is older than 30 s")
	}
}

// RFC 3550 §A.8: packets spaced exactly by their timestamps have no
// jitter; a 10 ms alternating delay converges on it.
func TestMediaJitter(t *testing.T) {
	var f flow
	t0 := time.Unix(1000, 0)
	f.first = t0
	for i := range 50 {
		f.jitterAdd(rtp(uint16(i), uint32(1e6+i*160), 172), t0.Add(time.Duration(i)*20*time.Millisecond))
	}
	if f.jitter.Value() != 0 {
		t.Fatalf("jitter %v on a perfect stream", f.jitter.Value())
	}
	for i := 50; i < 250; i++ {
		d := time.Duration(i%2) * 10 * time.Millisecond
		f.jitterAdd(rtp(uint16(i), uint32(1e6+i*160), 172), t0.Add(time.Duration(i)*20*time.Millisecond+d))
	}
	if v := f.jitter.Value(); v < 70 || v > 90 { // 10 ms = 80 timestamp units
		t.Fatalf("jitter %v units, want about 80", v)
	}
}

// A stream message that arrives in pieces, the first shorter than the
// request line, is answered once whole.
func TestTCPMessageInPieces(t *testing.T) {
	m := newMirror(t, Config{})
	c, err := net.Dial("tcp", netip.AddrPortFrom(lo, uint16(m.Ports().SIP)).String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	req := invite(netip.MustParseAddrPort("10.0.0.2:5060"), "TCP", 0)
	for _, piece := range [][]byte{req[:5], req[5:300], req[300:]} {
		if _, err := c.Write(piece); err != nil {
			t.Fatal(err)
		}
		time.Sleep(20 * time.Millisecond) // separate segments
	}
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 8192)
	n, err := c.Read(buf)
	if err != nil || !strings.HasPrefix(string(buf[:n]), "SIP/2.0 200 OK") {
		t.Fatalf("answer %q, %v", buf[:n], err)
	}
}

// SIP over TLS (RFC 3261 §26.2.1) on the TLS port when a certificate is
// configured: the same answer, reported as transport tls; and the mirror
// says where it listens in its log.
func TestTLSAnswer(t *testing.T) {
	cert, pool := testutil.SelfSigned(t)
	var logs testutil.SyncBuffer
	m := newMirror(t, Config{TLSConfig: &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
		Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if m.Ports().TLS == 0 {
		t.Fatal("no TLS port bound")
	}
	if !strings.Contains(logs.String(), "SIP mirror listening") {
		t.Errorf("log %q", logs.String())
	}
	c, err := tls.Dial("tcp", netip.AddrPortFrom(lo, uint16(m.Ports().TLS)).String(), &tls.Config{RootCAs: pool, ServerName: testutil.CertName})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	req := invite(netip.MustParseAddrPort("10.0.0.2:5061"), "TLS", 0)
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	var buf []byte
	tmp := make([]byte, 4096)
	for {
		n, err := c.Read(tmp)
		buf = append(buf, tmp[:n]...)
		if msg, perr := sipmsg.Parse(buf, true); perr == nil {
			rep, err := sipmsg.ParseReport(msg.Body)
			if err != nil || rep.Transport != "tls" || !bytes.Equal(rep.Request, req) {
				t.Fatalf("report %+v, %v", rep, err)
			}
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if m.Stats().Answers["tls"] != 1 {
		t.Errorf("answers %v", m.Stats().Answers)
	}
}

// Behind a cloud 1:1 NAT the answer's SDP names the public address.
func TestAdvertisedAddressInSDP(t *testing.T) {
	pub := netip.MustParseAddr("203.0.113.7")
	m := newMirror(t, Config{Advertise: map[netip.Addr]netip.Addr{lo: pub}})
	ans, _ := udpExchange(t, m.Ports().Control, invite(netip.MustParseAddrPort("10.0.0.2:5060"), "UDP", padTo))
	msg, err := sipmsg.Parse(ans, false)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(msg.Body, []byte("c=IN IP4 203.0.113.7\r\n")) || bytes.Contains(msg.Body, []byte("127.0.0.1")) {
		t.Errorf("SDP %q names the private address", msg.Body)
	}
}
