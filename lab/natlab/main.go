// Command natlab puts natprobe and stund on either side of a real Linux
// kernel NAT (nftables in a network namespace) for every NAT behaviour
// natprobe reports, and checks each report field against the ground truth
// written next to the profile's ruleset (profiles.go).
//
// It needs root. Run it from the module root: `make natlab` or
// `go run ./lab/natlab [-profile name,...] [-checks ...]`.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"
)

// The checks a profile can run; all by default.
//
//	lab      coturn's natdiscovery and the classic stun client against
//	         coturn: proves that the ruleset really behaves as its ground
//	         truth says, independently of our code.
//	natprobe natprobe --json against stund: every field vs the ground truth.
//	coturn   natprobe --json against coturn: the same verdicts.
//	interop  natdiscovery and the classic stun client against stund
//	         (lossless profiles only).
var allChecks = []string{"lab", "natprobe", "coturn", "interop"}

type result struct {
	p        profile
	observed string
	checks   []string // "name:ok" / "name:FAIL"
	details  []string
	wall     time.Duration
	ok       bool
}

func main() {
	var (
		only    = flag.String("profile", "", "comma-separated profiles to run (default: all)")
		checks  = flag.String("checks", strings.Join(allChecks, ","), "checks to run: "+strings.Join(allChecks, ","))
		jobs    = flag.Int("j", 6, "profiles run in parallel (each in its own namespaces; most of a profile's time is third-party clients waiting on timeouts, not CPU)")
		timeout = flag.Duration("timeout", 290*time.Second, "limit for the whole matrix")
		list    = flag.Bool("list", false, "print the profiles with their ground truth and exit")
		keep    = flag.String("keep", "", "debug: set up this profile, print its namespaces and leave them")
		runs    = flag.Int("runs", 0, "natprobe runs on each loss profile (0: the profile's own count); more runs hunt for an unstable verdict")
	)
	flag.Parse()
	if *list {
		for _, p := range profiles {
			fmt.Printf("%-15s %s\n    %s\n", p.Name, p.Want, p.Doc)
		}
		return
	}
	want := map[string]bool{}
	for _, c := range strings.Split(*checks, ",") {
		c = strings.TrimSpace(c)
		if c == "" {
			continue
		}
		if !contains(allChecks, c) {
			usage("unknown check %q", c)
		}
		want[c] = true
	}
	var run []int
	for _, name := range strings.Split(*only, ",") {
		name = strings.TrimSpace(name)
		if name == "" {
			continue
		}
		i := profileIndex(name)
		if i < 0 {
			usage("unknown profile %q (see -list)", name)
		}
		run = append(run, i)
	}
	if *keep != "" {
		run = []int{profileIndex(*keep)}
		if run[0] < 0 {
			usage("unknown profile %q", *keep)
		}
	}
	if len(run) == 0 {
		for i := range profiles {
			run = append(run, i)
		}
	}
	if *runs > 0 {
		for i := range profiles {
			if profiles[i].LossPct > 0 {
				profiles[i].Runs = *runs
			}
		}
	}
	if *jobs < 1 {
		usage("-j must be at least 1")
	}

	if err := preflight(); err != nil {
		fmt.Fprintln(os.Stderr, "natlab: FAIL:", err)
		os.Exit(2)
	}
	if n, err := cleanLeftovers(); err != nil {
		fmt.Fprintln(os.Stderr, "natlab:", err)
		os.Exit(2)
	} else if n > 0 {
		fmt.Fprintf(os.Stderr, "natlab: removed %d namespaces left by killed runs\n", n)
	}

	if *keep != "" {
		i := run[0]
		// A kept lab outlives this process, so its names carry no pid
		// for cleanLeftovers to find dead: another run must not reap it.
		l := newLab(os.Getpid(), i)
		l.client, l.router, l.server = keepPrefix+l.client[len(nsPrefix):], keepPrefix+l.router[len(nsPrefix):], keepPrefix+l.server[len(nsPrefix):]
		if err := l.setup(context.Background(), profiles[i]); err != nil {
			_ = l.teardown()
			fmt.Fprintln(os.Stderr, "natlab:", err)
			os.Exit(1)
		}
		fmt.Println(l.client, l.router, l.server)
		fmt.Fprintf(os.Stderr, "natlab: kept; remove with: for n in %s %s %s; do ip netns pids $n | xargs -r kill; ip netns del $n; done\n", l.client, l.router, l.server)
		return
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()

	tmp, err := tempDir("natlab-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "natlab:", err)
		os.Exit(2)
	}
	defer os.RemoveAll(tmp)

	// Build our binaries once, before any profile runs; each only if a
	// chosen check needs it.
	build := func(pkg string) string {
		start := time.Now()
		out, err := exec.CommandContext(ctx, "go", "build", "-o", tmp+"/", pkg).CombinedOutput()
		if err != nil {
			fmt.Fprintf(os.Stderr, "natlab: FAIL: cannot build %s (run from the module root; -checks lab runs the lab validation alone): %v\n%s", pkg, err, out)
			os.Exit(1)
		}
		fmt.Fprintf(os.Stderr, "natlab: built %s in %v\n", pkg, time.Since(start).Round(time.Millisecond))
		return filepath.Join(tmp, filepath.Base(pkg))
	}
	var stund, natprobe string
	if want["natprobe"] || want["interop"] {
		stund = build("./cmd/stund")
	}
	if want["natprobe"] || want["coturn"] {
		natprobe = build("./cmd/natprobe")
	}
	if want["lab"] || want["coturn"] || want["interop"] {
		for _, tool := range []string{"turnserver", "turnutils_natdiscovery", "stun"} {
			if _, err := exec.LookPath(tool); err != nil {
				fmt.Fprintf(os.Stderr, "natlab: FAIL: %s missing (apt-get install coturn stun-client): %v\n", tool, err)
				os.Exit(2)
			}
		}
	}

	start := time.Now()
	results := make([]result, len(run))
	queue := make(chan int)
	var wg sync.WaitGroup
	for w := 0; w < min(*jobs, len(run)); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range queue {
				results[k] = runProfile(ctx, run[k], profiles[run[k]], want, stund, natprobe, tmp)
				r := results[k]
				fmt.Fprintf(os.Stderr, "natlab: %-15s %s (%v)\n", r.p.Name, okFail(r.ok), r.wall.Round(100*time.Millisecond))
			}
		}()
	}
	// Longest first: the lifetime profile waits out conntrack timeouts
	// for most of a minute, so it starts at once and the short profiles
	// fill the other workers around it.
	order := make([]int, len(run))
	for k := range order {
		order[k] = k
	}
	sort.SliceStable(order, func(a, b int) bool {
		return profiles[run[order[a]]].Want.LifetimeS > profiles[run[order[b]]].Want.LifetimeS
	})
	for _, k := range order {
		if ctx.Err() != nil {
			break
		}
		queue <- k
	}
	close(queue)
	wg.Wait()
	sweepOwn()

	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "PROFILE\tEXPECTED\tOBSERVED\tCHECKS\tWALL\tRESULT")
	failed := 0
	for _, r := range results {
		if r.p.Name == "" {
			continue // never started (interrupted)
		}
		if !r.ok {
			failed++
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%.1fs\t%s\n", r.p.Name, r.p.Want, r.observed,
			strings.Join(r.checks, " "), r.wall.Seconds(), okFail(r.ok))
	}
	tw.Flush()
	for _, r := range results {
		for _, d := range r.details {
			fmt.Printf("  %s: %s\n", r.p.Name, d)
		}
	}
	ran := 0
	for _, r := range results {
		if r.p.Name != "" {
			ran++
		}
	}
	fmt.Printf("natlab: %d profiles, %d failed, %v wall\n", ran, failed, time.Since(start).Round(100*time.Millisecond))
	switch {
	case ctx.Err() != nil && ran < len(run):
		fmt.Printf("natlab: FAIL: stopped (%v) after %d of %d profiles\n", context.Cause(ctx), ran, len(run))
		os.Exit(1)
	case ctx.Err() != nil:
		fmt.Printf("natlab: FAIL: stopped (%v)\n", context.Cause(ctx))
		os.Exit(1)
	case failed > 0:
		os.Exit(1)
	}
}

