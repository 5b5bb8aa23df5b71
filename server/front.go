package server

import (
	"crypto/hmac"
	"crypto/sha1" //nolint:gosec // MESSAGE-INTEGRITY is HMAC-SHA1 (RFC 8489 §14.5)
	"encoding/binary"
	"log/slog"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/stund/stund/internal/stunwire"
)

// The TURN front: every STUN request bound for pion/turn passes through it,
// over UDP and TCP/TLS alike (demux.go calls it from the read loops). It
// does what pion v5.1.2 gets wrong, and passes on only requests that are
// authenticated and conform:
//
//   - authentication (RFC 8489 §9.2.4): 401 with REALM and NONCE and no state
//     for a request without MESSAGE-INTEGRITY; 400 when MESSAGE-INTEGRITY
//     comes without USERNAME, REALM or NONCE; 401 for an unknown user or a
//     wrong password (pion: 400); 438 with a fresh NONCE for an expired
//     nonce or one minted for another source address (pion: nonces live an
//     hour and bind to nothing). Nonces are ours (nonce.go).
//   - allocation ownership (RFC 8656 §5, §7): 437 for Refresh,
//     CreatePermission, ChannelBind and Connect on a 5-tuple with no
//     allocation (pion: silence), 441 for another user's credentials on it
//     (pion: silence), 437 for an Allocate by another user on a 5-tuple in
//     use.
//   - LIFETIME (RFC 8656 §7.2, §7.3): clamped to [600 s, 3600 s]; Refresh
//     with 0 still deletes (pion takes anything under an hour, even 1 s).
//   - peers (RFC 8656 §9.2, §11.2): a CreatePermission naming one refused
//     address is refused whole with 403 and installs nothing (pion installs
//     the addresses before the refused one); ChannelBind to a refused peer
//     gets 403 (pion: 401); at most maxPermissions per allocation (508).
//   - CHANNEL-NUMBER outside 0x4000-0x4FFF: 400 (RFC 8656 §11.2, §12).
//   - unknown comprehension-required attributes: 420 with UNKNOWN-ATTRIBUTES
//     (RFC 8489 §6.3.1), answered after authentication, with
//     MESSAGE-INTEGRITY.
//
// pion still authenticates what it is given, with its own nonces, which
// cannot be configured. So an accepted request is re-signed: NONCE replaced
// by a current pion nonce and MESSAGE-INTEGRITY recomputed with the user's
// key (which the front has just verified). pion's nonces come from a
// private, in-memory port of pion's (piontap.go) that no client reaches;
// the wire only ever carries ours (nonce.go), which bind to the client's
// address and transport and expire in minutes.
//
// Error responses to requests that passed the integrity check carry
// MESSAGE-INTEGRITY (RFC 8489 §9.2.4, last paragraph), and FINGERPRINT when
// the request had one. Unauthenticated answers (401, 400, 438) carry no
// reason phrase and are never more than twice the request (at most twice over UDP), else
// they are dropped and counted. Every unauthenticated answer, on UDP and
// streams alike, takes a token from the source IP's budget (ratelimit.go).
// Indications are never answered (RFC 8489 §6.3.2): only Send goes to pion.
//
// Per packet the front does one pass over the attributes, no goroutine and
// no buffer of its own (it writes into the connection's scratch buffer);
// authenticated requests cost two HMAC-SHA1 and one MD5 (the key).

const (
	// RFC 8656 §7.2: the default lifetime (600 s) is the floor, and
	// "servers SHOULD NOT" grant more than 3600 s.
	minLifetimeSec = 600
	maxLifetimeSec = 3600
	// maxPermissions bounds the permissions of one allocation: each costs a timer and a map entry in pion; real clients use a few.
	maxPermissions = 1024
	// miSize is MESSAGE-INTEGRITY with its header (RFC 8489 §14.5).
	miSize = 4 + sha1.Size
)

// attrAlternateServer is ALTERNATE-SERVER (RFC 8489 §14.15), named in a
// 300 Try Alternate.
const attrAlternateServer = 0x8023

