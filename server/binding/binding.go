// Package binding is the Binding responder: it answers STUN Binding
// requests (RFC 8489 §7, RFC 5780 §6, RFC 3489 §8/§11) for every listener.
package binding

// It answers STUN Binding (RFC 8489 §7, RFC 5780 §6, RFC 3489
// §8/§11) on the fast path, without heap allocation per packet; everything
// else on the sockets goes to pion/turn.
//
// # What goes in an answer
//
// With an alternate IP (two-IP mode) every Binding request gets the RFC 5780
// answer (RFC 5780 §6): XOR-MAPPED-ADDRESS, RESPONSE-ORIGIN and
// OTHER-ADDRESS; an RFC 3489 request (no magic cookie) gets MAPPED-ADDRESS,
// SOURCE-ADDRESS and CHANGED-ADDRESS (RFC 3489 §11.1). That holds whether or
// not the request used an RFC 5780 feature, because the NAT-discovery
// clients (coturn's turnutils_natdiscovery, pion's stun-nat-behaviour,
// NatTypeTester, stuntman) send a bare Binding request first and call a
// server whose answer lacks OTHER-ADDRESS "not RFC 5780 capable". In
// single-IP mode there is no alternate to name (RFC 5780 §6): the answer is
// the mapped address.
//
// RFC5780Lean is the opt-in lean answer: RFC 5780 attributes only for a
// request that uses an RFC 5780 feature (CHANGE-REQUEST, RESPONSE-PORT or
// PADDING), and only while the answer stays within twice the request (an
// IPv4 request with CHANGE-REQUEST always has room; an IPv6 one only when
// the client pads its request, e.g. with SOFTWARE, as natprobe does).
//
// # The amplification rule
//
// An unauthenticated answer over UDP is at most twice its request, or at
// most the RFC 5780 answer to a minimal request of the same form
// (rfc5780AnswerV4/V6: 64 bytes over IPv4, 100 over IPv6, 8 less without
// FINGERPRINT), whichever is larger. Attributes go in in this order:
//
//  1. the core: the mapped address (XOR-MAPPED-ADDRESS, RFC 8489 §14.2, or
//     MAPPED-ADDRESS for RFC 3489, §11.2.1), then in two-IP mode
//     OTHER-ADDRESS and RESPONSE-ORIGIN (CHANGED-ADDRESS and SOURCE-ADDRESS
//     for RFC 3489); FINGERPRINT iff the request carried one (the request
//     paid the same 8 bytes). The core is that RFC 5780 answer, so it always
//     fits the rule. In lean mode only the mapped address is core.
//  2. MAPPED-ADDRESS beside XOR-MAPPED-ADDRESS (RFC 5780 §6.1 asks for both,
//     so that a client can detect an ALG rewriting addresses; clients using
//     the cookie all read XOR-MAPPED-ADDRESS, so it is optional).
//  3. SOFTWARE, only when configured (none by default: it tells an attacker
//     the version).
//  4. PADDING (RFC 5780 §7.6), up to the request's own PADDING length and
//     the request's size.
//
// Items 2-4 go in only while the answer stays within twice the request:
// the allowance above 2x pays for the answer a NAT-discovery client needs,
// not for extras. So a 28-byte request with 4 bytes of PADDING gets the
// 56-byte core and no PADDING, never 64 bytes (2.3x).
//
// What that gives a bare request (TestBareRequestSizes): 20 bytes get 56
// over IPv4 (2.8x; the rule's ceiling is 64/20 = 3.2x) and 92 over IPv6
// (4.6x); with FINGERPRINT, 28 bytes get 64 (2.3x) and 100 (3.6x). coturn
// 4.6.1 answers a bare request with 4.6x over IPv4 and 7.0x over IPv6
// (docs/operator.md has the measurements). The follow-up requests of
// the discovery clients (CHANGE-REQUEST, 28 bytes) get the same core. Error
// answers stay within twice the request: the reason phrase is dropped when
// it does not fit. Over TCP/TLS there is no budget: a stream's source
// completed a handshake and cannot be spoofed, so nothing is reflected.
//
// What the interop clients send first (captured on the wire):
// turnutils_natdiscovery and turnutils_stunclient a bare 20-byte cookie
// request, which they follow only if the answer has OTHER-ADDRESS; stun
// (stun-client 0.97) a 28-byte RFC 3489 request with CHANGE-REQUEST (value 0
// on its first test), answered over IPv4 with MAPPED + CHANGED + SOURCE = 56
// bytes = 2x in either mode.
//
// # Streams (TCP/TLS)
//
// A reply over a stream goes back on the same connection (RFC 8489 §6.2.2),
// so it can neither come from another address nor go to another port:
// CHANGE-REQUEST with a flag set and RESPONSE-PORT are answered with 420
// listing the attribute (as RFC 5780 §6 does for a server that cannot honour
// CHANGE-REQUEST). OTHER-ADDRESS over a stream names the same listener port
// on the alternate IP (TCP and TLS listen on both IPs), RESPONSE-ORIGIN the
// listener itself.

