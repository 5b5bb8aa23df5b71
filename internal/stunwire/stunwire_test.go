package stunwire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/pion/stun/v4"
)

// RFC 5769 §2.1, §2.2, §2.3 test vectors.
var (
	rfc5769Request = []byte("\x00\x01\x00\x58" + "\x21\x12\xa4\x42" +
		"\xb7\xe7\xa7\x01\xbc\x34\xd6\x86\xfa\x87\xdf\xae" +
		"\x80\x22\x00\x10" + "STUN test client" +
		"\x00\x24\x00\x04" + "\x6e\x00\x01\xff" +
		"\x80\x29\x00\x08" + "\x93\x2f\xf9\xb1\x51\x26\x3b\x36" +
		"\x00\x06\x00\x09" + "\x65\x76\x74\x6a\x3a\x68\x36\x76\x59\x20\x20\x20" +
		"\x00\x08\x00\x14" + "\x9a\xea\xa7\x0c\xbf\xd8\xcb\x56\x78\x1e\xf2\xb5" +
		"\xb2\xd3\xf2\x49\xc1\xb5\x71\xa2" +
		"\x80\x28\x00\x04" + "\xe5\x7a\x3b\xcf")
	rfc5769IPv4 = []byte("\x01\x01\x00\x3c" + "\x21\x12\xa4\x42" +
		"\xb7\xe7\xa7\x01\xbc\x34\xd6\x86\xfa\x87\xdf\xae" +
		"\x80\x22\x00\x0b" + "\x74\x65\x73\x74\x20\x76\x65\x63\x74\x6f\x72\x20" +
		"\x00\x20\x00\x08" + "\x00\x01\xa1\x47\xe1\x12\xa6\x43" +
		"\x00\x08\x00\x14" + "\x2b\x91\xf5\x99\xfd\x9e\x90\xc3\x8c\x74\x89\xf9" +
		"\x2a\xf9\xba\x53\xf0\x6b\xe7\xd7" +
		"\x80\x28\x00\x04" + "\xc0\x7d\x4c\x96")
	rfc5769IPv6 = []byte("\x01\x01\x00\x48" + "\x21\x12\xa4\x42" +
		"\xb7\xe7\xa7\x01\xbc\x34\xd6\x86\xfa\x87\xdf\xae" +
		"\x80\x22\x00\x0b" + "\x74\x65\x73\x74\x20\x76\x65\x63\x74\x6f\x72\x20" +
		"\x00\x20\x00\x14" + "\x00\x02\xa1\x47" +
		"\x01\x13\xa9\xfa\xa5\xd3\xf1\x79" + "\xbc\x25\xf4\xb5\xbe\xd2\xb9\xd9" +
		"\x00\x08\x00\x14" + "\xa3\x82\x95\x4e\x4b\xe6\x7b\xf1\x17\x84\xc9\x7c" +
		"\x82\x92\xc2\x75\xbf\xe3\xed\x41" +
		"\x80\x28\x00\x04" + "\xc8\xfb\x0b\x4c")
)

// walk parses msg fully and returns the attribute types, the XOR-MAPPED
// address if any, and whether FINGERPRINT checked out.
func walk(t *testing.T, msg []byte) (types []uint16, xor netip.AddrPort, fpOK bool) {
	t.Helper()
	h, err := ParseHeader(msg)
	if err != nil {
		t.Fatalf("ParseHeader: %v", err)
	}
	it := NewAttrs(msg)
	for {
		typ, val, off, ok := it.Next()
		if !ok {
			break
		}
		types = append(types, typ)
		switch typ {
		case AttrXORMappedAddress:
			if xor, err = ParseXORAddress(val, &h.ID); err != nil {
				t.Fatalf("XOR-MAPPED-ADDRESS: %v", err)
			}
		case AttrFingerprint:
			fpOK = CheckFingerprint(msg, off, val) == nil
		}
	}
	if it.Err() != nil {
		t.Fatalf("attrs: %v", it.Err())
	}
	return types, xor, fpOK
}