// knownRequired lists the comprehension-required attributes (0x0000-0x7FFF)
// a TURN request may carry that stund (or pion behind it) understands.
func knownRequired(t uint16) bool {
	switch t {
	case stunwire.AttrMappedAddress, stunwire.AttrUsername, stunwire.AttrMessageIntegrity,
		stunwire.AttrErrorCode, stunwire.AttrUnknownAttributes, stunwire.AttrRealm, stunwire.AttrNonce,
		stunwire.AttrMessageIntegritySHA256, stunwire.AttrPasswordAlgorithm, stunwire.AttrUserhash,
		stunwire.AttrXORMappedAddress, stunwire.AttrPriority, stunwire.AttrUseCandidate,
		stunwire.AttrPadding, stunwire.AttrResponsePort, stunwire.AttrChangeRequest,
		stunwire.AttrChannelNumber, stunwire.AttrLifetime, stunwire.AttrXORPeerAddress, stunwire.AttrData, stunwire.AttrXORRelayedAddress,
		stunwire.AttrRequestedAddressFamily, stunwire.AttrEvenPort, stunwire.AttrRequestedTransport, stunwire.AttrDontFragment,
		stunwire.AttrReservationToken, stunwire.AttrConnectionID:
		return true
	}
	return false
}

// protoTCP is REQUESTED-TRANSPORT's protocol number for TCP (RFC 6062 §6.2).
const protoTCP = 6

// FrontStats counts the front's decisions.
type FrontStats struct {
	Challenged    uint64 // 401 to requests without MESSAGE-INTEGRITY
	AuthFailed    uint64 // 401: unknown user, foreign realm, wrong password
	BadRequest    uint64 // 400, and 440 (a relay address family the server has not)
	StaleNonce    uint64 // 438: expired, or minted for another address
	NoAllocation  uint64 // 437
	WrongCreds    uint64 // 441
	Forbidden     uint64 // 403 (peer policy)
	Capacity      uint64 // 508 (permission limit)
	UnknownAttr   uint64 // 420
	Amplification uint64 // unauthenticated answers not sent: over 2x the request
	Malformed     uint64 // dropped: bad attributes or FINGERPRINT
	Passed        uint64 // handed to pion, re-signed
	Indications   uint64 // dropped: indications other than Send
}

type frontStats struct {
	challenged, authFailed, badRequest, stale, noAlloc, wrongCreds, forbidden,
	capacity, unknownAttr, amplification, malformed, passed, indications atomic.Uint64
}

// frontDeps is what the front consults; the server builds it once.
type frontDeps struct {
	auth   *Authenticator
	policy *livePolicy
	led    *ledger
	pion   *pionNonces
	// allowUnauth takes a token from the source IP's budget of
	// unauthenticated answers (ratelimit.go).
	allowUnauth func(netip.Addr) bool
	// authFailed counts and logs one failed authentication (authlog.go).
	authFailed func(f authFailure)
	// admitAllocate decides a new Allocate while draining or full
	// (fleet.go): 0, or 300 with an alternate, or 508.
	admitAllocate func() (int, netip.AddrPort)
	log           *slog.Logger
	realmLen      int
}

// turnFront is the per-server front; frontConn is its per-read-loop state.
type turnFront struct {
	frontDeps
	nonces *nonceMinter
	family byte // the REQUESTED-ADDRESS-FAMILY the relays serve: 0x01 IPv4, 0x02 IPv6

	stats        frontStats
	budgetWarned atomic.Int64 // unix nanos of the last warnBudget line
}

func newTurnFront(d frontDeps, ipv4 bool, nonceLife time.Duration) *turnFront {
	f := &turnFront{frontDeps: d, nonces: newNonceMinter(nonceLife, nil), family: 0x01}
	if !ipv4 {
		f.family = 0x02
	}
	return f
}

// Stats returns a snapshot of the counters.
func (f *turnFront) Stats() FrontStats {
	st := &f.stats
	return FrontStats{
		Challenged: st.challenged.Load(), AuthFailed: st.authFailed.Load(), BadRequest: st.badRequest.Load(),
		StaleNonce: st.stale.Load(), NoAllocation: st.noAlloc.Load(), WrongCreds: st.wrongCreds.Load(),
		Forbidden: st.forbidden.Load(), Capacity: st.capacity.Load(), UnknownAttr: st.unknownAttr.Load(),
		Amplification: st.amplification.Load(), Malformed: st.malformed.Load(), Passed: st.passed.Load(),
		Indications: st.indications.Load(),
	}
}