import (
	"encoding/binary"
	"net/netip"
	"sync/atomic"

	"github.com/stund/stund/internal/stunwire"
)

const (
	// amplificationFactor caps an unauthenticated answer at this multiple
	// of the request's size, so that a spoofed request reflects at most
	// twice its bytes at a victim; only the RFC 5780 answer itself (below)
	// may be larger.
	amplificationFactor = 2
	// rfc5780AnswerV4 and rfc5780AnswerV6 are the RFC 5780 answer to a
	// minimal Binding request that carries FINGERPRINT, the size an
	// unauthenticated answer may always reach even when it is more than
	// twice its request. The 20-byte header; XOR-MAPPED-ADDRESS,
	// RESPONSE-ORIGIN and OTHER-ADDRESS, each 4 bytes of type and length,
	// 4 of reserved, family and port, then the address (RFC 8489 §14.1,
	// §14.2; RFC 5780 §7.3, §7.4): 4+4+4 = 12 bytes over IPv4, 4+4+16 = 24
	// over IPv6; and FINGERPRINT, 4+4 = 8 bytes (RFC 8489 §14.7):
	// 20 + 3×12 + 8 = 64 and 20 + 3×24 + 8 = 100. Without FINGERPRINT in
	// the request the answer has none, and the allowance is 8 bytes less.
	rfc5780AnswerV4 = stunwire.HeaderSize + 3*(4+4+4) + stunwire.FingerprintSize
	rfc5780AnswerV6 = stunwire.HeaderSize + 3*(4+4+16) + stunwire.FingerprintSize
)

// Reason phrases (RFC 8489 §14.8): kept short because they count against the
// amplification budget and are dropped when they do not fit.
const (
	reasonBadRequest  = "Bad Request"
	reasonUnknownAttr = "Unknown Attribute"
)

// Endpoint indexes the RFC 5780 socket grid: ip 0 = primary, 1 = alternate;
// port 0 = primary, 1 = alternate.
// Endpoint is a cell of the RFC 5780 grid: IP and Port are 0 for the
// primary and 1 for the alternate (for streams: the listener's IP, Port 0).
type Endpoint struct{ IP, Port int }

type Config struct {
	Grid        [2][2]netip.AddrPort      // bound UDP sockets, Grid[ip][port]; Grid[1][*] is invalid (zero) in single-IP mode
	Advertise   map[netip.Addr]netip.Addr // private -> public (cloud 1:1 NAT); nil = none
	Software    string                    // "" = no SOFTWARE attribute (it tells an attacker the version)
	RFC5780Lean bool                      // RFC 5780 attributes only for requests that use an RFC 5780 feature, within 2x (see file comment)
}

type Request struct {
	Raw    []byte         // one whole STUN message
	Src    netip.AddrPort // the client as seen by us
	Local  netip.AddrPort // the local address it arrived on (grid socket, or TCP/TLS listener address for streams)
	At     Endpoint       // grid cell it arrived on (for streams: ip index of the listener, port 0)
	Stream bool           // TCP/TLS: reply goes back on the same connection
}

