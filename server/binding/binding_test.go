package binding

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/pion/stun/v4"
	"github.com/stund/stund/internal/stunwire"
)

// Unit tests of binder.handle. Requests are built and replies decoded with
// pion/stun, an implementation independent of internal/stunwire.

var (
	gridV4 = [2][2]netip.AddrPort{
		{netip.MustParseAddrPort("10.0.0.1:3478"), netip.MustParseAddrPort("10.0.0.1:3479")},
		{netip.MustParseAddrPort("10.0.0.2:3478"), netip.MustParseAddrPort("10.0.0.2:3479")},
	}
	gridV6 = [2][2]netip.AddrPort{
		{netip.MustParseAddrPort("[2001:db8::1]:3478"), netip.MustParseAddrPort("[2001:db8::1]:3479")},
		{netip.MustParseAddrPort("[2001:db8::2]:3478"), netip.MustParseAddrPort("[2001:db8::2]:3479")},
	}
	clientV4 = netip.MustParseAddrPort("198.51.100.7:40000")
	clientV6 = netip.MustParseAddrPort("[2001:db8:ffff::7]:40000")
)

// request builds a cookie-form Binding request with pion, adding raw
// attributes in order; fingerprint appends FINGERPRINT.
func request(t testing.TB, fingerprint bool, attrs ...rawAttr) []byte {
	t.Helper()
	m, err := stun.Build(stun.TransactionID, stun.BindingRequest)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range attrs {
		m.Add(a.typ, a.val)
	}
	if fingerprint {
		if err := stun.Fingerprint.AddTo(m); err != nil {
			t.Fatal(err)
		}
	}
	return bytes.Clone(m.Raw)
}

// rawAttr is an attribute pion/stun has no typed setter for (server_test.go
// gives it an AddTo method).
type rawAttr struct {
	typ stun.AttrType
	val []byte
}

func changeReq(flags uint32) rawAttr {
	return rawAttr{stun.AttrChangeRequest, binary.BigEndian.AppendUint32(nil, flags)}
}
func respPort(p uint16) rawAttr {
	return rawAttr{stun.AttrResponsePort, []byte{byte(p >> 8), byte(p), 0, 0}}
}
func padding(n int) rawAttr { return rawAttr{stun.AttrPadding, make([]byte, n)} }

// decoded is a reply as pion sees it.
type decoded struct {
	msg                          *stun.Message
	xor, mapped, origin, other   netip.AddrPort
	source, changed              netip.AddrPort // RFC 3489 attributes
	hasXOR, hasMapped, hasOrigin bool
	hasOther                     bool
	code                         int
	unknown                      []stun.AttrType
	padLen                       int
	fpOK                         bool
}

func toAP(ip net.IP, port int) netip.AddrPort {
	a, _ := netip.AddrFromSlice(ip)
	return netip.AddrPortFrom(a.Unmap(), uint16(port))
}

func decode(t *testing.T, raw []byte) decoded {
	t.Helper()
	raw = bytes.Clone(raw)
	if binary.BigEndian.Uint32(raw[4:8]) != stunwire.MagicCookie {
		// pion only decodes RFC 5389 framing; RFC 3489 replies carry no
		// XOR attributes, so substituting the cookie changes nothing else.
		binary.BigEndian.PutUint32(raw[4:8], stunwire.MagicCookie)
	}
	m := &stun.Message{Raw: raw}
	if err := m.Decode(); err != nil {
		t.Fatalf("pion cannot decode reply %x: %v", raw, err)
	}
	d := decoded{msg: m}
	var xa stun.XORMappedAddress
	if err := xa.GetFrom(m); err == nil {
		d.xor, d.hasXOR = toAP(xa.IP, xa.Port), true
	}
	var ma stun.MappedAddress
	if err := ma.GetFrom(m); err == nil {
		d.mapped, d.hasMapped = toAP(ma.IP, ma.Port), true
	}
	var ro stun.ResponseOrigin
	if err := ro.GetFrom(m); err == nil {
		d.origin, d.hasOrigin = toAP(ro.IP, ro.Port), true
	}
	var oa stun.OtherAddress
	if err := oa.GetFrom(m); err == nil {
		d.other, d.hasOther = toAP(oa.IP, oa.Port), true
	}
	var sa stun.MappedAddress
	if err := sa.GetFromAs(m, stun.AttrSourceAddress); err == nil {
		d.source = toAP(sa.IP, sa.Port)
	}
	var ca stun.MappedAddress
	if err := ca.GetFromAs(m, stun.AttrChangedAddress); err == nil {
		d.changed = toAP(ca.IP, ca.Port)
	}
	var ec stun.ErrorCodeAttribute
	if err := ec.GetFrom(m); err == nil {
		d.code = int(ec.Code)
	}
	var ua stun.UnknownAttributes
	if err := ua.GetFrom(m); err == nil {
		d.unknown = ua
	}
	if p, err := m.Get(stun.AttrPadding); err == nil {
		d.padLen = len(p)
	}
	d.fpOK = stun.Fingerprint.Check(m) == nil
	return d
}

