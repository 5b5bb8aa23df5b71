package certreload

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stund/stund/internal/testutil"
)

// pair makes a PEM certificate and key for the loopback addresses with
// serial.
func pair(t *testing.T, serial int64) (certPEM, keyPEM []byte) {
	t.Helper()
	c, _ := testutil.SelfSignedSerial(t, serial)
	return testutil.PEM(t, c)
}

// files holds the cert and key paths a Reloader reads; each write moves
// the mtime on, so that a rewrite of equal size is seen even where the
// clock is coarse.
type files struct {
	t         *testing.T
	cert, key string
	gen       int
}

func (f *files) write(certPEM, keyPEM []byte) {
	f.t.Helper()
	f.gen++
	mt := time.Now().Add(time.Duration(f.gen) * time.Minute)
	for _, w := range []struct {
		path string
		b    []byte
	}{{f.cert, certPEM}, {f.key, keyPEM}} {
		if w.b == nil {
			continue
		}
		if err := os.WriteFile(w.path, w.b, 0o600); err != nil {
			f.t.Fatal(err)
		}
		if err := os.Chtimes(w.path, mt, mt); err != nil {
			f.t.Fatal(err)
		}
	}
}

// serveTLS runs a TLS echo server on loopback that takes its certificate
// from r.
func serveTLS(t *testing.T, r *Reloader) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{GetCertificate: r.GetCertificate, MinVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	return ln.Addr().String()
}

// dial completes a handshake and returns the connection and the serial
// of the certificate the server presented.
func dial(t *testing.T, addr string) (*tls.Conn, int64) {
	t.Helper()
	d := &net.Dialer{Timeout: 10 * time.Second}
	// The test checks which certificate is presented, not trust.
	c, err := tls.DialWithDialer(d, "tcp", addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, c.ConnectionState().PeerCertificates[0].SerialNumber.Int64()
}

func echo(t *testing.T, c *tls.Conn) {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 4)
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "ping" {
		t.Fatalf("echo on the open connection: %q %v", b, err)
	}
}

func setup(t *testing.T) (*files, *Reloader, *testutil.SyncBuffer, string) {
	t.Helper()
	dir := t.TempDir()
	f := &files{t: t, cert: filepath.Join(dir, "cert.pem"), key: filepath.Join(dir, "key.pem")}
	f.write(pair(t, 1))
	log := &testutil.SyncBuffer{}
	r, err := New(f.cert, f.key, slog.New(slog.NewTextHandler(log, nil)))
	if err != nil {
		t.Fatal(err)
	}
	return f, r, log, serveTLS(t, r)
}

// TestReload: after the files are swapped and Reload runs (SIGHUP), a new
// handshake gets the new serial while the connection made before keeps
// working; a broken certificate, a key that does not match, or a missing
// file keep the last good certificate, with one log line that says why.
func TestReload(t *testing.T) {
	f, r, log, addr := setup(t)
	old, serial := dial(t, addr)
	if serial != 1 {
		t.Fatalf("first handshake: serial %d, want 1", serial)
	}

	f.write(pair(t, 2))
	if err := r.Reload(); err != nil {
		t.Fatal(err)
	}
	if _, serial := dial(t, addr); serial != 2 {
		t.Fatalf("after the swap: serial %d, want 2", serial)
	}
	echo(t, old)
	if s := old.ConnectionState().PeerCertificates[0].SerialNumber.Int64(); s != 1 {
		t.Errorf("the open connection's certificate changed to %d", s)
	}

	c3, k3 := pair(t, 3)
	_, k4 := pair(t, 4)
	for _, bad := range []struct {
		name      string
		cert, key []byte
		why       string
	}{
		{"garbage certificate", []byte("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"), k3, "certificate"},
		{"truncated key", c3, k3[:40], "key"},
		{"key of another certificate", c3, k4, "private key does not match public key"},
	} {
		before := strings.Count(log.String(), "\n")
		f.write(bad.cert, bad.key)
		err := r.Reload()
		if err == nil || !strings.Contains(err.Error(), bad.why) {
			t.Errorf("%s: Reload error %v, want one naming %q", bad.name, err, bad.why)
		}
		if _, serial := dial(t, addr); serial != 2 {
			t.Errorf("%s: serial %d served, want the old 2", bad.name, serial)
		}
		lines := strings.Split(strings.TrimSpace(log.String()), "\n")[before:]
		if len(lines) != 1 || !strings.Contains(lines[0], "reload failed") || !strings.Contains(lines[0], "serial=2") {
			t.Errorf("%s: log %q, want one line saying the old serial 2 stays", bad.name, lines)
		}
	}
	if err := os.Remove(f.key); err != nil {
		t.Fatal(err)
	}
	if err := r.Reload(); err == nil {
		t.Error("Reload with the key missing succeeded")
	}
	if ok, failed := r.Loads(); ok != 1 || failed != 4 {
		t.Errorf("Loads() = %d ok, %d failed; want 1, 4", ok, failed)
	}
}

