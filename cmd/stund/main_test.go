package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/pion/logging"
	"github.com/pion/turn/v5"
	"github.com/stund/stund/internal/testutil"
)

// testTimeout bounds every wait: loopback answers in microseconds.
const testTimeout = 10 * time.Second

func runArgs(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var o, e bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	code = run(ctx, append([]string{"stund"}, args...), &o, &e)
	return code, o.String(), e.String()
}

func TestVersion(t *testing.T) {
	code, out, _ := runArgs(t, "--version")
	if code != 0 || !strings.Contains(out, "stund version "+version) {
		t.Fatalf("--version: code %d, output %q", code, out)
	}
}

// TestCompletion: --generate-bash-completion (what urfave/cli's
// bash_autocomplete script runs) lists every flag for "stund <TAB>", the
// flags matching a prefix, and the values of --log-level/--log-format. It
// reads run's args, not os.Args.
func TestCompletion(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{nil, "--config\n--primary-ip\n"}, // a prefix of the full list, checked below
		{[]string{"--met"}, "--metrics\n"},
		{[]string{"--max"}, "--max-bps\n--max-conns-per-ip\n"},
		{[]string{"--log-level"}, "debug\ninfo\nwarn\nerror\n"},
		{[]string{"--log-level", "w"}, "warn\n"},
		{[]string{"--log-format", ""}, "text\njson\n"},
	} {
		code, out, _ := runArgs(t, append(tc.args, "--generate-bash-completion")...)
		if code != 0 || !strings.HasPrefix(out, tc.want) || (tc.args != nil && out != tc.want) {
			t.Errorf("%q: code %d, completions %q, want %q", tc.args, code, out, tc.want)
		}
		if tc.args != nil {
			continue
		}
		got := strings.Split(strings.TrimSpace(out), "\n")
		for _, f := range flags() {
			if !slices.Contains(got, "--"+f.Names()[0]) {
				t.Errorf("all flags: %q lacks --%s", out, f.Names()[0])
			}
		}
	}
}