func mustHandle(t *testing.T, b *Responder, req Request) (Reply, decoded) {
	t.Helper()
	reply, ok := b.Handle(make([]byte, 0, 1500), req)
	if !ok {
		t.Fatalf("no reply to %x", req.Raw)
	}
	if !bytes.Equal(reply.Msg[8:20], req.Raw[8:20]) {
		t.Fatalf("transaction ID not echoed")
	}
	return reply, decode(t, reply.Msg)
}

func TestRFC5780Table(t *testing.T) {
	b := New(Config{Grid: gridV4})
	flags := []struct {
		name   string
		value  uint32
		dip    int
		dport  int
		absent bool
	}{
		{"none", 0, 0, 0, false},
		{"port", stunwire.ChangePort, 0, 1, false},
		{"ip", stunwire.ChangeIP, 1, 0, false},
		{"both", stunwire.ChangeIP | stunwire.ChangePort, 1, 1, false},
	}
	for ip := range 2 {
		for port := range 2 {
			at := Endpoint{ip, port}
			for _, f := range flags {
				for _, fp := range []bool{false, true} {
					raw := request(t, fp, changeReq(f.value))
					reply, d := mustHandle(t, b, Request{Raw: raw, Src: clientV4, Local: gridV4[ip][port], At: at})
					wantFrom := Endpoint{ip ^ f.dip, port ^ f.dport}
					if reply.From != wantFrom || reply.To != clientV4 {
						t.Errorf("at %v change %s: from %v to %v, want %v %v", at, f.name, reply.From, reply.To, wantFrom, clientV4)
					}
					if d.msg.Type != stun.BindingSuccess || d.xor != clientV4 {
						t.Errorf("at %v change %s: type %v xor %v", at, f.name, d.msg.Type, d.xor)
					}
					if d.origin != gridV4[wantFrom.IP][wantFrom.Port] {
						t.Errorf("at %v change %s: RESPONSE-ORIGIN %v want %v", at, f.name, d.origin, gridV4[wantFrom.IP][wantFrom.Port])
					}
					if d.other != gridV4[1][1] {
						t.Errorf("at %v change %s: OTHER-ADDRESS %v", at, f.name, d.other)
					}
					if d.fpOK != fp {
						t.Errorf("at %v change %s: FINGERPRINT present/valid = %v, request had %v", at, f.name, d.fpOK, fp)
					}
					if len(reply.Msg) > ruleLimit(raw, false) {
						t.Errorf("at %v change %s: reply %d bytes for a %d-byte request", at, f.name, len(reply.Msg), len(raw))
					}
				}
			}
		}
	}
	s := b.Stats()
	// 4 cells × 2 fingerprint variants × (port, ip, both).
	if s.ChangePort != 16 || s.ChangeIP != 16 || s.Success != 32 || s.Requests != 32 {
		t.Errorf("stats %+v", s)
	}
}

// ruleLimit is the amplification rule for an unauthenticated answer: twice
// the request, or the RFC 5780 answer to a minimal request with FINGERPRINT
// (20 + 3×12 + 8 = 64 bytes over IPv4, 20 + 3×24 + 8 = 100 over IPv6),
// whichever is larger. Literal numbers, not binding.go's constants, so that
// a wrong constant fails here.
func ruleLimit(raw []byte, v6 bool) int {
	if v6 {
		return max(2*len(raw), 100)
	}
	return max(2*len(raw), 64)
}

// family is one address family's grid and client.
type family struct {
	name string
	grid [2][2]netip.AddrPort
	src  netip.AddrPort
	v6   bool
}

var families = []family{{"v4", gridV4, clientV4, false}, {"v6", gridV6, clientV6, true}}