// Front returns the TURN front's counters.
func (s *Server) Front() FrontStats { return s.front.Stats() }

// frontConn is the front's scratch for one read loop (one UDP socket or
// one TCP/TLS connection); only that loop's goroutine touches it.
type frontConn struct {
	out []byte // replies and re-signed requests
}

// passedRequest is what the front remembers of the request it handed pion
// last on a read loop, so that pion's answer can be signed for the client:
// its transaction ID (with the cookie), the client's key, the key it was
// re-signed with for pion, and whether it had FINGERPRINT.
type passedRequest struct {
	id           [16]byte
	key, pionKey []byte
	fp           bool
	wout         []byte // scratch: re-signed responses
}

// frontVerdict says what the read loop does with a message.
type frontVerdict uint8

const (
	// frontPass: hand msg (the original or a re-signed copy) to pion.
	frontPass frontVerdict = iota
	// frontReply: send msg back to the client, pion sees nothing.
	frontReply
	// frontDrop: nothing to send, nothing for pion.
	frontDrop
)

// reqAttrs is what one pass over a request's attributes found.
type reqAttrs struct {
	username, realm, nonce, mi []byte
	miOff                      int // offset of MESSAGE-INTEGRITY, -1 if absent
	lifetime                   []byte
	haveLifetime               bool
	channel                    []byte
	haveChannel                bool
	family                     []byte // REQUESTED-ADDRESS-FAMILY, nil if absent
	transport                  []byte // REQUESTED-TRANSPORT, nil if absent
	fingerprint                bool
	unknown                    [stunwire.MaxUnknownAttributes]uint16
	nUnknown                   int
}

// inspect runs the front on one STUN message (already framed, cookie form)
// from src to the server's dst. For frontPass it also returns what
// signResponse needs to sign pion's answer.
func (f *turnFront) inspect(fc *frontConn, pkt []byte, src, dst netip.AddrPort, tcp bool) (frontVerdict, []byte, passedRequest) {
	var none passedRequest
	h, err := stunwire.ParseHeader(pkt)
	if err != nil || !h.Cookie {
		f.stats.malformed.Add(1)
		return frontDrop, nil, none // the demux lets only cookie STUN through
	}
	method := stunwire.Method(h.Type)
	switch h.Type & stunwire.ClassMask {
	case stunwire.ClassRequest:
	case stunwire.ClassIndication:
		// RFC 8489 §6.3.2: an indication is never answered. Only Send
		// means anything to a TURN server (RFC 8656 §10.2); pion checks
		// its allocation and permission and answers nothing.
		if method == stunwire.MethodSend {
			return frontPass, pkt, none
		}
		f.stats.indications.Add(1)
		return frontDrop, nil, none
	default:
		f.stats.malformed.Add(1) // responses are for clients, not for us
		return frontDrop, nil, none
	}
	switch method {
	case stunwire.MethodAllocate, stunwire.MethodRefresh, stunwire.MethodCreatePermission, stunwire.MethodChannelBind, stunwire.MethodConnect, stunwire.MethodConnectionBind:
	default:
		f.stats.malformed.Add(1) // pion serves no other method, and answers nothing
		return frontDrop, nil, none
	}

	// The one walk (stunwire.Check): lengths, FINGERPRINT (RFC 8489 §7.3:
	// a bad one means "not STUN": drop), MESSAGE-INTEGRITY's place and the
	// unknown comprehension-required attributes before it.
	sc, err := stunwire.Check(pkt, knownRequired)
	if err != nil {
		f.stats.malformed.Add(1)
		return frontDrop, nil, none
	}
	ra := reqAttrs{miOff: sc.Integrity, fingerprint: sc.Fingerprint}
	ra.nUnknown = copy(ra.unknown[:], sc.Unknown())
	it := stunwire.NewAttrs(pkt)
	for {
		typ, val, off, ok := it.Next()
		if !ok {
			break
		}
		if off == ra.miOff {
			ra.mi = val
			break // RFC 8489 §14.5: attributes after MESSAGE-INTEGRITY are ignored
		}
		switch typ {
		case stunwire.AttrUsername:
			ra.username = val
		case stunwire.AttrRealm:
			ra.realm = val
		case stunwire.AttrNonce:
			ra.nonce = val
		case stunwire.AttrLifetime:
			ra.lifetime, ra.haveLifetime = val, true
		case stunwire.AttrChannelNumber:
			ra.channel, ra.haveChannel = val, true
		case stunwire.AttrRequestedAddressFamily:
			ra.family = val
		case stunwire.AttrRequestedTransport:
			ra.transport = val
		}
	}
	v, msg, pass := f.authenticate(fc, pkt, &h, method, &ra, src, dst, tcp)
	return v, msg, pass
}

