// Package stunwire parses and builds STUN messages without heap allocation,
// for the server's fast paths and natprobe alike: one codec, one attribute
// walk (Check) and one set of wire constants. It understands RFC 8489 framing (with
// the magic cookie) and RFC 3489 framing (a 128-bit transaction ID and no
// cookie), and tells STUN apart from TURN ChannelData and junk (RFC 7983).
//
// Every function works on caller-owned byte slices: parsers return
// sub-slices of their input, builders append to the slice they are given and
// return it, as strconv.Append* does.
package stunwire

import (
	"encoding/binary"
	"errors"
	"hash/crc32"
	"net/netip"
)

const (
	// HeaderSize is the fixed STUN header: type, length, cookie, transaction
	// ID (RFC 8489 §5; RFC 3489 §11.1 has the same 20 bytes).
	HeaderSize = 20
	// MagicCookie distinguishes RFC 5389/8489 messages from RFC 3489 ones
	// (RFC 8489 §5).
	MagicCookie = 0x2112A442
	// fingerprintXOR is XORed into the CRC-32 so FINGERPRINT differs from
	// CRCs other protocols put at the same place (RFC 8489 §14.7).
	fingerprintXOR = 0x5354554e
	// attrHeaderSize is the type + length prefix of every attribute
	// (RFC 8489 §14).
	attrHeaderSize = 4
	// FingerprintSize is a whole FINGERPRINT attribute: header + CRC-32.
	FingerprintSize = attrHeaderSize + 4
	// ChannelDataHeaderSize is channel number + length (RFC 8656 §12.4).
	ChannelDataHeaderSize = 4
	// MinChannel and MaxChannel bound the channel numbers a client may bind;
	// 0x5000-0xFFFF is reserved so that DTLS-SRTP demultiplexing stays
	// unambiguous (RFC 8656 §12, RFC 7983).
	MinChannel = 0x4000
	MaxChannel = 0x4FFF
	// maxSTUNFirstByte: RFC 7983 §7 demultiplexes STUN as first byte 0-3
	// (every defined method fits); 20-63 is DTLS, 64-79 ChannelData, 128-191
	// RTP. A TLS record (first byte 22) must not be mistaken for STUN.
	maxSTUNFirstByte = 3
)

// Message types we build or recognise (RFC 8489 §5, §18.2: method 0x001 with
// the class bits C1 = 0x0100, C0 = 0x0010).
const (
	TypeBindingRequest    uint16 = 0x0001
	TypeBindingIndication uint16 = 0x0011
	TypeBindingSuccess    uint16 = 0x0101
	TypeBindingError      uint16 = 0x0111
)

// Attribute types (RFC 8489 §18.3, RFC 5780 §9.1, RFC 3489 §11.2).
const (
	AttrMappedAddress          uint16 = 0x0001
	AttrResponseAddress        uint16 = 0x0002 // RFC 3489 only; never honoured (reflection)
	AttrChangeRequest          uint16 = 0x0003
	AttrSourceAddress          uint16 = 0x0004 // RFC 3489
	AttrChangedAddress         uint16 = 0x0005 // RFC 3489
	AttrUsername               uint16 = 0x0006
	AttrMessageIntegrity       uint16 = 0x0008
	AttrErrorCode              uint16 = 0x0009
	AttrUnknownAttributes      uint16 = 0x000A
	AttrRealm                  uint16 = 0x0014
	AttrNonce                  uint16 = 0x0015
	AttrMessageIntegritySHA256 uint16 = 0x001C
	AttrPasswordAlgorithm      uint16 = 0x001D
	AttrUserhash               uint16 = 0x001E
	AttrXORMappedAddress       uint16 = 0x0020
	AttrPriority               uint16 = 0x0024 // RFC 8445 (ICE)
	AttrUseCandidate           uint16 = 0x0025 // RFC 8445 (ICE)
	AttrPadding                uint16 = 0x0026
	AttrResponsePort           uint16 = 0x0027
	AttrSoftware               uint16 = 0x8022
	AttrAlternateServer        uint16 = 0x8023
	AttrFingerprint            uint16 = 0x8028
	AttrResponseOrigin         uint16 = 0x802B
	AttrOtherAddress           uint16 = 0x802C
)