type Reply struct {
	Msg  []byte         // encoded reply, appended to buf
	From Endpoint       // grid socket to send from (ignored for Stream)
	To   netip.AddrPort // destination
}

// streamBudget is the size bound of a reply over a stream: none that a
// reply can reach (a stream's source cannot be spoofed).
const streamBudget = 1 << 16

// counters counts every outcome of Handle; metrics read Stats().
type counters struct {
	requests     atomic.Uint64 // Binding requests that parsed
	indications  atomic.Uint64 // Binding indications (keepalives), never answered
	malformed    atomic.Uint64 // dropped: bad framing, overrun, bad FINGERPRINT, bad attribute value
	notBinding   atomic.Uint64 // handed a STUN message that is not a Binding request/indication
	rfc3489      atomic.Uint64 // requests without the magic cookie
	changeIP     atomic.Uint64 // successful replies honouring change-IP
	changePort   atomic.Uint64 // successful replies honouring change-port
	responsePort atomic.Uint64 // successful replies sent to RESPONSE-PORT
	padding      atomic.Uint64 // successful replies carrying PADDING
	overBudget   atomic.Uint64 // lean mode: OTHER-ADDRESS withheld, or the mapped address alone over 2× the request
	success      atomic.Uint64 // success responses built
	err400       atomic.Uint64 // 400 Bad Request replies
	err420       atomic.Uint64 // 420 Unknown Attribute replies
}

// Stats is a point-in-time copy of counters.
type Stats struct {
	Requests, Indications, Malformed, NotBinding, RFC3489 uint64
	ChangeIP, ChangePort, ResponsePort, Padding           uint64
	OverBudget, Success, Err400, Err420                   uint64
}

func (s *counters) snapshot() Stats {
	return Stats{
		Requests: s.requests.Load(), Indications: s.indications.Load(),
		Malformed: s.malformed.Load(), NotBinding: s.notBinding.Load(),
		RFC3489: s.rfc3489.Load(), ChangeIP: s.changeIP.Load(),
		ChangePort: s.changePort.Load(), ResponsePort: s.responsePort.Load(),
		Padding: s.padding.Load(), OverBudget: s.overBudget.Load(),
		Success: s.success.Load(), Err400: s.err400.Load(), Err420: s.err420.Load(),
	}
}

// Responder answers Binding requests; safe for concurrent use (it keeps
// only atomic counters).
type Responder struct {
	cfg   Config
	dual  bool // an alternate IP exists: RFC 5780 CHANGE-REQUEST and OTHER-ADDRESS are possible
	stats counters
}

// New returns a Responder for the bound grid cfg.Grid.
func New(cfg Config) *Responder {
	return &Responder{cfg: cfg, dual: cfg.Grid[1][0].IsValid() && cfg.Grid[1][1].IsValid()}
}

// Stats is a snapshot of the counters.
func (b *Responder) Stats() Stats { return b.stats.snapshot() }

// isBinding reports whether a datagram is a Binding request or indication
// (cookie or RFC 3489 form, framed exactly) that handle() should take;
// everything else goes to pion/turn.
func IsBinding(pkt []byte) bool {
	switch stunwire.Classify(pkt) {
	case stunwire.KindSTUN, stunwire.KindSTUNClassic:
		t := binary.BigEndian.Uint16(pkt[0:2])
		return t == stunwire.TypeBindingRequest || t == stunwire.TypeBindingIndication
	}
	return false
}

