package server

import (
	"errors"
	"net"
	"net/netip"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pion/stun/v4"
	"github.com/pion/turn/v5"
)

// e2eTimeout bounds every wait in these tests; loopback answers in well under
// a millisecond, so reaching it means something is broken, not slow.
const e2eTimeout = 5 * time.Second

func startTURNServer(t *testing.T, mod func(*Config)) *Server {
	t.Helper()
	cfg := Config{
		PrimaryIP:   netip.MustParseAddr("127.0.0.1"),
		AlternateIP: netip.MustParseAddr("127.0.0.2"),
		Realm:       testRealm,
		Users:       map[string]string{"alice": "alice-pw", "bob": "bob-pw", "carol": "carol-pw"},
		DisableTCP:  true,
	}
	if mod != nil {
		mod(&cfg)
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatalf("server.New: %v", err)
	}
	t.Cleanup(func() { s.Close() })

	return s
}

func serverAddr(s *Server) *net.UDPAddr { return net.UDPAddrFromAddrPort(s.Grid()[0][0]) }

// countingConn records ChannelData frames (RFC 8656 §12.4: first two bits
// 01) in both directions, to prove the channel carried the data.
type countingConn struct {
	net.PacketConn
	chanOut, chanIn, bindReq atomic.Int32
}

func isChannelData(b []byte) bool { return len(b) >= 4 && b[0]&0xC0 == 0x40 }

func (c *countingConn) WriteTo(b []byte, a net.Addr) (int, error) {
	if isChannelData(b) {
		c.chanOut.Add(1)
	} else if len(b) >= 2 && b[0] == 0x00 && b[1] == 0x09 { // ChannelBind request
		c.bindReq.Add(1)
	}

	return c.PacketConn.WriteTo(b, a)
}

func (c *countingConn) ReadFrom(b []byte) (int, net.Addr, error) {
	n, a, err := c.PacketConn.ReadFrom(b)
	if err == nil && isChannelData(b[:n]) {
		c.chanIn.Add(1)
	}

	return n, a, err
}

func newTURNClient(t *testing.T, s *Server, user, pass string) (*turn.Client, *countingConn) {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cc := &countingConn{PacketConn: pc}
	c := newPionClient(t, &turn.ClientConfig{
		STUNServerAddr: serverAddr(s).String(),
		TURNServerAddr: serverAddr(s).String(),
		Username:       user,
		Password:       pass,
		Conn:           cc,
		RTO:            100 * time.Millisecond,
	})

	return c, cc
}

func turnErrorCode(err error) int {
	var te *stun.TurnError
	if errors.As(err, &te) {
		return int(te.ErrorCodeAttr.Code)
	}

	return 0
}

// TestTURNRelayBothWays: allocate, permission, channel, data both ways to a
// plain UDP peer on loopback opened with AllowPeers.
func TestTURNRelayBothWays(t *testing.T) {
	s := startTURNServer(t, func(c *Config) { c.AllowPeers = mustPrefixes(t, "127.0.0.0/8") })
	c, cc := newTURNClient(t, s, "alice", "alice-pw")
	relay, err := c.Allocate()
	if err != nil {
		t.Fatalf("Allocate: %v", err)
	}
	defer relay.Close()
	if s.AllocationCount() != 1 {
		t.Fatalf("server has %d allocations, want 1", s.AllocationCount())
	}

	peer, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()

	// Client -> peer: the first packets go as Send indications while pion's
	// client binds a channel; keep sending (bounded) until ChannelData has
	// carried packets and the peer received them.
	buf := make([]byte, 1500)
	got := 0
	var relayedFrom net.Addr
	deadline := time.Now().Add(e2eTimeout)
	for i := 0; i < 200 && time.Now().Before(deadline) && (got < 3 || cc.chanOut.Load() < 2); i++ {
		if _, err := relay.WriteTo([]byte("to-peer-"+strconv.Itoa(i)), peer.LocalAddr()); err != nil {
			t.Fatalf("relay write: %v", err)
		}
		_ = peer.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		if n, from, err := peer.ReadFrom(buf); err == nil && string(buf[:8]) == "to-peer-" && n > 8 {
			got++
			relayedFrom = from
		}
	}
	if got == 0 {
		t.Fatal("peer received nothing through the relay")
	}
	if cc.bindReq.Load() == 0 || cc.chanOut.Load() == 0 {
		t.Fatalf("no channel used: %d ChannelBind requests, %d ChannelData sent", cc.bindReq.Load(), cc.chanOut.Load())
	}
	if relayedFrom.String() != relay.LocalAddr().String() {
		t.Errorf("peer saw source %v, the relayed address is %v", relayedFrom, relay.LocalAddr())
	}

	// Peer -> client, arriving on the bound channel.
	for i := 0; i < 3; i++ {
		if _, err := peer.WriteTo([]byte("to-client"), relayedFrom); err != nil {
			t.Fatal(err)
		}
		_ = relay.SetReadDeadline(time.Now().Add(e2eTimeout))
		n, from, err := relay.ReadFrom(buf)
		if err != nil {
			t.Fatalf("client read: %v", err)
		}
		if string(buf[:n]) != "to-client" || from.String() != peer.LocalAddr().String() {
			t.Fatalf("client got %q from %v", buf[:n], from)
		}
	}
	if cc.chanIn.Load() == 0 {
		t.Error("the server did not use the channel toward the client")
	}
}

