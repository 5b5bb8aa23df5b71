package classifier

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"

	"github.com/stund/stund/internal/stunwire"
)

// reply builds a success response to key with the given attributes, the
// way a server would (stunwire is also the server's codec).
func reply(key txKey, fingerprint bool, attrs func(m []byte) []byte) []byte {
	id := [16]byte(key)
	m := stunwire.AppendHeader(nil, stunwire.TypeBindingSuccess, &id)
	m = attrs(m)
	if fingerprint {
		return stunwire.AppendFingerprint(m, 0)
	}
	return stunwire.Finish(m, 0)
}

func TestBuildRequest(t *testing.T) {
	k := newKey(false)
	for _, c := range []struct {
		name         string
		o            reqOpts
		change       int64 // -1: no CHANGE-REQUEST
		responsePort int
	}{
		{"plain", plainOpts, 0, 0},
		{"change IP and port", changeOpts(stunwire.ChangeIP | stunwire.ChangePort), int64(stunwire.ChangeIP | stunwire.ChangePort), 0},
		{"change port", changeOpts(stunwire.ChangePort), int64(stunwire.ChangePort), 0},
		{"bare", reqOpts{}, -1, 0},
		{"response port", reqOpts{responsePort: 40001}, -1, 40001},
	} {
		t.Run(c.name, func(t *testing.T) {
			b := buildRequest(nil, k, "natprobe-test", c.o)
			h, err := stunwire.ParseHeader(b)
			if err != nil || h.Type != stunwire.TypeBindingRequest || !h.Cookie || txKey(h.ID) != k {
				t.Fatalf("header %+v, %v", h, err)
			}
			change, port, fp, sw := int64(-1), 0, false, ""
			it := stunwire.NewAttrs(b)
			for {
				typ, val, off, ok := it.Next()
				if !ok {
					break
				}
				switch typ {
				case stunwire.AttrChangeRequest:
					change = int64(binary.BigEndian.Uint32(val))
				case stunwire.AttrResponsePort:
					port = int(binary.BigEndian.Uint16(val))
				case stunwire.AttrSoftware:
					sw = string(val)
				case stunwire.AttrFingerprint:
					fp = stunwire.CheckFingerprint(b, off, val) == nil
				}
			}
			if change != c.change || port != c.responsePort || !fp || sw != "natprobe-test" {
				t.Errorf("change %d port %d fingerprint %v software %q", change, port, fp, sw)
			}
			// stund holds its reply to 2x the request: the full IPv4
			// RFC 5780 reply (76 bytes) must fit.
			if 2*len(b) < 76 {
				t.Errorf("request of %d bytes is too small for a full reply", len(b))
			}
		})
	}
	classic := newKey(true)
	if binary.BigEndian.Uint32(classic[:4]) == stunwire.MagicCookie {
		t.Fatal("a classic key starts with the magic cookie")
	}
	b := buildRequest(nil, classic, "ignored", reqOpts{classic: true})
	if len(b) != stunwire.HeaderSize || !bytes.Equal(b[4:20], classic[:]) {
		t.Errorf("RFC 3489 request: %x", b)
	}
}

