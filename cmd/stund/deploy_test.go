package main

// The deployment files (Dockerfile, systemd unit, Kubernetes manifests) are
// checked against what stund actually accepts: docker, systemd and a cluster
// are not available in CI, so these tests parse the files and compare the
// fields stund relies on with its flags and defaults.

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/stund/stund/server"
)

const repoRoot = "../.."

// flagByEnv maps STUND_* variables to flag names: stund's, and stund
// ctl's (a container may set STUND_ADMIN_URL for kubectl exec).
func flagByEnv() map[string]string {
	m := map[string]string{}
	for _, f := range append(flags(), ctlCommand(io.Discard).Flags...) {
		if ev, ok := f.(interface{ GetEnvVars() []string }); ok {
			for _, e := range ev.GetEnvVars() {
				m[e] = f.Names()[0]
			}
		}
	}
	return m
}

// drainTimeout is --drain-timeout's default: how long a stop may take.
// TODO(merge): read it from the flag once the drain's flag is merged.
const drainTimeout = time.Hour

// stopMargin is what the stop timeouts allow past a full drain for
// closing the sockets.
const stopMargin = time.Minute

// systemdSeconds parses the systemd time spans the unit uses ("90",
// "90s", "61min", "1h").
func systemdSeconds(t *testing.T, v string) time.Duration {
	t.Helper()
	for _, u := range []struct {
		suffix string
		unit   time.Duration
	}{{"min", time.Minute}, {"h", time.Hour}, {"s", time.Second}, {"", time.Second}} {
		if n, ok := strings.CutSuffix(v, u.suffix); ok {
			if i, err := strconv.Atoi(n); err == nil {
				return time.Duration(i) * u.unit
			}
		}
	}
	t.Fatalf("time span %q not understood", v)
	return 0
}

func flagNames() map[string]bool {
	m := map[string]bool{}
	for _, f := range flags() {
		for _, n := range f.Names() {
			m[n] = true
		}
	}
	return m
}

// dockerStage is one FROM ... of a Dockerfile with its instructions.
type dockerStage struct {
	from, name string
	instr      [][2]string // instruction (upper case), rest of line
}

func parseDockerfile(t *testing.T, path string) []dockerStage {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	// Join continuation lines, drop comments.
	var lines []string
	cur := ""
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if strings.HasPrefix(l, "#") || (l == "" && cur == "") {
			continue
		}
		if strings.HasSuffix(l, "\\") {
			cur += strings.TrimSuffix(l, "\\") + " "
			continue
		}
		lines = append(lines, cur+l)
		cur = ""
	}
	var stages []dockerStage
	for _, l := range lines {
		if l == "" {
			continue
		}
		op, rest, _ := strings.Cut(l, " ")
		op = strings.ToUpper(op)
		if op == "FROM" {
			f := strings.Fields(rest)
			st := dockerStage{from: f[0]}
			if len(f) == 3 && strings.EqualFold(f[1], "AS") {
				st.name = f[2]
			}
			stages = append(stages, st)
			continue
		}
		if len(stages) == 0 {
			t.Fatalf("%s: %s before FROM", path, op)
		}
		stages[len(stages)-1].instr = append(stages[len(stages)-1].instr, [2]string{op, strings.TrimSpace(rest)})
	}
	return stages
}

func (s dockerStage) all(op string) []string {
	var out []string
	for _, in := range s.instr {
		if in[0] == op {
			out = append(out, in[1])
		}
	}
	return out
}

