package relay

import (
	"context"
	"crypto/hmac"
	"crypto/sha1"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pion/stun/v4"
	"github.com/pion/turn/v5"
	"github.com/stund/stund/internal/stunwire"
	"github.com/stund/stund/internal/testutil"
)

const (
	testUser   = "alice"
	testPass   = "s3cret"
	testSecret = "rest-shared-secret"
	testRealm  = "stund.test"
)

// testServer is a TURN server on loopback: UDP and TCP on the same port,
// TLS on another. udpBlackhole replaces the UDP listener with a socket that
// never answers (UDP "blocked").
type testServer struct {
	port, tlsPort int
	rootCAs       *x509.CertPool
}

func (s *testServer) cfg(transport string) Config {
	return Config{
		Server:    "127.0.0.1:" + strconv.Itoa(s.port),
		TLSServer: "127.0.0.1:" + strconv.Itoa(s.tlsPort),
		Transport: transport,
		Username:  testUser,
		Password:  testPass,
		TLSConfig: &tls.Config{RootCAs: s.rootCAs, ServerName: "stund.test", MinVersion: tls.VersionTLS12},
	}
}

func startServer(t *testing.T, udpBlackhole bool) *testServer {
	t.Helper()
	var tcpL net.Listener
	var udpC net.PacketConn
	// A free TCP port may be taken for UDP; retry a few times (bounded).
	for range 20 {
		l, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		u, err := net.ListenPacket("udp4", l.Addr().String())
		if err == nil {
			tcpL, udpC = l, u

			break
		}
		_ = l.Close()
	}
	if tcpL == nil {
		t.Fatal("no port free for both UDP and TCP")
	}
	cert, pool := testutil.SelfSigned(t)
	tlsL, err := tls.Listen("tcp4", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatal(err)
	}
	gen := func() turn.RelayAddressGenerator {
		return &turn.RelayAddressGeneratorStatic{RelayAddress: net.ParseIP("127.0.0.1"), Address: "127.0.0.1"}
	}
	auth := func(ra *turn.RequestAttributes) (string, []byte, bool) {
		if ra.Username == testUser {
			return ra.Username, turn.GenerateAuthKey(testUser, ra.Realm, testPass), true
		}
		// TURN REST: "expiry:user", password base64(HMAC-SHA1(secret, username)).
		exp, _, ok := strings.Cut(ra.Username, ":")
		if !ok {
			return "", nil, false
		}
		if e, err := strconv.ParseInt(exp, 10, 64); err != nil || e < time.Now().Unix() {
			return "", nil, false
		}
		_, pass, err := restPassword(ra.Username)
		if err != nil {
			return "", nil, false
		}

		return ra.Username, turn.GenerateAuthKey(ra.Username, ra.Realm, pass), true
	}
	sc := turn.ServerConfig{
		Realm:       testRealm,
		AuthHandler: auth,
		ListenerConfigs: []turn.ListenerConfig{
			{Listener: tcpL, RelayAddressGenerator: gen()},
			{Listener: tlsL, RelayAddressGenerator: gen()},
		},
	}
	if udpBlackhole {
		// Keep the port bound so nothing else answers there, and never read.
		t.Cleanup(func() { _ = udpC.Close() })
	} else {
		sc.PacketConnConfigs = []turn.PacketConnConfig{{PacketConn: udpC, RelayAddressGenerator: gen()}}
	}
	srv, err := turn.NewServer(sc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })

	return &testServer{
		port:    tcpL.Addr().(*net.TCPAddr).Port,
		tlsPort: tlsL.Addr().(*net.TCPAddr).Port,
		rootCAs: pool,
	}
}

// restPassword recomputes what the server expects for a REST username.
func restPassword(username string) (string, string, error) {
	mac := hmacSHA1B64(testSecret, username)

	return username, mac, nil
}

// testCtx is a safety net, not an assertion.
func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)

	return ctx
}

func checkProof(t *testing.T, p *Proof, err error, transport, peerKind string) {
	t.Helper()
	if err != nil || !p.OK {
		t.Fatalf("proof over %s failed: ok=%v err=%v", transport, p.OK, err)
	}
	if p.Transport != transport || p.Peer != peerKind {
		t.Errorf("transport=%s peer=%s, want %s and %s", p.Transport, p.Peer, transport, peerKind)
	}
	if p.Sent != probeCount || p.Received == 0 || p.Received > p.Sent || p.Reached < p.Received {
		t.Errorf("sent=%d reached=%d received=%d", p.Sent, p.Reached, p.Received)
	}
	if p.RTT <= 0 {
		t.Errorf("rtt=%v, want > 0", p.RTT)
	}
	if want := 1 - float64(p.Received)/float64(p.Sent); p.Loss != want {
		t.Errorf("loss=%v, want %v", p.Loss, want)
	}
	if !p.RelayedAddr.IsValid() || p.RelayedAddr.Addr() != netip.MustParseAddr("127.0.0.1") || p.RelayedAddr.Port() == 0 {
		t.Errorf("relayed address %v", p.RelayedAddr)
	}
	if !p.PeerAddr.IsValid() {
		t.Errorf("peer address %v", p.PeerAddr)
	}
	t.Logf("%s: relayed %v peer %s %v rtt %v loss %.0f%%", transport, p.RelayedAddr, p.Peer, p.PeerAddr, p.RTT, 100*p.Loss)
}