// rawClient speaks TURN with hand-built messages, to read ERROR-CODEs that
// pion's client hides.
type rawClient struct {
	t                 *testing.T
	conn              *net.UDPConn
	srv               *net.UDPAddr
	user, pass, realm string
	nonce             string
}

func newRawClient(t *testing.T, s *Server, user, pass string) *rawClient {
	t.Helper()
	conn, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:0")))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })

	return &rawClient{t: t, conn: conn, srv: serverAddr(s), user: user, pass: pass}
}

func (c *rawClient) roundTrip(setters []stun.Setter) *stun.Message {
	c.t.Helper()
	m, err := stun.Build(setters...)
	if err != nil {
		c.t.Fatal(err)
	}
	buf := make([]byte, 1500)
	for try := 0; try < 3; try++ { // UDP: a bounded retransmit
		if _, err := c.conn.WriteTo(m.Raw, c.srv); err != nil {
			c.t.Fatal(err)
		}
		_ = c.conn.SetReadDeadline(time.Now().Add(e2eTimeout / 3))
		for {
			n, _, err := c.conn.ReadFrom(buf)
			if err != nil {
				break
			}
			r := &stun.Message{Raw: append([]byte(nil), buf[:n]...)}
			if r.Decode() == nil && r.TransactionID == m.TransactionID {
				return r
			}
		}
	}
	c.t.Fatalf("no answer to %v", m.Type)

	return nil
}

// do sends an authenticated request, learning REALM and NONCE from a 401 or
// 438 first (RFC 8489 §9.2.3), and returns the final answer.
func (c *rawClient) do(method stun.Method, attrs ...stun.Setter) *stun.Message {
	c.t.Helper()
	for try := 0; try < 3; try++ {
		setters := []stun.Setter{stun.TransactionID, stun.NewType(method, stun.ClassRequest)}
		setters = append(setters, attrs...)
		if c.nonce != "" {
			setters = append(setters, stun.NewUsername(c.user), stun.NewRealm(c.realm), stun.NewNonce(c.nonce),
				stun.NewLongTermIntegrity(c.user, c.realm, c.pass))
		}
		setters = append(setters, stun.Fingerprint)
		r := c.roundTrip(setters)
		var ec stun.ErrorCodeAttribute
		if r.Type.Class == stun.ClassErrorResponse && ec.GetFrom(r) == nil &&
			(ec.Code == stun.CodeUnauthorized || ec.Code == stun.CodeStaleNonce) && r.Contains(stun.AttrNonce) {
			var n stun.Nonce
			var rl stun.Realm
			if n.GetFrom(r) != nil || rl.GetFrom(r) != nil {
				c.t.Fatal("401 without NONCE/REALM")
			}
			c.nonce, c.realm = n.String(), rl.String()

			continue
		}

		return r
	}
	c.t.Fatalf("%v: still challenged after 3 tries", method)

	return nil
}

func errorCode(r *stun.Message) int {
	if r.Type.Class != stun.ClassErrorResponse {
		return 0
	}
	var ec stun.ErrorCodeAttribute
	if ec.GetFrom(r) != nil {
		return -1
	}

	return int(ec.Code)
}