// public maps a local address to the address clients should use (--advertise).
func (b *Responder) public(ap netip.AddrPort) netip.AddrPort {
	if pub, ok := b.cfg.Advertise[ap.Addr().Unmap()]; ok {
		return netip.AddrPortFrom(pub, ap.Port())
	}
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// parsed is what handle learns from a request's attributes.
type parsed struct {
	hasChange, hasRespPort, hasPadding, hasFingerprint bool
	change                                             uint32
	respPort                                           uint16
	padLen                                             int
	unknown                                            [stunwire.MaxUnknownAttributes]uint16
	nUnknown                                           int
}

// knownAttr reports whether a comprehension-required attribute is one we
// understand in a Binding request (RFC 8489 §7.3.1): the RFC 8489 set (auth
// attributes are ignored, Binding here is unauthenticated), the RFC 5780
// ones we implement, and ICE's PRIORITY/USE-CANDIDATE (RFC 8445 §16.1) so that
// connectivity checks are not refused. RESPONSE-ADDRESS (RFC 3489) is
// deliberately unknown: honouring it would make us a reflector.
func knownAttr(t uint16) bool {
	switch t {
	case stunwire.AttrMappedAddress, stunwire.AttrChangeRequest, stunwire.AttrUsername,
		stunwire.AttrMessageIntegrity, stunwire.AttrErrorCode, stunwire.AttrUnknownAttributes,
		stunwire.AttrRealm, stunwire.AttrNonce, stunwire.AttrMessageIntegritySHA256,
		stunwire.AttrPasswordAlgorithm, stunwire.AttrUserhash, stunwire.AttrXORMappedAddress,
		stunwire.AttrPriority, stunwire.AttrUseCandidate, stunwire.AttrPadding, stunwire.AttrResponsePort:
		return true
	}
	return false
}

// handle returns ok=false when nothing is to be sent (indication = keepalive,
// malformed, not Binding); every outcome is counted. Its steps: parse, the
// refusals (RFC 8489 §7.3.1, RFC 5780 §6), where the answer leaves from and
// goes to (RFC 5780 §6.1), the addresses it names, the answer itself.
func (b *Responder) Handle(buf []byte, req Request) (reply Reply, ok bool) {
	h, p, ok := b.parse(req.Raw)
	if !ok {
		return reply, false
	}
	src := netip.AddrPortFrom(req.Src.Addr().Unmap(), req.Src.Port())
	budget := amplificationFactor * len(req.Raw)
	if req.Stream {
		// A stream's source completed a handshake and cannot be spoofed:
		// a reply there reflects nothing at a victim, so every attribute
		// fits.
		budget = streamBudget
	}
	if code, unknown := b.refusal(req, &p); code != 0 {
		return b.errorReply(buf, &h, req, src, &p, budget, code, reasonFor(code), unknown)
	}
	from, to := route(req, &p, src)
	origin, other, ok := b.addresses(req, from)
	if !ok {
		// The cell the request names does not exist (wiring error): say
		// so rather than answer from a socket we do not have.
		return b.errorReply(buf, &h, req, src, &p, budget, 420, reasonUnknownAttr, []uint16{stunwire.AttrChangeRequest})
	}
	msg := b.success(buf, &h, req, &p, src, origin, other, budget)
	b.countSuccess(req, from, &p)
	return Reply{Msg: msg, From: from, To: to}, true
}

// parse reads the header and the attributes a Binding request may carry;
// ok=false means nothing is answered (counted here).
func (b *Responder) parse(raw []byte) (h stunwire.Header, p parsed, ok bool) {
	h, err := stunwire.ParseHeader(raw)
	if err != nil {
		b.stats.malformed.Add(1)
		return h, p, false
	}
	switch h.Type {
	case stunwire.TypeBindingRequest:
	case stunwire.TypeBindingIndication:
		// RFC 8489 §6.3.2: indications get no response; Binding
		// indications are keepalives (RFC 8489 §3).
		b.stats.indications.Add(1)
		return h, p, false
	default:
		b.stats.notBinding.Add(1)
		return h, p, false
	}
	// The one walk (stunwire.Check): lengths, FINGERPRINT last and right
	// (RFC 8489 §7.3, §14.7: a mismatch means "discard"), and the unknown
	// comprehension-required attributes (RFC 8489 §7.3.1).
	sc, err := stunwire.Check(raw, knownAttr)
	if err != nil || !p.read(raw) {
		b.stats.malformed.Add(1)
		return h, p, false
	}
	p.hasFingerprint = sc.Fingerprint
	p.nUnknown = copy(p.unknown[:], sc.Unknown())
	b.stats.requests.Add(1)
	if !h.Cookie {
		b.stats.rfc3489.Add(1)
	}
	return h, p, true
}

// read takes the RFC 5780 attributes' values; false for a malformed one.
func (p *parsed) read(raw []byte) bool {
	it := stunwire.NewAttrs(raw)
	for {
		typ, val, _, more := it.Next()
		if !more {
			return it.Err() == nil
		}
		switch typ {
		case stunwire.AttrChangeRequest: // RFC 5780 §7.2
			if len(val) != 4 {
				return false
			}
			p.hasChange, p.change = true, binary.BigEndian.Uint32(val)
		case stunwire.AttrResponsePort: // RFC 5780 §7.5: port, then 2 bytes RFFU
			if len(val) != 4 || binary.BigEndian.Uint16(val) == 0 {
				return false
			}
			p.hasRespPort, p.respPort = true, binary.BigEndian.Uint16(val)
		case stunwire.AttrPadding: // RFC 5780 §7.6
			p.hasPadding, p.padLen = true, len(val)
		case stunwire.AttrMappedAddress, stunwire.AttrXORMappedAddress, stunwire.AttrResponseOrigin,
			stunwire.AttrOtherAddress, stunwire.AttrAlternateServer:
			// Meaningless in a request, but a malformed one (zero length,
			// wrong family; cf. GHSA-34rh-wp3j-6cxc) marks a broken or
			// hostile sender: drop it (RFC 8489 §14.1 layout).
			if _, err := stunwire.ParseAddress(val); err != nil {
				return false
			}
		}
	}
}

// refusal returns the error to answer instead of a success, or 0.
func (b *Responder) refusal(req Request, p *parsed) (code int, unknown []uint16) {
	switch {
	case p.nUnknown > 0:
		// RFC 8489 §7.3.1: unknown comprehension-required attributes → 420.
		return 420, p.unknown[:p.nUnknown]
	case p.hasPadding && p.hasRespPort:
		// RFC 5780 §6.1: PADDING together with RESPONSE-PORT → 400.
		return 400, nil
	case p.hasChange && !b.dual:
		// RFC 5780 §6: a server without an alternate address and port
		// "MUST respond with a 420 (Unknown Attribute) to any Request
		// with a CHANGE-REQUEST attribute" - change-port alone included:
		// the alternate is an address *and* port, and OTHER-ADDRESS could
		// not name it.
		return 420, []uint16{stunwire.AttrChangeRequest}
	case req.Stream && p.hasChange && p.change&(stunwire.ChangeIP|stunwire.ChangePort) != 0:
		// The reply must go back on the connection (RFC 8489 §6.2.2).
		return 420, []uint16{stunwire.AttrChangeRequest}
	case req.Stream && p.hasRespPort:
		return 420, []uint16{stunwire.AttrResponsePort}
	}
	return 0, nil
}

func reasonFor(code int) string {
	if code == 400 {
		return reasonBadRequest
	}
	return reasonUnknownAttr
}

// route is RFC 5780 §6.1 Table 1: the reply leaves from {ip ^ A, port ^ B},
// to the source or to its RESPONSE-PORT (§7.5).
func route(req Request, p *parsed, src netip.AddrPort) (from Endpoint, to netip.AddrPort) {
	from = req.At
	if p.change&stunwire.ChangeIP != 0 {
		from.IP ^= 1
	}
	if p.change&stunwire.ChangePort != 0 {
		from.Port ^= 1
	}
	to = src
	if p.hasRespPort {
		to = netip.AddrPortFrom(src.Addr(), p.respPort)
	}
	return from, to
}

// addresses are RESPONSE-ORIGIN and OTHER-ADDRESS for a reply leaving from
// the cell from (other is invalid in single-IP mode); ok=false when a cell
// the request involves does not exist.
func (b *Responder) addresses(req Request, from Endpoint) (origin, other netip.AddrPort, ok bool) {
	if req.Stream {
		origin = b.public(req.Local)
		if b.dual {
			other = b.public(netip.AddrPortFrom(b.cfg.Grid[1-req.At.IP][0].Addr(), req.Local.Port()))
		}
		return origin, other, true
	}
	if !b.cfg.Grid[from.IP][from.Port].IsValid() || !b.cfg.Grid[req.At.IP][req.At.Port].IsValid() {
		return origin, other, false
	}
	origin = b.public(b.cfg.Grid[from.IP][from.Port])
	if b.dual {
		// RFC 5780 §7.4: OTHER-ADDRESS names the server's alternate
		// address and port, Aa:Ap, whichever cell the request arrived
		// on. Read literally ("the source that change-IP+port would
		// use") it is the diagonal of the arrival cell, but clients
		// follow §4.3 with it: coturn's natdiscovery sends test III to
		// the OTHER-ADDRESS of its test II reply (sent to Aa:Pp), and a
		// diagonal answer (Pa:Ap) makes an address-dependent NAT read
		// as address-and-port-dependent (seen in the NAT lab). coturn
		// names Aa:Ap always, and so do we.
		other = b.public(b.cfg.Grid[1][1])
	}
	return origin, other, true
}

// success builds the success answer into buf, within the amplification
// rule (file comment): first the core, then the extras that fit.
func (b *Responder) success(buf []byte, h *stunwire.Header, req Request, p *parsed, src, origin, other netip.AddrPort, budget int) []byte {
	// full: the RFC 5780 answer to every request (file comment); lean
	// mode answers with RFC 5780 attributes only a request that uses an
	// RFC 5780 feature, and only within the budget.
	full := b.dual && !b.cfg.RFC5780Lean
	rfc5780 := full || (b.dual && (p.hasChange || p.hasRespPort || p.hasPadding))
	fp := 0
	if p.hasFingerprint {
		fp = stunwire.FingerprintSize
	}
	// The rule's ceiling is 2× the request or the RFC 5780 answer to a
	// minimal request, whichever is larger; only the core may use the part
	// above 2× (file comment). Lean mode keeps to 2×.
	ceiling := budget
	if full && !req.Stream {
		ceiling = max(budget, rfc5780Allowance(src, p.hasFingerprint))
	}
	start := len(buf)
	m := stunwire.AppendHeader(buf, stunwire.TypeBindingSuccess, &h.ID)
	m = b.appendCore(m, h, src, origin, other, rfc5780, start+ceiling-fp)
	fits := func(n int) bool { return len(m)-start+n+fp <= budget }
	// Extras only within 2×.
	// MAPPED-ADDRESS beside XOR-MAPPED-ADDRESS (RFC 5780 §6.1).
	if n := stunwire.AddressAttrSize(src); rfc5780 && h.Cookie && fits(n) {
		m = stunwire.AppendAddress(m, stunwire.AttrMappedAddress, src)
	}
	// SOFTWARE only when configured (RFC 8489 §14.14).
	if s := b.cfg.Software; s != "" && fits(4+(len(s)+3)&^3) {
		m = stunwire.AppendSoftware(m, s)
	}
	// PADDING (RFC 5780 §6.1, §7.6): the RFC asks for the MTU; we give at
	// most what the request itself carried, and only within 2×, so padding
	// never amplifies.
	if p.hasPadding {
		n := min(p.padLen, len(req.Raw), budget-(len(m)-start)-fp-4) &^ 3
		if n >= 0 {
			m = stunwire.AppendPadding(m, n)
			b.stats.padding.Add(1)
		}
	}
	if p.hasFingerprint {
		m = stunwire.AppendFingerprint(m, start) // RFC 8489 §7.3: FINGERPRINT iff the request had one
	} else {
		m = stunwire.Finish(m, start)
	}
	return m[start:]
}

// appendCore appends the mapped address, and OTHER-ADDRESS and
// RESPONSE-ORIGIN when the answer is an RFC 5780 one, each only while m
// stays within limit bytes (the mapped address always).
func (b *Responder) appendCore(m []byte, h *stunwire.Header, src, origin, other netip.AddrPort, rfc5780 bool, limit int) []byte {
	fitsCore := func(n int) bool { return len(m)+n <= limit }
	if h.Cookie {
		m = stunwire.AppendXORAddress(m, stunwire.AttrXORMappedAddress, src, &h.ID) // RFC 8489 §14.2
	} else {
		m = stunwire.AppendAddress(m, stunwire.AttrMappedAddress, src) // RFC 3489 §11.2.1
	}
	if !fitsCore(0) {
		// Lean or single-IP: the IPv6 mapped address of a bare request
		// (44 > 2×20) is sent all the same; no client works without it.
		b.stats.overBudget.Add(1)
	}
	if !rfc5780 {
		return m
	}
	// OTHER-ADDRESS (RFC 5780 §7.4) / CHANGED-ADDRESS (RFC 3489 §11.2.3).
	// Lean: a minimal IPv6 request with CHANGE-REQUEST has no room
	// (20+24+24 = 68 > 2×28).
	if fitsCore(stunwire.AddressAttrSize(other)) {
		typ := stunwire.AttrOtherAddress
		if !h.Cookie {
			typ = stunwire.AttrChangedAddress
		}
		m = stunwire.AppendAddress(m, typ, other)
	} else {
		b.stats.overBudget.Add(1) // OTHER-ADDRESS withheld: the request was too small
	}
	// RESPONSE-ORIGIN (RFC 5780 §7.3) / SOURCE-ADDRESS (RFC 3489 §11.2.2).
	if fitsCore(stunwire.AddressAttrSize(origin)) {
		typ := stunwire.AttrResponseOrigin
		if !h.Cookie {
			typ = stunwire.AttrSourceAddress
		}
		m = stunwire.AppendAddress(m, typ, origin)
	}
	return m
}

// countSuccess counts a success answer and the RFC 5780 features it used.
func (b *Responder) countSuccess(req Request, from Endpoint, p *parsed) {
	b.stats.success.Add(1)
	if from.IP != req.At.IP {
		b.stats.changeIP.Add(1)
	}
	if from.Port != req.At.Port {
		b.stats.changePort.Add(1)
	}
	if p.hasRespPort {
		b.stats.responsePort.Add(1)
	}
}

// rfc5780Allowance is the RFC 5780 answer to a minimal request of the same
// form as one from src (FINGERPRINT iff it carried one): the size the
// amplification rule always allows. OTHER-ADDRESS and RESPONSE-ORIGIN are
// of src's family: Config.Validate keeps both IPs and their advertised
// addresses in one family.
func rfc5780Allowance(src netip.AddrPort, fingerprint bool) int {
	n := rfc5780AnswerV6
	if src.Addr().Is4() {
		n = rfc5780AnswerV4
	}
	if !fingerprint {
		n -= stunwire.FingerprintSize
	}
	return n
}

// errorReply builds an error response (RFC 8489 §6.3.1.1) sent back to the
// request's source from the socket it arrived on; the reason phrase is left
// out when it would break the amplification budget.
func (b *Responder) errorReply(buf []byte, h *stunwire.Header, req Request, src netip.AddrPort,
	p *parsed, budget, code int, reason string, unknown []uint16) (Reply, bool) {
	fp := 0
	if p.hasFingerprint {
		fp = stunwire.FingerprintSize
	}
	size := stunwire.HeaderSize + stunwire.ErrorCodeAttrSize(reason) + fp
	if len(unknown) > 0 {
		size += stunwire.UnknownAttributesAttrSize(len(unknown))
	}
	if size > budget {
		reason = ""
	}
	start := len(buf)
	m := stunwire.AppendHeader(buf, stunwire.TypeBindingError, &h.ID)
	m = stunwire.AppendErrorCode(m, code, reason)
	if len(unknown) > 0 {
		m = stunwire.AppendUnknownAttributes(m, unknown) // RFC 8489 §14.9
	}
	if p.hasFingerprint {
		m = stunwire.AppendFingerprint(m, start)
	} else {
		m = stunwire.Finish(m, start)
	}
	switch code {
	case 400:
		b.stats.err400.Add(1)
	case 420:
		b.stats.err420.Add(1)
	}
	return Reply{Msg: m[start:], From: req.At, To: src}, true
}