// authenticate applies RFC 8489 §9.2.4 in its order, then the TURN checks;
// it passes an accepted request on re-signed for pion.
func (f *turnFront) authenticate(fc *frontConn, pkt []byte, h *stunwire.Header, method uint16, ra *reqAttrs, src, dst netip.AddrPort, tcp bool) (frontVerdict, []byte, passedRequest) {
	var none passedRequest
	realm := f.auth.Realm()
	errType := stunwire.MessageType(method, stunwire.ClassError)

	// RFC 8489 §9.2.4, in its order.
	if ra.miOff < 0 {
		// No MESSAGE-INTEGRITY: 401 with REALM and NONCE, nothing kept.
		f.stats.challenged.Add(1)
		return f.unauth(fc, pkt, h, errType, 401, realm, src, tcp)
	}
	if ra.username == nil || ra.realm == nil || ra.nonce == nil {
		f.stats.badRequest.Add(1)
		return f.unauth(fc, pkt, h, errType, 400, "", src, tcp)
	}
	// Every configured REST secret is tried (rotation, auth.go).
	userID, key, pionKey, known := f.auth.Verify(string(ra.username), string(ra.realm), func(k []byte) bool {
		return checkIntegrity(pkt, ra.miOff, ra.mi, k)
	})
	if !known || key == nil {
		f.stats.authFailed.Add(1)
		f.authFailed(authFailure{src: src, tcp: tcp, method: method, username: ra.username, realm: ra.realm, knownUser: known})
		return f.unauth(fc, pkt, h, errType, 401, realm, src, tcp)
	}
	v := f.nonces.verify(ra.nonce, src, tcp)
	if v == nonceBad && method == stunwire.MethodConnectionBind && tcp {
		v = f.controlNonce(ra.nonce, src.Addr(), userID)
	}
	if v != nonceOK {
		f.stats.stale.Add(1)
		return f.unauth(fc, pkt, h, errType, 438, realm, src, tcp)
	}

	// Authenticated from here: every answer carries MESSAGE-INTEGRITY.
	if ra.nUnknown > 0 {
		f.stats.unknownAttr.Add(1)
		v, msg := f.authReply(fc, h, errType, 420, ra.unknown[:ra.nUnknown], key, ra.fingerprint)
		return v, msg, none
	}
	tuple := fiveTuple{src: src, dst: dst, tcp: tcp}
	if code := f.check(pkt, h, method, ra, tuple, userID); code != 0 {
		v, msg := f.authReply(fc, h, errType, code, nil, key, ra.fingerprint)
		return v, msg, none
	}
	// A new allocation on a draining or full node: elsewhere (fleet.go).
	// Answered like any error to an authenticated request, signed.
	if method == stunwire.MethodAllocate && f.admitAllocate != nil && f.led.lookup(tuple) == nil {
		if code, alt := f.admitAllocate(); code != 0 {
			v, msg := f.authReplyAlt(fc, h, errType, code, nil, alt, key, ra.fingerprint)
			return v, msg, none
		}
	}
	pn := f.pion.current()
	if pn == nil {
		f.stats.malformed.Add(1)
		return frontDrop, nil, none // pion did not mint a nonce; the client retransmits
	}
	if method == stunwire.MethodRefresh && clampLifetime(method, ra) == 0 {
		if a := f.led.lookup(tuple); a != nil {
			a.ending(endDeleted) // RFC 8656 §7.3: the client ends it
		}
	}
	msg := f.resign(fc, pkt, h, method, ra, pn, pionKey)
	if len(msg) >= pionInboundMTU {
		f.stats.malformed.Add(1)
		return frontDrop, nil, none // pion would drop it as truncated
	}
	f.stats.passed.Add(1)
	// pion answers this one (signResponse): remember whose it is.
	return frontPass, msg, passedRequest{id: h.ID, key: key, pionKey: pionKey, fp: ra.fingerprint}
}

