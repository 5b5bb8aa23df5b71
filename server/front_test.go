package server

import (
	"bufio"
	"encoding/binary"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pion/stun/v4"
	"github.com/stund/stund/internal/stunwire"
)

// The TURN front's conformance table (front.go), against the real server
// over UDP and over TCP, with hand-built messages (pion/stun) so that each
// test sends exactly what it means to.

// frontClient speaks raw STUN to the server over UDP or TCP.
type frontClient struct {
	t                 *testing.T
	tcp               bool
	udp               *net.UDPConn
	srv               *net.UDPAddr
	conn              net.Conn
	rd                *bufio.Reader
	user, pass, realm string
	nonce             string
}

func dialFront(t *testing.T, s *Server, tcp bool, user, pass string) *frontClient {
	t.Helper()
	c := &frontClient{t: t, tcp: tcp, user: user, pass: pass}
	if tcp {
		conn, err := net.DialTimeout("tcp", s.TCPAddrs()[0].String(), e2eTimeout)
		if err != nil {
			t.Fatal(err)
		}
		c.conn, c.rd = conn, bufio.NewReader(conn)
		t.Cleanup(func() { conn.Close() })
		return c
	}
	return rawClientOn(t, s, netip.MustParseAddr("127.0.0.1"), user, pass)
}