// TestPoll: each poll compares the files with what was loaded; a change
// is loaded, no change loads nothing, and a broken pair is tried and
// logged once, not on every poll.
func TestPoll(t *testing.T) {
	f, r, log, addr := setup(t)
	r.poll()
	if ok, failed := r.Loads(); ok != 0 || failed != 0 {
		t.Fatalf("unchanged files were reloaded: %d ok, %d failed", ok, failed)
	}
	f.write(pair(t, 5))
	r.poll()
	if _, serial := dial(t, addr); serial != 5 {
		t.Fatalf("after the files changed: serial %d, want 5", serial)
	}

	// A renewal that writes the certificate first: the half-done pair
	// fails once and loads when the key follows.
	c6, k6 := pair(t, 6)
	f.write(c6, nil)
	r.poll()
	r.poll()
	if ok, failed := r.Loads(); ok != 1 || failed != 1 {
		t.Errorf("half-written pair: %d ok, %d failed; want 1, 1 (tried once, not per poll)", ok, failed)
	}
	if _, serial := dial(t, addr); serial != 5 {
		t.Errorf("half-written pair: serial %d, want the old 5", serial)
	}
	f.write(nil, k6)
	r.poll()
	if _, serial := dial(t, addr); serial != 6 {
		t.Errorf("after the key followed: serial %d, want 6", serial)
	}
	if n := strings.Count(log.String(), "reload failed"); n != 1 {
		t.Errorf("%d failure lines, want 1:\n%s", n, log.String())
	}

	// A file removed for a swap is waited for, not reported.
	if err := os.Remove(f.cert); err != nil {
		t.Fatal(err)
	}
	r.poll()
	if ok, failed := r.Loads(); ok != 2 || failed != 1 {
		t.Errorf("missing file: %d ok, %d failed; want 2, 1 (not tried)", ok, failed)
	}
	c7, k7 := pair(t, 7)
	f.write(c7, k7)
	r.poll()
	if _, serial := dial(t, addr); serial != 7 {
		t.Errorf("after the swap completed: serial %d, want 7", serial)
	}
}

// TestWatch: a tick polls, and the watch ends with its context.
func TestWatch(t *testing.T) {
	f, r, _, addr := setup(t)
	tick := make(chan time.Time)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.watch(ctx, tick); close(done) }()
	f.write(pair(t, 8))
	tick <- time.Time{} // received: the poll runs before the loop looks at ctx again
	cancel()
	<-done
	if _, serial := dial(t, addr); serial != 8 {
		t.Errorf("after a tick: serial %d, want 8", serial)
	}
}

// TestNewRefusesBadPair: at start there is no old certificate to keep.
func TestNewRefusesBadPair(t *testing.T) {
	dir := t.TempDir()
	c, _ := pair(t, 1)
	_, k := pair(t, 2)
	cf, kf := filepath.Join(dir, "c"), filepath.Join(dir, "k")
	if err := os.WriteFile(cf, c, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(kf, k, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := New(cf, kf, nil); err == nil {
		t.Error("New accepted a key that does not match")
	}
	if _, err := New(cf, filepath.Join(dir, "missing"), nil); err == nil {
		t.Error("New accepted a missing key")
	}
}