// maxControlConns bounds the control connections controlNonce tries: one
// user's TCP allocations from one IP, which the user quota (10 by default)
// keeps few; a client with more than this many gets 438 and retries.
const maxControlConns = 16

// controlNonce verifies the NONCE of a ConnectionBind against the control
// connections of the user's TCP allocations from the same IP. RFC 6062 §4.3
// and §4.4 send ConnectionBind on a new data connection with the control
// connection's credentials, and clients (pion's among them) reuse its
// NONCE; ours is bound to the control connection's port, so the data
// connection's own address cannot verify it. The nonce still has to be one
// minted for a connection of this user from this IP, and fresh.
func (f *turnFront) controlNonce(nonce []byte, ip netip.Addr, userID string) nonceVerdict {
	var cand [maxControlConns]netip.AddrPort
	n := f.led.controlTuples(cand[:], ip, userID)
	v := nonceBad
	for _, src := range cand[:n] {
		switch f.nonces.verify(nonce, src, true) {
		case nonceOK:
			return nonceOK
		case nonceStale:
			v = nonceStale
		}
	}
	return v
}

// check applies the allocation, lifetime, peer and channel rules; it
// returns the error code to answer, or 0 to pass the request on.
func (f *turnFront) check(pkt []byte, h *stunwire.Header, method uint16, ra *reqAttrs, tuple fiveTuple, userID string) int {
	if code := f.checkShape(method, ra, tuple.tcp); code != 0 {
		f.stats.badRequest.Add(1)
		return code
	}
	if method == stunwire.MethodConnectionBind {
		return 0 // RFC 6062 §5.4: a new data connection, no allocation on its 5-tuple
	}
	a := f.led.lookup(tuple)
	if method == stunwire.MethodAllocate {
		return f.checkAllocate(a, ra, userID)
	}
	if a == nil {
		// RFC 8656 §7.3, §9.2, §11.2: no allocation on this 5-tuple.
		f.stats.noAlloc.Add(1)
		return 437
	}
	if a.user != userID {
		// RFC 8656 §5: the allocation is another user's.
		f.stats.wrongCreds.Add(1)
		return 441
	}
	switch method {
	case stunwire.MethodCreatePermission, stunwire.MethodChannelBind, stunwire.MethodConnect:
		return f.checkPeers(pkt, h, method, ra, a)
	}
	return 0
}

// checkShape is 400 for what no allocation makes right: TCP requests over
// UDP, a malformed channel number or LIFETIME.
func (f *turnFront) checkShape(method uint16, ra *reqAttrs, tcp bool) int {
	// RFC 6062 §5.1, §5.2, §5.4: TCP allocations, Connect and
	// ConnectionBind exist only over a TCP or TLS control connection; over
	// UDP they are 400 (and a Connect there would dial from the UDP read
	// loop that every other client on the socket waits behind).
	if !tcp && (method == stunwire.MethodConnect || method == stunwire.MethodConnectionBind ||
		(method == stunwire.MethodAllocate && len(ra.transport) >= 1 && ra.transport[0] == protoTCP)) {
		return 400
	}
	if ra.haveChannel && method == stunwire.MethodChannelBind {
		// RFC 8656 §11.2, §12: a channel number outside 0x4000-0x4FFF is 400.
		if len(ra.channel) != 4 {
			return 400
		}
		if n := binary.BigEndian.Uint16(ra.channel); n < stunwire.MinChannel || n > stunwire.MaxChannel {
			return 400
		}
	}
	if ra.haveLifetime && len(ra.lifetime) != 4 {
		return 400
	}
	return 0
}

// checkAllocate applies RFC 8656 §7.2 steps 2 and 6 to an Allocate on a
// 5-tuple whose allocation (if any) is a.
func (f *turnFront) checkAllocate(a *allocation, ra *reqAttrs, userID string) int {
	// RFC 8656 §7.2 step 2: a 5-tuple in use is 437. pion answers the
	// same user's retransmission from its cache; another user is ours.
	if a != nil && a.user != userID {
		f.stats.noAlloc.Add(1)
		return 437
	}
	// RFC 6156 §4.2, RFC 8656 §7.2: a family the server cannot relay is
	// 440 (its relays are on its own IPs, all of one family; pion would
	// try to bind the other family and answer 508). Absent, pion relays in
	// the listener's family.
	if ra.family != nil {
		if len(ra.family) != 4 {
			f.stats.badRequest.Add(1)
			return 400
		}
		if ra.family[0] != f.family {
			f.stats.badRequest.Add(1)
			return 440
		}
	}
	return 0
}

