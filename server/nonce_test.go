package server

import (
	"net/netip"
	"testing"
	"time"
)

// TestNonceMinter: a nonce verifies only for the address, port and
// transport it was minted for, and only within its lifetime (RFC 8489
// §9.2.4), on an injected clock.
func TestNonceMinter(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	clock := func() time.Time { return now }
	m := newNonceMinter(10*time.Minute, clock)
	a := netip.MustParseAddrPort("192.0.2.1:40000")
	n := m.appendNonce(nil, a, false)
	if len(n) != NonceLen {
		t.Fatalf("nonce %q has %d bytes, want %d", n, len(n), NonceLen)
	}
	for _, tc := range []struct {
		name  string
		nonce []byte
		src   netip.AddrPort
		tcp   bool
		after time.Duration
		want  nonceVerdict
	}{
		{"fresh", n, a, false, 0, nonceOK},
		{"9m50s later", n, a, false, 9*time.Minute + 50*time.Second, nonceOK},
		{"other port", n, netip.MustParseAddrPort("192.0.2.1:40001"), false, 0, nonceBad},
		{"other ip", n, netip.MustParseAddrPort("192.0.2.2:40000"), false, 0, nonceBad},
		{"mapped form is the same address", n, netip.MustParseAddrPort("[::ffff:192.0.2.1]:40000"), false, 0, nonceOK},
		{"other transport", n, a, true, 0, nonceBad},
		{"expired", n, a, false, 10 * time.Minute, nonceStale},
		{"an hour", n, a, false, time.Hour, nonceStale},
		// One wrap of the 16-bit tick later the low bits match again; the
		// MAC covers the full tick, so it fails.
		{"one wrap later", n, a, false, (1 << 16) * nonceTick, nonceBad},
		{"tampered", append([]byte{n[0] ^ 1}, n[1:]...), a, false, 0, nonceBad},
		{"short", n[:7], a, false, 0, nonceBad},
		{"not base64", []byte("!!!!!!!!"), a, false, 0, nonceBad},
		{"empty", nil, a, false, 0, nonceBad},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m.now = func() time.Time { return now.Add(tc.after) }
			if got := m.verify(tc.nonce, tc.src, tc.tcp); got != tc.want {
				t.Errorf("verify = %d, want %d", got, tc.want)
			}
		})
	}
	m.now = clock

	// A nonce from the future (a clock stepped back) is not ours.
	m.now = func() time.Time { return now.Add(time.Minute) }
	future := m.appendNonce(nil, a, false)
	m.now = clock
	if got := m.verify(future, a, false); got == nonceOK {
		t.Error("a nonce minted a minute ahead verified")
	}

	// The skew hook moves the clock of a running server.
	m.skew.Store(int64(11 * time.Minute))
	if got := m.verify(n, a, false); got != nonceStale {
		t.Errorf("with 11 min skew: %d, want stale", got)
	}
}

// TestNonceMinterKeys: two servers (two keys) do not accept each other's
// nonces.
func TestNonceMinterKeys(t *testing.T) {
	a := netip.MustParseAddrPort("[2001:db8::1]:5000")
	n := newNonceMinter(0, nil).appendNonce(nil, a, true)
	if got := newNonceMinter(0, nil).verify(n, a, true); got != nonceBad {
		t.Errorf("foreign nonce: %d, want bad", got)
	}
}