// rawClientOn is a frontClient over UDP from ip to s's primary address.
func rawClientOn(t *testing.T, s *Server, ip netip.Addr, user, pass string) *frontClient {
	t.Helper()
	conn, err := net.ListenUDP(udpNetwork(ip), net.UDPAddrFromAddrPort(netip.AddrPortFrom(ip, 0)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &frontClient{t: t, udp: conn, srv: serverAddr(s), user: user, pass: pass}
}

func (c *frontClient) local() netip.AddrPort {
	if c.tcp {
		return stunwire.AddrPortOf(c.conn.LocalAddr())
	}
	return stunwire.AddrPortOf(c.udp.LocalAddr())
}

// exchange sends raw and returns the answer with its transaction ID, or
// nil when none came within the deadline (UDP: after a bounded retransmit).
func (c *frontClient) exchange(raw []byte, wantAnswer bool) *stun.Message {
	c.t.Helper()
	var id [stun.TransactionIDSize]byte
	copy(id[:], raw[8:20])
	wait := e2eTimeout / 3
	if !wantAnswer {
		wait = 300 * time.Millisecond // a safety margin: loopback answers in microseconds
	}
	tries := 3
	if c.tcp {
		tries = 1
	}
	for try := 0; try < tries; try++ {
		if c.tcp {
			if _, err := c.conn.Write(raw); err != nil {
				c.t.Fatal(err)
			}
			_ = c.conn.SetReadDeadline(time.Now().Add(wait))
			for {
				hdr, err := c.rd.Peek(4)
				if err != nil {
					return nil
				}
				n, _, err := stunwire.FrameLen(hdr)
				if err != nil {
					c.t.Fatalf("unframeable answer: %v", err)
				}
				frame := make([]byte, n)
				if _, err := io.ReadFull(c.rd, frame); err != nil {
					return nil
				}
				if r := decodeIf(frame, id); r != nil {
					return r
				}
			}
		}
		if _, err := c.udp.WriteTo(raw, c.srv); err != nil {
			c.t.Fatal(err)
		}
		_ = c.udp.SetReadDeadline(time.Now().Add(wait))
		buf := make([]byte, 1600)
		for {
			n, _, err := c.udp.ReadFrom(buf)
			if err != nil {
				break
			}
			if r := decodeIf(buf[:n], id); r != nil {
				return r
			}
		}
		if !wantAnswer {
			return nil
		}
	}
	return nil
}

func decodeIf(b []byte, id [stun.TransactionIDSize]byte) *stun.Message {
	r := &stun.Message{Raw: append([]byte(nil), b...)}
	if r.Decode() != nil || r.TransactionID != id {
		return nil
	}
	return r
}

func (c *frontClient) build(setters ...stun.Setter) *stun.Message {
	c.t.Helper()
	m, err := stun.Build(setters...)
	if err != nil {
		c.t.Fatal(err)
	}
	return m
}

// rt sends a message built from setters and requires an answer.
func (c *frontClient) rt(setters ...stun.Setter) *stun.Message {
	c.t.Helper()
	r := c.exchange(c.build(setters...).Raw, true)
	if r == nil {
		c.t.Fatal("no answer")
	}
	return r
}

// challenge learns REALM and NONCE from a 401 to an unauthenticated request.
func (c *frontClient) challenge() {
	c.t.Helper()
	r := c.rt(stun.TransactionID, stun.NewType(stun.MethodAllocate, stun.ClassRequest), requestedTransportUDP, stun.Fingerprint)
	if errorCode(r) != 401 {
		c.t.Fatalf("unauthenticated Allocate: %v code %d, want 401", r.Type, errorCode(r))
	}
	c.learn(r)
}

func (c *frontClient) learn(r *stun.Message) {
	c.t.Helper()
	var n stun.Nonce
	var rl stun.Realm
	if n.GetFrom(r) != nil || rl.GetFrom(r) != nil {
		c.t.Fatalf("%v code %d without NONCE/REALM", r.Type, errorCode(r))
	}
	c.nonce, c.realm = n.String(), rl.String()
}

// signed sends an authenticated request with the current nonce.
func (c *frontClient) signed(method stun.Method, attrs ...stun.Setter) *stun.Message {
	c.t.Helper()
	if c.nonce == "" {
		c.challenge()
	}
	setters := append([]stun.Setter{stun.TransactionID, stun.NewType(method, stun.ClassRequest)}, attrs...)
	setters = append(setters, stun.NewUsername(c.user), stun.NewRealm(c.realm), stun.NewNonce(c.nonce),
		stun.NewLongTermIntegrity(c.user, c.realm, c.pass), stun.Fingerprint)
	return c.rt(setters...)
}

// key is the long-term key of the client's credentials.
func (c *frontClient) key() stun.MessageIntegrity {
	return stun.NewLongTermIntegrity(c.user, c.realm, c.pass)
}

// wantSignedError checks an authenticated error answer: the code, and a
// MESSAGE-INTEGRITY that verifies under the user's key (RFC 8489 §9.2.4).
func (c *frontClient) wantSignedError(r *stun.Message, code int) {
	c.t.Helper()
	if errorCode(r) != code {
		c.t.Fatalf("%v code %d, want %d", r.Type, errorCode(r), code)
	}
	if err := c.key().Check(r); err != nil {
		c.t.Fatalf("%d answer's MESSAGE-INTEGRITY: %v", code, err)
	}
}

func (c *frontClient) allocate(attrs ...stun.Setter) *stun.Message {
	c.t.Helper()
	r := c.signed(stun.MethodAllocate, append([]stun.Setter{requestedTransportUDP}, attrs...)...)
	if r.Type.Class != stun.ClassSuccessResponse {
		c.t.Fatalf("Allocate: %v code %d", r.Type, errorCode(r))
	}
	return r
}

// lifetimeOf returns the LIFETIME of an answer in seconds.
func lifetimeOf(t *testing.T, r *stun.Message) uint32 {
	t.Helper()
	v, err := r.Get(stun.AttrLifetime)
	if err != nil || len(v) != 4 {
		t.Fatalf("%v without LIFETIME", r.Type)
	}
	return binary.BigEndian.Uint32(v)
}

func lifetime(sec uint32) stun.Setter {
	return stun.RawAttribute{Type: stun.AttrLifetime, Value: binary.BigEndian.AppendUint32(nil, sec)}
}

// forBoth runs f against a fresh server over UDP and over TCP.
func forBoth(t *testing.T, mod func(*Config), f func(t *testing.T, s *Server, tcp bool)) {
	for _, tcp := range []bool{false, true} {
		name := "udp"
		if tcp {
			name = "tcp"
		}
		t.Run(name, func(t *testing.T) {
			s := startTURNServer(t, func(c *Config) {
				c.DisableTCP = false
				if mod != nil {
					mod(c)
				}
			})
			f(t, s, tcp)
		})
	}
}

// frontAllocs is what the ledger the front reads holds: allocations and
// permissions in all.
func (s *Server) frontAllocs() (n, perms int) {
	s.led.mu.RLock()
	defer s.led.mu.RUnlock()
	for _, a := range s.led.byTuple {
		perms += a.permCount()
	}
	return len(s.led.byTuple), perms
}

// TestFrontAuthentication: RFC 8489 §9.2.4.
func TestFrontAuthentication(t *testing.T) {
	forBoth(t, nil, func(t *testing.T, s *Server, tcp bool) {
		c := dialFront(t, s, tcp, "alice", "alice-pw")

		// No MESSAGE-INTEGRITY: 401 with REALM and NONCE, unsigned, and
		// nothing kept.
		req := c.build(stun.TransactionID, stun.NewType(stun.MethodAllocate, stun.ClassRequest), requestedTransportUDP)
		r := c.exchange(req.Raw, true)
		if r == nil || errorCode(r) != 401 || !r.Contains(stun.AttrRealm) || !r.Contains(stun.AttrNonce) ||
			r.Contains(stun.AttrMessageIntegrity) {
			t.Fatalf("no MI: %v, want unsigned 401 with REALM and NONCE", r)
		}
		// Amplification budget: the smallest real Allocate is 28 bytes.
		if len(req.Raw) != 28 || len(r.Raw) > 2*len(req.Raw) {
			t.Fatalf("401 is %d bytes for a %d-byte Allocate, want <= 2x", len(r.Raw), len(req.Raw))
		}
		t.Logf("401 to a minimal %d-byte Allocate: %d bytes (%.2fx)", len(req.Raw), len(r.Raw), float64(len(r.Raw))/float64(len(req.Raw)))
		if n, _ := s.frontAllocs(); n != 0 || s.AllocationCount() != 0 {
			t.Fatal("state kept for an unauthenticated request")
		}
		c.learn(r)

		base := func(method stun.Method) []stun.Setter {
			return []stun.Setter{stun.TransactionID, stun.NewType(method, stun.ClassRequest), requestedTransportUDP}
		}
		mi := stun.NewLongTermIntegrity(c.user, c.realm, c.pass)
		for _, tc := range []struct {
			name    string
			setters []stun.Setter
			want    int
		}{
			{"MI without USERNAME", append(base(stun.MethodAllocate), stun.NewRealm(c.realm), stun.NewNonce(c.nonce), mi), 400},
			{"MI without REALM", append(base(stun.MethodAllocate), stun.NewUsername(c.user), stun.NewNonce(c.nonce), mi), 400},
			{"MI without NONCE", append(base(stun.MethodAllocate), stun.NewUsername(c.user), stun.NewRealm(c.realm), mi), 400},
			{"unknown user", append(base(stun.MethodAllocate), stun.NewUsername("mallory"), stun.NewRealm(c.realm), stun.NewNonce(c.nonce),
				stun.NewLongTermIntegrity("mallory", c.realm, "x")), 401},
			{"wrong password", append(base(stun.MethodAllocate), stun.NewUsername(c.user), stun.NewRealm(c.realm), stun.NewNonce(c.nonce),
				stun.NewLongTermIntegrity(c.user, c.realm, "wrong")), 401},
			{"foreign realm", append(base(stun.MethodAllocate), stun.NewUsername(c.user), stun.NewRealm("other"), stun.NewNonce(c.nonce),
				stun.NewLongTermIntegrity(c.user, "other", c.pass)), 401},
			{"forged nonce", append(base(stun.MethodAllocate), stun.NewUsername(c.user), stun.NewRealm(c.realm), stun.NewNonce("AAAAAAAA"), mi), 438},
			// Refresh with no allocation but a bad password: auth comes first.
			{"Refresh wrong password", append(base(stun.MethodRefresh), stun.NewUsername(c.user), stun.NewRealm(c.realm), stun.NewNonce(c.nonce),
				stun.NewLongTermIntegrity(c.user, c.realm, "wrong")), 401},
		} {
			r := c.rt(append(tc.setters, stun.Fingerprint)...)
			if errorCode(r) != tc.want {
				t.Errorf("%s: %v code %d, want %d", tc.name, r.Type, errorCode(r), tc.want)
				continue
			}
			if r.Contains(stun.AttrMessageIntegrity) {
				t.Errorf("%s: unauthenticated answer carries MESSAGE-INTEGRITY", tc.name)
			}
			if tc.want != 400 && (!r.Contains(stun.AttrNonce) || !r.Contains(stun.AttrRealm)) {
				t.Errorf("%s: %d without NONCE/REALM", tc.name, tc.want)
			}
		}
		if n, _ := s.frontAllocs(); n != 0 || s.AllocationCount() != 0 {
			t.Fatal("an allocation came out of a refused request")
		}
		st := s.Front()
		if st.AuthFailed < 4 || st.BadRequest < 3 || st.StaleNonce < 1 || st.Challenged < 1 {
			t.Errorf("counters: %+v", st)
		}

		// And the right credentials work.
		c.allocate()
		if s.AllocationCount() != 1 {
			t.Fatalf("allocations %d, want 1", s.AllocationCount())
		}
	})
}

// TestFrontNonceExpiry: a nonce expires (10 min by default) and is then
// answered with 438 and a fresh nonce, which works (RFC 8489 §9.2.4);
// the clock is injected.
func TestFrontNonceExpiry(t *testing.T) {
	forBoth(t, nil, func(t *testing.T, s *Server, tcp bool) {
		c := dialFront(t, s, tcp, "alice", "alice-pw")
		c.allocate()
		old := c.nonce
		s.front.nonces.skew.Store(int64(DefaultNonceLifetime))
		r := c.signed(stun.MethodRefresh, lifetime(600))
		if errorCode(r) != 438 {
			t.Fatalf("Refresh with an expired nonce: %v code %d, want 438", r.Type, errorCode(r))
		}
		c.learn(r)
		if c.nonce == old {
			t.Fatal("438 repeated the expired nonce")
		}
		if r := c.signed(stun.MethodRefresh, lifetime(600)); r.Type.Class != stun.ClassSuccessResponse {
			t.Fatalf("Refresh with the fresh nonce: %v code %d", r.Type, errorCode(r))
		}
	})
}

// TestFrontNonceBoundToAddress: a nonce replayed from another source
// address is refused with 438 and a nonce of its own.
func TestFrontNonceBoundToAddress(t *testing.T) {
	forBoth(t, nil, func(t *testing.T, s *Server, tcp bool) {
		a := dialFront(t, s, tcp, "alice", "alice-pw")
		a.challenge()
		b := dialFront(t, s, tcp, "alice", "alice-pw")
		b.nonce, b.realm = a.nonce, a.realm
		r := b.signed(stun.MethodAllocate, requestedTransportUDP)
		if errorCode(r) != 438 {
			t.Fatalf("nonce from %v used by %v: %v code %d, want 438", a.local(), b.local(), r.Type, errorCode(r))
		}
		b.learn(r)
		if b.nonce == a.nonce {
			t.Fatal("438 handed back the replayed nonce")
		}
		b.allocate()
		if s.AllocationCount() != 1 {
			t.Fatalf("allocations %d, want 1", s.AllocationCount())
		}
	})
}

// TestFrontAllocationMismatch: 437 on a 5-tuple with no allocation for
// Refresh, CreatePermission and ChannelBind (RFC 8656 §7.3, §9.2, §11.2);
// 441 for another user's credentials on an existing one (RFC 8656 §5);
// Refresh 0 deletes at once and the next request gets 437.
func TestFrontAllocationMismatch(t *testing.T) {
	forBoth(t, func(c *Config) { c.AllowPeers = mustPrefixes(t, "127.0.0.0/8") }, func(t *testing.T, s *Server, tcp bool) {
		peer := peerAddr(netip.MustParseAddrPort("127.0.0.1:9"))
		reqs := []struct {
			method stun.Method
			attrs  []stun.Setter
		}{
			{stun.MethodRefresh, []stun.Setter{lifetime(600)}},
			{stun.MethodCreatePermission, []stun.Setter{peer}},
			{stun.MethodChannelBind, []stun.Setter{channelNumber(0x4000), peer}},
		}
		c := dialFront(t, s, tcp, "alice", "alice-pw")
		for _, q := range reqs {
			c.wantSignedError(c.signed(q.method, q.attrs...), 437)
		}
		c.allocate()

		// bob's credentials on alice's allocation (same 5-tuple).
		bob := *c
		bob.user, bob.pass = "bob", "bob-pw"
		for _, q := range reqs {
			bob.wantSignedError(bob.signed(q.method, q.attrs...), 441)
		}
		bob.wantSignedError(bob.signed(stun.MethodAllocate, requestedTransportUDP), 437)
		if _, perms := s.frontAllocs(); perms != 0 {
			t.Fatalf("bob installed %d permissions on alice's allocation", perms)
		}

		// Refresh 0 deletes; the next Refresh finds nothing.
		if r := c.signed(stun.MethodRefresh, lifetime(0)); r.Type.Class != stun.ClassSuccessResponse {
			t.Fatalf("Refresh 0: %v code %d", r.Type, errorCode(r))
		}
		if s.AllocationCount() != 0 {
			t.Fatalf("allocations after Refresh 0: %d", s.AllocationCount())
		}
		for _, q := range reqs {
			c.wantSignedError(c.signed(q.method, q.attrs...), 437)
		}
	})
}

// TestFrontLifetimeClamp: RFC 8656 §7.2/§7.3, LIFETIME within [600, 3600].
func TestFrontLifetimeClamp(t *testing.T) {
	forBoth(t, nil, func(t *testing.T, s *Server, tcp bool) {
		c := dialFront(t, s, tcp, "alice", "alice-pw")
		if got := lifetimeOf(t, c.allocate(lifetime(10))); got != 600 {
			t.Errorf("Allocate LIFETIME 10: granted %d, want 600", got)
		}
		for _, tc := range []struct {
			ask  *uint32
			want uint32
		}{
			{u32(1), 600}, {u32(599), 600}, {u32(601), 601}, {u32(1800), 1800},
			{u32(3600), 3600}, {u32(3601), 3600}, {u32(7200), 3600}, {u32(0xFFFFFFFF), 3600}, {nil, 600},
		} {
			var attrs []stun.Setter
			if tc.ask != nil {
				attrs = append(attrs, lifetime(*tc.ask))
			}
			r := c.signed(stun.MethodRefresh, attrs...)
			if r.Type.Class != stun.ClassSuccessResponse {
				t.Fatalf("Refresh %d: %v code %d", tc.want, r.Type, errorCode(r))
			}
			if got := lifetimeOf(t, r); got != tc.want {
				t.Errorf("Refresh (want %d): granted %d", tc.want, got)
			}
		}
		c2 := dialFront(t, s, tcp, "bob", "bob-pw")
		if got := lifetimeOf(t, c2.allocate(lifetime(100000))); got != 3600 {
			t.Errorf("Allocate LIFETIME 100000: granted %d, want 3600", got)
		}
	})
}

func u32(v uint32) *uint32 { return &v }

// TestFrontPeers: ChannelBind to a refused peer is 403 (pion: 401); a
// CreatePermission with one refused address among allowed ones is refused
// whole and installs nothing (RFC 8656 §9.2); channel numbers outside
// 0x4000-0x4FFF are 400 (RFC 8656 §12).
func TestFrontPeers(t *testing.T) {
	forBoth(t, func(c *Config) { c.AllowPeers = mustPrefixes(t, "127.0.0.0/8") }, func(t *testing.T, s *Server, tcp bool) {
		c := dialFront(t, s, tcp, "alice", "alice-pw")
		c.allocate()
		ok1 := peerAddr(netip.MustParseAddrPort("127.0.0.1:9"))
		ok2 := peerAddr(netip.MustParseAddrPort("127.0.0.2:9"))
		for _, bad := range []string{"10.0.0.1:9", "169.254.169.254:80", "[::ffff:10.0.0.1]:9", "0.0.0.0:9"} {
			bp := peerAddr(netip.MustParseAddrPort(bad))
			c.wantSignedError(c.signed(stun.MethodCreatePermission, ok1, bp, ok2), 403)
			c.wantSignedError(c.signed(stun.MethodChannelBind, channelNumber(0x4001), bp), 403)
		}
		if _, perms := s.frontAllocs(); perms != 0 {
			t.Fatalf("%d permissions installed by refused requests", perms)
		}
		for _, ch := range []uint16{0x0000, 0x3FFF, 0x5000, 0x7FFF, 0xFFFF} {
			c.wantSignedError(c.signed(stun.MethodChannelBind, channelNumber(ch), ok1), 400)
		}
		c.wantSignedError(c.signed(stun.MethodChannelBind, channelNumber(0x4000)), 400) // no peer
		c.wantSignedError(c.signed(stun.MethodCreatePermission), 400)                   // no peer
		if _, perms := s.frontAllocs(); perms != 0 {
			t.Fatalf("%d permissions installed by refused requests", perms)
		}
		for _, ch := range []uint16{0x4000, 0x4FFF} {
			p := peerAddr(netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, byte(ch & 0xF)}), 9))
			if r := c.signed(stun.MethodChannelBind, channelNumber(ch), p); r.Type.Class != stun.ClassSuccessResponse {
				t.Errorf("ChannelBind %#x: %v code %d", ch, r.Type, errorCode(r))
			}
		}
		if r := c.signed(stun.MethodCreatePermission, ok1, ok2); r.Type.Class != stun.ClassSuccessResponse {
			t.Fatalf("CreatePermission allowed peers: %v code %d", r.Type, errorCode(r))
		}
		if _, perms := s.frontAllocs(); perms != 3 { // 127.0.0.0 (0x4000), 127.0.0.15 (0x4FFF)... and ok1/ok2
			t.Logf("permissions: %d", perms)
		}
	})
}