// TestDockerfile: two stages, a static non-cgo trimmed build with the
// version stamped, a distroless/scratch final stage running as non-root,
// and EXPOSE matching stund's default ports.
func TestDockerfile(t *testing.T) {
	st := parseDockerfile(t, filepath.Join(repoRoot, "Dockerfile"))
	if len(st) != 2 {
		t.Fatalf("%d stages, want 2 (build, run)", len(st))
	}
	build, final := st[0], st[1]
	if !strings.HasPrefix(build.from, "golang:1.26") || build.name == "" {
		t.Errorf("build stage FROM %s AS %q, want golang:1.26 with a name", build.from, build.name)
	}
	runs := strings.Join(build.all("RUN"), "\n")
	for _, want := range []string{"CGO_ENABLED=0", "-trimpath", "-s -w", "-X main.version=", "./cmd/stund"} {
		if !strings.Contains(runs, want) {
			t.Errorf("build stage RUN lacks %q", want)
		}
	}
	if !(strings.HasPrefix(final.from, "gcr.io/distroless/static") || final.from == "scratch") {
		t.Errorf("final stage FROM %s, want distroless static or scratch", final.from)
	}
	if final.all("RUN") != nil {
		t.Error("final stage runs commands: it should only copy the static binary")
	}
	users := final.all("USER")
	if len(users) == 0 {
		t.Fatal("final stage has no USER: it would run as root")
	}
	u := strings.SplitN(users[len(users)-1], ":", 2)[0]
	if u == "root" || u == "0" {
		t.Errorf("final USER %s is root", users[len(users)-1])
	}
	if _, err := strconv.Atoi(u); err != nil {
		t.Errorf("USER %s is not numeric: Kubernetes' runAsNonRoot cannot verify a name", u)
	}
	copies := strings.Join(final.all("COPY"), "\n")
	if !strings.Contains(copies, "--from="+build.name) {
		t.Errorf("final stage does not copy from the build stage: %s", copies)
	}
	entry := strings.Join(final.all("ENTRYPOINT"), "")
	if !strings.Contains(entry, "stund") {
		t.Errorf("ENTRYPOINT %q does not run stund", entry)
	}
	exposed := strings.Fields(strings.Join(final.all("EXPOSE"), " "))
	for _, want := range []string{
		strconv.Itoa(server.DefaultPort) + "/udp", strconv.Itoa(server.DefaultPort) + "/tcp",
		strconv.Itoa(server.DefaultAltPort) + "/udp", strconv.Itoa(server.DefaultTLSPort) + "/tcp",
	} {
		if !slices.Contains(exposed, want) {
			t.Errorf("EXPOSE lacks %s (have %v)", want, exposed)
		}
	}
	// The build context must keep what the build needs.
	ign, err := os.ReadFile(filepath.Join(repoRoot, ".dockerignore"))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(ign), "\n") {
		l = strings.TrimSpace(l)
		for _, needed := range []string{"go.mod", "go.sum", "cmd", "server", "internal"} {
			if strings.TrimSuffix(l, "/") == needed {
				t.Errorf(".dockerignore excludes %s, which the build needs", needed)
			}
		}
	}
}

