package classifier

// wire.go builds natprobe's Binding requests and parses whatever comes back,
// on the project's own STUN codec (internal/stunwire, shared with the
// server). It is used instead of pion's stun.Message because natprobe must
// also read RFC 3489 replies (no magic cookie: pion's decoder refuses them)
// for the ALG check, and because stunwire rejects an address attribute whose
// length does not match its family, where pion's MAPPED-ADDRESS decoder
// zero-fills a short value into a wrong address.

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/stund/stund/internal/stunwire"
)

// txKey identifies a transaction: bytes 4..20 of the STUN header, i.e. the
// magic cookie and the 96-bit transaction ID (RFC 8489 §5), or the 128-bit
// RFC 3489 transaction ID (RFC 3489 §11.1). Replies echo it unchanged.
type txKey [16]byte

// newKey returns a fresh random transaction key. RFC 8489 §5 asks for a
// cryptographically random transaction ID; classic keys must not start with
// the magic cookie or they would read as RFC 8489 messages.
func newKey(classic bool) txKey {
	var k txKey
	for {
		_, _ = rand.Read(k[:])
		if !classic {
			binary.BigEndian.PutUint32(k[:4], stunwire.MagicCookie)
			return k
		}
		if binary.BigEndian.Uint32(k[:4]) != stunwire.MagicCookie {
			return k
		}
	}
}

// reqOpts says what a Binding request asks of the server.
type reqOpts struct {
	// sendChange sends CHANGE-REQUEST with the change flags, even when
	// they are zero. A zero CHANGE-REQUEST asks for nothing (RFC 5780
	// §7.2) but marks the request as an RFC 5780 one: RFC 5780 §6.1 wants
	// OTHER-ADDRESS and RESPONSE-ORIGIN in every reply, yet a server
	// holding replies to an amplification budget (stund by default) only
	// adds them for requests that use an RFC 5780 attribute, as the
	// classic stun client's always do. A single-IP server answers it with
	// 420 (RFC 5780 §6); the transaction then falls back to a bare request
	// (txn.downgrade).
	sendChange   bool
	change       uint32 // CHANGE-REQUEST flags (stunwire.ChangeIP, stunwire.ChangePort; RFC 5780 §7.2)
	responsePort uint16 // RESPONSE-PORT (RFC 5780 §7.5); 0 = absent
	classic      bool   // RFC 3489 form: no cookie, no attributes (ALG check)
}

// plainOpts is a request that asks for no change: the reply comes from the
// address it was sent to and reports our reflexive address.
var plainOpts = reqOpts{sendChange: true}

// changeOpts asks for a reply from another server IP and/or port.
func changeOpts(flags uint32) reqOpts { return reqOpts{sendChange: true, change: flags} }

// plain reports whether the reply comes from where the request went, to
// where it came from.
func (o reqOpts) plain() bool { return !o.classic && o.change == 0 && o.responsePort == 0 }

// buildRequest appends a Binding request to dst. Cookie requests carry
// SOFTWARE (so the operator finds the run in the server's log) and
// FINGERPRINT (RFC 8489 §14.7; RFC 5780 §5 asks for it). The request's size
// matters: stund holds an unauthenticated reply to twice the request's size
// and drops RESPONSE-ORIGIN and MAPPED-ADDRESS first, so a bare 20-byte
// request would lose the very attributes the origin and ALG checks read.
// With SOFTWARE of at least 8 bytes and FINGERPRINT the request is 40 bytes
// or more, enough for the full 76-byte IPv4 reply.
func buildRequest(dst []byte, key txKey, software string, o reqOpts) []byte {
	start := len(dst)
	dst = stunwire.AppendHeader(dst, stunwire.TypeBindingRequest, (*[16]byte)(&key))
	if o.classic {
		// RFC 3489 §11.1: a bare request; the reply's MAPPED-ADDRESS is
		// what an ALG rewrites.
		return stunwire.Finish(dst, start)
	}
	if o.sendChange || o.change != 0 {
		var v [4]byte
		binary.BigEndian.PutUint32(v[:], o.change)
		dst = stunwire.AppendAttr(dst, stunwire.AttrChangeRequest, v[:]) // RFC 5780 §7.2
	}
	if o.responsePort != 0 {
		var v [4]byte // port, then two bytes reserved (RFC 5780 §7.5)
		binary.BigEndian.PutUint16(v[:], o.responsePort)
		dst = stunwire.AppendAttr(dst, stunwire.AttrResponsePort, v[:])
	}
	if software != "" {
		dst = stunwire.AppendSoftware(dst, software) // RFC 8489 §14.14
	}
	return stunwire.AppendFingerprint(dst, start)
}

// msgClass is the class of a Binding message (RFC 8489 §5).
type msgClass uint8

const (
	classRequest msgClass = iota + 1
	classIndication
	classSuccess
	classError
)

// message is what natprobe reads out of one datagram. Absent address
// attributes are the zero AddrPort.
type message struct {
	class   msgClass
	key     txKey
	classic bool // RFC 3489 framing

	xorMapped netip.AddrPort // XOR-MAPPED-ADDRESS (RFC 8489 §14.2)
	mapped    netip.AddrPort // MAPPED-ADDRESS (RFC 8489 §14.1, RFC 3489 §11.2.1)
	other     netip.AddrPort // OTHER-ADDRESS (RFC 5780 §7.4) or CHANGED-ADDRESS (RFC 3489 §11.2.3)
	origin    netip.AddrPort // RESPONSE-ORIGIN (RFC 5780 §7.3) or SOURCE-ADDRESS (RFC 3489 §11.2.2)
	errCode   int            // ERROR-CODE (RFC 8489 §14.8), error responses only
}

