package stunwire

import (
	"net"
	"net/netip"
	"testing"

	"github.com/pion/stun/v4"
)

// The same job both ways: parse a Binding request carrying CHANGE-REQUEST
// and FINGERPRINT, verify FINGERPRINT, read CHANGE-REQUEST, and build a
// success response with XOR-MAPPED-ADDRESS, OTHER-ADDRESS, RESPONSE-ORIGIN
// and FINGERPRINT. pion/stun's Message is the reference.

var (
	benchSrc    = netip.MustParseAddrPort("198.51.100.7:40000")
	benchOther  = netip.MustParseAddrPort("10.0.0.2:3479")
	benchOrigin = netip.MustParseAddrPort("10.0.0.1:3478")
)

func benchRequest(b *testing.B) []byte {
	m, err := stun.Build(stun.TransactionID, stun.BindingRequest,
		stun.RawAttribute{Type: stun.AttrChangeRequest, Value: []byte{0, 0, 0, 6}}, stun.Fingerprint)
	if err != nil {
		b.Fatal(err)
	}
	return m.Raw
}

func BenchmarkParseBuild(b *testing.B) {
	req := benchRequest(b)
	b.Run("stunwire", func(b *testing.B) {
		out := make([]byte, 0, 1500)
		b.ReportAllocs()
		b.SetBytes(int64(len(req)))
		for b.Loop() {
			h, err := ParseHeader(req)
			if err != nil {
				b.Fatal(err)
			}
			var change []byte
			it := NewAttrs(req)
			for {
				typ, val, off, ok := it.Next()
				if !ok {
					break
				}
				switch typ {
				case AttrChangeRequest:
					change = val
				case AttrFingerprint:
					if CheckFingerprint(req, off, val) != nil {
						b.Fatal("fingerprint")
					}
				}
			}
			if it.Err() != nil || len(change) != 4 {
				b.Fatal("attrs")
			}
			m := AppendHeader(out[:0], TypeBindingSuccess, &h.ID)
			m = AppendXORAddress(m, AttrXORMappedAddress, benchSrc, &h.ID)
			m = AppendAddress(m, AttrOtherAddress, benchOther)
			m = AppendAddress(m, AttrResponseOrigin, benchOrigin)
			out = AppendFingerprint(m, 0)
		}
	})
	b.Run("pion", func(b *testing.B) {
		in := new(stun.Message)
		out := new(stun.Message)
		srcIP := net.IP(benchSrc.Addr().AsSlice())
		otherIP := net.IP(benchOther.Addr().AsSlice())
		originIP := net.IP(benchOrigin.Addr().AsSlice())
		b.ReportAllocs()
		b.SetBytes(int64(len(req)))
		for b.Loop() {
			in.Raw = append(in.Raw[:0], req...)
			if err := in.Decode(); err != nil {
				b.Fatal(err)
			}
			if err := stun.Fingerprint.Check(in); err != nil {
				b.Fatal(err)
			}
			change, err := in.Get(stun.AttrChangeRequest)
			if err != nil || len(change) != 4 {
				b.Fatal("attrs")
			}
			out.Reset()
			if err := out.Build(
				stun.NewTransactionIDSetter(in.TransactionID), stun.BindingSuccess,
				&stun.XORMappedAddress{IP: srcIP, Port: int(benchSrc.Port())},
				&stun.OtherAddress{IP: otherIP, Port: int(benchOther.Port())},
				&stun.ResponseOrigin{IP: originIP, Port: int(benchOrigin.Port())},
				stun.Fingerprint,
			); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// TestSameBytesAsPion checks that the benchmark's two sides build the same
// message, so the comparison is like for like.
func TestSameBytesAsPion(t *testing.T) {
	m, _ := stun.Build(stun.TransactionID, stun.BindingRequest)
	var id [16]byte
	copy(id[:], m.Raw[4:20])
	mine := AppendHeader(nil, TypeBindingSuccess, &id)
	mine = AppendXORAddress(mine, AttrXORMappedAddress, benchSrc, &id)
	mine = AppendAddress(mine, AttrOtherAddress, benchOther)
	mine = AppendAddress(mine, AttrResponseOrigin, benchOrigin)
	mine = AppendFingerprint(mine, 0)
	ref, err := stun.Build(stun.NewTransactionIDSetter(m.TransactionID), stun.BindingSuccess,
		&stun.XORMappedAddress{IP: net.IP(benchSrc.Addr().AsSlice()), Port: int(benchSrc.Port())},
		&stun.OtherAddress{IP: net.IP(benchOther.Addr().AsSlice()), Port: int(benchOther.Port())},
		&stun.ResponseOrigin{IP: net.IP(benchOrigin.Addr().AsSlice()), Port: int(benchOrigin.Port())},
		stun.Fingerprint)
	if err != nil {
		t.Fatal(err)
	}
	if string(mine) != string(ref.Raw) {
		t.Errorf("stunwire %x\npion     %x", mine, ref.Raw)
	}
}

// benchKnown is the server's Binding set in miniature: CHANGE-REQUEST and
// the RFC 5769 request's PRIORITY and USERNAME.
func benchKnown(t uint16) bool {
	return t == AttrChangeRequest || t == AttrPriority || t == AttrUsername
}

// BenchmarkCheck compares Check with the hand-written loop that
// server/binding, server/front.go and classifier/wire.go each carried
// (FINGERPRINT check, MESSAGE-INTEGRITY offset, unknown
// comprehension-required types into a fixed array), on the RFC 5769
// request (six attributes, FINGERPRINT last). Run with -benchmem.
func BenchmarkCheck(b *testing.B) {
	req := rfc5769Request
	b.Run("Check", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(req)))
		for b.Loop() {
			s, err := Check(req, benchKnown)
			if err != nil || !s.Fingerprint || s.Integrity < 0 || len(s.Unknown()) != 0 {
				b.Fatal(s, err)
			}
		}
	})
	b.Run("loop", func(b *testing.B) {
		b.ReportAllocs()
		b.SetBytes(int64(len(req)))
		for b.Loop() {
			var unknown [MaxUnknownAttributes]uint16
			nUnknown, miOff, fp := 0, -1, false
			it := NewAttrs(req)
			for {
				typ, val, off, ok := it.Next()
				if !ok {
					break
				}
				if typ == AttrFingerprint {
					if CheckFingerprint(req, off, val) != nil {
						b.Fatal("fingerprint")
					}
					fp = true
					continue
				}
				if miOff >= 0 {
					continue
				}
				switch typ {
				case AttrMessageIntegrity:
					miOff = off
				default:
					if typ < 0x8000 && !benchKnown(typ) && nUnknown < len(unknown) {
						unknown[nUnknown] = typ
						nUnknown++
					}
				}
			}
			if it.Err() != nil || !fp || miOff < 0 || nUnknown != 0 {
				b.Fatal("attrs")
			}
		}
	})
}