func TestProveUDP(t *testing.T) {
	s := startServer(t, false)
	p, err := Prove(testCtx(t), s.cfg(""), UDP)
	checkProof(t, p, err, UDP, UDP)
	if p.Received != probeCount {
		// Loopback loses nothing unless the relay does.
		t.Errorf("received %d of %d on loopback", p.Received, probeCount)
	}
}

func TestProveTCP(t *testing.T) {
	s := startServer(t, false)
	p, err := Prove(testCtx(t), s.cfg(""), TCP)
	checkProof(t, p, err, TCP, UDP)
}

func TestProveTLS(t *testing.T) {
	s := startServer(t, false)
	p, err := Prove(testCtx(t), s.cfg(""), TLS)
	checkProof(t, p, err, TLS, UDP)
}

func TestProveTLSUntrustedCert(t *testing.T) {
	s := startServer(t, false)
	cfg := s.cfg("")
	cfg.TLSConfig = &tls.Config{ServerName: "stund.test", MinVersion: tls.VersionTLS12} // system roots only
	p, err := Prove(testCtx(t), cfg, TLS)
	if err == nil || p.OK {
		t.Fatalf("self-signed certificate accepted: %+v", p)
	}
	if !strings.Contains(err.Error(), "TLS handshake") {
		t.Errorf("error does not say TLS handshake: %v", err)
	}
}

func TestProveRESTSecret(t *testing.T) {
	s := startServer(t, false)
	cfg := s.cfg("")
	cfg.Username, cfg.Password, cfg.Secret = "", "", testSecret
	p, err := Prove(testCtx(t), cfg, UDP)
	checkProof(t, p, err, UDP, UDP)

	cfg.Secret = "not-the-secret"
	p, err = Prove(testCtx(t), cfg, UDP)
	if err == nil || p.OK || !errors.Is(err, ErrAuth) {
		t.Fatalf("wrong REST secret: ok=%v err=%v, want ErrAuth", p.OK, err)
	}
}

func TestProveWrongPassword(t *testing.T) {
	s := startServer(t, false)
	cfg := s.cfg("")
	cfg.Password = "wrong"
	p, err := Prove(testCtx(t), cfg) // all transports: a 401 must not fall through
	if err == nil || p.OK {
		t.Fatalf("wrong password proved a relay: %+v", p)
	}
	if !errors.Is(err, ErrAuth) || !errors.Is(p.Err, ErrAuth) {
		t.Errorf("error is not ErrAuth: %v", err)
	}
	if !strings.Contains(err.Error(), "password") {
		t.Errorf("message does not explain: %v", err)
	}
	if p.Transport != UDP {
		t.Errorf("fell through to %s after a 401", p.Transport)
	}
}

func TestProveNoCredentials(t *testing.T) {
	s := startServer(t, false)
	cfg := s.cfg(UDP)
	cfg.Username, cfg.Password = "", ""
	_, err := Prove(testCtx(t), cfg, UDP)
	if err == nil || !strings.Contains(err.Error(), "credentials") {
		t.Fatalf("err=%v, want a missing-credentials error", err)
	}
}

// UDP to the server goes into a black hole: the UDP attempt must give up
// within its bound, TCP must then succeed, and since the second socket
// cannot reach the server over UDP either, it proves through a second
// allocation.
func TestProveFallbackWhenUDPBlocked(t *testing.T) {
	s := startServer(t, true)
	cfg := s.cfg("")
	cfg.AttemptTimeout = 500 * time.Millisecond
	start := time.Now()
	p, err := Prove(testCtx(t), cfg)
	checkProof(t, p, err, TCP, "relay")
	if p.Err == nil || !strings.Contains(p.Err.Error(), "udp:") {
		t.Errorf("the failed UDP attempt is not reported: %v", p.Err)
	}
	t.Logf("fallback took %v", time.Since(start))
}

