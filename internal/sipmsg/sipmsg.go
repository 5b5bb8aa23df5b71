// Package sipmsg parses and builds the few SIP messages that stund's SIP
// mirror and natprobe's ALG test exchange, and the mirror's report of what
// it received, which both sides must read alike.
package sipmsg

import (
	"bytes"
	"compress/flate"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
)

// Limits. A SIP message of the ALG test is well under them; anything over
// is not ours and is refused before it costs memory.
const (
	// MaxHeader bounds the start line plus headers: 8 KiB, more than
	// any real INVITE's (RFC 3261 §18.1.1 expects UDP messages under
	// the path MTU, about 1300 bytes).
	MaxHeader = 8 << 10
	// MaxBody bounds Content-Length.
	MaxBody = 8 << 10
	// maxHeaders bounds the number of header lines.
	maxHeaders = 64
)

// Errors of Parse.
var (
	ErrNotSIP    = errors.New("not SIP")
	ErrMalformed = errors.New("malformed SIP")
	ErrTooLarge  = errors.New("SIP message over the size limits")
	ErrShort     = errors.New("incomplete SIP message")
)

// Header is one header line, name as written.
type Header struct {
	Name, Value string
}

// Message is one parsed SIP message.
type Message struct {
	// Request line (Method != "") or status line.
	Method, URI string
	Status      int
	Reason      string
	Headers     []Header
	Body        []byte
	// Len is the number of bytes of the input the message used (start
	// line, headers, blank line and Content-Length bytes of body).
	Len int
}

// compact maps RFC 3261 §7.3.3 compact header names to their long forms.
var compact = map[string]string{
	"v": "via", "f": "from", "t": "to", "i": "call-id", "m": "contact",
	"l": "content-length", "c": "content-type", "k": "supported", "s": "subject", "e": "content-encoding",
}

// Canonical returns the lower-case long form of a header name.
func Canonical(name string) string {
	n := strings.ToLower(strings.TrimSpace(name))
	if l, ok := compact[n]; ok {
		return l
	}
	return n
}

// Get returns the value of the first header called name (compact forms
// and case do not matter), and whether there was one.
func (m *Message) Get(name string) (string, bool) {
	want := Canonical(name)
	for _, h := range m.Headers {
		if Canonical(h.Name) == want {
			return h.Value, true
		}
	}
	return "", false
}

// All returns the values of every header called name, in order.
func (m *Message) All(name string) []string {
	want := Canonical(name)
	var out []string
	for _, h := range m.Headers {
		if Canonical(h.Name) == want {
			out = append(out, h.Value)
		}
	}
	return out
}