// TestBadConfigExit2: bad values exit 2 and name the flag (and the YAML line).
func TestBadConfigExit2(t *testing.T) {
	dir := t.TempDir()
	yml := filepath.Join(dir, "stund.yaml")
	if err := os.WriteFile(yml, []byte("realm: x\nmetrics: not-an-address\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, _, errOut := runArgs(t, "--config", yml)
	if code != exitUsage || !strings.Contains(errOut, "metrics") || !strings.Contains(errOut, "line 2") {
		t.Errorf("bad metrics in YAML: code %d, stderr %q", code, errOut)
	}
	code, _, errOut = runArgs(t, "--metrics", "127.0.0.1:99999")
	if code != exitUsage || !strings.Contains(errOut, "metrics") {
		t.Errorf("bad --metrics: code %d, stderr %q", code, errOut)
	}
	if err := os.WriteFile(yml, []byte("realm: x\nmetricz: 1\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, _, errOut = runArgs(t, "--config", yml)
	if code != exitUsage || !strings.Contains(errOut, "line 2") {
		t.Errorf("unknown key: code %d, stderr %q", code, errOut)
	}
	if err := os.WriteFile(yml, []byte("realm: x\nio-uring: sometimes\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, _, errOut = runArgs(t, "--config", yml)
	if code != exitUsage || !strings.Contains(errOut, "io-uring") || !strings.Contains(errOut, "line 2") {
		t.Errorf("bad io-uring in YAML: code %d, stderr %q", code, errOut)
	}
}

// freeUDPPorts returns two UDP ports free on 127.0.0.1 and 127.0.0.2 at the
// moment of asking (the caller retries when it loses a race).
func freeUDPPorts(t *testing.T) (int, int) {
	t.Helper()
	var ports []int
	for len(ports) < 2 {
		c, err := net.ListenPacket("udp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		p := c.LocalAddr().(*net.UDPAddr).Port
		c2, err := net.ListenPacket("udp4", fmt.Sprintf("127.0.0.2:%d", p))
		if err == nil {
			c2.Close()
			if len(ports) == 0 || ports[0] != p {
				ports = append(ports, p)
			}
		}
		c.Close()
	}
	return ports[0], ports[1]
}

var adminRE = regexp.MustCompile(`admin on (http://[0-9.:]+)`)

// startStund runs stund in-process until the test ends; it returns the
// admin URL and the primary UDP address.
func startStund(t *testing.T, args ...string) (admin string, primary string, out *testutil.SyncBuffer) {
	t.Helper()
	for try := 0; try < 5; try++ {
		p, q := freeUDPPorts(t)
		out = &testutil.SyncBuffer{}
		errOut := &testutil.SyncBuffer{}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan int, 1)
		full := append([]string{"stund", "--no-tcp", "--port", strconv.Itoa(p), "--alt-port", strconv.Itoa(q), "--metrics", "127.0.0.1:0"}, args...)
		go func() { done <- run(ctx, full, out, errOut) }()
		deadline := time.Now().Add(testTimeout)
		for time.Now().Before(deadline) && !strings.Contains(out.String(), "listening on") {
			select {
			case code := <-done:
				cancel()
				if strings.Contains(errOut.String(), "address already in use") {
					goto retry
				}
				t.Fatalf("stund exited %d: %s", code, errOut.String())
			case <-time.After(10 * time.Millisecond):
			}
		}
		if !strings.Contains(out.String(), "listening on") {
			cancel()
			t.Fatalf("stund did not start: %s %s", out.String(), errOut.String())
		}
		t.Cleanup(func() {
			cancel()
			select {
			case code := <-done:
				if code != 0 {
					t.Errorf("stund exited %d: %s", code, errOut.String())
				}
			case <-time.After(testTimeout):
				t.Error("stund did not stop")
			}
		})
		return adminRE.FindStringSubmatch(out.String())[1], fmt.Sprintf("127.0.0.1:%d", p), out
	retry:
	}
	t.Fatal("no free ports after 5 tries")
	return
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: testTimeout}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// metric returns the value of one exposition line ("name{labels}") or -1.
func metric(t *testing.T, admin, series string) float64 {
	t.Helper()
	_, body := httpGet(t, admin+"/metrics")
	for _, line := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err == nil {
				return f
			}
		}
	}
	return -1
}

func waitSeries(t *testing.T, admin, series string, want float64) {
	t.Helper()
	for i := 0; i < 500; i++ {
		if metric(t, admin, series) == want {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s = %v, want %v", series, metric(t, admin, series), want)
}

func allocate(t *testing.T, server, user, pass string) (net.PacketConn, error) {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return turnClient(t, server, user, pass, pc).Allocate()
}

// turnClient is pion's TURN client on conn (UDP, or TCP through
// turn.NewSTUNConn) with its logging off; it and conn are closed when the
// test ends.
func turnClient(t *testing.T, server, user, pass string, conn net.PacketConn) *turn.Client {
	t.Helper()
	lf := logging.NewDefaultLoggerFactory()
	lf.DefaultLogLevel = logging.LogLevelDisabled
	c, err := turn.NewClient(&turn.ClientConfig{
		STUNServerAddr: server, TURNServerAddr: server,
		Username: user, Password: pass, Realm: "stund.test",
		Conn: conn, LoggerFactory: lf, RTO: 100 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Listen(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); conn.Close() })
	return c
}

// TestServeMetricsAndSIGHUP: stund from the command line serves the admin
// endpoints, and a real SIGHUP re-reads the YAML file and the environment:
// the live allocation stays, a removed user cannot allocate, a new secret
// from the environment works, and a broken file keeps the old settings.
func TestServeMetricsAndSIGHUP(t *testing.T) {
	dir := t.TempDir()
	yml := filepath.Join(dir, "stund.yaml")
	write := func(s string) {
		if err := os.WriteFile(yml, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("realm: stund.test\nuser:\n  - alice:alice-pw\n")
	admin, primary, out := startStund(t, "--config", yml)

	if code, body := httpGet(t, admin+"/healthz"); code != 200 {
		t.Errorf("/healthz %d %q", code, body)
	}
	if code, body := httpGet(t, admin+"/readyz"); code != 200 {
		t.Errorf("/readyz %d %q", code, body)
	}
	if v := metric(t, admin, `stund_build_info{goversion="`+runtime.Version()+`",version="`+version+`"}`); v != 1 {
		t.Errorf("stund_build_info = %v", v)
	}

	relay, err := allocate(t, primary, "alice", "alice-pw")
	if err != nil {
		t.Fatalf("alice: %v", err)
	}
	defer relay.Close()
	waitSeries(t, admin, "stund_allocations_active", 1)

	// Reload: alice removed, bob added; a REST secret from the environment.
	write("realm: stund.test\nuser:\n  - bob:bob-pw\n")
	t.Setenv("STUND_AUTH_SECRET", "env-secret")
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitSeries(t, admin, `stund_reloads_total{result="ok"}`, 1)
	if v := metric(t, admin, "stund_allocations_active"); v != 1 {
		t.Errorf("allocations after reload: %v, want alice's still live", v)
	}
	if _, err := allocate(t, primary, "alice", "alice-pw"); err == nil {
		t.Error("removed user alice allocated after SIGHUP")
	}
	if r, err := allocate(t, primary, "bob", "bob-pw"); err != nil {
		t.Errorf("bob after SIGHUP: %v", err)
	} else {
		r.Close()
	}
	u, p, _ := turn.GenerateLongTermTURNRESTCredentials("env-secret", "dave", time.Hour)
	if r, err := allocate(t, primary, u, p); err != nil {
		t.Errorf("REST credentials from the reloaded environment: %v", err)
	} else {
		r.Close()
	}

	// A broken file: logged, counted, old settings kept.
	write("realm: stund.test\nuser: [bob:bob-pw\n")
	if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	waitSeries(t, admin, `stund_reloads_total{result="error"}`, 1)
	if r, err := allocate(t, primary, "bob", "bob-pw"); err != nil {
		t.Errorf("bob after a failed reload: %v", err)
	} else {
		r.Close()
	}
	_ = out
}