// Address families of the (XOR-)MAPPED-ADDRESS encoding (RFC 8489 §14.1).
const (
	familyIPv4 = 0x01
	familyIPv6 = 0x02
)

// Errors. They are package variables so that returning one never allocates.
var (
	ErrShort        = errors.New("stunwire: shorter than a STUN header")
	ErrNotSTUN      = errors.New("stunwire: first two bits are not zero")
	ErrBadLength    = errors.New("stunwire: length field does not match the datagram or is not a multiple of 4")
	ErrAttrOverrun  = errors.New("stunwire: attribute runs past the end of the message")
	ErrBadAddress   = errors.New("stunwire: malformed address attribute")
	ErrFingerprint  = errors.New("stunwire: FINGERPRINT mismatch or not last")
	ErrNeedMore     = errors.New("stunwire: need more bytes to frame the next message")
	ErrJunk         = errors.New("stunwire: neither STUN nor ChannelData")
	ErrBadAttrValue = errors.New("stunwire: attribute value has the wrong length")
)

// Header is a parsed STUN header.
type Header struct {
	Type   uint16 // message type (method and class bits)
	Length int    // length of the attribute section in bytes
	Cookie bool   // true for RFC 5389/8489 form, false for RFC 3489 form
	// ID holds bytes 4..20 of the message: the magic cookie and the 96-bit
	// transaction ID (RFC 8489 §5), or the 128-bit RFC 3489 transaction ID
	// (RFC 3489 §11.1). Responses echo it unchanged either way.
	ID [16]byte
}

// ParseHeader validates the framing of one whole STUN message held in msg
// (a datagram, or a message cut out of a stream by FrameLen): the first two
// bits are zero, the length is a multiple of 4 and covers exactly the rest of
// msg (RFC 8489 §5, §6.3).
func ParseHeader(msg []byte) (Header, error) {
	var h Header
	if len(msg) < HeaderSize {
		return h, ErrShort
	}
	if msg[0]&0xC0 != 0 {
		return h, ErrNotSTUN
	}
	l := int(binary.BigEndian.Uint16(msg[2:4]))
	if l%4 != 0 || HeaderSize+l != len(msg) {
		return h, ErrBadLength
	}
	h.Type = binary.BigEndian.Uint16(msg[0:2])
	h.Length = l
	h.Cookie = binary.BigEndian.Uint32(msg[4:8]) == MagicCookie
	copy(h.ID[:], msg[4:20])
	return h, nil
}

// Attrs iterates over the attributes of a message whose header passed
// ParseHeader. It never reads past the message and reports an attribute that
// overruns it (including its padding to 4 bytes, RFC 8489 §14) through Err.
type Attrs struct {
	msg []byte
	off int
	err error
}

// NewAttrs starts an iteration over msg's attributes.
func NewAttrs(msg []byte) Attrs {
	if len(msg) < HeaderSize {
		return Attrs{msg: msg, off: len(msg), err: ErrShort}
	}
	return Attrs{msg: msg, off: HeaderSize}
}

// Next returns the next attribute's type, value and offset of its header
// within the message; ok is false at the end or on error.
func (a *Attrs) Next() (typ uint16, val []byte, off int, ok bool) {
	if a.err != nil || a.off >= len(a.msg) {
		return 0, nil, 0, false
	}
	rest := len(a.msg) - a.off
	if rest < attrHeaderSize {
		a.err = ErrAttrOverrun
		return 0, nil, 0, false
	}
	typ = binary.BigEndian.Uint16(a.msg[a.off:])
	l := int(binary.BigEndian.Uint16(a.msg[a.off+2:]))
	padded := (l + 3) &^ 3
	if attrHeaderSize+padded > rest {
		a.err = ErrAttrOverrun
		return 0, nil, 0, false
	}
	off = a.off
	val = a.msg[a.off+attrHeaderSize : a.off+attrHeaderSize+l : a.off+attrHeaderSize+l]
	a.off += attrHeaderSize + padded
	return typ, val, off, true
}

