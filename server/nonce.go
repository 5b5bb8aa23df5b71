package server

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"net/netip"
	"sync/atomic"
	"time"
)

// Stateless nonces for the TURN front (front.go).
//
// RFC 8489 §9.2 lets the server choose the NONCE; §9.2.4 wants 438 (Stale
// Nonce) once it is no longer valid. stund's nonces carry their own issue
// time and a MAC over that time and the client's transport address, so the
// server keeps no per-client state before authentication (RFC 8656 §7.2
// needs none, and an attacker spraying unauthenticated requests must not be
// able to make the server remember anything), a nonce expires, and a nonce
// seen from another source address or transport does not verify.
//
// Wire form: 8 characters of unpadded base64url over 6 bytes,
//
//	tick (16 bits, big endian) | MAC (32 bits)
//
// tick is the issue time in nonceTick units, modulo 2^16; the verifier
// rebuilds the full tick as the latest one not after now with those low
// bits, and the MAC (truncated HMAC-SHA256 under a per-process random key)
// covers that full tick, the transport and the address, so a nonce older
// than one wrap (2^16 ticks, 6 days) never verifies either.
//
// Why so short: the NONCE rides in the 401 that answers an unauthenticated
// request, and over UDP such an answer is capped at twice the request
// (the amplification budget). The
// smallest real Allocate (header + REQUESTED-TRANSPORT, 28 bytes) gets
// header 20 + ERROR-CODE 8 + REALM 16 (for a realm up to 12 bytes) +
// NONCE 12 = 56 bytes: exactly 2x. A 32-bit MAC does not weaken the
// long-term credential: the NONCE is covered by MESSAGE-INTEGRITY, so a
// forged nonce buys nothing without the password; what it guards is the
// replay of a captured request from another address within the lifetime,
// which needs a source address whose MAC collides (2^-32 per address tried).
const (
	// nonceTick is the unit of a nonce's issue time: fine enough that the
	// lifetime is honoured to within 8 s, coarse enough that 16 bits span
	// 6 days.
	nonceTick = 8 * time.Second
	// nonceRawLen is tick (2) + MAC (4).
	nonceRawLen = 6
	nonceMACLen = 4
	// NonceLen is the length of the NONCE value on the wire.
	NonceLen = 8
	// DefaultNonceLifetime is how long a nonce is accepted (10
	// minutes by default: a nonce that leaks is useless soon). RFC 8656 §4 suggests about an hour; a shorter
	// one costs an authenticated client one 438 round trip per lifetime.
	DefaultNonceLifetime = 10 * time.Minute
)

// nonceVerdict is what verify concluded.
type nonceVerdict uint8

const (
	nonceOK nonceVerdict = iota
	// nonceStale: well formed and ours, but older than the lifetime.
	nonceStale
	// nonceBad: not ours, not for this address, or malformed.
	nonceBad
)

// nonceMinter issues and verifies nonces. It is immutable after
// construction and safe for concurrent use.
type nonceMinter struct {
	key  [32]byte
	life time.Duration
	now  func() time.Time // tests inject a clock
	skew atomic.Int64     // added to now (ns): tests move a running server's clock
}

func newNonceMinter(life time.Duration, now func() time.Time) *nonceMinter {
	if life <= 0 {
		life = DefaultNonceLifetime
	}
	if now == nil {
		now = time.Now
	}
	m := &nonceMinter{life: life, now: now}
	if _, err := rand.Read(m.key[:]); err != nil {
		panic("nonce key: " + err.Error()) // crypto/rand does not fail on Linux
	}
	return m
}

func (m *nonceMinter) clock() time.Time { return m.now().Add(time.Duration(m.skew.Load())) }

func (m *nonceMinter) tick(t time.Time) uint64 { return uint64(t.UnixNano() / int64(nonceTick)) }

// mac is the truncated HMAC-SHA256 of tick, transport and address.
func (m *nonceMinter) mac(tick uint64, src netip.AddrPort, tcp bool) [nonceMACLen]byte {
	var in [8 + 1 + 16 + 2]byte
	binary.BigEndian.PutUint64(in[0:8], tick)
	if tcp {
		in[8] = 1
	}
	a := src.Addr().Unmap().As16()
	copy(in[9:25], a[:])
	binary.BigEndian.PutUint16(in[25:27], src.Port())
	h := hmac.New(sha256.New, m.key[:])
	h.Write(in[:])
	var sum [sha256.Size]byte
	var out [nonceMACLen]byte
	copy(out[:], h.Sum(sum[:0]))
	return out
}

// appendNonce appends a fresh nonce for a client at src to dst.
func (m *nonceMinter) appendNonce(dst []byte, src netip.AddrPort, tcp bool) []byte {
	t := m.tick(m.clock())
	var raw [nonceRawLen]byte
	binary.BigEndian.PutUint16(raw[0:2], uint16(t))
	mac := m.mac(t, src, tcp)
	copy(raw[2:], mac[:])
	return base64.RawURLEncoding.AppendEncode(dst, raw[:])
}

// verify checks a NONCE value received from src.
func (m *nonceMinter) verify(nonce []byte, src netip.AddrPort, tcp bool) nonceVerdict {
	if len(nonce) != NonceLen {
		return nonceBad
	}
	var raw [nonceRawLen]byte
	if n, err := base64.RawURLEncoding.Decode(raw[:], nonce); err != nil || n != nonceRawLen {
		return nonceBad
	}
	now := m.tick(m.clock())
	low := uint64(binary.BigEndian.Uint16(raw[0:2]))
	// The latest full tick <= now whose low 16 bits are low.
	t := now&^0xFFFF | low
	if t > now {
		t -= 1 << 16
	}
	mac := m.mac(t, src, tcp)
	if !hmac.Equal(mac[:], raw[2:]) {
		return nonceBad
	}
	// Age in ticks; the issue tick itself counts as age 0, so a nonce lives
	// between life-nonceTick and life.
	if time.Duration(now-t)*nonceTick >= m.life {
		return nonceStale
	}
	return nonceOK
}
