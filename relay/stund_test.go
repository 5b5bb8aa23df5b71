package relay

import (
	"crypto/tls"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/stund/stund/internal/testutil"
	"github.com/stund/stund/server"
)

// startStund runs our own server on 127.0.0.1 + 127.0.0.2 with UDP, TCP and
// TLS. AllowPeers opens loopback: the second socket's mapped address (and,
// relay to relay, the relayed addresses) are 127.0.0.1 in tests.
func startStund(t *testing.T, mods ...func(*server.Config)) (*server.Server, Config) {
	t.Helper()
	cert, pool := testutil.SelfSigned(t)
	sc := server.Config{
		PrimaryIP:   netip.MustParseAddr("127.0.0.1"),
		AlternateIP: netip.MustParseAddr("127.0.0.2"),
		TLSConfig:   &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12},
		Realm:       testRealm,
		Users:       map[string]string{testUser: testPass},
		AuthSecrets: []string{testSecret},
		AllowPeers:  []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
	}
	for _, m := range mods {
		m(&sc)
	}
	s, err := server.New(sc)
	if err != nil {
		t.Fatalf("server.New: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	var tlsAddr string
	for _, a := range s.TLSAddrs() {
		if a.Addr() == netip.MustParseAddr("127.0.0.1") {
			tlsAddr = a.String()
		}
	}

	return s, Config{
		Server:    s.Grid()[0][0].String(),
		TLSServer: tlsAddr,
		Username:  testUser,
		Password:  testPass,
		TLSConfig: &tls.Config{RootCAs: pool, ServerName: "stund.test", MinVersion: tls.VersionTLS12},
	}
}

func TestStundProve(t *testing.T) {
	_, cfg := startStund(t)
	for _, tr := range []string{UDP, TCP, TLS} {
		t.Run(tr, func(t *testing.T) {
			p, err := Prove(testCtx(t), cfg, tr)
			checkProof(t, p, err, tr, UDP)
		})
	}
}

func TestStundRESTSecret(t *testing.T) {
	_, cfg := startStund(t)
	cfg.Username, cfg.Password, cfg.Secret = "", "", testSecret
	p, err := Prove(testCtx(t), cfg, UDP)
	checkProof(t, p, err, UDP, UDP)
}

func TestStundWrongPassword(t *testing.T) {
	_, cfg := startStund(t)
	cfg.Password = "wrong"
	p, err := Prove(testCtx(t), cfg)
	if err == nil || p.OK || !errors.Is(err, ErrAuth) {
		t.Fatalf("wrong password: ok=%v err=%v, want ErrAuth", p.OK, err)
	}
	if p.Transport != UDP || !strings.Contains(err.Error(), "password") {
		t.Errorf("transport %s, message %v", p.Transport, err)
	}
	t.Logf("%v", err)
}

// UDP to the advertised port is a black hole; TCP on that port is proxied
// to stund. The UDP attempt must give up within its bound and TCP must
// prove the relay, relay to relay since the peer cannot use UDP either.
func TestStundFallbackWhenUDPBlocked(t *testing.T) {
	s, cfg := startStund(t)
	addr := testutil.UDPBlackHole(t, s.TCPAddrs()[0].String())

	cfg.Server = addr
	cfg.AttemptTimeout = 500 * time.Millisecond
	p, err := Prove(testCtx(t), cfg)
	checkProof(t, p, err, TCP, "relay")
	if p.Err == nil || !strings.Contains(p.Err.Error(), "udp:") {
		t.Errorf("the failed UDP attempt is not reported: %v", p.Err)
	}
}

// A refusal that is not about credentials (486 quota, RFC 8656 §7.2) is the
// server's answer too: no fall-through to TCP, and not ErrAuth.
func TestStundQuotaRefusal(t *testing.T) {
	_, cfg := startStund(t, func(c *server.Config) { c.UserQuota = 1 })
	first, err := Dial(testCtx(t), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer first.Close()
	p, err := Prove(testCtx(t), cfg)
	var re *RefusedError
	if err == nil || p.OK || !errors.As(err, &re) || re.Code != 486 || errors.Is(err, ErrAuth) {
		t.Fatalf("ok=%v err=%v, want a 486 refusal", p.OK, err)
	}
	if p.Transport != UDP {
		t.Errorf("fell through to %s after a 486", p.Transport)
	}
	t.Logf("%v", err)
}

// longRealm is a realm an operator might well choose. Its 401 (20-byte
// header, ERROR-CODE, REALM, NONCE, FINGERPRINT) is 80 bytes: over twice
// a bare 36-byte Allocate, so stund's amplification budget (an
// unauthenticated UDP reply is at most twice the request, so that stund
// cannot be used to reflect traffic at a spoofed source) drops it over UDP
// unless the request carries SOFTWARE.
const longRealm = "voip.telecom-provider.example.net"

// TestStundLongRealm: with a long realm the relay still works over UDP,
// because our requests carry SOFTWARE and so earn a 401 big enough for it.
func TestStundLongRealm(t *testing.T) {
	_, cfg := startStund(t, func(c *server.Config) { c.Realm = longRealm })
	for _, sw := range []string{"natprobe/dev probe-id=0123abcd", ""} {
		t.Run("software="+sw, func(t *testing.T) {
			cfg := cfg
			cfg.Software = sw
			cfg.AttemptTimeout = 2 * time.Second
			p, err := Prove(testCtx(t), cfg, UDP)
			checkProof(t, p, err, UDP, UDP)
		})
	}
}