// requestedTransportUDP is REQUESTED-TRANSPORT = 17 (RFC 8656 §18.7).
var requestedTransportUDP = stun.RawAttribute{Type: stun.AttrRequestedTransport, Value: []byte{17, 0, 0, 0}}

type peerAddr netip.AddrPort

func (p peerAddr) AddTo(m *stun.Message) error {
	ap := netip.AddrPort(p)

	return stun.XORMappedAddress{IP: ap.Addr().AsSlice(), Port: int(ap.Port())}.AddToAs(m, stun.AttrXORPeerAddress)
}

func channelNumber(n uint16) stun.Setter {
	return stun.RawAttribute{Type: stun.AttrChannelNumber, Value: []byte{byte(n >> 8), byte(n), 0, 0}}
}

// TestTURNDefaultPolicyRefusesLoopback: with no --allow-peer a loopback peer
// is refused with 403 on CreatePermission and ChannelBind (RFC 8656 §9.2,
// §12.2), and a Send indication toward it reaches nothing.
func TestTURNDefaultPolicyRefusesLoopback(t *testing.T) {
	s := startTURNServer(t, nil)
	peer, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	pap := netip.MustParseAddrPort(peer.LocalAddr().String())

	c := newRawClient(t, s, "alice", "alice-pw")
	if r := c.do(stun.MethodAllocate, requestedTransportUDP); r.Type.Class != stun.ClassSuccessResponse {
		t.Fatalf("Allocate: %v code %d", r.Type, errorCode(r))
	}
	for _, ap := range []netip.AddrPort{
		pap,
		netip.AddrPortFrom(netip.MustParseAddr("::ffff:127.0.0.1"), pap.Port()),
		netip.MustParseAddrPort("169.254.169.254:80"),
		netip.MustParseAddrPort("0.0.0.0:80"),
		s.Grid()[0][0], // the server's own listener
	} {
		if r := c.do(stun.MethodCreatePermission, peerAddr(ap)); errorCode(r) != 403 {
			t.Errorf("CreatePermission %v: %v code %d, want 403", ap, r.Type, errorCode(r))
		}
	}
	if r := c.do(stun.MethodChannelBind, channelNumber(0x4000), peerAddr(pap)); r.Type.Class != stun.ClassErrorResponse {
		t.Errorf("ChannelBind %v: %v, want an error", pap, r.Type)
	}
	// One refused address among allowed ones refuses the request whole.
	if r := c.do(stun.MethodCreatePermission, peerAddr(netip.MustParseAddrPort("8.8.8.8:53")), peerAddr(pap)); errorCode(r) != 403 {
		t.Errorf("mixed CreatePermission: %v code %d, want 403", r.Type, errorCode(r))
	}

	send, err := stun.Build(stun.TransactionID, stun.NewType(stun.MethodSend, stun.ClassIndication),
		peerAddr(pap), stun.RawAttribute{Type: stun.AttrData, Value: []byte("leak")}, stun.Fingerprint)
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if _, err := c.conn.WriteTo(send.Raw, c.srv); err != nil {
			t.Fatal(err)
		}
	}
	// A permission-free Send must be dropped; a packet would arrive within
	// microseconds on loopback, so this wait is a safety margin.
	_ = peer.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, from, err := peer.ReadFrom(make([]byte, 100)); err == nil {
		t.Fatalf("refused peer received %d bytes from %v", n, from)
	}
	if s.live.refused() == 0 {
		t.Error("refusals not counted")
	}
}