// TestBareRequestSizes: in two-IP mode a bare request gets the RFC 5780
// answer (XOR-MAPPED-ADDRESS, RESPONSE-ORIGIN, OTHER-ADDRESS) and nothing
// else, of exactly the size the file comment of binding.go states.
func TestBareRequestSizes(t *testing.T) {
	for _, f := range families {
		for _, fp := range []bool{false, true} {
			b := New(Config{Grid: f.grid})
			raw := request(t, fp)
			reply, d := mustHandle(t, b, Request{Raw: raw, Src: f.src, At: Endpoint{}})
			// 20 + 3 addresses (12 or 24 bytes each) + FINGERPRINT iff asked.
			want := map[[2]bool]int{{false, false}: 56, {false, true}: 64, {true, false}: 92, {true, true}: 100}[[2]bool{f.v6, fp}]
			if len(reply.Msg) != want || len(reply.Msg) > ruleLimit(raw, f.v6) {
				t.Errorf("%s fp=%v: %d bytes for %d, want %d", f.name, fp, len(reply.Msg), len(raw), want)
			}
			if d.xor != f.src || d.origin != f.grid[0][0] || d.other != f.grid[1][1] || d.fpOK != fp || d.hasMapped {
				t.Errorf("%s fp=%v: %+v", f.name, fp, d)
			}
			if s := b.Stats(); s.OverBudget != 0 || s.Success != 1 {
				t.Errorf("%s fp=%v: stats %+v", f.name, fp, s)
			}
		}
	}
	// The constants the rule is built on are these answers.
	if rfc5780AnswerV4 != 64 || rfc5780AnswerV6 != 100 {
		t.Errorf("rfc5780AnswerV4 %d, rfc5780AnswerV6 %d; want 64 and 100", rfc5780AnswerV4, rfc5780AnswerV6)
	}
}

// TestBareRequestLean: RFC5780Lean keeps the lean answer: a bare request
// gets its mapped address only; one with CHANGE-REQUEST gets OTHER-ADDRESS
// and RESPONSE-ORIGIN within 2x (over IPv6 only when it is padded).
func TestBareRequestLean(t *testing.T) {
	for _, f := range families {
		b := New(Config{Grid: f.grid, RFC5780Lean: true})
		bare := request(t, false)
		reply, d := mustHandle(t, b, Request{Raw: bare, Src: f.src, At: Endpoint{}})
		want := map[bool]int{false: 32, true: 44}[f.v6] // the mapped address only
		if d.hasOther || d.hasOrigin || d.hasMapped || d.xor != f.src || len(reply.Msg) != want {
			t.Errorf("%s lean bare: %d bytes %+v", f.name, len(reply.Msg), d)
		}
		change := request(t, false, changeReq(0))
		reply, d = mustHandle(t, b, Request{Raw: change, Src: f.src, At: Endpoint{}})
		if len(reply.Msg) > 2*len(change) || d.hasOther == f.v6 || d.hasOrigin == f.v6 {
			t.Errorf("%s lean CHANGE-REQUEST: %d bytes for %d, %+v", f.name, len(reply.Msg), len(change), d)
		}
		// Lean counts the answers it shrank: the IPv6 mapped address over
		// 2x, and the IPv6 OTHER-ADDRESS withheld.
		wantOver := map[bool]uint64{false: 0, true: 2}[f.v6]
		if s := b.Stats(); s.OverBudget != wantOver {
			t.Errorf("%s lean: overBudget %d, want %d", f.name, s.OverBudget, wantOver)
		}
	}
	// With room (a request padded by an unknown optional attribute), the
	// cookie answer also carries RESPONSE-ORIGIN, then MAPPED-ADDRESS.
	big := request(t, false, changeReq(0), rawAttr{0x8050, make([]byte, 24)})
	_, d := mustHandle(t, New(Config{Grid: gridV4, RFC5780Lean: true}), Request{Raw: big, Src: clientV4, At: Endpoint{}})
	if !d.hasOther || !d.hasOrigin || !d.hasMapped || d.mapped != clientV4 || d.origin != gridV4[0][0] {
		t.Errorf("lean roomy: %+v", d)
	}
}

// TestSoftwareWithinRule: SOFTWARE only when configured, and only where it
// fits within 2x: a bare request's answer is already over 2x.
func TestSoftwareWithinRule(t *testing.T) {
	for _, sw := range []string{"abcd", "stund"} {
		b := New(Config{Grid: gridV4, Software: sw})
		bare := request(t, false)
		reply, d := mustHandle(t, b, Request{Raw: bare, Src: clientV4})
		if _, err := d.msg.Get(stun.AttrSoftware); err == nil || len(reply.Msg) > ruleLimit(bare, false) {
			t.Errorf("%q: SOFTWARE in the answer to a bare request (%d bytes)", sw, len(reply.Msg))
		}
		big := request(t, false, rawAttr{0x8050, make([]byte, 24)})
		reply, d = mustHandle(t, b, Request{Raw: big, Src: clientV4})
		var soft stun.Software
		if err := soft.GetFrom(d.msg); err != nil || soft.String() != sw || len(reply.Msg) > 2*len(big) {
			t.Errorf("%q: roomy request: SOFTWARE %q %v, %d bytes for %d", sw, soft, err, len(reply.Msg), len(big))
		}
	}
	_, d := mustHandle(t, New(Config{Grid: gridV4}), Request{Raw: request(t, false, rawAttr{0x8050, make([]byte, 24)}), Src: clientV4})
	if _, err := d.msg.Get(stun.AttrSoftware); err == nil {
		t.Error("SOFTWARE sent though not configured")
	}
}