// Err reports why the iteration stopped early, or nil.
func (a *Attrs) Err() error { return a.err }

// CheckFingerprint verifies a FINGERPRINT attribute found at offset off of
// msg with value val: it must be the last attribute and carry the CRC-32 of
// everything before it XOR 0x5354554e (RFC 8489 §14.7).
func CheckFingerprint(msg []byte, off int, val []byte) error {
	if len(val) != 4 || off+FingerprintSize != len(msg) {
		return ErrFingerprint
	}
	if crc32.ChecksumIEEE(msg[:off])^fingerprintXOR != binary.BigEndian.Uint32(val) {
		return ErrFingerprint
	}
	return nil
}

// ParseAddress decodes a MAPPED-ADDRESS-style value (RFC 8489 §14.1; the
// same layout serves RESPONSE-ORIGIN, OTHER-ADDRESS and the RFC 3489
// addresses). Zero-length and family/length mismatches are errors, never
// panics (cf. GHSA-34rh-wp3j-6cxc).
func ParseAddress(val []byte) (netip.AddrPort, error) {
	if len(val) < 4 {
		return netip.AddrPort{}, ErrBadAddress
	}
	port := binary.BigEndian.Uint16(val[2:4])
	switch {
	case val[1] == familyIPv4 && len(val) == 8:
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(val[4:8])), port), nil
	case val[1] == familyIPv6 && len(val) == 20:
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(val[4:20])), port), nil
	}
	return netip.AddrPort{}, ErrBadAddress
}

// ParseXORAddress decodes an XOR-MAPPED-ADDRESS-style value (RFC 8489
// §14.2) with id being Header.ID (cookie followed by transaction ID).
func ParseXORAddress(val []byte, id *[16]byte) (netip.AddrPort, error) {
	ap, err := ParseAddress(val)
	if err != nil {
		return ap, err
	}
	port := ap.Port() ^ uint16(MagicCookie>>16)
	if ap.Addr().Is4() {
		a := ap.Addr().As4()
		for i := range a {
			a[i] ^= id[i]
		}
		return netip.AddrPortFrom(netip.AddrFrom4(a), port), nil
	}
	a := ap.Addr().As16()
	for i := range a {
		a[i] ^= id[i]
	}
	return netip.AddrPortFrom(netip.AddrFrom16(a), port), nil
}

// AppendHeader starts a message of type typ echoing id, with a zero length
// that Finish or AppendFingerprint fills in. The message starts at len(dst).
func AppendHeader(dst []byte, typ uint16, id *[16]byte) []byte {
	dst = binary.BigEndian.AppendUint16(dst, typ)
	dst = append(dst, 0, 0)
	return append(dst, id[:]...)
}

// AppendAttr appends one attribute with value val, zero-padded to 4 bytes
// (RFC 8489 §14).
func AppendAttr(dst []byte, typ uint16, val []byte) []byte {
	dst = binary.BigEndian.AppendUint16(dst, typ)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(val)))
	dst = append(dst, val...)
	return appendZeros(dst, pad4(len(val))-len(val))
}

// AddressAttrSize is the encoded size of an address attribute for ap.
func AddressAttrSize(ap netip.AddrPort) int {
	if ap.Addr().Unmap().Is4() {
		return attrHeaderSize + 8
	}
	return attrHeaderSize + 20
}

// AppendAddress appends an address attribute of type typ in the
// MAPPED-ADDRESS layout (RFC 8489 §14.1): used for MAPPED-ADDRESS,
// RESPONSE-ORIGIN, OTHER-ADDRESS (RFC 5780 §7.3, §7.4) and SOURCE-ADDRESS,
// CHANGED-ADDRESS (RFC 3489 §11.2). IPv4-mapped IPv6 addresses are written
// as IPv4.
func AppendAddress(dst []byte, typ uint16, ap netip.AddrPort) []byte {
	return appendAddr(dst, typ, ap, nil)
}