// Parse errors. A datagram that fails is dropped and counted, never acted on.
var (
	errNotBinding  = errors.New("not a STUN Binding message")
	errBadAttr     = errors.New("malformed attribute")
	errUnknownAttr = errors.New("unknown comprehension-required attribute")
	errNoErrorCode = errors.New("error response without a valid ERROR-CODE")
	errNoAddress   = errors.New("success response without a mapped address")
)

// knownReplyAttr lists the comprehension-required attributes natprobe
// understands in a Binding response; RFC 8489 §7.3.3 discards a response
// carrying any other (0x0000-0x7FFF).
func knownReplyAttr(t uint16) bool {
	switch t {
	case stunwire.AttrMappedAddress, stunwire.AttrXORMappedAddress, stunwire.AttrErrorCode,
		stunwire.AttrUnknownAttributes, stunwire.AttrPadding, stunwire.AttrSourceAddress,
		stunwire.AttrChangedAddress, stunwire.AttrUsername, stunwire.AttrMessageIntegrity,
		stunwire.AttrRealm, stunwire.AttrNonce, stunwire.AttrMessageIntegritySHA256:
		return true
	}
	return false
}

// knownClassicReplyAttr accepts RFC 3489's whole attribute range in classic
// replies, whose servers predate the comprehension-required rule.
func knownClassicReplyAttr(t uint16) bool { return t < 0x0020 || knownReplyAttr(t) }

// parseMessage decodes one datagram defensively: exact framing, the Binding
// method only, every address attribute well formed, FINGERPRINT (when
// present) last and correct. It never panics on any input (FuzzParseMessage).
func parseMessage(b []byte) (message, error) {
	var m message
	h, err := stunwire.ParseHeader(b)
	if err != nil {
		return m, err
	}
	switch h.Type {
	case stunwire.TypeBindingRequest:
		m.class = classRequest
	case stunwire.TypeBindingIndication:
		m.class = classIndication
	case stunwire.TypeBindingSuccess:
		m.class = classSuccess
	case stunwire.TypeBindingError:
		m.class = classError
	default:
		return m, errNotBinding
	}
	m.key = txKey(h.ID)
	m.classic = !h.Cookie
	if m.class == classRequest || m.class == classIndication {
		// Our own hairpinned requests: only the key matters; broken
		// framing or FINGERPRINT still disqualifies it.
		_, err := stunwire.Check(b, nil)
		return m, err
	}
	known := knownReplyAttr
	if m.classic {
		known = knownClassicReplyAttr
	}
	scan, err := stunwire.Check(b, known)
	if err != nil {
		return m, err
	}
	if u := scan.Unknown(); len(u) > 0 {
		return m, fmt.Errorf("%w 0x%04x", errUnknownAttr, u[0])
	}
	if err := m.readAttrs(b, &h.ID); err != nil {
		return m, err
	}
	switch m.class {
	case classError:
		if m.errCode < 300 || m.errCode > 699 {
			return m, errNoErrorCode
		}
	case classSuccess:
		if !m.xorMapped.IsValid() && !m.mapped.IsValid() {
			return m, errNoAddress
		}
	}
	return m, nil
}

// readAttrs reads the address and ERROR-CODE values of a response that
// stunwire.Check has accepted. Only the first occurrence of an attribute
// counts (RFC 8489 §14), and of OTHER-ADDRESS and CHANGED-ADDRESS (or
// RESPONSE-ORIGIN and SOURCE-ADDRESS) the first present.
func (m *message) readAttrs(b []byte, id *[16]byte) error {
	haveCode := false
	it := stunwire.NewAttrs(b)
	for {
		typ, val, _, ok := it.Next()
		if !ok {
			return it.Err()
		}
		var dst *netip.AddrPort
		switch typ {
		case stunwire.AttrXORMappedAddress:
			if m.xorMapped.IsValid() {
				continue
			}
			ap, err := stunwire.ParseXORAddress(val, id)
			if err != nil {
				return fmt.Errorf("XOR-MAPPED-ADDRESS: %w", err)
			}
			m.xorMapped = stunwire.Unmap(ap)
			continue
		case stunwire.AttrErrorCode:
			if haveCode {
				continue
			}
			if len(val) < 4 || val[3] > 99 {
				return errNoErrorCode
			}
			m.errCode, haveCode = int(val[2]&0x07)*100+int(val[3]), true
			continue
		case stunwire.AttrMappedAddress:
			dst = &m.mapped
		case stunwire.AttrOtherAddress, stunwire.AttrChangedAddress:
			dst = &m.other
		case stunwire.AttrResponseOrigin, stunwire.AttrSourceAddress:
			dst = &m.origin
		default:
			continue
		}
		if dst.IsValid() {
			continue
		}
		ap, err := stunwire.ParseAddress(val)
		if err != nil {
			return fmt.Errorf("%w 0x%04x: %v", errBadAttr, typ, err)
		}
		*dst = stunwire.Unmap(ap)
	}
}

// mappedOf is the reflexive address a success response reports:
// XOR-MAPPED-ADDRESS when present (an ALG cannot rewrite it), else
// MAPPED-ADDRESS (RFC 3489 servers).
func (m *message) mappedOf() netip.AddrPort {
	if m.xorMapped.IsValid() {
		return m.xorMapped
	}
	return m.mapped
}