// checkPeers applies the peer policy and the permission bound to the
// XOR-PEER-ADDRESS attributes of a CreatePermission, ChannelBind or
// Connect on allocation a.
func (f *turnFront) checkPeers(pkt []byte, h *stunwire.Header, method uint16, ra *reqAttrs, a *allocation) int {
	policy := f.policy.load()
	peers, fresh := 0, 0
	it := stunwire.NewAttrs(pkt)
	for {
		typ, val, off, ok := it.Next()
		if !ok || off == ra.miOff {
			break
		}
		if typ != stunwire.AttrXORPeerAddress {
			continue
		}
		ap, err := stunwire.ParseXORAddress(val, &h.ID)
		if err != nil {
			f.stats.badRequest.Add(1)
			return 400
		}
		peers++
		addr := canonical(ap.Addr())
		// RFC 8656 §9.2: a refused address refuses the whole request, so
		// nothing is installed (pion would install the ones before it).
		if !policy.Allowed(addr) {
			policy.refused.Add(1)
			f.stats.forbidden.Add(1)
			return 403
		}
		if !a.permitted(addr) {
			fresh++ // a duplicate in one request counts twice: conservative
		}
	}
	// RFC 8656 §9.2, §11.2: XOR-PEER-ADDRESS is mandatory; ChannelBind and
	// Connect name exactly one peer.
	if peers == 0 || (method != stunwire.MethodCreatePermission && peers != 1) {
		f.stats.badRequest.Add(1)
		return 400
	}
	if method != stunwire.MethodConnect && a.permCount()+fresh > maxPermissions {
		// RFC 8656 §9.2: "unable to fulfill the request due to some capacity limit".
		f.stats.capacity.Add(1)
		return 508
	}
	return 0
}

// clampLifetime applies RFC 8656 §7.2/§7.3: 0 on a Refresh deletes; otherwise
// the requested value (default 600 when absent) bounded to [600, 3600].
func clampLifetime(method uint16, ra *reqAttrs) uint32 {
	if !ra.haveLifetime {
		return minLifetimeSec
	}
	v := binary.BigEndian.Uint32(ra.lifetime)
	switch {
	case v == 0 && method == stunwire.MethodRefresh:
		return 0
	case v < minLifetimeSec:
		return minLifetimeSec
	case v > maxLifetimeSec:
		return maxLifetimeSec
	}
	return v
}

// resign rebuilds the request for pion in fc.out: the attributes before
// MESSAGE-INTEGRITY minus NONCE (and LIFETIME on Allocate/Refresh, which is
// rewritten clamped), then pion's NONCE and a fresh MESSAGE-INTEGRITY under
// the user's key. Attributes after MESSAGE-INTEGRITY (FINGERPRINT) are left
// out: pion does not need them.
func (f *turnFront) resign(fc *frontConn, pkt []byte, h *stunwire.Header, method uint16, ra *reqAttrs, pionNonce, key []byte) []byte {
	rewriteLife := method == stunwire.MethodAllocate || method == stunwire.MethodRefresh
	out := stunwire.AppendHeader(fc.out[:0], h.Type, &h.ID)
	it := stunwire.NewAttrs(pkt)
	for {
		typ, val, off, ok := it.Next()
		if !ok || off == ra.miOff {
			break
		}
		if typ == stunwire.AttrNonce || (rewriteLife && typ == stunwire.AttrLifetime) {
			continue
		}
		out = stunwire.AppendAttr(out, typ, val)
	}
	if rewriteLife {
		var lt [4]byte
		binary.BigEndian.PutUint32(lt[:], clampLifetime(method, ra))
		out = stunwire.AppendAttr(out, stunwire.AttrLifetime, lt[:])
	}
	out = stunwire.AppendAttr(out, stunwire.AttrNonce, pionNonce)
	out = appendIntegrity(out, 0, key)
	fc.out = out
	return out
}