// runProfile builds one profile's lab, runs the chosen checks and tears the
// lab down whatever happened.
func runProfile(ctx context.Context, idx int, p profile, want map[string]bool, stundBin, natprobeBin, tmp string) (r result) {
	start := time.Now()
	r = result{p: p, ok: true, observed: "-"}
	if len(p.Checks) > 0 { // the profile runs only these of the chosen checks
		only := map[string]bool{}
		for _, c := range p.Checks {
			only[c] = want[c]
		}
		want = only
	}
	fail := func(check string, msgs ...string) {
		r.ok = false
		for _, m := range msgs {
			r.details = append(r.details, check+": "+m)
		}
	}
	mark := func(check string, bad []string) {
		if len(bad) == 0 {
			r.checks = append(r.checks, check+":ok")
			return
		}
		r.checks = append(r.checks, check+":FAIL")
		fail(check, bad...)
	}
	defer func() { r.wall = time.Since(start) }()

	l := newLab(os.Getpid(), idx)
	defer func() {
		if err := l.teardown(); err != nil {
			fail("teardown", err.Error())
		}
	}()
	if err := l.setup(ctx, p); err != nil {
		fail("setup", err.Error())
		return r
	}
	dir := filepath.Join(tmp, p.Name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		fail("setup", err.Error())
		return r
	}
	lossless := p.LossPct == 0
	tolerant := p.LossPct >= 50

	var co, st, st5780 *server
	var err error
	if want["lab"] || want["coturn"] {
		if co, err = startCoturn(ctx, l.server, dir); err != nil {
			fail("coturn", err.Error())
		}
		defer co.stop()
	}
	if stundBin != "" {
		// The SIP mirror on this stund only: the second one below
		// would collide on its ports.
		if st, err = startStund(ctx, stundBin, l.server, stundPort, stundAltPort, append([]string{"--sip-mirror"}, stundArgs...)...); err != nil {
			fail("stund", err.Error())
		}
		defer st.stop()
		if want["interop"] && lossless {
			if st5780, err = startStund(ctx, stundBin, l.server, stund5780Port, stund5780AltPort,
				append([]string{"--rfc5780-always"}, stundArgs...)...); err != nil {
				fail("stund --rfc5780-always", err.Error())
			}
			defer st5780.stop()
		}
	}

	// Lab validation: third-party clients against a third-party server.
	if want["lab"] && co != nil && lossless {
		o, err := runNatdiscovery(ctx, l.client, coturnPort)
		if err != nil {
			fail("lab", err.Error())
		} else {
			mark("lab-natdisc", compare(p.Want, o, false))
			r.details = append(r.details, "natdiscovery→coturn: "+o.String())
			if r.observed == "-" {
				r.observed = "natdisc:" + o.Mapping + "/" + o.Filtering + " hp=" + o.Hairpin
			}
		}
		o, err = runClassicStun(ctx, l.client, coturnPort)
		if err != nil {
			fail("lab", err.Error())
		} else {
			mark("lab-stun", compare(p.Want, o, false))
			r.details = append(r.details, "stun→coturn: "+o.Legacy)
		}
	}
	if want["lab"] && co != nil && p.Want.LifetimeS > 0 {
		// The binding must survive a little less idle time than the
		// conntrack timeout and be gone a little after it.
		type res struct {
			alive bool
			err   error
		}
		short, long := p.Want.LifetimeS-4, p.Want.LifetimeS+3
		ch := make(chan res, 1)
		go func() { a, e := natdiscoveryLifetime(ctx, l.client, coturnPort, long); ch <- res{a, e} }()
		a1, e1 := natdiscoveryLifetime(ctx, l.client, coturnPort, short)
		r2 := <-ch
		var bad []string
		switch {
		case e1 != nil || r2.err != nil:
			bad = append(bad, fmt.Sprint(e1, r2.err))
		case !a1 || r2.alive:
			bad = append(bad, fmt.Sprintf("binding alive after %ds idle: %v (want true), after %ds: %v (want false)", short, a1, long, r2.alive))
		}
		mark("lab-life", bad)
		r.details = append(r.details, fmt.Sprintf("natdiscovery -t: alive after %ds=%v, after %ds=%v", short, a1, long, r2.alive))
	}
	if want["lab"] && p.LossPct > 0 {
		// 400 datagrams: the rate is within ±7 points with overwhelming
		// probability (binomial sd ≤ 2.5 points).
		rate, err := measureLoss(ctx, l.client, l.router, 400)
		var bad []string
		if err != nil {
			bad = append(bad, err.Error())
		} else if d := rate*100 - float64(p.LossPct); d > 7 || d < -7 {
			bad = append(bad, fmt.Sprintf("measured loss %.1f%%, want %d%%", rate*100, p.LossPct))
		}
		mark("lab-loss", bad)
		r.details = append(r.details, fmt.Sprintf("measured loss per direction %.1f%%", rate*100))
		if r.observed == "-" {
			r.observed = fmt.Sprintf("loss:%.0f%%", rate*100)
		}
	}
	if want["natprobe"] && st != nil {
		// Loss profiles run natprobe several times: at 25 % every run must
		// give the same (correct) verdicts, at 50 % every run only correct
		// or inconclusive ones.
		runs := max(p.Runs, 1)
		var bad []string
		var verdicts []string
		var durs []string
		seen := false
		for i := 0; i < runs && ctx.Err() == nil; i++ {
			// The first run on a loss profile, or on one whose NAT
			// makes natprobe fall back to the relay, also makes a call
			// (callFor), whose loss each way must match the profile's.
			o, b, err := runNatprobe(ctx, natprobeBin, l.client, stundPort, p, p.Want.Relay, p.Want.LifetimeS > 0, callFor(p, i))
			if err != nil {
				bad = append(bad, fmt.Sprintf("run %d: %v", i+1, err))
				continue
			}
			b = append(b, compare(p.Want, o, tolerant)...)
			for _, m := range b {
				bad = append(bad, fmt.Sprintf("run %d: %s", i+1, m))
			}
			if !seen || len(b) > 0 { // the first report, or a wrong one
				r.observed, seen = o.String(), true
			}
			if !contains(verdicts, o.String()) {
				verdicts = append(verdicts, o.String())
			}
			durs = append(durs, fmt.Sprintf("%.0f", o.durationMs))
			if len(o.extra) > 0 {
				r.details = append(r.details, fmt.Sprintf("natprobe→stund run %d: %s", i+1, strings.Join(o.extra, "; ")))
			}
		}
		if runs > 1 {
			r.details = append(r.details, fmt.Sprintf("natprobe→stund: %d runs, duration_ms %s, %d distinct reports: %s",
				runs, strings.Join(durs, " "), len(verdicts), strings.Join(verdicts, " | ")))
			if !tolerant && len(verdicts) > 1 {
				bad = append(bad, fmt.Sprintf("%d runs gave %d different reports", runs, len(verdicts)))
			}
		}
		mark("natprobe", bad)
	}
	if want["coturn"] && co != nil && natprobeBin != "" {
		o, bad, err := runNatprobe(ctx, natprobeBin, l.client, coturnPort, p, "", false, 0)
		if err != nil {
			fail("natprobe→coturn", err.Error())
			r.checks = append(r.checks, "coturn:FAIL")
		} else {
			w := p.Want
			w.LifetimeS, w.Relay = 0, ""
			mark("coturn", append(bad, compare(w, o, tolerant)...))
			if len(bad) > 0 || len(compare(w, o, tolerant)) > 0 {
				r.details = append(r.details, "natprobe→coturn observed: "+o.String())
			}
		}
	}
	if want["interop"] && st5780 != nil {
		if o, err := runNatdiscovery(ctx, l.client, stund5780Port); err != nil {
			fail("natdisc→stund", err.Error())
		} else if bad := compare(p.Want, o, false); len(bad) > 0 {
			mark("natdisc", bad)
			r.details = append(r.details, "natdiscovery→stund: "+o.String())
		} else {
			mark("natdisc", nil)
		}
	}
	if want["interop"] && st != nil && lossless {
		if o, err := runClassicStun(ctx, l.client, stundPort); err != nil {
			fail("stun→stund", err.Error())
		} else if bad := compare(p.Want, o, false); len(bad) > 0 {
			mark("stun", bad)
			r.details = append(r.details, "stun→stund: "+o.Legacy)
		} else {
			mark("stun", nil)
		}
	}
	// The router itself must not have lost packets to NAT tuple clashes:
	// such drops are the ruleset's doing, and would make natprobe's honest
	// "inconclusive" look like its own failure (profiles.go, xorChains).
	if n, err := clashDrops(ctx, l.router); err != nil {
		mark("lab-ct", []string{err.Error()})
	} else if n > 0 {
		mark("lab-ct", []string{fmt.Sprintf("the router's conntrack dropped %d packets on NAT tuple clashes (insert_failed): a ruleset defect", n)})
	} else {
		mark("lab-ct", nil)
	}
	if ctx.Err() != nil {
		fail("run", "interrupted: "+context.Cause(ctx).Error())
	}
	return r
}

func okFail(ok bool) string {
	if ok {
		return "ok"
	}
	return "FAIL"
}

func profileIndex(name string) int {
	for i, p := range profiles {
		if p.Name == name {
			return i
		}
	}
	return -1
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func usage(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "natlab: "+format+"\n", args...)
	flag.Usage()
	os.Exit(2)
}