func TestDialPacketConn(t *testing.T) {
	s := startServer(t, false)
	ctx := testCtx(t)
	r, err := Dial(ctx, s.cfg(UDP))
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if r.Transport() != UDP || r.RelayedAddr() != stunwire.Unmap(r.PacketConn().LocalAddr().(*net.UDPAddr).AddrPort()) {
		t.Fatalf("relay %s %v", r.Transport(), r.RelayedAddr())
	}
	// A plain peer on loopback talks to the relayed address both ways.
	peer, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	pa := peer.LocalAddr().(*net.UDPAddr).AddrPort()
	if err := r.Permit(ctx, pa); err != nil {
		t.Fatal(err)
	}
	_ = peer.SetDeadline(time.Now().Add(5 * time.Second))
	_ = r.PacketConn().SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := peer.WriteTo([]byte("ping"), net.UDPAddrFromAddrPort(r.RelayedAddr())); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 100)
	n, from, err := r.PacketConn().ReadFrom(buf)
	if err != nil || string(buf[:n]) != "ping" || from.(*net.UDPAddr).AddrPort() != pa {
		t.Fatalf("relay read %q from %v: %v", buf[:n], from, err)
	}
	if _, err := r.PacketConn().WriteTo([]byte("pong"), from); err != nil {
		t.Fatal(err)
	}
	n, from, err = peer.ReadFrom(buf)
	if err != nil || string(buf[:n]) != "pong" || stunwire.Unmap(from.(*net.UDPAddr).AddrPort()) != r.RelayedAddr() {
		t.Fatalf("peer read %q from %v: %v", buf[:n], from, err)
	}
	r.Close()
	r.Close() // idempotent
}

func TestWithDefaultPort(t *testing.T) {
	for _, c := range []struct{ in, tls, want, wantTLS string }{
		{"example.net", "", "example.net:3478", "example.net:5349"},
		{"example.net:3480", "", "example.net:3480", "example.net:5349"},
		{"[2001:db8::1]", "", "[2001:db8::1]:3478", "[2001:db8::1]:5349"},
		{"2001:db8::1", "", "[2001:db8::1]:3478", "[2001:db8::1]:5349"},
		{"[2001:db8::1]:1", "turns.example.net:443", "[2001:db8::1]:1", "turns.example.net:443"},
	} {
		cfg := Config{Server: c.in, TLSServer: c.tls}
		got, err := cfg.address(UDP)
		gotTLS, errTLS := cfg.address(TLS)
		if err != nil || errTLS != nil || got != c.want || gotTLS != c.wantTLS {
			t.Errorf("%q: %q %q (%v %v), want %q %q", c.in, got, gotTLS, err, errTLS, c.want, c.wantTLS)
		}
	}
	if _, err := (&Config{Server: "h:99999"}).address(UDP); err == nil {
		t.Error("port 99999 accepted")
	}
}

func hmacSHA1B64(secret, msg string) string {
	m := hmac.New(sha1.New, []byte(secret))
	m.Write([]byte(msg))

	return base64.StdEncoding.EncodeToString(m.Sum(nil))
}

// withSoftware adds SOFTWARE to a bare request, keeping FINGERPRINT last
// and valid; it leaves signed requests, answers and non-STUN data alone.
func TestWithSoftware(t *testing.T) {
	sw := stun.NewSoftware("natprobe/dev probe-id=0123abcd")
	bare := stun.MustBuild(stun.TransactionID, stun.NewType(stun.MethodAllocate, stun.ClassRequest), stun.Fingerprint)
	q, ok := withSoftware(bare.Raw, sw)
	if !ok {
		t.Fatal("bare Allocate not rewritten")
	}
	m := &stun.Message{Raw: q}
	if err := m.Decode(); err != nil {
		t.Fatal(err)
	}
	var got stun.Software
	if err := got.GetFrom(m); err != nil || got.String() != sw.String() {
		t.Errorf("SOFTWARE %q (%v)", got, err)
	}
	if err := stun.Fingerprint.Check(m); err != nil || m.Attributes[len(m.Attributes)-1].Type != stun.AttrFingerprint {
		t.Errorf("FINGERPRINT not last or invalid: %v %v", err, m.Attributes)
	}
	if m.TransactionID != bare.TransactionID || m.Type != bare.Type {
		t.Errorf("header changed: %v", m)
	}
	signed := stun.MustBuild(stun.TransactionID, stun.NewType(stun.MethodAllocate, stun.ClassRequest),
		stun.NewUsername("u"), stun.NewShortTermIntegrity("p"), stun.Fingerprint)
	answer := stun.MustBuild(stun.TransactionID, stun.BindingSuccess)
	for name, p := range map[string][]byte{"signed": signed.Raw, "answer": answer.Raw, "channeldata": {0x40, 0, 0, 4, 1, 2, 3, 4}, "software already": q} {
		if _, ok := withSoftware(p, sw); ok {
			t.Errorf("%s rewritten", name)
		}
	}
}