// AppendXORAddress appends an XOR-MAPPED-ADDRESS-layout attribute (RFC 8489
// §14.2) with id being Header.ID.
func AppendXORAddress(dst []byte, typ uint16, ap netip.AddrPort, id *[16]byte) []byte {
	return appendAddr(dst, typ, ap, id)
}

func appendAddr(dst []byte, typ uint16, ap netip.AddrPort, id *[16]byte) []byte {
	addr := ap.Addr().Unmap()
	port := ap.Port()
	if id != nil {
		port ^= uint16(MagicCookie >> 16)
	}
	if addr.Is4() {
		dst = binary.BigEndian.AppendUint16(dst, typ)
		dst = binary.BigEndian.AppendUint16(dst, 8)
		dst = append(dst, 0, familyIPv4)
		dst = binary.BigEndian.AppendUint16(dst, port)
		a := addr.As4()
		if id != nil {
			for i := range a {
				a[i] ^= id[i]
			}
		}
		return append(dst, a[:]...)
	}
	dst = binary.BigEndian.AppendUint16(dst, typ)
	dst = binary.BigEndian.AppendUint16(dst, 20)
	dst = append(dst, 0, familyIPv6)
	dst = binary.BigEndian.AppendUint16(dst, port)
	a := addr.As16()
	if id != nil {
		for i := range a {
			a[i] ^= id[i]
		}
	}
	return append(dst, a[:]...)
}

// ErrorCodeAttrSize is the encoded size of ERROR-CODE with reason.
func ErrorCodeAttrSize(reason string) int { return attrHeaderSize + 4 + pad4(len(reason)) }

// AppendErrorCode appends ERROR-CODE (RFC 8489 §14.8): class = code/100,
// number = code%100, then the UTF-8 reason phrase padded to 4.
func AppendErrorCode(dst []byte, code int, reason string) []byte {
	dst = binary.BigEndian.AppendUint16(dst, AttrErrorCode)
	dst = binary.BigEndian.AppendUint16(dst, uint16(4+len(reason)))
	dst = append(dst, 0, 0, byte(code/100)&0x07, byte(code%100))
	dst = append(dst, reason...)
	return appendZeros(dst, pad4(len(reason))-len(reason))
}

// UnknownAttributesAttrSize is the encoded size of UNKNOWN-ATTRIBUTES
// listing n types.
func UnknownAttributesAttrSize(n int) int { return attrHeaderSize + pad4(2*n) }

// AppendUnknownAttributes appends UNKNOWN-ATTRIBUTES (RFC 8489 §14.9).
func AppendUnknownAttributes(dst []byte, types []uint16) []byte {
	dst = binary.BigEndian.AppendUint16(dst, AttrUnknownAttributes)
	dst = binary.BigEndian.AppendUint16(dst, uint16(2*len(types)))
	for _, t := range types {
		dst = binary.BigEndian.AppendUint16(dst, t)
	}
	return appendZeros(dst, pad4(2*len(types))-2*len(types))
}

// AppendPadding appends a PADDING attribute (RFC 5780 §7.6) whose value is
// n zero bytes; n is rounded up to a multiple of 4.
func AppendPadding(dst []byte, n int) []byte {
	n = pad4(n)
	dst = binary.BigEndian.AppendUint16(dst, AttrPadding)
	dst = binary.BigEndian.AppendUint16(dst, uint16(n))
	return appendZeros(dst, n)
}

// AppendSoftware appends SOFTWARE (RFC 8489 §14.14).
func AppendSoftware(dst []byte, s string) []byte {
	dst = binary.BigEndian.AppendUint16(dst, AttrSoftware)
	dst = binary.BigEndian.AppendUint16(dst, uint16(len(s)))
	dst = append(dst, s...)
	return appendZeros(dst, pad4(len(s))-len(s))
}

// Finish writes the length field of the message that starts at dst[start:].
func Finish(dst []byte, start int) []byte {
	binary.BigEndian.PutUint16(dst[start+2:], uint16(len(dst)-start-HeaderSize))
	return dst
}