// unauth answers before authentication: ERROR-CODE without a reason phrase,
// REALM and a fresh NONCE for 401/438 (RFC 8489 §9.2.4), nothing else; and
// over UDP only when the answer is at most twice the request.
func (f *turnFront) unauth(fc *frontConn, pkt []byte, h *stunwire.Header, typ uint16, code int, realm string, src netip.AddrPort, tcp bool) (frontVerdict, []byte, passedRequest) {
	var none passedRequest
	out := stunwire.AppendHeader(fc.out[:0], typ, &h.ID)
	out = stunwire.AppendErrorCode(out, code, "")
	if code != 400 {
		out = stunwire.AppendAttr(out, stunwire.AttrRealm, []byte(realm))
		out = appendNonceAttr(out, f.nonces, src, tcp)
	}
	out = stunwire.Finish(out, 0)
	fc.out = out
	// A stream's source has completed a handshake and cannot be spoofed,
	// so an answer there reflects nothing at a victim: no size budget
	// (dropping a 401 over TCP would only leave a real client waiting,
	// e.g. with a long realm). Over UDP, at most twice the request.
	if !tcp && len(out) > 2*len(pkt) {
		f.stats.amplification.Add(1)
		f.warnBudget(len(out), len(pkt))
		return frontDrop, nil, none
	}
	// Every unauthenticated answer, any transport, spends the source's
	// per-IP budget: a flood of junk requests earns a bounded answer rate.
	if !f.allowUnauth(src.Addr()) {
		return frontDrop, nil, none // counted there (ratelimit.go)
	}
	return frontReply, out, none
}

// budgetWarnEvery spaces the log lines about answers dropped for the
// amplification budget: the operator must learn why clients get no 401
// (usually a long realm against minimal Allocate requests), but an
// attacker must not be able to flood the log.
const budgetWarnEvery = time.Minute

// warnBudget logs, at most once per budgetWarnEvery, that an
// unauthenticated answer was dropped for being over twice its request.
func (f *turnFront) warnBudget(answer, request int) {
	now := time.Now().UnixNano()
	last := f.budgetWarned.Load()
	if now-last < int64(budgetWarnEvery) || !f.budgetWarned.CompareAndSwap(last, now) {
		return
	}
	f.log.Warn("unauthenticated UDP answer dropped: over twice the request (the amplification budget); a shorter realm lets minimal Allocate requests be answered",
		"answer_bytes", answer, "request_bytes", request, "realm_bytes", f.realmLen,
		"dropped_total", f.stats.amplification.Load())
}

// appendNonceAttr appends a NONCE attribute minted for src.
func appendNonceAttr(dst []byte, m *nonceMinter, src netip.AddrPort, tcp bool) []byte {
	dst = binary.BigEndian.AppendUint16(dst, stunwire.AttrNonce)
	dst = binary.BigEndian.AppendUint16(dst, NonceLen)
	return m.appendNonce(dst, src, tcp) // NonceLen is a multiple of 4: no padding
}

// authReply answers an authenticated request with an error, signed with
// the user's key (RFC 8489 §9.2.4), FINGERPRINT when the request had one.
func (f *turnFront) authReply(fc *frontConn, h *stunwire.Header, typ uint16, code int, unknown []uint16, key []byte, fp bool) (frontVerdict, []byte) {
	return f.authReplyAlt(fc, h, typ, code, unknown, netip.AddrPort{}, key, fp)
}

// authReplyAlt is authReply with an ALTERNATE-SERVER (RFC 8489 §14.15)
// when alt is valid: the 300 Try Alternate of a draining or full node.
func (f *turnFront) authReplyAlt(fc *frontConn, h *stunwire.Header, typ uint16, code int, unknown []uint16, alt netip.AddrPort, key []byte, fp bool) (frontVerdict, []byte) {
	out := stunwire.AppendHeader(fc.out[:0], typ, &h.ID)
	out = stunwire.AppendErrorCode(out, code, "")
	if len(unknown) > 0 {
		out = stunwire.AppendUnknownAttributes(out, unknown)
	}
	if alt.IsValid() {
		out = stunwire.AppendAddress(out, attrAlternateServer, alt)
	}
	out = appendIntegrity(out, 0, key)
	if fp {
		out = stunwire.AppendFingerprint(out, 0)
	}
	fc.out = out
	return frontReply, out
}