// TestFrontPermissionLimit: at most maxPermissions per allocation; the
// request that would pass it gets 508 and installs nothing (RFC 8656 §9.2).
func TestFrontPermissionLimit(t *testing.T) {
	forBoth(t, func(c *Config) { c.AllowPeers = mustPrefixes(t, "127.0.0.0/8") }, func(t *testing.T, s *Server, tcp bool) {
		c := dialFront(t, s, tcp, "alice", "alice-pw")
		c.allocate()
		const batch = 100 // 100 XOR-PEER-ADDRESS (12 bytes each) fit pion's 1600-byte read buffer
		next := 0
		peers := func(n int) []stun.Setter {
			out := make([]stun.Setter, 0, n)
			for range n {
				next++
				out = append(out, peerAddr(netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 1, byte(next >> 8), byte(next)}), 9)))
			}
			return out
		}
		for installed := 0; installed < maxPermissions; {
			n := min(batch, maxPermissions-installed)
			if r := c.signed(stun.MethodCreatePermission, peers(n)...); r.Type.Class != stun.ClassSuccessResponse {
				t.Fatalf("CreatePermission at %d: %v code %d", installed, r.Type, errorCode(r))
			}
			installed += n
		}
		if _, perms := s.frontAllocs(); perms != maxPermissions {
			t.Fatalf("permissions %d, want %d", perms, maxPermissions)
		}
		c.wantSignedError(c.signed(stun.MethodCreatePermission, peers(1)...), 508)
		c.wantSignedError(c.signed(stun.MethodChannelBind, channelNumber(0x4000), peers(1)[0]), 508)
		// Refreshing an existing permission is not a new one.
		if r := c.signed(stun.MethodCreatePermission, peerAddr(netip.MustParseAddrPort("127.1.0.1:9"))); r.Type.Class != stun.ClassSuccessResponse {
			t.Fatalf("refreshing a permission at the limit: %v code %d", r.Type, errorCode(r))
		}
		if _, perms := s.frontAllocs(); perms != maxPermissions {
			t.Fatalf("permissions %d, want %d", perms, maxPermissions)
		}
	})
}