func TestRFC5769Vectors(t *testing.T) {
	types, _, fp := walk(t, rfc5769Request)
	want := []uint16{AttrSoftware, AttrPriority, 0x8029, AttrUsername, AttrMessageIntegrity, AttrFingerprint}
	if !equalTypes(types, want) || !fp {
		t.Errorf("request: types %x fingerprint %v", types, fp)
	}
	if h, _ := ParseHeader(rfc5769Request); !h.Cookie || h.Type != TypeBindingRequest {
		t.Errorf("request header %+v", h)
	}
	for _, tc := range []struct {
		name string
		msg  []byte
		want netip.AddrPort
	}{
		{"ipv4", rfc5769IPv4, netip.MustParseAddrPort("192.0.2.1:32853")},
		{"ipv6", rfc5769IPv6, netip.MustParseAddrPort("[2001:db8:1234:5678:11:2233:4455:6677]:32853")},
	} {
		_, xor, fp := walk(t, tc.msg)
		if xor != tc.want || !fp {
			t.Errorf("%s: xor %v fingerprint %v", tc.name, xor, fp)
		}
		// Flipping one bit anywhere before FINGERPRINT must break it.
		bad := bytes.Clone(tc.msg)
		bad[25] ^= 1
		if _, _, fp := walk(t, bad); fp {
			t.Errorf("%s: corrupted message passed FINGERPRINT", tc.name)
		}
	}
}

func equalTypes(a, b []uint16) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestBuildDecodedByPion builds a response with every builder and decodes it
// with pion/stun as an independent implementation.
func TestBuildDecodedByPion(t *testing.T) {
	for _, ap := range []netip.AddrPort{
		netip.MustParseAddrPort("192.0.2.1:32853"),
		netip.MustParseAddrPort("[2001:db8::77]:3478"),
		netip.MustParseAddrPort("[::ffff:198.51.100.7]:1"), // written as IPv4
	} {
		var id [16]byte
		binary.BigEndian.PutUint32(id[:], MagicCookie)
		copy(id[4:], "abcdefghijkl")
		b := AppendHeader(make([]byte, 0, 512), TypeBindingSuccess, &id)
		b = AppendXORAddress(b, AttrXORMappedAddress, ap, &id)
		b = AppendAddress(b, AttrMappedAddress, ap)
		b = AppendAddress(b, AttrResponseOrigin, ap)
		b = AppendAddress(b, AttrOtherAddress, ap)
		b = AppendSoftware(b, "stund")
		b = AppendPadding(b, 5)
		b = AppendErrorCode(b, 420, "Unknown Attribute")
		b = AppendUnknownAttributes(b, []uint16{0x0002, 0x0007, 0x7fff})
		b = AppendFingerprint(b, 0)

		m := &stun.Message{Raw: b}
		if err := m.Decode(); err != nil {
			t.Fatalf("pion decode: %v", err)
		}
		if err := stun.Fingerprint.Check(m); err != nil {
			t.Errorf("pion FINGERPRINT: %v", err)
		}
		want := ap.Addr().Unmap()
		var xa stun.XORMappedAddress
		if err := xa.GetFrom(m); err != nil || !ipEq(xa.IP, want) || xa.Port != int(ap.Port()) {
			t.Errorf("XOR-MAPPED-ADDRESS %v %v, want %v", xa, err, ap)
		}
		var ma stun.MappedAddress
		if err := ma.GetFrom(m); err != nil || !ipEq(ma.IP, want) || ma.Port != int(ap.Port()) {
			t.Errorf("MAPPED-ADDRESS %v %v", ma, err)
		}
		var oa stun.OtherAddress
		if err := oa.GetFrom(m); err != nil || !ipEq(oa.IP, want) {
			t.Errorf("OTHER-ADDRESS %v %v", oa, err)
		}
		var sw stun.Software
		if err := sw.GetFrom(m); err != nil || sw.String() != "stund" {
			t.Errorf("SOFTWARE %q %v", sw, err)
		}
		if p, err := m.Get(stun.AttrPadding); err != nil || len(p) != 8 {
			t.Errorf("PADDING %d %v", len(p), err)
		}
		var ec stun.ErrorCodeAttribute
		if err := ec.GetFrom(m); err != nil || ec.Code != 420 || string(ec.Reason) != "Unknown Attribute" {
			t.Errorf("ERROR-CODE %v %v", ec, err)
		}
		var ua stun.UnknownAttributes
		if err := ua.GetFrom(m); err != nil || len(ua) != 3 || ua[1] != 0x0007 {
			t.Errorf("UNKNOWN-ATTRIBUTES %v %v", ua, err)
		}
		if m.TransactionID != [12]byte([]byte("abcdefghijkl")) {
			t.Errorf("transaction ID %x", m.TransactionID)
		}
	}
}

