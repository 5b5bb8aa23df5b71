package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// nsPrefix starts the name of every namespace the lab creates; the pid of
// the run follows, so that a later run can tell leftovers of a killed run
// (pid gone) from a run still in progress.
const nsPrefix = "natlab-"

// keepPrefix names the labs -keep leaves for debugging: no pid follows it, so
// cleanLeftovers never reaps them while someone is still using them.
const keepPrefix = "natlab-keep-"

var nsName = regexp.MustCompile(`^` + nsPrefix + `(\d+)-`)

// lab is one profile's three namespaces.
type lab struct {
	client, router, server string
	created                []string
}

func newLab(pid, idx int) *lab {
	base := fmt.Sprintf("%s%d-%d", nsPrefix, pid, idx)
	return &lab{client: base + "-c", router: base + "-r", server: base + "-s"}
}

// run runs a short setup command and returns its error with its output.
func run(ctx context.Context, name string, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

func runStdin(ctx context.Context, stdin, name string, args ...string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %v: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// setup builds the topology and loads the profile's ruleset. On error the
// caller still calls teardown, which removes whatever was created.
func (l *lab) setup(ctx context.Context, p profile) error {
	for _, ns := range []string{l.client, l.router, l.server} {
		if err := run(ctx, "ip", "netns", "add", ns); err != nil {
			return err
		}
		l.created = append(l.created, ns)
	}
	steps := [][]string{
		// veths are created directly inside the namespaces: the host's
		// own namespace never sees an interface of the lab.
		{"ip", "-n", l.router, "link", "add", "r0", "type", "veth", "peer", "name", "c0", "netns", l.client},
		{"ip", "-n", l.router, "link", "add", "r1", "type", "veth", "peer", "name", "s0", "netns", l.server},
		{"ip", "-n", l.client, "addr", "add", clientIP + "/24", "dev", "c0"},
		{"ip", "-n", l.router, "addr", "add", routerInIP + "/24", "dev", "r0"},
		{"ip", "-n", l.router, "addr", "add", routerPubIP + "/24", "dev", "r1"},
		{"ip", "-n", l.router, "addr", "add", routerPubB + "/24", "dev", "r1"},
		{"ip", "-n", l.server, "addr", "add", serverIP + "/24", "dev", "s0"},
		{"ip", "-n", l.server, "addr", "add", serverAltIP + "/24", "dev", "s0"},
	}
	if p.Pool {
		steps = append(steps, []string{"ip", "-n", l.router, "addr", "add", routerPubIP2 + "/24", "dev", "r1"})
	}
	for _, ns := range []string{l.client, l.router, l.server} {
		steps = append(steps,
			[]string{"ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"},
			[]string{"ip", "-n", ns, "link", "set", "lo", "up"})
	}
	steps = append(steps,
		[]string{"ip", "-n", l.client, "link", "set", "c0", "up"},
		[]string{"ip", "-n", l.router, "link", "set", "r0", "up"},
		[]string{"ip", "-n", l.router, "link", "set", "r1", "up"},
		[]string{"ip", "-n", l.server, "link", "set", "s0", "up"},
		[]string{"ip", "-n", l.client, "route", "add", "default", "via", routerInIP},
		// The router forwards; no redirects (a hairpinned packet leaves
		// by the interface it came in on) and no reverse-path filter.
		[]string{"ip", "netns", "exec", l.router, "sysctl", "-qw",
			"net.ipv4.ip_forward=1",
			"net.ipv4.conf.all.send_redirects=0",
			"net.ipv4.conf.r0.send_redirects=0",
			"net.ipv4.conf.all.rp_filter=0",
			"net.ipv4.conf.r0.rp_filter=0",
			"net.ipv4.conf.r1.rp_filter=0"},
		[]string{"ip", "netns", "exec", l.client, "sysctl", "-qw", "net.ipv4.conf.all.accept_redirects=0"},
	)
	for _, s := range steps {
		if err := run(ctx, s[0], s[1:]...); err != nil {
			return err
		}
	}
	if err := runStdin(ctx, p.Rules, "ip", "netns", "exec", l.router, "nft", "-f", "-"); err != nil {
		return fmt.Errorf("loading the %s ruleset: %w", p.Name, err)
	}
	// Netfilter sysctls exist once conntrack is loaded (the ruleset does
	// that) and are per network namespace.
	keys := make([]string, 0, len(p.Sysctls))
	for k := range p.Sysctls {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if err := run(ctx, "ip", "netns", "exec", l.router, "sysctl", "-qw", k+"="+p.Sysctls[k]); err != nil {
			return err
		}
	}
	return nil
}

// teardown kills whatever still runs in the lab's namespaces and deletes
// them (the veths go with them). It uses a fresh context: it must also run
// after an interrupt.
func (l *lab) teardown() error {
	var errs []error
	for _, ns := range l.created {
		killNSProcs(ns)
		if err := run(context.Background(), "ip", "netns", "del", ns); err != nil {
			errs = append(errs, err)
		}
	}
	l.created = nil
	return errors.Join(errs...)
}

// killNSProcs ends the processes left in one of the lab's own namespaces
// (started by this lab, or by a killed run of it).
func killNSProcs(ns string) {
	out, err := exec.Command("ip", "netns", "pids", ns).Output()
	if err != nil {
		return
	}
	for _, f := range strings.Fields(string(out)) {
		if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// cleanLeftovers deletes namespaces of earlier runs whose process is gone
// (a run killed with SIGKILL cannot clean up after itself).
func cleanLeftovers() (int, error) {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return 0, fmt.Errorf("ip netns list: %w", err)
	}
	n := 0
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		m := nsName.FindStringSubmatch(f[0])
		if m == nil {
			continue
		}
		pid, _ := strconv.Atoi(m[1])
		// Only a run whose process is certainly gone (ESRCH) left
		// leftovers; EPERM, or a PID from another PID namespace, is a
		// run we cannot see into, and its namespaces are not ours.
		if pid == os.Getpid() || !errors.Is(syscall.Kill(pid, 0), syscall.ESRCH) {
			continue
		}
		killNSProcs(f[0])
		if err := run(context.Background(), "ip", "netns", "del", f[0]); err == nil {
			n++
		}
	}
	return n, nil
}

// sweepOwn deletes every namespace of this run that may still exist.
func sweepOwn() {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return
	}
	own := fmt.Sprintf("%s%d-", nsPrefix, os.Getpid())
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) > 0 && strings.HasPrefix(f[0], own) {
			killNSProcs(f[0])
			_ = run(context.Background(), "ip", "netns", "del", f[0])
		}
	}
}