// Parse reads one SIP message from the start of b. A datagram must hold
// exactly one message (RFC 3261 §18.3: Content-Length is then optional and
// the rest of the datagram is the body); a stream's message ends where its
// Content-Length says, which is mandatory there, and ErrShort asks for
// more bytes.
func Parse(b []byte, stream bool) (*Message, error) {
	end := bytes.Index(b, []byte("\r\n\r\n"))
	if end < 0 {
		if len(b) > MaxHeader {
			return nil, ErrTooLarge
		}
		if stream && !bytes.Contains(b, []byte("\r\n")) {
			return nil, ErrShort // the start line itself is still arriving
		}
		if !looksSIP(b) {
			return nil, ErrNotSIP
		}
		if stream {
			return nil, ErrShort
		}
		return nil, fmt.Errorf("%w: no blank line after the headers", ErrMalformed)
	}
	if end+4 > MaxHeader {
		return nil, ErrTooLarge
	}
	lines := strings.Split(string(b[:end]), "\r\n")
	m := &Message{}
	if err := m.startLine(lines[0]); err != nil {
		return nil, err
	}
	for _, l := range lines[1:] {
		if l != "" && (l[0] == ' ' || l[0] == '\t') { // RFC 3261 §7.3.1 folding
			if len(m.Headers) == 0 {
				return nil, fmt.Errorf("%w: continuation line before any header", ErrMalformed)
			}
			m.Headers[len(m.Headers)-1].Value += " " + strings.TrimSpace(l)
			continue
		}
		name, value, ok := strings.Cut(l, ":")
		name = strings.TrimSpace(name)
		if !ok || name == "" || strings.ContainsAny(name, " \t") {
			return nil, fmt.Errorf("%w: header line %q", ErrMalformed, clip(l))
		}
		if len(m.Headers) == maxHeaders {
			return nil, ErrTooLarge
		}
		m.Headers = append(m.Headers, Header{name, strings.TrimSpace(value)})
	}
	rest := b[end+4:]
	cl, hasCL := m.Get("content-length")
	switch {
	case hasCL:
		n, err := strconv.Atoi(cl)
		if err != nil || n < 0 {
			return nil, fmt.Errorf("%w: Content-Length %q", ErrMalformed, clip(cl))
		}
		if n > MaxBody {
			return nil, ErrTooLarge
		}
		if n > len(rest) {
			if stream {
				return nil, ErrShort
			}
			return nil, fmt.Errorf("%w: Content-Length %d but %d bytes of body", ErrMalformed, n, len(rest))
		}
		rest = rest[:n]
	case stream:
		return nil, fmt.Errorf("%w: no Content-Length on a stream (RFC 3261 §18.3)", ErrMalformed)
	case len(rest) > MaxBody:
		return nil, ErrTooLarge
	}
	m.Body = rest
	m.Len = end + 4 + len(rest)
	return m, nil
}

func (m *Message) startLine(l string) error {
	if strings.HasPrefix(l, "SIP/2.0 ") { // RFC 3261 §7.2 Status-Line
		code, reason, _ := strings.Cut(l[len("SIP/2.0 "):], " ")
		n, err := strconv.Atoi(code)
		if err != nil || len(code) != 3 || n < 100 || n > 699 {
			return fmt.Errorf("%w: status line %q", ErrMalformed, clip(l))
		}
		m.Status, m.Reason = n, reason
		return nil
	}
	// RFC 3261 §7.1 Request-Line: Method SP Request-URI SP SIP-Version.
	f := strings.Split(l, " ")
	if len(f) != 3 || f[2] != "SIP/2.0" {
		if looksSIP([]byte(l)) {
			return fmt.Errorf("%w: request line %q", ErrMalformed, clip(l))
		}
		return ErrNotSIP
	}
	if !isToken(f[0]) || f[1] == "" || !strings.Contains(f[1], ":") {
		return fmt.Errorf("%w: request line %q", ErrMalformed, clip(l))
	}
	m.Method, m.URI = f[0], f[1]
	return nil
}

// looksSIP says whether the first line ends in SIP/2.0 or starts with it:
// what tells malformed SIP apart from other protocols in the drop counts.
func looksSIP(b []byte) bool {
	l, _, _ := bytes.Cut(b, []byte("\r\n"))
	return bytes.HasPrefix(l, []byte("SIP/2.0 ")) || bytes.HasSuffix(l, []byte(" SIP/2.0"))
}

// isToken is RFC 3261 §25.1 token, as far as a method name needs.
func isToken(s string) bool {
	if s == "" {
		return false
	}
	for _, c := range []byte(s) {
		if !(c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || strings.IndexByte("-.!%*_+`'~", c) >= 0) {
			return false
		}
	}
	return true
}

func clip(s string) string {
	if len(s) > 60 {
		return s[:60] + "…"
	}
	return s
}