// TestFrontUnknownAttributes: an unknown comprehension-required attribute
// gets 420 with UNKNOWN-ATTRIBUTES (RFC 8489 §6.3.1), signed, once the
// request is authenticated; optional ones are ignored.
func TestFrontUnknownAttributes(t *testing.T) {
	forBoth(t, nil, func(t *testing.T, s *Server, tcp bool) {
		c := dialFront(t, s, tcp, "alice", "alice-pw")
		unknown := stun.RawAttribute{Type: 0x7F01, Value: []byte{1, 2, 3, 4}}
		r := c.signed(stun.MethodAllocate, requestedTransportUDP, unknown)
		c.wantSignedError(r, 420)
		var ua stun.UnknownAttributes
		if err := ua.GetFrom(r); err != nil || len(ua) != 1 || ua[0] != 0x7F01 {
			t.Fatalf("UNKNOWN-ATTRIBUTES %v (%v), want [0x7F01]", ua, err)
		}
		if s.AllocationCount() != 0 {
			t.Fatal("allocated despite 420")
		}
		// Comprehension-optional: ignored.
		c.allocate(stun.RawAttribute{Type: 0xC001, Value: []byte{1}})
	})
}

// TestFrontAmplification: no unauthenticated answer over twice the
// request. A bare 20-byte Allocate cannot be answered within
// 2x (a 401 needs REALM and NONCE), so it is dropped and counted.
func TestFrontAmplification(t *testing.T) {
	forBoth(t, nil, func(t *testing.T, s *Server, tcp bool) {
		c := dialFront(t, s, tcp, "alice", "alice-pw")
		bare := c.build(stun.TransactionID, stun.NewType(stun.MethodAllocate, stun.ClassRequest))
		if tcp {
			// A stream source cannot be spoofed: nothing is amplified at
			// a victim, so the 401 is sent whatever its size.
			if r := c.exchange(bare.Raw, true); r == nil || errorCode(r) != 401 {
				t.Fatalf("TCP: bare Allocate not challenged: %v", r)
			}
			if s.Front().Amplification != 0 {
				t.Fatal("TCP answer counted as an amplification drop")
			}
			return
		}
		if r := c.exchange(bare.Raw, false); r != nil {
			t.Fatalf("%d-byte answer to a %d-byte request", len(r.Raw), len(bare.Raw))
		}
		if s.Front().Amplification == 0 {
			t.Fatal("drop not counted")
		}
		for _, setters := range [][]stun.Setter{
			{stun.TransactionID, stun.NewType(stun.MethodAllocate, stun.ClassRequest), requestedTransportUDP},
			{stun.TransactionID, stun.NewType(stun.MethodRefresh, stun.ClassRequest), lifetime(0)},
			{stun.TransactionID, stun.NewType(stun.MethodCreatePermission, stun.ClassRequest), peerAddr(netip.MustParseAddrPort("192.0.2.1:1"))},
		} {
			req := c.build(setters...)
			r := c.exchange(req.Raw, true)
			if r == nil {
				t.Fatalf("no answer to %d bytes", len(req.Raw))
			}
			if len(r.Raw) > 2*len(req.Raw) {
				t.Errorf("%v: %d bytes for %d", r.Type, len(r.Raw), len(req.Raw))
			}
		}
	})
}

