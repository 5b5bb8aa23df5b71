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
	opts := parseFlags()
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
	if opts.keep {
		keepLab(opts.run[0])
		return
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, opts.timeout)
	defer cancel()

	tmp, err := tempDir("natlab-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "natlab:", err)
		os.Exit(2)
	}
	defer os.RemoveAll(tmp)

	stund, natprobe := buildTools(ctx, opts.want, tmp)
	start := time.Now()
	results := runMatrix(ctx, opts, stund, natprobe, tmp)
	if code := summarise(ctx, results, len(opts.run), start); code != 0 {
		os.Exit(code)
	}
}

// labOptions is the command line.
type labOptions struct {
	want    map[string]bool // the checks to run
	run     []int           // indexes into profiles
	jobs    int
	timeout time.Duration
	keep    bool // set run[0] up and leave it
}

// parseFlags reads the command line; -list prints the profiles and exits,
// a misuse prints usage and exits 2.
func parseFlags() labOptions {
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
		os.Exit(0)
	}
	o := labOptions{want: parseChecks(*checks), run: parseProfiles(*only), jobs: *jobs, timeout: *timeout, keep: *keep != ""}
	if o.keep {
		o.run = []int{profileIndex(*keep)}
		if o.run[0] < 0 {
			usage("unknown profile %q", *keep)
		}
	}
	if *runs > 0 {
		for i := range profiles {
			if profiles[i].LossPct > 0 {
				profiles[i].Runs = *runs
			}
		}
	}
	if o.jobs < 1 {
		usage("-j must be at least 1")
	}
	return o
}

// parseChecks reads -checks: a comma-separated subset of allChecks.
func parseChecks(list string) map[string]bool {
	want := map[string]bool{}
	for _, c := range strings.Split(list, ",") {
		c = strings.TrimSpace(c)
		if c == "" {
			continue
		}
		if !contains(allChecks, c) {
			usage("unknown check %q", c)
		}
		want[c] = true
	}
	return want
}

