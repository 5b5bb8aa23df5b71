package main

// The configuration reference in docs/operator.md is generated from the
// flags, and the metrics list is checked against the registry, so neither
// drifts from the code. Regenerate after changing a flag:
//
//	STUND_UPDATE_DOCS=1 go test ./cmd/stund -run TestOperatorDoc

import (
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/urfave/cli/v2"

	"github.com/stund/stund/internal/certreload"
	"github.com/stund/stund/internal/testutil"
	"github.com/stund/stund/server"
)

const (
	flagsBegin = "<!-- BEGIN FLAGS: generated from cmd/stund's flags by `STUND_UPDATE_DOCS=1 go test ./cmd/stund -run TestOperatorDoc`; do not edit -->"
	flagsEnd   = "<!-- END FLAGS -->"
)

// flagReference renders one table row per flag.
func flagReference() string {
	var b strings.Builder
	b.WriteString("| flag | environment | default | what it does |\n| --- | --- | --- | --- |\n")
	for _, f := range flags() {
		name := f.Names()[0]
		def, usage := "", ""
		if d, ok := f.(cli.DocGenerationFlag); ok {
			def, usage = d.GetValue(), d.GetUsage()
		}
		if tv, ok := f.(interface{ TakesValue() bool }); (ok && !tv.TakesValue()) || def == "false" {
			def = "off"
		}
		if def == "" || def == "[]" {
			def = "—"
		} else {
			def = "`" + def + "`"
		}
		arg := ""
		if i := strings.Index(usage, "`"); i >= 0 {
			if j := strings.Index(usage[i+1:], "`"); j >= 0 {
				arg = " " + usage[i+1:i+1+j]
			}
		}
		usage = strings.ReplaceAll(usage, "`", "")
		usage = strings.ReplaceAll(usage, "|", "\\|")
		fmt.Fprintf(&b, "| `--%s%s` | `%s` | %s | %s |\n", name, arg, envName(name)[0], def, usage)
	}
	return b.String()
}