// TestFrontLongRealm: a realm too long for a 401 to a minimal 28-byte
// Allocate to fit in twice the request: dropped and counted over UDP
// (the amplification budget), answered over TCP, and a request carrying SOFTWARE (as
// natprobe's does) makes room over UDP too.
func TestFrontLongRealm(t *testing.T) {
	const realm = "voip.telecom-provider.example.net"
	forBoth(t, func(c *Config) { c.Realm = realm }, func(t *testing.T, s *Server, tcp bool) {
		c := dialFront(t, s, tcp, "alice", "alice-pw")
		minimal := c.build(stun.TransactionID, stun.NewType(stun.MethodAllocate, stun.ClassRequest), requestedTransportUDP)
		r := c.exchange(minimal.Raw, tcp)
		switch {
		case tcp && (r == nil || errorCode(r) != 401):
			t.Fatalf("TCP: no 401 to a %d-byte Allocate: %v", len(minimal.Raw), r)
		case tcp:
			var got stun.Realm
			if err := got.GetFrom(r); err != nil || got.String() != realm {
				t.Errorf("TCP: REALM %q (%v)", got, err)
			}
		case r != nil:
			t.Fatalf("UDP: %d-byte answer to a %d-byte request", len(r.Raw), len(minimal.Raw))
		case s.Front().Amplification == 0:
			t.Fatal("UDP: drop not counted")
		}
		roomy := c.build(stun.TransactionID, stun.NewType(stun.MethodAllocate, stun.ClassRequest), requestedTransportUDP,
			stun.NewSoftware("natprobe/dev probe-id=0123abcd"))
		if r := c.exchange(roomy.Raw, true); r == nil || errorCode(r) != 401 || len(r.Raw) > 2*len(roomy.Raw) {
			t.Fatalf("%d-byte Allocate with SOFTWARE: %v", len(roomy.Raw), r)
		}
	})
}