// AppendFingerprint finishes the message at dst[start:] with FINGERPRINT:
// the length field is set to include it first, then the CRC-32 of all that
// precedes it is XORed with 0x5354554e (RFC 8489 §14.7).
func AppendFingerprint(dst []byte, start int) []byte {
	binary.BigEndian.PutUint16(dst[start+2:], uint16(len(dst)-start-HeaderSize+FingerprintSize))
	crc := crc32.ChecksumIEEE(dst[start:]) ^ fingerprintXOR
	dst = binary.BigEndian.AppendUint16(dst, AttrFingerprint)
	dst = binary.BigEndian.AppendUint16(dst, 4)
	return binary.BigEndian.AppendUint32(dst, crc)
}

func pad4(n int) int { return (n + 3) &^ 3 }

func appendZeros(dst []byte, n int) []byte {
	for range n {
		dst = append(dst, 0)
	}
	return dst
}

// Kind is what a datagram or stream chunk looks like (RFC 7983 §7 ranges).
type Kind uint8

const (
	// KindJunk is neither STUN nor ChannelData; drop and count it.
	KindJunk Kind = iota
	// KindSTUN is an RFC 5389/8489 message (magic cookie present).
	KindSTUN
	// KindSTUNClassic is an RFC 3489 message (no magic cookie).
	KindSTUNClassic
	// KindChannelData is a TURN ChannelData message (RFC 8656 §12.4).
	KindChannelData
)

func (k Kind) String() string {
	switch k {
	case KindSTUN:
		return "stun"
	case KindSTUNClassic:
		return "stun-rfc3489"
	case KindChannelData:
		return "channeldata"
	}
	return "junk"
}

// Classify says what a whole datagram is. STUN must be framed exactly
// (ParseHeader's rules); ChannelData must name a channel in 0x4000-0x4FFF and
// carry at least its declared length and at most its padding after it
// (RFC 8656 §12.4, §12.5: padding is optional over UDP).
func Classify(pkt []byte) Kind {
	if len(pkt) < ChannelDataHeaderSize {
		return KindJunk
	}
	switch {
	case pkt[0] <= maxSTUNFirstByte:
		h, err := ParseHeader(pkt)
		if err != nil {
			return KindJunk
		}
		if h.Cookie {
			return KindSTUN
		}
		return KindSTUNClassic
	case pkt[0]>>6 == 1:
		ch := binary.BigEndian.Uint16(pkt[0:2])
		if ch < MinChannel || ch > MaxChannel {
			return KindJunk
		}
		l := int(binary.BigEndian.Uint16(pkt[2:4]))
		if n := len(pkt) - ChannelDataHeaderSize; n < l || n > pad4(l) {
			return KindJunk
		}
		return KindChannelData
	}
	return KindJunk
}

// FrameLen tells how many bytes of a byte stream (TCP/TLS) the next message
// occupies, given its first bytes: 20+length for STUN (RFC 8489 §6.2.2), and
// 4+length padded to 4 for ChannelData (RFC 8656 §12.5: over TCP and TLS the
// ChannelData message is always padded). ErrNeedMore asks for at least 4
// bytes; ErrJunk means the stream cannot be resynchronised and should be
// closed. The kind is KindSTUN only when the first 8 bytes (with the
// cookie) are present; with 4..7 bytes a STUN message reports KindSTUNClassic.
func FrameLen(b []byte) (int, Kind, error) {
	if len(b) < 4 {
		return 0, KindJunk, ErrNeedMore
	}
	l := int(binary.BigEndian.Uint16(b[2:4]))
	switch {
	case b[0] <= maxSTUNFirstByte:
		if l%4 != 0 {
			return 0, KindJunk, ErrJunk
		}
		k := KindSTUNClassic
		if len(b) >= 8 && binary.BigEndian.Uint32(b[4:8]) == MagicCookie {
			k = KindSTUN
		}
		return HeaderSize + l, k, nil
	case b[0]>>6 == 1:
		ch := binary.BigEndian.Uint16(b[0:2])
		if ch < MinChannel || ch > MaxChannel {
			return 0, KindJunk, ErrJunk
		}
		return ChannelDataHeaderSize + pad4(l), KindChannelData, nil
	}
	return 0, KindJunk, ErrJunk
}