// TestPaddingWithinRule: small paddings never take an answer past the
// rule; PADDING only goes in within 2x, so it never pays for itself out of
// the RFC 5780 allowance.
func TestPaddingWithinRule(t *testing.T) {
	for _, f := range families {
		for _, lean := range []bool{false, true} {
			for _, fp := range []bool{false, true} {
				for _, n := range []int{4, 8, 16, 100} {
					b := New(Config{Grid: f.grid, RFC5780Lean: lean})
					raw := request(t, fp, padding(n))
					reply, d := mustHandle(t, b, Request{Raw: raw, Src: f.src})
					name := fmt.Sprintf("%s lean=%v fp=%v PADDING %d (%d bytes)", f.name, lean, fp, n, len(raw))
					if len(reply.Msg) > ruleLimit(raw, f.v6) {
						t.Errorf("%s: %d bytes, over the rule %d", name, len(reply.Msg), ruleLimit(raw, f.v6))
					}
					if d.padLen > n || (d.msg.Contains(stun.AttrPadding) && len(reply.Msg) > 2*len(raw)) {
						t.Errorf("%s: PADDING %d in a %d-byte answer", name, d.padLen, len(reply.Msg))
					}
					if !lean && (!d.hasOther || !d.hasOrigin || d.xor != f.src) {
						t.Errorf("%s: RFC 5780 attributes missing: %+v", name, d)
					}
					if n == 100 && d.padLen != 100 {
						t.Errorf("%s: PADDING %d, the request's 100 fit", name, d.padLen)
					}
				}
			}
		}
	}
	// A 28-byte request with 4 bytes of PADDING gets the 56-byte core, not
	// 64 bytes (2.3x).
	raw := request(t, false, padding(4))
	reply, d := mustHandle(t, New(Config{Grid: gridV4}), Request{Raw: raw, Src: clientV4})
	if len(raw) != 28 || len(reply.Msg) != 56 || d.msg.Contains(stun.AttrPadding) {
		t.Errorf("PADDING 4: %d bytes for %d, PADDING %v", len(reply.Msg), len(raw), d.msg.Contains(stun.AttrPadding))
	}
}

func TestSingleIP(t *testing.T) {
	grid := gridV4
	grid[1] = [2]netip.AddrPort{}
	b := New(Config{Grid: grid})
	for _, f := range []uint32{0, stunwire.ChangePort, stunwire.ChangeIP, stunwire.ChangeIP | stunwire.ChangePort} {
		raw := request(t, false, changeReq(f))
		reply, d := mustHandle(t, b, Request{Raw: raw, Src: clientV4, At: Endpoint{0, 1}})
		if d.code != 420 || len(d.unknown) != 1 || d.unknown[0] != stun.AttrChangeRequest {
			t.Errorf("flags %x: code %d unknown %v", f, d.code, d.unknown)
		}
		if reply.From != (Endpoint{0, 1}) || reply.To != clientV4 || len(reply.Msg) > 2*len(raw) {
			t.Errorf("flags %x: %v %v %d", f, reply.From, reply.To, len(reply.Msg))
		}
	}
	// No OTHER-ADDRESS to give (RFC 5780 §6): bare requests get the
	// mapped address only, over IPv4 and IPv6, with or without
	// FINGERPRINT, within the rule.
	for _, f := range families {
		g := f.grid
		g[1] = [2]netip.AddrPort{}
		single := New(Config{Grid: g})
		for _, fp := range []bool{false, true} {
			raw := request(t, fp)
			reply, d := mustHandle(t, single, Request{Raw: raw, Src: f.src, At: Endpoint{0, 1}})
			if d.code != 0 || d.hasOther || d.hasOrigin || d.changed.IsValid() || d.xor != f.src || len(reply.Msg) > ruleLimit(raw, f.v6) {
				t.Errorf("%s fp=%v: plain request in single-IP mode: %d bytes %+v", f.name, fp, len(reply.Msg), d)
			}
		}
	}
	if s := b.Stats(); s.Err420 != 4 {
		t.Errorf("stats %+v", s)
	}
}

