package main

import (
	"strings"
	"testing"
)

// TestPprofOffByDefault: without --pprof the admin listener has no
// /debug/pprof/; with it, the index and a named profile are served next
// to /metrics.
func TestPprofOffByDefault(t *testing.T) {
	admin, _, _ := startStund(t)
	if code, _ := httpGet(t, admin+"/debug/pprof/"); code != 404 {
		t.Errorf("/debug/pprof/ without --pprof: %d, want 404", code)
	}

	admin, _, out := startStund(t, "--pprof")
	if !strings.Contains(out.String(), "/debug/pprof/") {
		t.Errorf("start-up line does not name /debug/pprof/: %q", out.String())
	}
	if code, body := httpGet(t, admin+"/debug/pprof/"); code != 200 || !strings.Contains(body, "goroutine") {
		t.Errorf("/debug/pprof/ with --pprof: %d %.200q", code, body)
	}
	if code, body := httpGet(t, admin+"/debug/pprof/goroutine?debug=1"); code != 200 || !strings.Contains(body, "goroutine profile") {
		t.Errorf("goroutine profile: %d %.200q", code, body)
	}
	if code, _ := httpGet(t, admin+"/metrics"); code != 200 {
		t.Errorf("/metrics with --pprof: %d", code)
	}
}

// TestPprofNeedsMetrics: --pprof alone is a configuration error that
// names both flags, not a silently ignored flag.
func TestPprofNeedsMetrics(t *testing.T) {
	code, _, errOut := runArgs(t, "--pprof", "--no-tcp")
	if code == 0 || !strings.Contains(errOut, "pprof") || !strings.Contains(errOut, "--metrics") {
		t.Fatalf("--pprof without --metrics: code %d, stderr %q", code, errOut)
	}
}