func TestOperatorDoc(t *testing.T) {
	path := filepath.Join(repoRoot, "docs/operator.md")
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	doc := string(raw)
	i, j := strings.Index(doc, flagsBegin), strings.Index(doc, flagsEnd)
	if i < 0 || j < i {
		t.Fatalf("%s lacks the generated flags section markers", path)
	}
	want := flagsBegin + "\n\n" + flagReference() + "\n" + flagsEnd
	if got := doc[i : j+len(flagsEnd)]; got != want {
		if os.Getenv("STUND_UPDATE_DOCS") == "1" {
			doc = doc[:i] + want + doc[j+len(flagsEnd):]
			if err := os.WriteFile(path, []byte(doc), 0o644); err != nil {
				t.Fatal(err)
			}
			t.Logf("updated %s", path)
		} else {
			t.Errorf("the flag reference in %s is stale: run STUND_UPDATE_DOCS=1 go test ./cmd/stund -run TestOperatorDoc", path)
		}
	}

	// Every stund_* metric is documented.
	srv, err := server.New(server.Config{
		PrimaryIP: netip.MustParseAddr("127.0.0.1"), AlternateIP: netip.MustParseAddr("127.0.0.2"),
		Users: map[string]string{"u": "p"}, DisableTCP: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	srv.Registry().MustRegister(buildInfo())
	srv.Registry().MustRegister(certMetrics(testReloader(t))...) // registered with --cert
	mfs, err := srv.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, mf := range mfs {
		if name := mf.GetName(); strings.HasPrefix(name, "stund_") {
			n++
			if !strings.Contains(doc, "`"+name+"`") {
				t.Errorf("metric %s is not in %s", name, path)
			}
			// Its row lists every label value (build_info's are the
			// running build's, not a fixed set).
			if name == "stund_build_info" {
				continue
			}
			row := metricRow(doc, name)
			for _, m := range mf.GetMetric() {
				for _, lp := range m.GetLabel() {
					if !strings.Contains(row, "`"+lp.GetValue()+"`") {
						t.Errorf("%s: %s=%q is not in its row of %s", name, lp.GetName(), lp.GetValue(), path)
					}
				}
			}
		}
	}
	if n < 15 {
		t.Errorf("only %d stund_* metrics registered", n)
	}
}

// metricRow is the metrics table's row for name ("" if none).
func metricRow(doc, name string) string {
	for _, line := range strings.Split(doc, "\n") {
		if strings.HasPrefix(line, "| `"+name+"` |") {
			return line
		}
	}
	return ""
}

// testReloader serves a fresh self-signed certificate from files.
func testReloader(t *testing.T) *certreload.Reloader {
	t.Helper()
	c, _ := testutil.SelfSigned(t)
	cp, kp := testutil.PEM(t, c)
	dir := t.TempDir()
	cf, kf := filepath.Join(dir, "cert.pem"), filepath.Join(dir, "key.pem")
	if err := os.WriteFile(cf, cp, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(kf, kp, 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := certreload.New(cf, kf, nil)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestFleetChapter: the operator guide's fleet chapter covers each thing
// an operator of several nodes needs, names every admin API route and
// ctl command as the code has them, and quotes the stop timeouts the
// deployment files actually set.
func TestFleetChapter(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(repoRoot, "docs/operator.md"))
	if err != nil {
		t.Fatal(err)
	}
	doc := string(raw)
	i := strings.Index(doc, "\n## Fleet")
	if i < 0 {
		t.Fatal("docs/operator.md has no Fleet chapter")
	}
	fleet := doc[i:]
	if j := strings.Index(fleet[1:], "\n## "); j >= 0 {
		fleet = fleet[:j+1]
	}
	for _, want := range []string{
		"_stun._udp", "_turn._udp", "_turn._tcp", "_turns._tcp", // DNS SRV
		"PROXY protocol", "--proxy-protocol-from", "consistent hashing", // load balancers
		"### Rolling restarts", "--drain-timeout", "second** `SIGTERM`", "--alternate-server", // drain
		"### Rotating the REST secret", "up to four", // rotation
		"--usage-log", "JSON lines", "reopens it on `SIGHUP`", // usage records
		"--admin-token", "WWW-Authenticate: Bearer", "405", // the API
	} {
		if !strings.Contains(fleet, want) {
			t.Errorf("the Fleet chapter does not mention %q", want)
		}
	}
	for _, route := range []string{"GET /allocations", "GET /allocations?user=NAME", "DELETE /allocations/{id}", "DELETE /users/{name}/allocations", "POST /drain"} {
		if !strings.Contains(fleet, "`"+route+"`") {
			t.Errorf("the API table lacks %s", route)
		}
	}
	for _, sub := range ctlCommand(io.Discard).Subcommands {
		if !strings.Contains(fleet, "stund ctl "+sub.Name) && !strings.Contains(fleet, "stund ctl --admin http://10.0.0.11:9641 "+sub.Name) {
			t.Errorf("stund ctl %s has no example", sub.Name)
		}
	}

	unit, err := os.ReadFile(filepath.Join(repoRoot, "configs/stund.service"))
	if err != nil {
		t.Fatal(err)
	}
	stop := regexp.MustCompile(`(?m)^TimeoutStopSec=(\S+)$`).FindSubmatch(unit)
	if stop == nil || !strings.Contains(fleet, "`TimeoutStopSec="+string(stop[1])+"`") {
		t.Errorf("the chapter does not quote the unit's TimeoutStopSec (%q)", stop)
	}
	grace := dig(k8sDocs(t)["DaemonSet"], "spec", "template", "spec", "terminationGracePeriodSeconds")
	if !strings.Contains(fleet, fmt.Sprintf("`terminationGracePeriodSeconds: %v`", grace)) {
		t.Errorf("the chapter does not quote the DaemonSet's terminationGracePeriodSeconds (%v)", grace)
	}
}

// TestDesignPackages: docs/design.md's package map lists every package
// under server/ and internal/, each with its one sentence.
func TestDesignPackages(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(repoRoot, "docs/design.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, glob := range []string{"server", "server/*", "internal/*"} {
		dirs, err := filepath.Glob(filepath.Join(repoRoot, glob))
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range dirs {
			if fi, err := os.Stat(d); err != nil || !fi.IsDir() {
				continue
			}
			if gos, _ := filepath.Glob(filepath.Join(d, "*.go")); len(gos) == 0 {
				continue
			}
			pkg, _ := filepath.Rel(repoRoot, d)
			if !regexp.MustCompile("(?m)^\\| `" + regexp.QuoteMeta(pkg) + "` \\| \\S").Match(raw) {
				t.Errorf("docs/design.md's package table has no row for %s", pkg)
			}
		}
	}
}
