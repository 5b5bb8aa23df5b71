// Package testutil holds helpers shared by the tests of several packages.
package testutil

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"net"
	"os"
	"sync"
	"testing"
	"time"
)

// SyncBuffer is a bytes.Buffer safe for concurrent writers: it collects a
// server's log lines from its goroutines while the test reads them.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// String returns everything written so far.
func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// CertName is the DNS name in SelfSigned's certificate.
const CertName = "stund.test"

// SelfSigned makes a self-signed ECDSA P-256 certificate for CertName,
// 127.0.0.1 and 127.0.0.2 (the test servers' two IPs), valid from an hour
// ago to an hour from now, and a pool that trusts it.
func SelfSigned(t testing.TB) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	return SelfSignedSerial(t, 1)
}

// SelfSignedSerial is SelfSigned with the given serial number, which tells
// one certificate from another in a test of certificate reloads.
func SelfSignedSerial(t testing.TB, serial int64) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(serial),
		Subject:               pkix.Name{CommonName: CertName},
		DNSNames:              []string{CertName},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1), net.IPv4(127, 0, 0, 2)},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA:                  true,
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool
}

// PEM encodes c's chain and private key as the files stund's --cert and
// --key read.
func PEM(t testing.TB, c tls.Certificate) (certPEM, keyPEM []byte) {
	t.Helper()
	for _, der := range c.Certificate {
		certPEM = append(certPEM, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	der, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	return certPEM, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

// RequireEnv is the variable CI sets so that a test missing something it
// needs (an interop tool, IPv6 loopback, a second loopback address) fails
// instead of skipping: a green CI run must not hide untested code.
const RequireEnv = "STUND_REQUIRE_INTEROP"

// SkipUnlessRequired skips the test with the message, or fails it when
// RequireEnv is set to 1.
func SkipUnlessRequired(tb testing.TB, format string, args ...any) {
	tb.Helper()
	if os.Getenv(RequireEnv) == "1" {
		tb.Fatalf(format+" ("+RequireEnv+"=1: required here)", args...)
	}
	tb.Skipf(format, args...)
}

// UDPBlackHole returns a loopback address whose UDP port is bound but never
// read (requests go unanswered, as when a firewall drops UDP) while TCP on
// the same port is spliced to tcpTarget; with tcpTarget "" TCP is refused
// too. Everything is closed when the test ends.
func UDPBlackHole(tb testing.TB, tcpTarget string) string {
	tb.Helper()
	var wg sync.WaitGroup
	tb.Cleanup(wg.Wait) // runs last: after the listener is closed
	for range 20 {      // a port free for both TCP and UDP, bounded tries
		l, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			tb.Fatal(err)
		}
		u, err := net.ListenPacket("udp4", l.Addr().String())
		if err != nil {
			_ = l.Close()
			continue
		}
		tb.Cleanup(func() { _ = u.Close() })
		if tcpTarget == "" {
			_ = l.Close() // TCP refused
			return l.Addr().String()
		}
		tb.Cleanup(func() { _ = l.Close() })
		wg.Go(func() {
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				wg.Go(func() { splice(c, tcpTarget) })
			}
		})
		return l.Addr().String()
	}
	tb.Fatal("no port free for both UDP and TCP")
	return ""
}

// splice copies between c and a new connection to target until one closes.
func splice(c net.Conn, target string) {
	defer c.Close()
	u, err := net.DialTimeout("tcp", target, 5*time.Second)
	if err != nil {
		return
	}
	defer u.Close()
	done := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(u, c); done <- struct{}{} }()
	go func() { _, _ = io.Copy(c, u); done <- struct{}{} }()
	<-done
}
