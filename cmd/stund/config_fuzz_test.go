package main

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"
)

// FuzzConfigYAML: any YAML file goes through the real Before (key check,
// altsrc) and buildConfig, as in run(), without binding a socket: no
// panic, and every error names a line or a key, so the operator can find
// what to fix.
func FuzzConfigYAML(f *testing.F) {
	for _, s := range []string{
		"",
		"port: 3478\nalt-port: 3479\n",
		"primary-ip: 127.0.0.1\nalternate-ip: 127.0.0.1\n",
		"user: [\"a:b\", \"c\"]\nrelay-ports: 9-1\n",
		"max-bps: -5\nunauth-rate: .nan\n",
		"alloc-rate: 0\n",
		"prot: 1\n",
		"port: [1, 2]\n",
		"- a\n- b\n",
		"port: &a 1\nalt-port: *a\n",
		"port: 1\nport: 2\n",
		"{port: 99999}",
		"log-level: loud\n",
		"\x00\xff",
	} {
		f.Add([]byte(s))
	}
	dir := f.TempDir()
	var names []string
	for _, fl := range flags() {
		names = append(names, fl.Names()...)
	}
	f.Fuzz(func(t *testing.T, yml []byte) {
		path := filepath.Join(dir, "stund.yaml")
		if err := os.WriteFile(path, yml, 0o600); err != nil {
			t.Fatal(err)
		}
		var stdout, stderr bytes.Buffer
		app := newApp(&stdout, &stderr)
		app.Action = func(c *cli.Context) error {
			_, _, err := buildConfig(c, keysOf(c))
			if err != nil {
				return configError{err}
			}
			return nil
		}
		err := app.Run([]string{"stund", "--config", path})
		if err == nil {
			return
		}
		msg := err.Error()
		var ce configError
		var ue usageError
		if !errors.As(err, &ce) && !errors.As(err, &ue) && !isFlagError(err) {
			t.Fatalf("not a configuration error: %T %v", err, err)
		}
		if strings.Contains(msg, "line ") {
			return
		}
		for _, n := range names {
			if strings.Contains(msg, n) {
				return
			}
		}
		t.Fatalf("error names neither a line nor a key: %q", msg)
	})
}