func TestParseMessage(t *testing.T) {
	k := newKey(false)
	id := [16]byte(k)
	mapped, other, origin := ap("5.6.7.8:40000"), ap("1.2.3.5:3479"), ap("1.2.3.4:3478")
	full := reply(k, true, func(m []byte) []byte {
		m = stunwire.AppendXORAddress(m, stunwire.AttrXORMappedAddress, mapped, &id)
		m = stunwire.AppendAddress(m, stunwire.AttrOtherAddress, other)
		m = stunwire.AppendAddress(m, stunwire.AttrResponseOrigin, origin)
		m = stunwire.AppendAddress(m, stunwire.AttrMappedAddress, mapped)
		return stunwire.AppendSoftware(m, "stund")
	})
	m, err := parseMessage(full)
	if err != nil {
		t.Fatal(err)
	}
	if m.class != classSuccess || m.key != k || m.classic || m.xorMapped != mapped || m.mapped != mapped || m.other != other || m.origin != origin {
		t.Errorf("parsed %+v", m)
	}

	v6 := ap("[2001:db8::1]:40000")
	m6, err := parseMessage(reply(k, false, func(m []byte) []byte {
		return stunwire.AppendXORAddress(m, stunwire.AttrXORMappedAddress, v6, &id)
	}))
	if err != nil || m6.xorMapped != v6 {
		t.Errorf("IPv6: %v %v", m6.xorMapped, err)
	}

	ck := newKey(true)
	cid := [16]byte(ck)
	cm := stunwire.AppendHeader(nil, stunwire.TypeBindingSuccess, &cid)
	cm = stunwire.AppendAddress(cm, stunwire.AttrMappedAddress, mapped)
	cm = stunwire.AppendAddress(cm, stunwire.AttrChangedAddress, other)
	cm = stunwire.AppendAddress(cm, stunwire.AttrSourceAddress, origin)
	cmsg, err := parseMessage(stunwire.Finish(cm, 0))
	if err != nil || !cmsg.classic || cmsg.key != ck || cmsg.mapped != mapped || cmsg.other != other || cmsg.origin != origin {
		t.Errorf("RFC 3489 reply: %+v %v", cmsg, err)
	}

	em := stunwire.AppendHeader(nil, stunwire.TypeBindingError, &id)
	em = stunwire.AppendErrorCode(em, 420, "Unknown Attribute")
	em = stunwire.AppendUnknownAttributes(em, []uint16{stunwire.AttrChangeRequest})
	emsg, err := parseMessage(stunwire.Finish(em, 0))
	if err != nil || emsg.class != classError || emsg.errCode != 420 {
		t.Errorf("420: %+v %v", emsg, err)
	}

	req := buildRequest(nil, k, "x", plainOpts)
	if rm, err := parseMessage(req); err != nil || rm.class != classRequest || rm.key != k {
		t.Errorf("our own request (hairpin): %+v %v", rm, err)
	}
}

func TestParseMessageRejects(t *testing.T) {
	k := newKey(false)
	id := [16]byte(k)
	good := reply(k, true, func(m []byte) []byte {
		return stunwire.AppendXORAddress(m, stunwire.AttrXORMappedAddress, ap("5.6.7.8:40000"), &id)
	})
	flip := func(b []byte, i int) []byte { c := bytes.Clone(b); c[i] ^= 0x40; return c }
	shortAddr := reply(k, false, func(m []byte) []byte {
		// IPv4 family with a 6-byte value: pion would zero-fill it.
		return stunwire.AppendAttr(m, stunwire.AttrXORMappedAddress, []byte{0, 1, 0x12, 0x34, 1, 2})
	})
	badOther := reply(k, false, func(m []byte) []byte {
		m = stunwire.AppendXORAddress(m, stunwire.AttrXORMappedAddress, ap("5.6.7.8:40000"), &id)
		return stunwire.AppendAttr(m, stunwire.AttrOtherAddress, []byte{0, 2, 0, 1, 1, 2, 3, 4})
	})
	unknownRequired := reply(k, false, func(m []byte) []byte {
		m = stunwire.AppendXORAddress(m, stunwire.AttrXORMappedAddress, ap("5.6.7.8:40000"), &id)
		return stunwire.AppendAttr(m, 0x7ff0, []byte{1, 2, 3, 4})
	})
	noAddress := reply(k, false, func(m []byte) []byte { return stunwire.AppendSoftware(m, "x") })
	em := stunwire.AppendHeader(nil, stunwire.TypeBindingError, &id)
	noCode := stunwire.Finish(em, 0)
	allocate := bytes.Clone(good)
	binary.BigEndian.PutUint16(allocate, 0x0103) // Allocate success
	for _, c := range []struct {
		name string
		b    []byte
	}{
		{"empty", nil},
		{"truncated header", good[:12]},
		{"length beyond the datagram", good[:len(good)-4]},
		{"FINGERPRINT wrong", flip(good, len(good)-1)},
		{"attribute bytes corrupted under FINGERPRINT", flip(good, 25)},
		{"IPv4 address too short", shortAddr},
		{"IPv6 family with IPv4 length", badOther},
		{"unknown comprehension-required attribute", unknownRequired},
		{"success without an address", noAddress},
		{"error without ERROR-CODE", noCode},
		{"not Binding", allocate},
		{"not STUN", []byte("GET / HTTP/1.1\r\n\r\nxx")},
	} {
		t.Run(c.name, func(t *testing.T) {
			if m, err := parseMessage(c.b); err == nil {
				t.Errorf("accepted: %+v", m)
			}
		})
	}
	if _, err := parseMessage(unknownRequired); !errors.Is(err, errUnknownAttr) {
		t.Errorf("unknown attribute error: %v", err)
	}
	// RFC 8489 §14.5: what follows MESSAGE-INTEGRITY is ignored, an
	// unknown comprehension-required attribute included.
	afterMI := reply(k, true, func(m []byte) []byte {
		m = stunwire.AppendXORAddress(m, stunwire.AttrXORMappedAddress, ap("5.6.7.8:40000"), &id)
		m = stunwire.AppendAttr(m, stunwire.AttrMessageIntegrity, make([]byte, 20))
		return stunwire.AppendAttr(m, 0x7ff0, []byte{1, 2, 3, 4})
	})
	if _, err := parseMessage(afterMI); err != nil {
		t.Errorf("unknown attribute after MESSAGE-INTEGRITY: %v", err)
	}
}