// ValidRequest checks what RFC 3261 §8.1.1 makes mandatory in a request
// and the mirror needs to answer it (§8.2.6): Via, From, To, Call-ID and
// a CSeq whose method matches the request line.
func (m *Message) ValidRequest() error {
	if m.Method == "" {
		return fmt.Errorf("%w: a response, not a request", ErrMalformed)
	}
	for _, h := range []string{"via", "from", "to", "call-id", "cseq"} {
		if v, ok := m.Get(h); !ok || v == "" {
			return fmt.Errorf("%w: no %s header", ErrMalformed, h)
		}
	}
	cseq, _ := m.Get("cseq")
	num, method, ok := strings.Cut(cseq, " ")
	if _, err := strconv.ParseUint(num, 10, 32); !ok || err != nil || strings.TrimSpace(method) != m.Method {
		return fmt.Errorf("%w: CSeq %q does not match %s", ErrMalformed, clip(cseq), m.Method)
	}
	return nil
}

// Report is what the mirror tells the prober about one request: where it
// came from, over what, to which of the mirror's ports, and the request
// exactly as it arrived. It travels in the answer's SDP as attributes
// whose values are base64 (of DEFLATE for the request), so that an ALG on
// the way back, which rewrites addresses it recognises in SIP and SDP,
// cannot alter them.
type Report struct {
	Source    netip.AddrPort // the request's source as the mirror saw it
	Transport string         // udp, tcp or tls
	Port      string         // "sip" or "control": which of the mirror's ports got it
	MediaPort uint16         // the media echo's UDP port, 0 when none
	Request   []byte         // the request as received
}

// SDP attribute names of the report (RFC 8866 §5.13 a=<name>:<value>).
const (
	attrSource  = "x-stund-source"
	attrRequest = "x-stund-request"
	attrMedia   = "x-stund-media"
)

// SDP returns the answer's body: an RFC 8866 session at ip whose media line
// has port 0 (RFC 3264 §6: no stream), the media echo's port in an
// attribute, and the report in two more. Port 0 because Linux's SIP helper
// drops a message whose SDP announces an address and port it already
// expects media on for another call (lab/README.md): every answer naming
// the one echo port would be dropped after the first.
func (r Report) SDP(ip netip.Addr) ([]byte, error) {
	var z bytes.Buffer
	w, err := flate.NewWriter(&z, flate.BestCompression)
	if err != nil {
		return nil, err
	}
	if _, err := w.Write(r.Request); err != nil {
		return nil, err
	}
	if err := w.Close(); err != nil {
		return nil, err
	}
	fam := "IP4"
	if ip.Is6() {
		fam = "IP6"
	}
	src := fmt.Sprintf("%s %s %s", r.Transport, r.Port, r.Source)
	var b bytes.Buffer
	fmt.Fprintf(&b, "v=0\r\no=stund 0 0 IN %s %s\r\ns=-\r\nc=IN %s %s\r\nt=0 0\r\n", fam, ip, fam, ip)
	b.WriteString("m=audio 0 RTP/AVP 0 8\r\n")
	if r.MediaPort != 0 {
		fmt.Fprintf(&b, "a=%s:%d\r\n", attrMedia, r.MediaPort)
	}
	fmt.Fprintf(&b, "a=%s:%s\r\n", attrSource, base64.StdEncoding.EncodeToString([]byte(src)))
	fmt.Fprintf(&b, "a=%s:%s\r\n", attrRequest, base64.StdEncoding.EncodeToString(z.Bytes()))
	return b.Bytes(), nil
}