// preflight proves that namespaces, veths and nftables work here, so that a
// machine without them fails loudly instead of passing silently.
func preflight() error {
	if os.Geteuid() != 0 {
		return errors.New("natlab needs root: it creates network namespaces (ip netns add)")
	}
	for _, tool := range []string{"ip", "nft", "sysctl", "ss"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("natlab needs %q (install iproute2 and nftables): %w", tool, err)
		}
	}
	ns := fmt.Sprintf("%s%d-preflight", nsPrefix, os.Getpid())
	if err := run(context.Background(), "ip", "netns", "add", ns); err != nil {
		return fmt.Errorf("cannot create network namespaces on this machine: %w", err)
	}
	defer func() { _ = run(context.Background(), "ip", "netns", "del", ns) }()
	if err := runStdin(context.Background(), "table ip t { chain c { type nat hook postrouting priority srcnat; masquerade; }; }",
		"ip", "netns", "exec", ns, "nft", "-f", "-"); err != nil {
		return fmt.Errorf("nftables NAT does not work in a network namespace here: %w", err)
	}
	return nil
}

// clashDrops reads the router namespace's conntrack statistics (per network
// namespace, one line per CPU, hexadecimal) and sums insert_failed: packets
// dropped because their NAT tuple clashed with an existing entry.
func clashDrops(ctx context.Context, router string) (int64, error) {
	out, err := exec.CommandContext(ctx, "ip", "netns", "exec", router, "cat", "/proc/net/stat/nf_conntrack").Output()
	if err != nil {
		return 0, fmt.Errorf("reading the router's conntrack statistics: %w", err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	col := -1
	for i, h := range strings.Fields(lines[0]) {
		if h == "insert_failed" {
			col = i
		}
	}
	if col < 0 {
		return 0, fmt.Errorf("no insert_failed column in /proc/net/stat/nf_conntrack: %q", lines[0])
	}
	var sum int64
	for _, l := range lines[1:] {
		f := strings.Fields(l)
		if col < len(f) {
			v, err := strconv.ParseInt(f[col], 16, 64)
			if err != nil {
				return 0, fmt.Errorf("conntrack statistics: %w", err)
			}
			sum += v
		}
	}
	return sum, nil
}
