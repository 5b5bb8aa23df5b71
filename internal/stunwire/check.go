package stunwire

const (
	// MaxUnknownAttributes bounds the unknown comprehension-required types
	// Check records: a message with more still fails as a whole, and the
	// 420 answer lists the first ones (RFC 8489 §14.9 does not ask for the
	// full list). A fixed array keeps the walk allocation-free and caps
	// what a hostile request can make a reply carry.
	MaxUnknownAttributes = 16
	// comprehensionOptional is the first type of the range an agent may
	// ignore when it does not know it (RFC 8489 §14: 0x8000-0xFFFF).
	comprehensionOptional = 0x8000
)

// ComprehensionRequired reports whether an agent that does not know
// attribute type typ must refuse the message (RFC 8489 §14: 0x0000-0x7FFF).
func ComprehensionRequired(typ uint16) bool { return typ < comprehensionOptional }

// Scan is what Check found in one pass over a message's attributes.
type Scan struct {
	// Integrity is the offset within the message of the MESSAGE-INTEGRITY
	// attribute's header (RFC 8489 §14.5), -1 when there is none.
	Integrity int
	// Fingerprint is true when the message ends with a FINGERPRINT that
	// matched (RFC 8489 §14.7); a mismatch is Check's error instead.
	Fingerprint bool
	// unknown holds the first nUnknown unknown comprehension-required types.
	unknown  [MaxUnknownAttributes]uint16
	nUnknown int
}

// Unknown returns the unknown comprehension-required attribute types, in
// the order they came, at most MaxUnknownAttributes of them: what a 420
// answer lists in UNKNOWN-ATTRIBUTES (RFC 8489 §7.3.1, §14.9). The slice
// aliases s.
func (s *Scan) Unknown() []uint16 { return s.unknown[:s.nUnknown] }

// Check is the one walk over the attributes of a message whose header
// passed ParseHeader. It fails with ErrAttrOverrun when an attribute runs
// past the message (RFC 8489 §14) and with ErrFingerprint when FINGERPRINT
// is not last or does not match (RFC 8489 §7.3: such a message is not
// STUN). It records where MESSAGE-INTEGRITY is, and every
// comprehension-required type for which known is false; known == nil
// records none. Attributes after MESSAGE-INTEGRITY or
// MESSAGE-INTEGRITY-SHA256 other than FINGERPRINT are ignored, as RFC 8489
// §14.5 and §14.6 require, so they are never reported unknown. Check does
// not allocate.
func Check(msg []byte, known func(uint16) bool) (Scan, error) {
	s := Scan{Integrity: -1}
	integrity := false // a MESSAGE-INTEGRITY(-SHA256) was seen
	it := NewAttrs(msg)
	for {
		typ, val, off, ok := it.Next()
		if !ok {
			return s, it.Err()
		}
		switch {
		case typ == AttrFingerprint:
			if err := CheckFingerprint(msg, off, val); err != nil {
				return s, err
			}
			s.Fingerprint = true
		case integrity:
		case typ == AttrMessageIntegrity:
			s.Integrity, integrity = off, true
		case typ == AttrMessageIntegritySHA256:
			integrity = true
		case known != nil && ComprehensionRequired(typ) && !known(typ) && s.nUnknown < MaxUnknownAttributes:
			s.unknown[s.nUnknown] = typ
			s.nUnknown++
		}
	}
}
