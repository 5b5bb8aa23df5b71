package main

import (
	"crypto/tls"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stund/stund/internal/testutil"
)

// freeTLSPort is a TCP port free on both test IPs at the moment of asking.
func freeTLSPort(t *testing.T) int {
	t.Helper()
	for range 20 {
		l, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		p := l.Addr().(*net.TCPAddr).Port
		l2, err := net.Listen("tcp4", fmt.Sprintf("127.0.0.2:%d", p))
		l.Close()
		if err == nil {
			l2.Close()
			return p
		}
	}
	t.Fatal("no TCP port free on both 127.0.0.1 and 127.0.0.2")
	return 0
}

// servedSerial is the serial of the certificate a new TLS handshake with
// addr gets.
func servedSerial(t *testing.T, addr string) int64 {
	t.Helper()
	d := &net.Dialer{Timeout: testTimeout}
	// Which certificate is presented is the question, not trust.
	c, err := tls.DialWithDialer(d, "tcp", addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatalf("TLS handshake with %s: %v", addr, err)
	}
	defer c.Close()
	return c.ConnectionState().PeerCertificates[0].SerialNumber.Int64()
}

// TestCertReloadSIGHUP: stund's TLS listener serves a certificate swapped
// on disk after SIGHUP; a broken file then keeps it, counted and logged;
// the expiry metric follows the certificate served.
func TestCertReloadSIGHUP(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	install := func(serial int64) time.Time {
		c, _ := testutil.SelfSignedSerial(t, serial)
		cp, kp := testutil.PEM(t, c)
		if err := os.WriteFile(certFile, cp, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(keyFile, kp, 0o600); err != nil {
			t.Fatal(err)
		}
		return c.Leaf.NotAfter
	}
	install(11)
	port := freeTLSPort(t)
	adminURL, _, _ := startStund(t, "--cert", certFile, "--key", keyFile, "--tls-port", strconv.Itoa(port))
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	if s := servedSerial(t, addr); s != 11 {
		t.Fatalf("serial %d at start, want 11", s)
	}

	notAfter := install(12)
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if !waitFor(func() bool { return servedSerial(t, addr) == 12 }) {
		t.Fatal("the new certificate is not served after SIGHUP")
	}
	if v := metric(t, adminURL, "stund_tls_certificate_expiry_timestamp_seconds"); v != float64(notAfter.Unix()) {
		t.Errorf("expiry metric %v, want %d", v, notAfter.Unix())
	}

	if err := os.WriteFile(certFile, []byte("not a certificate\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if !waitFor(func() bool { return metric(t, adminURL, `stund_tls_certificate_reloads_total{result="error"}`) >= 1 }) {
		t.Fatal("the broken certificate was not counted as a failed reload")
	}
	if s := servedSerial(t, addr); s != 12 {
		t.Errorf("serial %d after a broken file, want the old 12", s)
	}
}

// TestCertBadAtStart: a pair that does not load stops stund before it
// binds, naming --cert.
func TestCertBadAtStart(t *testing.T) {
	dir := t.TempDir()
	a, _ := testutil.SelfSignedSerial(t, 1)
	b, _ := testutil.SelfSignedSerial(t, 2)
	cp, _ := testutil.PEM(t, a)
	_, kp := testutil.PEM(t, b)
	certFile, keyFile := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(certFile, cp, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, kp, 0o600); err != nil {
		t.Fatal(err)
	}
	code, out, errOut := runArgs(t, "--no-tcp", "--cert", certFile, "--key", keyFile)
	if code != exitUsage || !strings.Contains(errOut, "cert:") || strings.Contains(out, "listening on") {
		t.Errorf("mismatched key: exit %d, stderr %q", code, errOut)
	}
}