func ipEq(ip net.IP, a netip.Addr) bool { return ip.Equal(net.IP(a.AsSlice())) }

func TestParseRejects(t *testing.T) {
	valid := AppendFingerprint(AppendXORAddress(AppendHeader(nil, TypeBindingRequest, &[16]byte{0x21, 0x12, 0xa4, 0x42}),
		AttrXORMappedAddress, netip.MustParseAddrPort("1.2.3.4:5"), &[16]byte{0x21, 0x12, 0xa4, 0x42}), 0)
	if _, err := ParseHeader(valid); err != nil {
		t.Fatal(err)
	}
	mut := func(f func(b []byte) []byte) []byte { return f(bytes.Clone(valid)) }
	for _, tc := range []struct {
		name string
		msg  []byte
		err  error
	}{
		{"empty", nil, ErrShort},
		{"19 bytes", valid[:19], ErrShort},
		{"top bits", mut(func(b []byte) []byte { b[0] |= 0x80; return b }), ErrNotSTUN},
		{"length not /4", mut(func(b []byte) []byte { b[3]++; return b }), ErrBadLength},
		{"length too long", mut(func(b []byte) []byte { b[3] += 4; return b }), ErrBadLength},
		{"truncated", valid[:len(valid)-4], ErrBadLength},
		{"trailing bytes", append(bytes.Clone(valid), 0, 0, 0, 0), ErrBadLength},
	} {
		if _, err := ParseHeader(tc.msg); !errors.Is(err, tc.err) {
			t.Errorf("%s: got %v want %v", tc.name, err, tc.err)
		}
	}
	// Attribute whose declared length overruns the message.
	over := mut(func(b []byte) []byte { b[HeaderSize+3] = 200; return b })
	it := NewAttrs(over)
	for range 10 {
		if _, _, _, ok := it.Next(); !ok {
			break
		}
	}
	if !errors.Is(it.Err(), ErrAttrOverrun) {
		t.Errorf("overrun: %v", it.Err())
	}
	// Zero-length and wrong-family addresses.
	for _, v := range [][]byte{nil, {0, 1}, {0, 1, 0, 1}, {0, 1, 0, 1, 1, 2, 3}, {0, 2, 0, 1, 1, 2, 3, 4}, {0, 3, 0, 1, 1, 2, 3, 4}} {
		if _, err := ParseXORAddress(v, &[16]byte{}); err == nil {
			t.Errorf("address %x accepted", v)
		}
	}
	// FINGERPRINT not last.
	nl := AppendSoftware(bytes.Clone(valid), "x")
	Finish(nl, 0)
	it = NewAttrs(nl)
	for {
		typ, val, off, ok := it.Next()
		if !ok {
			break
		}
		if typ == AttrFingerprint && CheckFingerprint(nl, off, val) == nil {
			t.Error("FINGERPRINT accepted when not last")
		}
	}
}