func TestResponsePortAndPadding(t *testing.T) {
	b := New(Config{Grid: gridV4})
	raw := request(t, false, respPort(5555))
	reply, d := mustHandle(t, b, Request{Raw: raw, Src: clientV4, At: Endpoint{1, 0}})
	if reply.To != netip.AddrPortFrom(clientV4.Addr(), 5555) || reply.From != (Endpoint{1, 0}) || d.xor != clientV4 || !d.hasOther {
		t.Errorf("RESPONSE-PORT: to %v from %v %+v", reply.To, reply.From, d)
	}
	// RESPONSE-PORT with change-IP: both apply.
	reply, _ = mustHandle(t, b, Request{Raw: request(t, false, respPort(5555), changeReq(stunwire.ChangeIP)), Src: clientV4, At: Endpoint{}})
	if reply.To.Port() != 5555 || reply.From != (Endpoint{1, 0}) {
		t.Errorf("RESPONSE-PORT+CHANGE-REQUEST: %v %v", reply.To, reply.From)
	}

	// PADDING: honoured up to the request's PADDING length...
	raw = request(t, false, padding(100))
	reply, d = mustHandle(t, b, Request{Raw: raw, Src: clientV4, At: Endpoint{}})
	if d.padLen != 100 || len(reply.Msg) > 2*len(raw) {
		t.Errorf("PADDING 100: got %d, reply %d for %d", d.padLen, len(reply.Msg), len(raw))
	}
	// ...and natdiscovery -P's 1500 bytes: never more than the request.
	raw = request(t, true, padding(1500))
	reply, d = mustHandle(t, b, Request{Raw: raw, Src: clientV4, At: Endpoint{}})
	if d.padLen == 0 || d.padLen > len(raw) || len(reply.Msg) > 2*len(raw) || !d.fpOK {
		t.Errorf("PADDING 1500: got %d, reply %d for %d, fp %v", d.padLen, len(reply.Msg), len(raw), d.fpOK)
	}
	// A request whose PADDING is tiny relative to a huge reply budget
	// still gets at most its own padding length.
	raw = request(t, false, padding(4), rawAttr{0x8050, make([]byte, 400)})
	_, d = mustHandle(t, b, Request{Raw: raw, Src: clientV4, At: Endpoint{}})
	if d.padLen != 4 {
		t.Errorf("PADDING 4: got %d", d.padLen)
	}

	// PADDING + RESPONSE-PORT: 400, to the source, not to the port.
	raw = request(t, false, padding(8), respPort(5555))
	reply, d = mustHandle(t, b, Request{Raw: raw, Src: clientV4, At: Endpoint{}})
	if d.code != 400 || reply.To != clientV4 || d.msg.Type != stun.BindingError {
		t.Errorf("PADDING+RESPONSE-PORT: code %d to %v type %v", d.code, reply.To, d.msg.Type)
	}
	s := b.Stats()
	if s.ResponsePort != 2 || s.Padding != 3 || s.Err400 != 1 {
		t.Errorf("stats %+v", s)
	}
}

// TestRFC3489Request replays the exact bytes the stun-client package sends,
// in both modes: each request carries CHANGE-REQUEST, so the lean answer is
// the RFC 3489 one too.
func TestRFC3489Request(t *testing.T) {
	for _, lean := range []bool{false, true} {
		t.Run(fmt.Sprintf("lean=%v", lean), func(t *testing.T) {
			testRFC3489Request(t, New(Config{Grid: gridV4, RFC5780Lean: lean}))
		})
	}
	// A bare RFC 3489 request (no CHANGE-REQUEST): the RFC 3489 answer
	// (§11.1) by default, within the rule; the mapped address when lean.
	bare, _ := hex.DecodeString("000100000124e61da6f7da30a68640492c59d51e")
	reply, d := mustHandle(t, New(Config{Grid: gridV4}), Request{Raw: bare, Src: clientV4})
	if d.mapped != clientV4 || d.changed != gridV4[1][1] || d.source != gridV4[0][0] || d.hasXOR || d.hasOther || len(reply.Msg) > ruleLimit(bare, false) {
		t.Errorf("bare RFC 3489: %d bytes %+v", len(reply.Msg), d)
	}
	_, d = mustHandle(t, New(Config{Grid: gridV4, RFC5780Lean: true}), Request{Raw: bare, Src: clientV4})
	if d.mapped != clientV4 || d.changed.IsValid() || d.source.IsValid() {
		t.Errorf("bare RFC 3489, lean: %+v", d)
	}
}