// TestTURNRESTCredentials: the TURN REST API username expiry:user with
// password base64(HMAC-SHA1(secret, username)).
func TestTURNRESTCredentials(t *testing.T) {
	const secret = "shared-secret-for-tests"
	s := startTURNServer(t, func(c *Config) { c.AuthSecrets = []string{secret} })

	user, pass, err := turn.GenerateLongTermTURNRESTCredentials(secret, "dave", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := newTURNClient(t, s, user, pass)
	relay, err := c.Allocate()
	if err != nil {
		t.Fatalf("valid REST credentials refused: %v", err)
	}
	relay.Close()

	expired := strconv.FormatInt(time.Now().Add(-time.Minute).Unix(), 10) + ":dave"
	for name, cred := range map[string][2]string{
		"expired":      {expired, RESTPassword(secret, expired)},
		"wrong secret": {user, RESTPassword("not-the-secret", user)},
		"wrong user":   {user + "x", pass},
		"malformed":    {"dave", RESTPassword(secret, "dave")},
	} {
		c, _ := newTURNClient(t, s, cred[0], cred[1])
		if _, err := c.Allocate(); err == nil {
			t.Errorf("%s: Allocate succeeded", name)
		} else if code := turnErrorCode(err); code != 401 {
			// RFC 8489 §9.2.4: unknown user or bad integrity is 401 (pion
			// v5.1.2 alone answers 400; the front in front.go answers).
			t.Errorf("%s: error %v (code %d), want 401", name, err, code)
		}
	}
}

// TestTURNQuota486: the per-user and the total quota both answer 486
// (RFC 8656 §7.2).
func TestTURNQuota486(t *testing.T) {
	s := startTURNServer(t, func(c *Config) { c.UserQuota, c.TotalQuota = 2, 3 })

	relays := map[string]net.PacketConn{}
	alloc := func(user string) error {
		c, _ := newTURNClient(t, s, user, user+"-pw")
		r, err := c.Allocate()
		if err == nil {
			relays[user] = r
		}

		return err
	}
	for i := range 2 {
		if err := alloc("alice"); err != nil {
			t.Fatalf("alice #%d: %v", i+1, err)
		}
	}
	if err := alloc("alice"); turnErrorCode(err) != 486 {
		t.Fatalf("alice over her quota: %v, want 486", err)
	}
	if err := alloc("bob"); err != nil {
		t.Fatalf("bob: %v", err)
	}
	if err := alloc("carol"); turnErrorCode(err) != 486 {
		t.Fatalf("carol over the total quota: %v, want 486", err)
	}
	if s.AllocationCount() != 3 || s.quotas.Active() != 3 {
		t.Fatalf("allocations: server %d, quotas %d, want 3", s.AllocationCount(), s.quotas.Active())
	}
	rc := newRawClient(t, s, "carol", "carol-pw")
	if r := rc.do(stun.MethodAllocate, requestedTransportUDP); errorCode(r) != 486 {
		t.Fatalf("raw Allocate over the total quota: code %d, want 486", errorCode(r))
	}

	// Closing bob's allocation (Refresh with LIFETIME 0) frees a slot.
	if err := relays["bob"].Close(); err != nil {
		t.Fatal(err)
	}
	// pion's client does not wait for the Refresh answer: poll, bounded.
	for i := 0; i < 100 && s.quotas.Active() != 2; i++ {
		time.Sleep(e2eTimeout / 100)
	}
	if s.AllocationCount() != 2 || s.quotas.Active() != 2 {
		t.Fatalf("after bob's close: server %d, quotas %d, want 2", s.AllocationCount(), s.quotas.Active())
	}
	if r := rc.do(stun.MethodAllocate, requestedTransportUDP); r.Type.Class != stun.ClassSuccessResponse {
		t.Fatalf("carol after a slot was freed: %v code %d", r.Type, errorCode(r))
	}
}

// TestTURNChannelBindRefused403: a ChannelBind toward a refused peer gets 403
// like CreatePermission (RFC 8656 §12.2). pion answers 401;
// the TURN front (front.go) answers 403 before pion sees the request.
func TestTURNChannelBindRefused403(t *testing.T) {
	s := startTURNServer(t, nil)
	c := newRawClient(t, s, "alice", "alice-pw")
	if r := c.do(stun.MethodAllocate, requestedTransportUDP); r.Type.Class != stun.ClassSuccessResponse {
		t.Fatalf("Allocate: %v code %d", r.Type, errorCode(r))
	}
	for _, ap := range []string{"127.0.0.1:9", "10.0.0.1:9", "[::ffff:169.254.169.254]:80"} {
		r := c.do(stun.MethodChannelBind, channelNumber(0x4001), peerAddr(netip.MustParseAddrPort(ap)))
		if errorCode(r) != 403 {
			t.Errorf("ChannelBind %s: %v code %d, want 403", ap, r.Type, errorCode(r))
		}
	}
}