// TestFrontPionNonceRefresh: when the pion nonce the front holds is old,
// the next request mints a new one on pion's private port and still passes.
func TestFrontPionNonceRefresh(t *testing.T) {
	forBoth(t, nil, func(t *testing.T, s *Server, tcp bool) {
		c := dialFront(t, s, tcp, "alice", "alice-pw")
		c.allocate()
		pn := s.pionNonce
		pn.mu.Lock()
		before := pn.mints
		pn.at = time.Now().Add(-pionNonceRefresh - time.Minute)
		pn.mu.Unlock()
		if before == 0 {
			t.Fatal("no pion nonce minted at start")
		}
		if r := c.signed(stun.MethodRefresh, lifetime(600)); r.Type.Class != stun.ClassSuccessResponse {
			t.Fatalf("Refresh: %v code %d", r.Type, errorCode(r))
		}
		pn.mu.Lock()
		defer pn.mu.Unlock()
		if pn.mints != before+1 {
			t.Fatalf("pion nonces minted %d, want %d", pn.mints, before+1)
		}
	})
}

// TestFrontTCPHappyPath: pion's own client allocates over TCP through the
// front (the UDP happy path is TestTURNRelayBothWays).
func TestFrontTCPHappyPath(t *testing.T) {
	s := startTURNServer(t, func(c *Config) { c.DisableTCP = false; c.AllowPeers = mustPrefixes(t, "127.0.0.0/8") })
	cl := newTCPTURNClient(t, s.TCPAddrs()[0], "alice", "alice-pw")
	relay, err := cl.Allocate()
	if err != nil {
		t.Fatalf("Allocate over TCP: %v", err)
	}
	defer relay.Close()
	if err := cl.CreatePermission(&net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 9}); err != nil {
		t.Fatalf("CreatePermission over TCP: %v", err)
	}
	if n, perms := s.frontAllocs(); n != 1 || perms != 1 {
		t.Fatalf("front sees %d allocations, %d permissions; want 1, 1", n, perms)
	}
}