func testRFC3489Request(t *testing.T, b *Responder) {
	for _, tc := range []struct {
		hex      string
		wantFrom Endpoint
	}{
		{"000100080124e61da6f7da30a68640492c59d51e0003000400000000", Endpoint{0, 0}},
		{"000100080226163f7bb2db63e7df17225b54ea0b0003000400000004", Endpoint{1, 0}},
		{"00010008033ef204096cf24ad1edb146c13196450003000400000002", Endpoint{0, 1}},
		{"00010008033ef204096cf24ad1edb146c13196450003000400000006", Endpoint{1, 1}},
	} {
		raw, _ := hex.DecodeString(tc.hex)
		if !IsBinding(raw) {
			t.Fatalf("IsBinding(%s) = false", tc.hex)
		}
		reply, d := mustHandle(t, b, Request{Raw: raw, Src: clientV4, At: Endpoint{}})
		if !bytes.Equal(reply.Msg[4:20], raw[4:20]) {
			t.Errorf("128-bit transaction ID not echoed")
		}
		if reply.From != tc.wantFrom || d.hasXOR || d.mapped != clientV4 ||
			d.changed != gridV4[1][1] || d.source != gridV4[tc.wantFrom.IP][tc.wantFrom.Port] || d.hasOther || d.hasOrigin {
			t.Errorf("%s: from %v %+v", tc.hex, reply.From, d)
		}
		if len(reply.Msg) > 2*len(raw) {
			t.Errorf("reply %d bytes for %d", len(reply.Msg), len(raw))
		}
	}
	if s := b.Stats(); s.RFC3489 != 4 {
		t.Errorf("stats %+v", s)
	}
}

func TestAdvertise(t *testing.T) {
	b := New(Config{Grid: gridV4, Advertise: map[netip.Addr]netip.Addr{
		netip.MustParseAddr("10.0.0.1"): netip.MustParseAddr("203.0.113.1"),
		netip.MustParseAddr("10.0.0.2"): netip.MustParseAddr("203.0.113.2"),
	}})
	_, d := mustHandle(t, b, Request{Raw: request(t, false, changeReq(stunwire.ChangePort)), Src: clientV4, At: Endpoint{0, 0}})
	if d.origin != netip.MustParseAddrPort("203.0.113.1:3479") || d.other != netip.MustParseAddrPort("203.0.113.2:3479") || d.xor != clientV4 {
		t.Errorf("advertise: %+v", d)
	}
}

func TestIPv6Grid(t *testing.T) {
	b := New(Config{Grid: gridV6})
	raw := request(t, true, changeReq(stunwire.ChangeIP), rawAttr{0x8050, make([]byte, 40)})
	reply, d := mustHandle(t, b, Request{Raw: raw, Src: clientV6, At: Endpoint{0, 1}})
	if reply.From != (Endpoint{1, 1}) || d.xor != clientV6 || d.origin != gridV6[1][1] || d.other != gridV6[1][1] || !d.fpOK {
		t.Errorf("IPv6: from %v %+v", reply.From, d)
	}
	// A v4-mapped source (dual-stack socket) is reported as IPv4.
	mapped := netip.AddrPortFrom(netip.AddrFrom16(clientV4.Addr().As16()), clientV4.Port())
	_, d = mustHandle(t, New(Config{Grid: gridV4}), Request{Raw: request(t, false), Src: mapped})
	if d.xor != clientV4 {
		t.Errorf("v4-mapped source: %v", d.xor)
	}
}

// TestIPv6Budget: over UDP an IPv6 answer keeps to the rule. By default a
// minimal 28-byte CHANGE-REQUEST gets the 92-byte RFC 5780 answer; in lean
// mode it gets its mapped address but no OTHER-ADDRESS (20+24+24 = 68 >
// 56) unless it is padded; a stream gets everything.
func TestIPv6Budget(t *testing.T) {
	minimal := request(t, false, changeReq(0))
	reply, d := mustHandle(t, New(Config{Grid: gridV6}), Request{Raw: minimal, Src: clientV6})
	if len(reply.Msg) != 92 || !d.hasOther || !d.hasOrigin || d.xor != clientV6 {
		t.Errorf("default: %d bytes for %d, %+v", len(reply.Msg), len(minimal), d)
	}
	lean := New(Config{Grid: gridV6, RFC5780Lean: true})
	reply, d = mustHandle(t, lean, Request{Raw: minimal, Src: clientV6})
	if len(reply.Msg) > 2*len(minimal) || d.hasOther || d.xor != clientV6 {
		t.Errorf("lean minimal: %d bytes for %d, other %v", len(reply.Msg), len(minimal), d.hasOther)
	}
	padded := request(t, false, changeReq(0), rawAttr{stun.AttrSoftware, []byte("natprobe/dev probe-id=0123abcd")})
	reply, d = mustHandle(t, lean, Request{Raw: padded, Src: clientV6})
	if len(reply.Msg) > 2*len(padded) || !d.hasOther || d.other != gridV6[1][1] {
		t.Errorf("lean padded: %d bytes for %d, other %v", len(reply.Msg), len(padded), d.other)
	}
	_, d = mustHandle(t, lean, Request{Raw: minimal, Src: clientV6, Stream: true})
	if !d.hasOther || !d.hasOrigin {
		t.Errorf("stream: an answer over TCP has no budget: %+v", d)
	}
	bare := request(t, false)
	reply, _ = mustHandle(t, lean, Request{Raw: bare, Src: clientV6})
	if len(reply.Msg) != 44 {
		t.Errorf("lean bare IPv6: %d bytes, want the 44-byte mapped address only", len(reply.Msg))
	}
}

