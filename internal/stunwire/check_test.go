package stunwire

import (
	"errors"
	"net"
	"net/netip"
	"slices"
	"testing"
)

// knownNone knows no attribute: every comprehension-required type is
// unknown.
func knownNone(uint16) bool { return false }

// knownSome knows PRIORITY, USERNAME and CHANGE-REQUEST.
func knownSome(t uint16) bool {
	return t == AttrPriority || t == AttrUsername || t == AttrChangeRequest
}

// request builds a cookie Binding request with attributes of the given
// types (4-byte zero values), with or without FINGERPRINT.
func request(fingerprint bool, types ...uint16) []byte {
	id := [16]byte{0x21, 0x12, 0xA4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}
	m := AppendHeader(nil, TypeBindingRequest, &id)
	for _, t := range types {
		m = AppendAttr(m, t, []byte{0, 0, 0, 0})
	}
	if fingerprint {
		return AppendFingerprint(m, 0)
	}
	return Finish(m, 0)
}

func TestCheck(t *testing.T) {
	many := make([]uint16, MaxUnknownAttributes+3)
	for i := range many {
		many[i] = 0x7F00 + uint16(i)
	}
	badFP := request(true, AttrChangeRequest)
	badFP[len(badFP)-1] ^= 1
	fpNotLast := AppendAttr(request(true), AttrSoftware, []byte("late"))
	fpNotLast = Finish(fpNotLast, 0)
	overrun := request(false, AttrChangeRequest)
	overrun[HeaderSize+3] = 8 // CHANGE-REQUEST claims 8 bytes, 4 remain

	for _, c := range []struct {
		name      string
		msg       []byte
		known     func(uint16) bool
		err       error
		integrity int
		fp        bool
		unknown   []uint16
	}{
		{"RFC 5769 request, all known", rfc5769Request, knownSome, nil, 76, true, nil},
		{"RFC 5769 request, nothing known", rfc5769Request, knownNone, nil, 76, true, []uint16{AttrPriority, AttrUsername}},
		{"known nil records nothing", request(true, 0x7FFF), nil, nil, -1, true, nil},
		{"comprehension-optional never unknown", request(false, 0x8FFF, 0x7FFE), knownNone, nil, -1, false, []uint16{0x7FFE}},
		{"cap", request(true, many...), knownNone, nil, -1, true, many[:MaxUnknownAttributes]},
		{"after MESSAGE-INTEGRITY ignored", request(true, 0x7F01, AttrMessageIntegrity, 0x7F02), knownNone, nil, 28, true, []uint16{0x7F01}},
		{"after MESSAGE-INTEGRITY-SHA256 ignored", request(false, AttrMessageIntegritySHA256, AttrMessageIntegrity, 0x7F02), knownNone, nil, -1, false, nil},
		{"bad FINGERPRINT", badFP, knownNone, ErrFingerprint, -1, false, nil},
		{"FINGERPRINT not last", fpNotLast, knownNone, ErrFingerprint, -1, false, nil},
		{"overrun", overrun, knownNone, ErrAttrOverrun, -1, false, nil},
		{"shorter than a header", []byte{0, 1}, knownNone, ErrShort, -1, false, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			s, err := Check(c.msg, c.known)
			if !errors.Is(err, c.err) {
				t.Fatalf("err %v, want %v", err, c.err)
			}
			if err != nil {
				return
			}
			if s.Integrity != c.integrity || s.Fingerprint != c.fp || !slices.Equal(s.Unknown(), c.unknown) {
				t.Errorf("integrity %d fingerprint %v unknown %#04x; want %d %v %#04x",
					s.Integrity, s.Fingerprint, s.Unknown(), c.integrity, c.fp, c.unknown)
			}
		})
	}
}

func TestCheckAllocatesNothing(t *testing.T) {
	msg := request(true, AttrChangeRequest, 0x7F01, AttrPriority)
	if n := testing.AllocsPerRun(100, func() {
		if s, err := Check(msg, knownSome); err != nil || len(s.Unknown()) != 1 {
			t.Fatal(s, err)
		}
	}); n != 0 {
		t.Errorf("Check allocates %v times per call", n)
	}
}

func TestMessageType(t *testing.T) {
	for _, c := range []struct {
		method, class, typ uint16
	}{
		{MethodBinding, ClassRequest, TypeBindingRequest},
		{MethodBinding, ClassIndication, TypeBindingIndication},
		{MethodBinding, ClassSuccess, TypeBindingSuccess},
		{MethodBinding, ClassError, TypeBindingError},
		{MethodAllocate, ClassError, 0x0113},         // RFC 8656 §18: Allocate error response
		{MethodSend, ClassIndication, 0x0016},        // Send indication
		{MethodConnectionBind, ClassSuccess, 0x010B}, // RFC 6062 §6.1
		{0xFFF, ClassError, 0x3EEF | ClassError},     // every method bit, around the class bits
		{0x080, ClassRequest, 0x0200},                // the lowest bit above C1
	} {
		if got := MessageType(c.method, c.class); got != c.typ {
			t.Errorf("MessageType(%#03x, %#04x) = %#04x, want %#04x", c.method, c.class, got, c.typ)
		}
		if Method(c.typ) != c.method || c.typ&ClassMask != c.class {
			t.Errorf("%#04x: method %#03x class %#04x, want %#03x %#04x", c.typ, Method(c.typ), c.typ&ClassMask, c.method, c.class)
		}
	}
}

func TestAddrPortOf(t *testing.T) {
	want := netip.MustParseAddrPort("192.0.2.1:3478")
	mapped := net.IP(netip.MustParseAddr("::ffff:192.0.2.1").AsSlice())
	for _, c := range []struct {
		name string
		a    net.Addr
		want netip.AddrPort
	}{
		{"UDP, IPv4-mapped", &net.UDPAddr{IP: mapped, Port: 3478}, want},
		{"TCP, IPv4-mapped", &net.TCPAddr{IP: mapped, Port: 3478}, want},
		{"other type, by its string", &net.IPAddr{IP: mapped}, netip.AddrPort{}},
		{"nil", nil, netip.AddrPort{}},
		{"typed nil", (*net.UDPAddr)(nil), netip.AddrPort{}},
		{"IPv6", &net.UDPAddr{IP: net.ParseIP("2001:db8::1"), Port: 1}, netip.MustParseAddrPort("[2001:db8::1]:1")},
	} {
		if got := AddrPortOf(c.a); got != c.want {
			t.Errorf("%s: %v, want %v", c.name, got, c.want)
		}
	}
}