// parseProfiles reads -profile: comma-separated names, all profiles when
// empty.
func parseProfiles(list string) []int {
	var run []int
	for _, name := range strings.Split(list, ",") {
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
	if len(run) == 0 {
		for i := range profiles {
			run = append(run, i)
		}
	}
	return run
}

// keepLab sets profile i up and leaves it for debugging (-keep).
func keepLab(i int) {
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
}

// buildTools builds our binaries once, before any profile runs, each only
// if a chosen check needs it, and checks that the third-party tools are
// installed.
func buildTools(ctx context.Context, want map[string]bool, tmp string) (stund, natprobe string) {
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
	return stund, natprobe
}

// runMatrix runs the chosen profiles on opts.jobs workers; a profile never
// started (interrupted) leaves a zero result.
func runMatrix(ctx context.Context, opts labOptions, stund, natprobe, tmp string) []result {
	run := opts.run
	results := make([]result, len(run))
	queue := make(chan int)
	var wg sync.WaitGroup
	for w := 0; w < min(opts.jobs, len(run)); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for k := range queue {
				results[k] = runProfile(ctx, run[k], profiles[run[k]], opts.want, stund, natprobe, tmp)
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
	return results
}

// summarise prints the results table and the details, and returns the
// exit status: 1 when a profile failed or the run was stopped.
func summarise(ctx context.Context, results []result, chosen int, start time.Time) int {
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "PROFILE\tEXPECTED\tOBSERVED\tCHECKS\tWALL\tRESULT")
	failed, ran := 0, 0
	for _, r := range results {
		if r.p.Name == "" {
			continue // never started (interrupted)
		}
		ran++
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
	fmt.Printf("natlab: %d profiles, %d failed, %v wall\n", ran, failed, time.Since(start).Round(100*time.Millisecond))
	switch {
	case ctx.Err() != nil && ran < chosen:
		fmt.Printf("natlab: FAIL: stopped (%v) after %d of %d profiles\n", context.Cause(ctx), ran, chosen)
		return 1
	case ctx.Err() != nil:
		fmt.Printf("natlab: FAIL: stopped (%v)\n", context.Cause(ctx))
		return 1
	case failed > 0:
		return 1
	}
	return 0
}

// runProfile builds one profile's lab, runs the chosen checks and tears the
// lab down whatever happened.
func runProfile(ctx context.Context, idx int, p profile, want map[string]bool, stundBin, natprobeBin, tmp string) (r result) {
	start := time.Now()
	if len(p.Checks) > 0 { // the profile runs only these of the chosen checks
		only := map[string]bool{}
		for _, c := range p.Checks {
			only[c] = want[c]
		}
		want = only
	}
	pr := &profileRun{
		ctx: ctx, p: p, want: want, natprobeBin: natprobeBin,
		r:        result{p: p, ok: true, observed: "-"},
		lossless: p.LossPct == 0, tolerant: p.LossPct >= 50,
		l: newLab(os.Getpid(), idx),
	}
	defer func() {
		if err := pr.l.teardown(); err != nil {
			pr.fail("teardown", err.Error())
		}
		r = pr.r
		r.wall = time.Since(start)
	}()
	pr.run(stundBin, tmp)
	return pr.r
}

// profileRun is one profile's lab while its checks run: each check is a
// method that records into r.
type profileRun struct {
	ctx                context.Context
	p                  profile
	want               map[string]bool
	natprobeBin        string
	l                  *lab
	r                  result
	lossless, tolerant bool // no loss at all; loss so high that "inconclusive" is acceptable

	co, st *server // coturn, stund; nil when not started
}

// fail records a failed step with its messages.
func (pr *profileRun) fail(check string, msgs ...string) {
	pr.r.ok = false
	for _, m := range msgs {
		pr.r.details = append(pr.r.details, check+": "+m)
	}
}

// mark records a check as ok, or as FAIL with what was wrong.
func (pr *profileRun) mark(check string, bad []string) {
	if len(bad) == 0 {
		pr.r.checks = append(pr.r.checks, check+":ok")
		return
	}
	pr.r.checks = append(pr.r.checks, check+":FAIL")
	pr.fail(check, bad...)
}

// run sets the lab up, starts the servers and runs the checks in order;
// the servers are stopped before it returns.
func (pr *profileRun) run(stundBin, tmp string) {
	if err := pr.l.setup(pr.ctx, pr.p); err != nil {
		pr.fail("setup", err.Error())
		return
	}
	dir := filepath.Join(tmp, pr.p.Name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		pr.fail("setup", err.Error())
		return
	}
	defer pr.stopServers()
	pr.startServers(stundBin, dir)
	pr.checkLab()
	pr.checkLabLifetime()
	pr.checkLabLoss()
	pr.checkNatprobe()
	pr.checkNatprobeCoturn()
	pr.checkInterop()
	pr.checkConntrack()
	if pr.ctx.Err() != nil {
		pr.fail("run", "interrupted: "+context.Cause(pr.ctx).Error())
	}
}

// startServers starts coturn and the two stund instances the chosen checks
// need.
func (pr *profileRun) startServers(stundBin, dir string) {
	ctx, want := pr.ctx, pr.want
	var err error
	if want["lab"] || want["coturn"] {
		if pr.co, err = startCoturn(ctx, pr.l.server, dir); err != nil {
			pr.fail("coturn", err.Error())
		}
	}
	if stundBin == "" {
		return
	}
	// The SIP mirror runs beside this stund (the natprobe runs' SIP test).
	if pr.st, err = startStund(ctx, stundBin, pr.l.server, stundPort, stundAltPort, append([]string{"--sip-mirror"}, stundArgs...)...); err != nil {
		pr.fail("stund", err.Error())
	}
}

// stopServers stops what startServers started, last started first.
func (pr *profileRun) stopServers() {
	pr.st.stop()
	pr.co.stop()
}

// checkLab is the lab validation: third-party clients against a
// third-party server.
func (pr *profileRun) checkLab() {
	if !pr.want["lab"] || pr.co == nil || !pr.lossless {
		return
	}
	r := &pr.r
	o, err := runNatdiscovery(pr.ctx, pr.l.client, coturnPort)
	if err != nil {
		pr.fail("lab", err.Error())
	} else {
		pr.mark("lab-natdisc", compare(pr.p.Want, o, false))
		r.details = append(r.details, "natdiscovery→coturn: "+o.String())
		if r.observed == "-" {
			r.observed = "natdisc:" + o.Mapping + "/" + o.Filtering + " hp=" + o.Hairpin
		}
	}
	o, err = runClassicStun(pr.ctx, pr.l.client, coturnPort)
	if err != nil {
		pr.fail("lab", err.Error())
	} else {
		pr.mark("lab-stun", compare(pr.p.Want, o, false))
		r.details = append(r.details, "stun→coturn: "+o.Legacy)
	}
}

// checkLabLifetime: the binding must survive a little less idle time than
// the conntrack timeout and be gone a little after it.
func (pr *profileRun) checkLabLifetime() {
	if !pr.want["lab"] || pr.co == nil || pr.p.Want.LifetimeS <= 0 {
		return
	}
	type res struct {
		alive bool
		err   error
	}
	ctx, client := pr.ctx, pr.l.client
	short, long := pr.p.Want.LifetimeS-4, pr.p.Want.LifetimeS+3
	ch := make(chan res, 1)
	go func() { a, e := natdiscoveryLifetime(ctx, client, coturnPort, long); ch <- res{a, e} }()
	a1, e1 := natdiscoveryLifetime(ctx, client, coturnPort, short)
	r2 := <-ch
	var bad []string
	switch {
	case e1 != nil || r2.err != nil:
		bad = append(bad, fmt.Sprint(e1, r2.err))
	case !a1 || r2.alive:
		bad = append(bad, fmt.Sprintf("binding alive after %ds idle: %v (want true), after %ds: %v (want false)", short, a1, long, r2.alive))
	}
	pr.mark("lab-life", bad)
	pr.r.details = append(pr.r.details, fmt.Sprintf("natdiscovery -t: alive after %ds=%v, after %ds=%v", short, a1, long, r2.alive))
}

// checkLabLoss measures the profile's loss rate. 400 datagrams: the rate is
// within ±7 points with overwhelming probability (binomial sd ≤ 2.5
// points).
func (pr *profileRun) checkLabLoss() {
	if !pr.want["lab"] || pr.p.LossPct <= 0 {
		return
	}
	rate, err := measureLoss(pr.ctx, pr.l.client, pr.l.router, 400)
	var bad []string
	if err != nil {
		bad = append(bad, err.Error())
	} else if d := rate*100 - float64(pr.p.LossPct); d > 7 || d < -7 {
		bad = append(bad, fmt.Sprintf("measured loss %.1f%%, want %d%%", rate*100, pr.p.LossPct))
	}
	pr.mark("lab-loss", bad)
	pr.r.details = append(pr.r.details, fmt.Sprintf("measured loss per direction %.1f%%", rate*100))
	if pr.r.observed == "-" {
		pr.r.observed = fmt.Sprintf("loss:%.0f%%", rate*100)
	}
}

// checkNatprobe runs natprobe against stund. Loss profiles run it several
// times: at 25 % every run must give the same (correct) verdicts, at 50 %
// every run only correct or inconclusive ones.
func (pr *profileRun) checkNatprobe() {
	if !pr.want["natprobe"] || pr.st == nil {
		return
	}
	p, r := pr.p, &pr.r
	runs := max(p.Runs, 1)
	var bad []string
	var verdicts []string
	var durs []string
	seen := false
	for i := 0; i < runs && pr.ctx.Err() == nil; i++ {
		// The first run on a loss profile, or on one whose NAT makes
		// natprobe fall back to the relay, also makes a call (callFor),
		// whose loss each way must match the profile's.
		o, b, err := runNatprobe(pr.ctx, pr.natprobeBin, pr.l.client, stundPort, p, p.Want.Relay, p.Want.LifetimeS > 0, callFor(p, i))
		if err != nil {
			bad = append(bad, fmt.Sprintf("run %d: %v", i+1, err))
			continue
		}
		b = append(b, compare(p.Want, o, pr.tolerant)...)
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
		if !pr.tolerant && len(verdicts) > 1 {
			bad = append(bad, fmt.Sprintf("%d runs gave %d different reports", runs, len(verdicts)))
		}
	}
	pr.mark("natprobe", bad)
}

// checkNatprobeCoturn runs natprobe against coturn: the same verdicts,
// without the lifetime and the relay, which that run does not ask for.
func (pr *profileRun) checkNatprobeCoturn() {
	if !pr.want["coturn"] || pr.co == nil || pr.natprobeBin == "" {
		return
	}
	o, bad, err := runNatprobe(pr.ctx, pr.natprobeBin, pr.l.client, coturnPort, pr.p, "", false, 0)
	if err != nil {
		pr.fail("natprobe→coturn", err.Error())
		pr.r.checks = append(pr.r.checks, "coturn:FAIL")
		return
	}
	w := pr.p.Want
	w.LifetimeS, w.Relay = 0, ""
	pr.mark("coturn", append(bad, compare(w, o, pr.tolerant)...))
	if len(bad) > 0 || len(compare(w, o, pr.tolerant)) > 0 {
		pr.r.details = append(pr.r.details, "natprobe→coturn observed: "+o.String())
	}
}

// checkInterop runs the third-party clients against stund (lossless
// profiles only): natdiscovery, whose bare first request needs
// OTHER-ADDRESS in its answer (default stund gives it to every request),
// and the classic stun client.
func (pr *profileRun) checkInterop() {
	if pr.want["interop"] && pr.st != nil && pr.lossless {
		if o, err := runNatdiscovery(pr.ctx, pr.l.client, stundPort); err != nil {
			pr.fail("natdisc→stund", err.Error())
		} else if bad := compare(pr.p.Want, o, false); len(bad) > 0 {
			pr.mark("natdisc", bad)
			pr.r.details = append(pr.r.details, "natdiscovery→stund: "+o.String())
		} else {
			pr.mark("natdisc", nil)
		}
	}
	if pr.want["interop"] && pr.st != nil && pr.lossless {
		if o, err := runClassicStun(pr.ctx, pr.l.client, stundPort); err != nil {
			pr.fail("stun→stund", err.Error())
		} else if bad := compare(pr.p.Want, o, false); len(bad) > 0 {
			pr.mark("stun", bad)
			pr.r.details = append(pr.r.details, "stun→stund: "+o.Legacy)
		} else {
			pr.mark("stun", nil)
		}
	}
}

// checkConntrack: the router itself must not have lost packets to NAT
// tuple clashes: such drops are the ruleset's doing, and would make
// natprobe's honest "inconclusive" look like its own failure (profiles.go,
// xorChains).
func (pr *profileRun) checkConntrack() {
	if n, err := clashDrops(pr.ctx, pr.l.router); err != nil {
		pr.mark("lab-ct", []string{err.Error()})
	} else if n > 0 {
		pr.mark("lab-ct", []string{fmt.Sprintf("the router's conntrack dropped %d packets on NAT tuple clashes (insert_failed): a ruleset defect", n)})
	} else {
		pr.mark("lab-ct", nil)
	}
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
