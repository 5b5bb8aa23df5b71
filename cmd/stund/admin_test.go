package main

import (
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/stund/stund/server/admin"
)

// apiStatus is the status of GET /allocations with token ("" sends none).
func apiStatus(t *testing.T, adminURL, token string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, adminURL+"/allocations", nil)
	if err != nil {
		t.Fatal(err)
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := (&http.Client{Timeout: testTimeout}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestAdminTokenOff: without a token the API paths are 404 and say how
// to turn the API on; /readyz answers JSON.
func TestAdminTokenOff(t *testing.T) {
	adminURL, _, out := startStund(t)
	if code, body := apiStatus(t, adminURL, "anything-at-all-16"); code != 404 || body != admin.APIOff {
		t.Errorf("API without --admin-token: %d %q", code, body)
	}
	if strings.Contains(out.String(), "/allocations") {
		t.Errorf("start-up line announces the API while it is off: %q", out.String())
	}
	if code, body := httpGet(t, adminURL+"/readyz"); code != 200 || !strings.Contains(body, `"state":"serving"`) {
		t.Errorf("/readyz: %d %q", code, body)
	}
}

// TestAdminTokenEnvAndFile: the token from STUND_ADMIN_TOKEN, then from
// --admin-token-file, which a SIGHUP re-reads: the old token stops
// working and the new one works, without a restart.
func TestAdminTokenEnvAndFile(t *testing.T) {
	// Each stund in its own subtest, stopped at its end: a SIGHUP reaches
	// every stund in the process, and urfave/cli's shared help flag makes
	// two reloading at once a data race no real process has.
	t.Run("env", func(t *testing.T) {
		const envTok = "token-from-the-environment"
		t.Setenv("STUND_ADMIN_TOKEN", envTok)
		adminURL, _, out := startStund(t)
		if !strings.Contains(out.String(), "/allocations") {
			t.Errorf("start-up line does not announce the API: %q", out.String())
		}
		if code, _ := apiStatus(t, adminURL, envTok); code != 200 {
			t.Errorf("env token: %d", code)
		}
		if code, _ := apiStatus(t, adminURL, ""); code != 401 {
			t.Errorf("no token: %d", code)
		}
	})
	t.Run("file", func(t *testing.T) {
		file := filepath.Join(t.TempDir(), "token")
		if err := os.WriteFile(file, []byte("first-token-in-a-file\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		adminURL, _, _ := startStund(t, "--admin-token-file", file)
		if code, _ := apiStatus(t, adminURL, "first-token-in-a-file"); code != 200 {
			t.Fatalf("file token (trailing newline trimmed): %d", code)
		}
		if err := os.WriteFile(file, []byte("second-token-in-a-file"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := syscall.Kill(os.Getpid(), syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		if !waitFor(func() bool { c, _ := apiStatus(t, adminURL, "second-token-in-a-file"); return c == 200 }) {
			t.Fatal("the rotated token does not work after SIGHUP")
		}
		if code, _ := apiStatus(t, adminURL, "first-token-in-a-file"); code != 401 {
			t.Errorf("the old token after SIGHUP: %d, want 401", code)
		}
	})
}

// TestAdminTokenErrors: a bad token setting stops stund before it binds,
// naming the flag (and the YAML line).
func TestAdminTokenErrors(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, []byte(" \n"), 0o600); err != nil {
		t.Fatal(err)
	}
	yml := filepath.Join(dir, "stund.yaml")
	if err := os.WriteFile(yml, []byte("realm: x\nmetrics: 127.0.0.1:0\nadmin-token: short\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	long := "a-token-long-enough-1234"
	for _, c := range []struct {
		args []string
		want []string
	}{
		{[]string{"--metrics", "127.0.0.1:0", "--admin-token", "short"}, []string{"admin-token", "at least 16"}},
		{[]string{"--admin-token", long}, []string{"admin-token", "--metrics"}},
		{[]string{"--metrics", "127.0.0.1:0", "--admin-token", long, "--admin-token-file", empty}, []string{"give one"}},
		{[]string{"--metrics", "127.0.0.1:0", "--admin-token-file", empty}, []string{"admin-token-file", "empty"}},
		{[]string{"--metrics", "127.0.0.1:0", "--admin-token-file", filepath.Join(dir, "missing")}, []string{"admin-token-file", "no such file"}},
		{[]string{"--metrics", "127.0.0.1:0", "--admin-token", "has white space in it"}, []string{"white space"}},
		{[]string{"--config", yml}, []string{"admin-token", "line 3"}},
	} {
		code, out, errOut := runArgs(t, append([]string{"--no-tcp"}, c.args...)...)
		if code != exitUsage || strings.Contains(out, "listening on") {
			t.Errorf("%q: exit %d, stdout %q", c.args, code, out)
		}
		for _, w := range c.want {
			if !strings.Contains(errOut, w) {
				t.Errorf("%q: stderr %q lacks %q", c.args, errOut, w)
			}
		}
	}
}
