package sipmsg

import (
	"bytes"
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func invite() []byte {
	return Invite{Transport: "TCP", Local: netip.MustParseAddrPort("10.0.0.2:5060"), Server: netip.MustParseAddrPort("198.51.100.10:5060"),
		RTPPort: 4000, CallID: "c@x", Branch: "z9hG4bK1", Tag: "t"}.Build()
}

// RFC 3261 §18.3: a stream message ends at Content-Length; a partial one
// asks for more; what follows is the next message.
func TestParseStreamFraming(t *testing.T) {
	msg := invite()
	two := append(append([]byte{}, msg...), msg...)
	m, err := Parse(two, true)
	if err != nil || m.Len != len(msg) || m.Method != "INVITE" {
		t.Fatalf("first of two: len %v err %v", m, err)
	}
	for _, cut := range []int{10, bytes.Index(msg, []byte("\r\n\r\n")), len(msg) - 1} {
		if _, err := Parse(msg[:cut], true); !errors.Is(err, ErrShort) {
			t.Errorf("cut at %d: %v, want ErrShort", cut, err)
		}
	}
	if _, err := Parse(msg[:len(msg)-1], false); !errors.Is(err, ErrMalformed) {
		t.Errorf("short datagram body: %v, want ErrMalformed", err)
	}
}

// Compact forms and case do not matter to Get (RFC 3261 §7.3.3); folding
// joins lines (§7.3.1).
func TestHeaders(t *testing.T) {
	m, err := Parse([]byte("OPTIONS sip:a@b SIP/2.0\r\nv: SIP/2.0/UDP h\r\nVIA: SIP/2.0/UDP g\r\nf: <sip:x@y>\r\n ;tag=1\r\nt: b\r\ni: c\r\nCSeq: 2 OPTIONS\r\nl: 0\r\n\r\n"), false)
	if err != nil {
		t.Fatal(err)
	}
	if v := m.All("Via"); len(v) != 2 || v[1] != "SIP/2.0/UDP g" {
		t.Errorf("via %q", v)
	}
	if f, _ := m.Get("FROM"); f != "<sip:x@y> ;tag=1" {
		t.Errorf("from %q", f)
	}
	if err := m.ValidRequest(); err != nil {
		t.Error(err)
	}
}

// What is not SIP says so; what looks like SIP but is broken is malformed.
func TestParseErrors(t *testing.T) {
	for _, c := range []struct {
		in   string
		want error
	}{
		{"GET / HTTP/1.1\r\n\r\n", ErrNotSIP},
		{"\x00\x01\x00\x00", ErrNotSIP},
		{"INVITE sip:a SIP/3.0\r\n\r\n", ErrNotSIP},
		{"INVITE nouri SIP/2.0\r\n\r\n", ErrMalformed},
		{"SIP/2.0 99 Low\r\n\r\n", ErrMalformed},
		{"INVITE sip:a SIP/2.0\r\nbad header\r\n\r\n", ErrMalformed},
		{"INVITE sip:a SIP/2.0\r\nX: " + strings.Repeat("x", MaxHeader) + "\r\n\r\n", ErrTooLarge},
		{"INVITE sip:a SIP/2.0\r\nContent-Length: 9000\r\n\r\n", ErrTooLarge},
	} {
		if _, err := Parse([]byte(c.in), false); !errors.Is(err, c.want) {
			t.Errorf("%.30q: %v, want %v", c.in, err, c.want)
		}
	}
}

// The report survives the trip through SDP byte for byte, and an ALG's
// address rewrite of the SDP lines leaves it intact.
func TestReportRoundTrip(t *testing.T) {
	in := Report{Source: netip.MustParseAddrPort("198.51.100.1:40000"), Transport: "udp", Port: "sip", MediaPort: 5064, Request: invite()}
	sdp, err := in.SDP(netip.MustParseAddr("198.51.100.10"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(sdp, []byte("m=audio 0 ")) {
		t.Errorf("media line must have port 0:\n%s", sdp)
	}
	alg := bytes.ReplaceAll(sdp, []byte("198.51.100.10"), []byte("10.0.0.99"))
	alg = bytes.ReplaceAll(alg, []byte("198.51.100.1"), []byte("10.0.0.2"))
	out, err := ParseReport(alg)
	if err != nil {
		t.Fatal(err)
	}
	if out.Source != in.Source || out.Transport != "udp" || out.Port != "sip" || out.MediaPort != 5064 || !bytes.Equal(out.Request, in.Request) {
		t.Errorf("got %+v", out)
	}
	if _, err := ParseReport([]byte("v=0\r\n")); err == nil {
		t.Error("no report parsed without error")
	}
}