func TestUnknownAttributes(t *testing.T) {
	b := New(Config{Grid: gridV4})
	// RESPONSE-ADDRESS (RFC 3489) is refused, not honoured; 0x7fff unknown.
	raw := request(t, true, rawAttr{0x0002, []byte{0, 1, 0, 9, 1, 2, 3, 4}}, rawAttr{0x7fff, nil}, changeReq(0))
	reply, d := mustHandle(t, b, Request{Raw: raw, Src: clientV4, At: Endpoint{}})
	if d.code != 420 || len(d.unknown) != 2 || d.unknown[0] != 0x0002 || d.unknown[1] != 0x7fff || !d.fpOK || reply.To != clientV4 {
		t.Errorf("420: %+v", d)
	}
	if len(reply.Msg) > 2*len(raw) {
		t.Errorf("420 reply %d for %d", len(reply.Msg), len(raw))
	}
	// Smallest request with an unknown attribute: the reason phrase is
	// dropped to stay within 2×.
	raw = request(t, false, rawAttr{0x0007, nil})
	reply, d = mustHandle(t, b, Request{Raw: raw, Src: clientV4})
	if d.code != 420 || len(reply.Msg) > 2*len(raw) {
		t.Errorf("small 420: code %d, %d bytes for %d", d.code, len(reply.Msg), len(raw))
	}
	// Comprehension-optional unknown (0x8050) and ICE's PRIORITY are fine.
	_, d = mustHandle(t, b, Request{Raw: request(t, false, rawAttr{0x8050, []byte{1}}, rawAttr{stun.AttrPriority, []byte{0, 0, 0, 1}}), Src: clientV4})
	if d.code != 0 || d.xor != clientV4 {
		t.Errorf("optional unknown: %+v", d)
	}
}

func TestStream(t *testing.T) {
	b := New(Config{Grid: gridV4})
	local := netip.MustParseAddrPort("10.0.0.2:5349") // TLS listener on the alternate IP
	_, d := mustHandle(t, b, Request{Raw: request(t, false, changeReq(0)), Src: clientV4, Local: local, At: Endpoint{1, 0}, Stream: true})
	if d.origin != local || d.other != netip.MustParseAddrPort("10.0.0.1:5349") || d.xor != clientV4 {
		t.Errorf("stream: %+v", d)
	}
	for _, a := range []rawAttr{changeReq(stunwire.ChangeIP), changeReq(stunwire.ChangePort), respPort(9)} {
		_, d := mustHandle(t, b, Request{Raw: request(t, false, a), Src: clientV4, Local: local, At: Endpoint{1, 0}, Stream: true})
		if d.code != 420 || len(d.unknown) != 1 || d.unknown[0] != a.typ {
			t.Errorf("stream %v: code %d unknown %v", a.typ, d.code, d.unknown)
		}
	}
}