// appendIntegrity appends MESSAGE-INTEGRITY to the message at dst[start:]:
// HMAC-SHA1 under key over the message with the length field already
// counting the attribute (RFC 8489 §14.5).
func appendIntegrity(dst []byte, start int, key []byte) []byte {
	binary.BigEndian.PutUint16(dst[start+2:], uint16(len(dst)-start-stunwire.HeaderSize+miSize))
	m := hmac.New(sha1.New, key)
	m.Write(dst[start:])
	dst = binary.BigEndian.AppendUint16(dst, stunwire.AttrMessageIntegrity)
	dst = binary.BigEndian.AppendUint16(dst, sha1.Size)
	return m.Sum(dst)
}

// checkIntegrity verifies the MESSAGE-INTEGRITY at pkt[miOff:] (RFC 8489
// §14.5: the length field as if the message ended after it).
func checkIntegrity(pkt []byte, miOff int, mi, key []byte) bool {
	if len(mi) != sha1.Size {
		return false
	}
	var hdr [stunwire.HeaderSize]byte
	copy(hdr[:], pkt[:stunwire.HeaderSize])
	binary.BigEndian.PutUint16(hdr[2:], uint16(miOff-stunwire.HeaderSize+miSize))
	m := hmac.New(sha1.New, key)
	m.Write(hdr[:])
	m.Write(pkt[stunwire.HeaderSize:miOff])
	var sum [sha1.Size]byte
	return hmac.Equal(m.Sum(sum[:0]), mi)
}

func methodName(m uint16) string {
	switch m {
	case stunwire.MethodAllocate:
		return "Allocate"
	case stunwire.MethodRefresh:
		return "Refresh"
	case stunwire.MethodCreatePermission:
		return "CreatePermission"
	case stunwire.MethodChannelBind:
		return "ChannelBind"
	case stunwire.MethodConnect:
		return "Connect"
	case stunwire.MethodConnectionBind:
		return "ConnectionBind"
	}
	return "unknown"
}

// signResponse returns pion's answer b to the request the front last
// passed, signed under the client's key: pion's own error responses (400,
// 442, 446, 447, 486, 508…) carry no MESSAGE-INTEGRITY, which RFC 8489
// §9.2.4 wants on every answer to an authenticated request; and a request
// verified under a rotated-out REST secret was passed to pion under the
// current secret's key, so pion's MESSAGE-INTEGRITY must be redone with
// the client's. What is re-signed gets FINGERPRINT when the request had
// one. Anything else (relayed data, indications, other transactions,
// 401/438) is returned as is; so is an answer already signed with the
// client's key to a request without FINGERPRINT, without copying.
//
// Only pion's read loop writes responses; relayed data and indications
// come from other goroutines, so fc is touched only once b is a response.
func (f *turnFront) signResponse(fc *passedRequest, b []byte) ([]byte, bool) {
	if len(b) < stunwire.HeaderSize || b[0]&0xC0 != 0 {
		return b, false
	}
	class := binary.BigEndian.Uint16(b) & stunwire.ClassMask
	if (class != stunwire.ClassSuccess && class != stunwire.ClassError) || fc.key == nil || string(b[4:20]) != string(fc.id[:]) {
		return b, false
	}
	miOff, code := -1, 0
	it := stunwire.NewAttrs(b)
	for {
		typ, val, off, ok := it.Next()
		if !ok {
			break
		}
		switch typ {
		case stunwire.AttrMessageIntegrity:
			miOff = off
		case stunwire.AttrErrorCode:
			if len(val) >= 4 {
				code = int(val[2]&0x7)*100 + int(val[3])
			}
		case stunwire.AttrFingerprint:
			return b, false // not pion's: pion adds no FINGERPRINT
		}
	}
	if it.Err() != nil || code == 401 || code == 438 {
		return b, false // pion's own challenge: not authenticated by pion
	}
	end := len(b)
	if miOff >= 0 {
		if string(fc.key) == string(fc.pionKey) && !fc.fp {
			// Signed by pion with the client's key: the common path
			// stays a compare, no copy.
			return b, false
		}
		end = miOff
	}
	out := append(fc.wout[:0], b[:end]...)
	out = appendIntegrity(out, 0, fc.key)
	if fc.fp {
		out = stunwire.AppendFingerprint(out, 0)
	}
	fc.wout = out
	return out, true
}