// TestSystemdUnit: the unit's hardening (a public service that parses
// untrusted packets gets no privilege it does not need), and commands stund
// accepts.
func TestSystemdUnit(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(repoRoot, "configs/stund.service"))
	if err != nil {
		t.Fatal(err)
	}
	kv := map[string][]string{}
	section := ""
	for _, l := range strings.Split(string(b), "\n") {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		if strings.HasPrefix(l, "[") {
			section = strings.Trim(l, "[]")
			continue
		}
		k, v, ok := strings.Cut(l, "=")
		if !ok {
			t.Errorf("not key=value: %q", l)
			continue
		}
		kv[section+"."+k] = append(kv[section+"."+k], v)
	}
	want := map[string]string{
		"Service.DynamicUser":             "yes",
		"Service.NoNewPrivileges":         "yes",
		"Service.ProtectSystem":           "strict",
		"Service.ProtectHome":             "yes",
		"Service.PrivateTmp":              "yes",
		"Service.RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
		"Service.ExecReload":              "/bin/kill -HUP $MAINPID",
		"Install.WantedBy":                "multi-user.target",
		"Service.Type":                    "simple",
		"Service.SystemCallArchitectures": "native",
		"Service.MemoryDenyWriteExecute":  "yes",
		"Service.RestrictSUIDSGID":        "yes",
		"Service.ProtectKernelTunables":   "yes",
		"Service.ProtectControlGroups":    "yes",
		"Service.LockPersonality":         "yes",
		"Service.RestrictNamespaces":      "yes",
		"Service.PrivateDevices":          "yes",
		"Service.ProtectKernelModules":    "yes",
		"Service.RestrictRealtime":        "yes",
		"Service.EnvironmentFile":         "-/etc/stund/stund.env",
		"Service.ProtectClock":            "yes",
		"Service.ProtectHostname":         "yes",
		"Service.ProtectKernelLogs":       "yes",
		"Service.UMask":                   "0077",
		"Service.Restart":                 "on-failure",
		"Unit.After":                      "network-online.target",
		"Unit.Wants":                      "network-online.target",
		"Service.ProtectProc":             "invisible",
		"Service.RestartSec":              "2s",
		"Service.LimitNOFILE":             "65536",
		"Service.ExecStart":               "/usr/local/bin/stund --config /etc/stund/stund.yaml",
		"Unit.Description":                "stund STUN (RFC 8489, RFC 5780) and TURN (RFC 8656) server",
		"Unit.Documentation":              "file:///usr/share/doc/stund/operator.md",
	}
	for k, v := range want {
		if !slices.Contains(kv[k], v) {
			t.Errorf("%s = %v, want %q", k, kv[k], v)
		}
	}
	for _, v := range []string{"@system-service", "~@privileged"} {
		if !slices.Contains(kv["Service.SystemCallFilter"], v) {
			t.Errorf("SystemCallFilter %v lacks %s", kv["Service.SystemCallFilter"], v)
		}
	}
	// No capability by default (CAP_NET_BIND_SERVICE is needed only for a
	// port below 1024, and every default port is above 1024): the bounding
	// set is assigned empty, no ambient capability is granted, and no
	// active line names a capability.
	for _, p := range []int{server.DefaultPort, server.DefaultAltPort, server.DefaultTLSPort, server.DefaultRelayPortMin} {
		if p < 1024 {
			t.Fatalf("default port %d is below 1024: the unit would need CAP_NET_BIND_SERVICE", p)
		}
	}
	if got := kv["Service.CapabilityBoundingSet"]; !slices.Equal(got, []string{""}) {
		t.Errorf("CapabilityBoundingSet = %q, want exactly one empty assignment (no capability)", got)
	}
	if got := kv["Service.AmbientCapabilities"]; got != nil && !slices.Equal(got, []string{""}) {
		t.Errorf("AmbientCapabilities = %q, want absent or empty", got)
	}
	for k, vs := range kv {
		for _, v := range vs {
			if strings.Contains(v, "CAP_") {
				t.Errorf("%s=%s grants a capability by default", k, v)
			}
		}
	}
	// The comment says when and how to grant CAP_NET_BIND_SERVICE: a
	// drop-in with both lines.
	if !regexp.MustCompile(`(?i)only when a configured port is below 1024`).Match(b) {
		t.Error("the unit lacks the comment saying CAP_NET_BIND_SERVICE is needed only for ports below 1024")
	}
	for _, l := range []string{"AmbientCapabilities=CAP_NET_BIND_SERVICE", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE"} {
		if !regexp.MustCompile(`(?m)^#\s*` + l + `$`).Match(b) {
			t.Errorf("the commented drop-in lacks %s", l)
		}
	}
	// LimitNOFILE leaves room for the default total quota of relays.
	if n, _ := strconv.Atoi(kv["Service.LimitNOFILE"][0]); n < server.DefaultTotalQuota*2 {
		t.Errorf("LimitNOFILE %d < 2 x the default total quota %d", n, server.DefaultTotalQuota)
	}
	// Stopping is a drain: SIGTERM, and time for the longest drain
	// before systemd's SIGKILL; the comment says how to cut it short.
	if got := kv["Service.KillSignal"]; !slices.Equal(got, []string{"SIGTERM"}) {
		t.Errorf("KillSignal = %q, want SIGTERM (stund's drain)", got)
	}
	if got := kv["Service.TimeoutStopSec"]; len(got) != 1 || systemdSeconds(t, got[0]) < drainTimeout+stopMargin {
		t.Errorf("TimeoutStopSec = %q, want at least the drain timeout %v plus %v", got, drainTimeout, stopMargin)
	}
	if !regexp.MustCompile(`(?i)second signal`).Match(b) || !bytes.Contains(b, []byte("systemctl kill -s SIGTERM")) {
		t.Error("the unit does not say that a second signal cuts a drain short")
	}
	// ExecStart's flags exist.
	names := flagNames()
	for _, w := range strings.Fields(kv["Service.ExecStart"][0]) {
		if f, ok := strings.CutPrefix(w, "--"); ok && !names[f] {
			t.Errorf("ExecStart uses unknown flag --%s", f)
		}
	}
}