// FuzzParseMessage: no input makes the reply parser panic, and whatever it
// accepts is consistent (a success carries an address, an error a code).
func FuzzParseMessage(f *testing.F) {
	k := newKey(false)
	id := [16]byte(k)
	f.Add(reply(k, true, func(m []byte) []byte {
		m = stunwire.AppendXORAddress(m, stunwire.AttrXORMappedAddress, ap("5.6.7.8:40000"), &id)
		m = stunwire.AppendAddress(m, stunwire.AttrOtherAddress, ap("1.2.3.5:3479"))
		return stunwire.AppendAddress(m, stunwire.AttrResponseOrigin, ap("1.2.3.4:3478"))
	}))
	f.Add(buildRequest(nil, k, "natprobe", plainOpts))
	f.Add(buildRequest(nil, newKey(true), "", reqOpts{classic: true}))
	em := stunwire.AppendHeader(nil, stunwire.TypeBindingError, &id)
	f.Add(stunwire.Finish(stunwire.AppendErrorCode(em, 420, "x"), 0))
	f.Add([]byte{0x01, 0x01, 0x00, 0x04, 0x21, 0x12, 0xa4, 0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x20, 0x00, 0x00})
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := parseMessage(b)
		if err != nil {
			return
		}
		switch m.class {
		case classSuccess:
			if !m.xorMapped.IsValid() && !m.mapped.IsValid() {
				t.Fatalf("success without an address: %x", b)
			}
		case classError:
			if m.errCode < 300 || m.errCode > 699 {
				t.Fatalf("error code %d: %x", m.errCode, b)
			}
		case classRequest, classIndication:
		default:
			t.Fatalf("class %d: %x", m.class, b)
		}
		for _, a := range []netip.AddrPort{m.xorMapped, m.mapped, m.other, m.origin} {
			if a.IsValid() && a.Addr().Is4In6() {
				t.Fatalf("address not unmapped: %s", a)
			}
		}
	})
}

// BenchmarkParseMessage parses stund's full RFC 5780 reply (XOR-MAPPED,
// OTHER, RESPONSE-ORIGIN, MAPPED, SOFTWARE, FINGERPRINT): the work done for
// every datagram natprobe receives. Run with -benchmem.
func BenchmarkParseMessage(b *testing.B) {
	k := newKey(false)
	id := [16]byte(k)
	full := reply(k, true, func(m []byte) []byte {
		m = stunwire.AppendXORAddress(m, stunwire.AttrXORMappedAddress, ap("5.6.7.8:40000"), &id)
		m = stunwire.AppendAddress(m, stunwire.AttrOtherAddress, ap("1.2.3.5:3479"))
		m = stunwire.AppendAddress(m, stunwire.AttrResponseOrigin, ap("1.2.3.4:3478"))
		m = stunwire.AppendAddress(m, stunwire.AttrMappedAddress, ap("5.6.7.8:40000"))
		return stunwire.AppendSoftware(m, "stund")
	})
	b.ReportAllocs()
	b.SetBytes(int64(len(full)))
	for b.Loop() {
		if m, err := parseMessage(full); err != nil || !m.other.IsValid() {
			b.Fatal(m, err)
		}
	}
}