// ParseReport reads the report from an answer's SDP body.
func ParseReport(body []byte) (Report, error) {
	var r Report
	var src, req string
	for _, l := range strings.Split(string(body), "\n") {
		l = strings.TrimRight(l, "\r")
		switch {
		case strings.HasPrefix(l, "a="+attrSource+":"):
			src = l[len("a="+attrSource+":"):]
		case strings.HasPrefix(l, "a="+attrRequest+":"):
			req = l[len("a="+attrRequest+":"):]
		case strings.HasPrefix(l, "a="+attrMedia+":"):
			if p, err := strconv.ParseUint(l[len("a="+attrMedia+":"):], 10, 16); err == nil {
				r.MediaPort = uint16(p)
			}
		}
	}
	if src == "" || req == "" {
		return r, fmt.Errorf("%w: the answer carries no mirror report", ErrMalformed)
	}
	s, err := base64.StdEncoding.DecodeString(src)
	if err != nil {
		return r, fmt.Errorf("%w: source attribute: %v", ErrMalformed, err)
	}
	f := strings.Fields(string(s))
	if len(f) != 3 {
		return r, fmt.Errorf("%w: source attribute %q", ErrMalformed, clip(string(s)))
	}
	r.Transport, r.Port = f[0], f[1]
	if r.Source, err = netip.ParseAddrPort(f[2]); err != nil {
		return r, fmt.Errorf("%w: source attribute: %v", ErrMalformed, err)
	}
	z, err := base64.StdEncoding.DecodeString(req)
	if err != nil {
		return r, fmt.Errorf("%w: request attribute: %v", ErrMalformed, err)
	}
	// Bounded: a request the mirror accepted is at most MaxHeader+MaxBody.
	fr := flate.NewReader(bytes.NewReader(z))
	defer fr.Close()
	if r.Request, err = io.ReadAll(io.LimitReader(fr, MaxHeader+MaxBody+1)); err != nil {
		return r, fmt.Errorf("%w: request attribute: %v", ErrMalformed, err)
	}
	if len(r.Request) > MaxHeader+MaxBody {
		return r, ErrTooLarge
	}
	return r, nil
}

// Invite describes the INVITE of the ALG test: the addresses a phone
// behind a NAT would put in it, which are what an ALG rewrites.
type Invite struct {
	Transport string         // UDP or TCP, for the Via (RFC 3261 §20.42)
	Local     netip.AddrPort // the phone's own address: Via, Contact, SDP o= and c=
	Server    netip.AddrPort // the request-URI's host
	RTPPort   uint16         // SDP m= port
	CallID    string
	Branch    string // RFC 3261 §8.1.1.7: starts with z9hG4bK
	Tag       string
	// PadTo pads the request with an X-Pad header to at least this many
	// bytes, so that the mirror's UDP answer, which must not exceed the
	// request, fits.
	PadTo int
}

// Build returns the request bytes.
func (in Invite) Build() []byte {
	fam := "IP4"
	if in.Local.Addr().Is6() {
		fam = "IP6"
	}
	ip := in.Local.Addr().String()
	sdp := fmt.Sprintf("v=0\r\no=natprobe 1 1 IN %s %s\r\ns=natprobe\r\nc=IN %s %s\r\nt=0 0\r\nm=audio %d RTP/AVP 0 8\r\na=rtpmap:0 PCMU/8000\r\na=sendrecv\r\n",
		fam, ip, fam, ip, in.RTPPort)
	uri := "sip:mirror@" + in.Server.String()
	var b strings.Builder
	fmt.Fprintf(&b, "INVITE %s SIP/2.0\r\n", uri)
	fmt.Fprintf(&b, "Via: SIP/2.0/%s %s;branch=%s;rport\r\n", in.Transport, in.Local, in.Branch)
	b.WriteString("Max-Forwards: 70\r\n")
	fmt.Fprintf(&b, "From: <sip:natprobe@%s>;tag=%s\r\n", in.Local, in.Tag)
	fmt.Fprintf(&b, "To: <%s>\r\n", uri)
	fmt.Fprintf(&b, "Call-ID: %s\r\n", in.CallID)
	b.WriteString("CSeq: 1 INVITE\r\n")
	fmt.Fprintf(&b, "Contact: <sip:natprobe@%s;transport=%s>\r\n", in.Local, strings.ToLower(in.Transport))
	b.WriteString("Content-Type: application/sdp\r\n")
	fmt.Fprintf(&b, "Content-Length: %d\r\n", len(sdp))
	const padHdr = "X-Pad: \r\n"
	if n := in.PadTo - (b.Len() + 2 + len(sdp)) - len(padHdr); n > 0 {
		fmt.Fprintf(&b, "X-Pad: %s\r\n", strings.Repeat("x", n))
	}
	b.WriteString("\r\n")
	b.WriteString(sdp)
	return []byte(b.String())
}