// k8sDocs reads every manifest under deploy/kubernetes.
func k8sDocs(t *testing.T) map[string]map[string]any {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(repoRoot, "deploy/kubernetes/*.yaml"))
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests: %v", err)
	}
	docs := map[string]map[string]any{}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(b))
		for {
			var d map[string]any
			err := dec.Decode(&d)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			if d == nil {
				continue
			}
			for _, k := range []string{"apiVersion", "kind", "metadata"} {
				if d[k] == nil {
					t.Errorf("%s: a document lacks %s", f, k)
				}
			}
			kind, _ := d["kind"].(string)
			docs[kind] = d
		}
	}
	return docs
}

// dig walks maps and lists: dig(m, "spec", "template", 0, ...).
func dig(v any, path ...any) any {
	for _, p := range path {
		switch k := p.(type) {
		case string:
			m, ok := v.(map[string]any)
			if !ok {
				return nil
			}
			v = m[k]
		case int:
			l, ok := v.([]any)
			if !ok || k >= len(l) {
				return nil
			}
			v = l[k]
		}
	}
	return v
}

// TestKubernetesManifests: the fields stund relies on.
func TestKubernetesManifests(t *testing.T) {
	docs := k8sDocs(t)
	ds := docs["DaemonSet"]
	if ds == nil {
		t.Fatal("no DaemonSet")
	}
	pod := dig(ds, "spec", "template", "spec")
	if dig(pod, "hostNetwork") != true {
		t.Error("hostNetwork is not true: RFC 5780 needs the node's two real addresses")
	}
	if dig(pod, "securityContext", "runAsNonRoot") != true {
		t.Error("pod does not require runAsNonRoot")
	}
	c := dig(pod, "containers", 0)
	if c == nil {
		t.Fatal("no container")
	}

	// Environment: every STUND_* is a flag; the secret comes from a Secret.
	byEnv := flagByEnv()
	env := map[string]any{}
	for _, e := range dig(c, "env").([]any) {
		name := dig(e, "name").(string)
		env[name] = e
		if strings.HasPrefix(name, "STUND_") && byEnv[name] == "" {
			t.Errorf("env %s is not a stund flag", name)
		}
	}
	sec := env["STUND_AUTH_SECRET"]
	if sec == nil || dig(sec, "valueFrom", "secretKeyRef", "name") == nil {
		t.Error("STUND_AUTH_SECRET does not come from a Secret")
	} else if s := docs["Secret"]; s != nil {
		key := dig(sec, "valueFrom", "secretKeyRef", "key")
		if dig(s, "metadata", "name") != dig(sec, "valueFrom", "secretKeyRef", "name") || dig(s, "stringData", key) == nil {
			t.Errorf("the Secret manifest does not provide %v/%v", dig(sec, "valueFrom", "secretKeyRef", "name"), key)
		}
	}
	metrics, _ := dig(env["STUND_METRICS"], "value").(string)
	_, metricsPort, _ := strings.Cut(metrics, ":")
	if metricsPort == "" {
		t.Fatalf("STUND_METRICS %q has no port: probes need the admin listener", metrics)
	}
	// The API token, optional, from the Secret; ctl in the pod finds the
	// listener through STUND_ADMIN_URL.
	tok := env["STUND_ADMIN_TOKEN"]
	if ref := dig(tok, "valueFrom", "secretKeyRef"); ref == nil || dig(ref, "optional") != true {
		t.Error("STUND_ADMIN_TOKEN does not come, optionally, from a Secret")
	} else if s := docs["Secret"]; s != nil && dig(s, "stringData", dig(ref, "key")) == nil {
		t.Errorf("the Secret manifest does not show the admin token key %v", dig(ref, "key"))
	}
	if u, _ := dig(env["STUND_ADMIN_URL"], "value").(string); u != "http://"+metrics {
		t.Errorf("STUND_ADMIN_URL %q is not the admin listener http://%s", u, metrics)
	}

	// Deleting the pod drains: the grace period covers the longest
	// drain, and SIGTERM starts it. A preStop hook has no way to do it:
	// an httpGet hook only GETs (POST /drain is needed) and carries no
	// token from a Secret, and the image has no shell or curl.
	if g, _ := dig(pod, "terminationGracePeriodSeconds").(int); time.Duration(g)*time.Second < drainTimeout+stopMargin {
		t.Errorf("terminationGracePeriodSeconds %d < the drain timeout %v plus %v", g, drainTimeout, stopMargin)
	}
	if h := dig(c, "lifecycle", "preStop"); h != nil {
		t.Errorf("preStop %v: SIGTERM is the drain", h)
	}

	// Args are known flags.
	names := flagNames()
	var configPath string
	args, _ := dig(c, "args").([]any)
	for i, a := range args {
		if f, ok := strings.CutPrefix(a.(string), "--"); ok {
			if !names[f] {
				t.Errorf("args use unknown flag --%s", f)
			}
			if f == fConfig && i+1 < len(args) {
				configPath = args[i+1].(string)
			}
		}
	}
	if configPath == "" {
		t.Error("stund is not given --config")
	}

	// Ports: the defaults, and the admin port the probes use.
	ports := map[string]string{} // name -> "port/proto"
	have := map[string]bool{}
	for _, p := range dig(c, "ports").([]any) {
		pp := strconv.Itoa(dig(p, "containerPort").(int)) + "/" + dig(p, "protocol").(string)
		have[pp] = true
		if n, ok := dig(p, "name").(string); ok {
			ports[n] = pp
		}
	}
	for _, want := range []string{
		strconv.Itoa(server.DefaultPort) + "/UDP", strconv.Itoa(server.DefaultPort) + "/TCP",
		strconv.Itoa(server.DefaultAltPort) + "/UDP", strconv.Itoa(server.DefaultTLSPort) + "/TCP",
		metricsPort + "/TCP",
	} {
		if !have[want] {
			t.Errorf("container ports lack %s", want)
		}
	}
	for probe, path := range map[string]string{"readinessProbe": "/readyz", "livenessProbe": "/healthz"} {
		if got := dig(c, probe, "httpGet", "path"); got != path {
			t.Errorf("%s path %v, want %s", probe, got, path)
		}
		port := dig(c, probe, "httpGet", "port")
		if s, ok := port.(string); ok {
			port = ports[s]
		} else if n, ok := port.(int); ok {
			port = strconv.Itoa(n) + "/TCP"
		}
		if port != metricsPort+"/TCP" {
			t.Errorf("%s port %v is not the admin port %s", probe, port, metricsPort)
		}
	}
	ann := dig(ds, "spec", "template", "metadata", "annotations")
	if dig(ann, "prometheus.io/port") != metricsPort || dig(ann, "prometheus.io/path") != "/metrics" {
		t.Errorf("scrape annotations %v do not match the admin port %s", ann, metricsPort)
	}
	if pm := docs["PodMonitor"]; pm != nil {
		if p, _ := dig(pm, "spec", "podMetricsEndpoints", 0, "port").(string); ports[p] != metricsPort+"/TCP" {
			t.Errorf("PodMonitor scrapes port %q, not the admin port", p)
		}
	}

	// The ConfigMap's stund.yaml is a valid stund configuration without
	// the node-specific keys the init container appends.
	cm := docs["ConfigMap"]
	body, _ := dig(cm, "data", "stund.yaml").(string)
	if body == "" {
		t.Fatal("ConfigMap has no stund.yaml")
	}
	f := filepath.Join(t.TempDir(), "stund.yaml")
	if err := os.WriteFile(f, []byte(body+"primary-ip: 192.0.2.10\nalternate-ip: 192.0.2.11\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := checkYAMLKeys(f, flags()); err != nil {
		t.Errorf("ConfigMap stund.yaml plus the node addresses: %v", err)
	}
	init := dig(pod, "initContainers", 0)
	script := strings.Join(func() []string {
		var s []string
		for _, x := range dig(init, "command").([]any) {
			s = append(s, x.(string))
		}
		return s
	}(), " ")
	for _, key := range []string{"primary-ip", "alternate-ip", configPath} {
		if !strings.Contains(script, key) {
			t.Errorf("the init step does not write %s", key)
		}
	}
}

// TestExampleConfig: configs/stund.yaml is a configuration stund accepts,
// and each key it shows commented out, to be turned on, is a flag too.
func TestExampleConfig(t *testing.T) {
	path := filepath.Join(repoRoot, "configs/stund.yaml")
	if _, err := checkYAMLKeys(path, flags()); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	names := flagNames()
	shown := regexp.MustCompile(`(?m)^# ([a-z0-9-]+):`).FindAllSubmatch(b, -1)
	if len(shown) == 0 {
		t.Fatal("no commented-out keys found: the pattern is stale")
	}
	for _, m := range shown {
		if !names[string(m[1])] {
			t.Errorf("commented-out key %q is not a flag", m[1])
		}
	}
}