func TestClassifyAndFrame(t *testing.T) {
	id := [16]byte{0x21, 0x12, 0xa4, 0x42, 1, 2, 3}
	stunMsg := Finish(AppendSoftware(AppendHeader(nil, TypeBindingRequest, &id), "abc"), 0)
	classic := bytes.Clone(stunMsg)
	classic[4] = 0
	cd := func(ch uint16, l int, extra int) []byte {
		b := binary.BigEndian.AppendUint16(nil, ch)
		b = binary.BigEndian.AppendUint16(b, uint16(l))
		return append(b, make([]byte, l+extra)...)
	}
	for _, tc := range []struct {
		name string
		pkt  []byte
		want Kind
	}{
		{"stun", stunMsg, KindSTUN},
		{"rfc3489", classic, KindSTUNClassic},
		{"stun truncated", stunMsg[:len(stunMsg)-4], KindJunk},
		{"channel 0x4000", cd(0x4000, 5, 0), KindChannelData},
		{"channel 0x4FFF padded", cd(0x4FFF, 5, 3), KindChannelData},
		{"channel 0x5000 reserved", cd(0x5000, 5, 0), KindJunk},
		{"channel 0x7FFF reserved", cd(0x7FFF, 4, 0), KindJunk},
		{"channel short", cd(0x4001, 5, -1), KindJunk},
		{"channel over-padded", cd(0x4001, 5, 4), KindJunk},
		{"dtls", append([]byte{22, 0xfe, 0xfd}, make([]byte, 30)...), KindJunk},
		{"rtp", append([]byte{0x80, 0}, make([]byte, 30)...), KindJunk},
		{"tiny", []byte{0, 1}, KindJunk},
	} {
		if got := Classify(tc.pkt); got != tc.want {
			t.Errorf("Classify %s = %v want %v", tc.name, got, tc.want)
		}
	}
	for _, tc := range []struct {
		name string
		b    []byte
		n    int
		kind Kind
		err  error
	}{
		{"stun", stunMsg[:8], len(stunMsg), KindSTUN, nil},
		{"stun 4 bytes", stunMsg[:4], len(stunMsg), KindSTUNClassic, nil},
		{"channeldata padded over TCP", cd(0x4000, 5, 3)[:4], 12, KindChannelData, nil},
		{"channeldata aligned", cd(0x4000, 8, 0)[:4], 12, KindChannelData, nil},
		{"need more", stunMsg[:3], 0, KindJunk, ErrNeedMore},
		{"stun odd length", []byte{0, 1, 0, 5}, 0, KindJunk, ErrJunk},
		{"reserved channel", []byte{0x50, 0, 0, 4}, 0, KindJunk, ErrJunk},
		{"tls record", []byte{0x16, 3, 1, 0}, 0, KindJunk, ErrJunk},
		{"stun first byte 4", []byte{4, 1, 0, 4}, 0, KindJunk, ErrJunk},
	} {
		n, k, err := FrameLen(tc.b)
		if n != tc.n || k != tc.kind || !errors.Is(err, tc.err) {
			t.Errorf("FrameLen %s = %d %v %v, want %d %v %v", tc.name, n, k, err, tc.n, tc.kind, tc.err)
		}
	}
}

// FuzzParse: no panic on any input, and for every message that parses, the
// attributes re-encoded with AppendAttr reproduce the message up to padding
// bytes, and Classify agrees with ParseHeader.
func FuzzParse(f *testing.F) {
	f.Add(rfc5769Request)
	f.Add(rfc5769IPv4)
	f.Add(rfc5769IPv6)
	f.Add([]byte{0, 1, 0, 4, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0, 0x20, 0, 0})
	f.Add([]byte{0x40, 0, 0, 1, 9})
	f.Fuzz(func(t *testing.T, b []byte) {
		_, _, _ = FrameLen(b)
		k := Classify(b)
		h, err := ParseHeader(b)
		isSTUN := k == KindSTUN || k == KindSTUNClassic
		if isSTUN && err != nil || err == nil && b[0] <= maxSTUNFirstByte && !isSTUN {
			t.Fatalf("Classify %v disagrees with ParseHeader %v", k, err)
		}
		if err != nil {
			return
		}
		if isSTUN && (k == KindSTUN) != h.Cookie {
			t.Fatalf("cookie mismatch")
		}
		out := AppendHeader(nil, h.Type, &h.ID)
		it := NewAttrs(b)
		for n := 0; n < 1<<14; n++ {
			typ, val, off, ok := it.Next()
			if !ok {
				break
			}
			_, _ = ParseAddress(val)
			_, _ = ParseXORAddress(val, &h.ID)
			if typ == AttrFingerprint {
				_ = CheckFingerprint(b, off, val)
			}
			out = AppendAttr(out, typ, val)
		}
		if it.Err() != nil {
			return
		}
		out = Finish(out, 0)
		if len(out) != len(b) {
			t.Fatalf("re-encoded length %d != %d", len(out), len(b))
		}
		// Same bytes except padding (which the builder zeroes).
		it2 := NewAttrs(out)
		it1 := NewAttrs(b)
		for {
			t1, v1, _, ok1 := it1.Next()
			t2, v2, _, ok2 := it2.Next()
			if ok1 != ok2 || t1 != t2 || !bytes.Equal(v1, v2) {
				t.Fatalf("round trip differs")
			}
			if !ok1 {
				break
			}
		}
	})
}
