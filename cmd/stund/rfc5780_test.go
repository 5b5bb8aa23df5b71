package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"

	"github.com/stund/stund/server"
)

// configOf runs the real app (Before: YAML key check and altsrc; then
// buildConfig) on args without binding a socket, and returns the
// configuration, the error and what was logged.
func configOf(t *testing.T, args ...string) (server.Config, string, error) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	var cfg server.Config
	app := newApp(&stdout, &stderr)
	app.Action = func(c *cli.Context) error {
		var err error
		cfg, _, err = buildConfig(c, keysOf(c))
		return err
	}
	err := app.Run(append([]string{"stund"}, args...))
	return cfg, stderr.String(), err
}

// TestRFC5780LeanFlag: --rfc5780-lean reaches server.Config from the
// command line, the environment and the YAML file; off by default; the
// deprecated --rfc5780-always is accepted, changes nothing and says so,
// and contradicts --rfc5780-lean.
func TestRFC5780LeanFlag(t *testing.T) {
	cfg, _, err := configOf(t)
	if err != nil || cfg.RFC5780Lean {
		t.Fatalf("default: lean %v, err %v", cfg.RFC5780Lean, err)
	}
	if cfg, _, err = configOf(t, "--rfc5780-lean"); err != nil || !cfg.RFC5780Lean {
		t.Errorf("--rfc5780-lean: lean %v, err %v", cfg.RFC5780Lean, err)
	}
	yml := filepath.Join(t.TempDir(), "stund.yaml")
	if err := os.WriteFile(yml, []byte("realm: x\nrfc5780-lean: true\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if cfg, _, err = configOf(t, "--config", yml); err != nil || !cfg.RFC5780Lean {
		t.Errorf("YAML rfc5780-lean: lean %v, err %v", cfg.RFC5780Lean, err)
	}
	t.Run("env", func(t *testing.T) {
		t.Setenv("STUND_RFC5780_LEAN", "true")
		if cfg, _, err := configOf(t); err != nil || !cfg.RFC5780Lean {
			t.Errorf("STUND_RFC5780_LEAN: lean %v, err %v", cfg.RFC5780Lean, err)
		}
	})

	cfg, log, err := configOf(t, "--rfc5780-always")
	if err != nil || cfg.RFC5780Lean || !strings.Contains(log, "deprecated") || !strings.Contains(log, "rfc5780-always") {
		t.Errorf("--rfc5780-always: lean %v, err %v, log %q", cfg.RFC5780Lean, err, log)
	}
	if err := os.WriteFile(yml, []byte("realm: x\nrfc5780-always: true\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, log, err = configOf(t, "--config", yml); err != nil || !strings.Contains(log, "line 2") {
		t.Errorf("YAML rfc5780-always: err %v, log %q", err, log)
	}
	if _, _, err = configOf(t, "--rfc5780-always", "--rfc5780-lean"); err == nil || !strings.Contains(err.Error(), "rfc5780-always") {
		t.Errorf("--rfc5780-always with --rfc5780-lean: err %v", err)
	}
}