func TestMalformedAndIndications(t *testing.T) {
	b := New(Config{Grid: gridV4})
	good := request(t, true, changeReq(0))
	badFP := bytes.Clone(good)
	badFP[len(badFP)-1] ^= 1
	overrun := request(t, false, changeReq(0))
	overrun[stunwire.HeaderSize+3] = 40 // CHANGE-REQUEST length runs past the end
	cases := map[string][]byte{
		"truncated":               good[:len(good)-4],
		"short":                   good[:12],
		"bad length":              append(bytes.Clone(good), 0, 0, 0, 0),
		"attribute overrun":       overrun,
		"bad fingerprint":         badFP,
		"zero-length XOR-MAPPED":  request(t, false, rawAttr{stun.AttrXORMappedAddress, nil}),
		"zero-length MAPPED":      request(t, false, rawAttr{stun.AttrMappedAddress, nil}),
		"bad family OTHER":        request(t, false, rawAttr{stun.AttrOtherAddress, []byte{0, 9, 0, 1, 1, 2, 3, 4}}),
		"zero-length CHANGE-REQ":  request(t, false, rawAttr{stun.AttrChangeRequest, nil}),
		"zero-length RESP-PORT":   request(t, false, rawAttr{stun.AttrResponsePort, nil}),
		"RESPONSE-PORT 0":         request(t, false, respPort(0)),
		"fingerprint not last":    append(good[:len(good):len(good)], request(t, false, rawAttr{0x8050, []byte{1, 2, 3, 4}})[20:]...),
		"empty":                   nil,
		"garbage":                 []byte("GET / HTTP/1.1\r\n\r\n"),
		"channeldata":             {0x40, 0x00, 0x00, 0x00},
		"cookie, odd attr length": request(t, false, rawAttr{0x8050, []byte{1}})[:25],
	}
	// Fix up the length field of "fingerprint not last" so only the
	// FINGERPRINT placement is wrong.
	fnl := cases["fingerprint not last"]
	binary.BigEndian.PutUint16(fnl[2:], uint16(len(fnl)-20))
	for name, raw := range cases {
		if _, ok := b.Handle(nil, Request{Raw: raw, Src: clientV4}); ok {
			t.Errorf("%s: answered", name)
		}
	}
	if s := b.Stats(); s.Malformed != uint64(len(cases)) || s.Success != 0 {
		t.Errorf("malformed %d of %d: %+v", s.Malformed, len(cases), s)
	}
	// Indication: silently accepted and counted.
	ind, _ := stun.Build(stun.TransactionID, stun.NewType(stun.MethodBinding, stun.ClassIndication))
	if !IsBinding(ind.Raw) {
		t.Error("IsBinding(indication) = false")
	}
	if _, ok := b.Handle(nil, Request{Raw: ind.Raw, Src: clientV4}); ok {
		t.Error("indication answered")
	}
	// TURN Allocate is not ours.
	alloc, _ := stun.Build(stun.TransactionID, stun.NewType(stun.MethodAllocate, stun.ClassRequest))
	if IsBinding(alloc.Raw) {
		t.Error("IsBinding(Allocate) = true")
	}
	if _, ok := b.Handle(nil, Request{Raw: alloc.Raw, Src: clientV4}); ok {
		t.Error("Allocate answered")
	}
	if s := b.Stats(); s.Indications != 1 || s.NotBinding != 1 {
		t.Errorf("stats %+v", s)
	}
}

func TestHandleZeroAlloc(t *testing.T) {
	b := New(Config{Grid: gridV4, Software: "stund"})
	raw := request(t, true, changeReq(stunwire.ChangeIP|stunwire.ChangePort), padding(64))
	buf := make([]byte, 0, 1500)
	n := testing.AllocsPerRun(100, func() {
		if _, ok := b.Handle(buf, Request{Raw: raw, Src: clientV4, At: Endpoint{}}); !ok {
			t.Fatal("no reply")
		}
	})
	if n != 0 {
		t.Errorf("handle allocates %.1f times per request", n)
	}
}

// FuzzBindingHandle: no panic, and every reply parses, echoes the
// transaction ID and keeps to the amplification rule.
func FuzzBindingHandle(f *testing.F) {
	f.Add(request(f, true, changeReq(6)), true, false)
	f.Add(request(f, false, padding(30), respPort(1)), false, false)
	f.Add(request(f, false, rawAttr{0x0002, nil}), false, true)
	raw, _ := hex.DecodeString("000100080124e61da6f7da30a68640492c59d51e0003000400000000")
	f.Add(raw, true, false)
	f.Fuzz(func(t *testing.T, raw []byte, lean, stream bool) {
		b := New(Config{Grid: gridV6, RFC5780Lean: lean})
		reply, ok := b.Handle(make([]byte, 0, 64), Request{Raw: raw, Src: clientV6, Local: gridV6[0][0], Stream: stream})
		if !ok {
			return
		}
		if _, err := stunwire.ParseHeader(reply.Msg); err != nil {
			t.Fatalf("reply does not parse: %v", err)
		}
		if !bytes.Equal(reply.Msg[4:20], raw[4:20]) {
			t.Fatal("ID not echoed")
		}
		// Over UDP: the rule; lean mode keeps to 2x, or to the header,
		// the IPv6 mapped address and FINGERPRINT. A stream has no budget.
		limit := ruleLimit(raw, true)
		if lean {
			limit = max(2*len(raw), 20+24+8)
		}
		if !stream && len(reply.Msg) > limit {
			t.Fatalf("reply %d bytes for a %d-byte request", len(reply.Msg), len(raw))
		}
	})
}

// BenchmarkBindingHandle is the Binding fast path every UDP read loop
// runs per request : it must stay at 0 allocs/op.
func BenchmarkBindingHandle(b *testing.B) {
	bd := New(Config{Grid: gridV4, Software: "stund"})
	raw := request(b, true)
	buf := make([]byte, 0, 1500)
	b.ReportAllocs()
	b.SetBytes(int64(len(raw)))
	for i := 0; i < b.N; i++ {
		if _, ok := bd.Handle(buf, Request{Raw: raw, Src: clientV4, At: Endpoint{}}); !ok {
			b.Fatal("no reply")
		}
	}
}

// AddTo lets rawAttr go into pion-built requests.
func (a rawAttr) AddTo(m *stun.Message) error { m.Add(a.typ, a.val); return nil }
