// Command stundbench runs the same loopback workloads against stund and
// coturn's turnserver, alternating A/B over several rounds with a fresh
// server process each round, and prints the median of each figure and
// the ratio stund/coturn. A generator ceiling (an in-process echo) is
// measured in the same run. See bench/README.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
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

	"github.com/stund/stund/bench/loadgen"
)

type opts struct {
	rounds        int
	dur, lowDur   time.Duration
	relayDur      time.Duration
	allocs        []int // RSS checkpoints, ascending
	bindFlows     int
	bindWindow    int
	relayCounts   []int
	relaySizes    []int
	stund, coturn string
	base          string // a second stund binary (A/B of a change), "" = none
	baseArgs      string // extra flags for base
	stundArgs     string // extra flags for stund
	profDir       string // CPU profiles of stund (--pprof) per workload go here; "" = none
	round         int    // the round being run (profile file names)
	only          string
	work          map[string]bool // workloads to run: alloc, bind, relay
	smoke         bool
}

const (
	user, pass = "u", "p"
	realm      = "bench"
	// Ports away from 3478 so a bench never meets a test's server.
	// Relay ports below the ephemeral range (32768-60999): the
	// generator's 10k client sockets would otherwise crowd it (508).
	stundPort  = 35780
	coturnPort = 35790
	basePort   = 35800
	relayMin   = 10000
	relayMax   = 31999
	// allocWorkers: allocations in flight at once during churn.
	allocWorkers = 32
)

func main() {
	var o opts
	var allocs string
	flag.IntVar(&o.rounds, "rounds", 5, "rounds (each: a fresh stund and a fresh coturn, order alternating)")
	flag.DurationVar(&o.dur, "dur", 3*time.Second, "duration of the Binding throughput run")
	flag.DurationVar(&o.lowDur, "low", time.Second, "duration of each low-load latency run")
	flag.DurationVar(&o.relayDur, "relay", 1500*time.Millisecond, "duration of each relay run")
	flag.StringVar(&allocs, "allocs", "1000,10000", "allocation counts at which RSS is read")
	flag.IntVar(&o.bindFlows, "bind-flows", 8, "client sockets for Binding")
	flag.IntVar(&o.bindWindow, "bind-window", 32, "Binding requests in flight per socket")
	flag.StringVar(&o.stund, "stund", "bin/stund", "stund binary")
	flag.StringVar(&o.coturn, "turnserver", "turnserver", "coturn binary")
	flag.StringVar(&o.base, "base", "", "also run this stund binary as server \"base\" (before/after a change, same run)")
	flag.StringVar(&o.baseArgs, "base-args", "", "extra flags for the base server, space-separated (e.g. --offload=off: the same binary with the kernel relay off)")
	flag.StringVar(&o.stundArgs, "stund-args", "", "extra flags for the stund server, space-separated (e.g. --offload=off to profile the userspace relay)")
	flag.StringVar(&o.only, "only", "", "run only this server (stund, coturn or base)")
	flag.StringVar(&o.profDir, "profile", "", "`DIR` for CPU profiles of stund (its --pprof) during Binding and each relay kind")
	var work string
	flag.StringVar(&work, "work", "alloc,bind,relay", "workloads to run (alloc, bind, relay)")
	flag.BoolVar(&o.smoke, "smoke", false, "seconds-long check that the harness works end to end (no speed assertion)")
	relayCounts := flag.String("relay-allocs", "1,8,64", "allocation counts of the relay workloads (at most 64)")
	relaySizes := flag.String("relay-sizes", "100,1200", "payload sizes in bytes of the relay workloads")
	flag.Parse()
	o.relayCounts = intList("-relay-allocs", *relayCounts, 64)
	o.relaySizes = intList("-relay-sizes", *relaySizes, 1400)
	o.work = map[string]bool{}
	for _, w := range strings.Split(work, ",") {
		if w != "alloc" && w != "bind" && w != "relay" {
			fatal(fmt.Errorf("-work: unknown workload %q", w))
		}
		o.work[w] = true
	}
	for _, f := range strings.Split(allocs, ",") {
		var n int
		if _, err := fmt.Sscan(f, &n); err != nil || n <= 0 {
			fatal(fmt.Errorf("-allocs: %q is not a count", f))
		}
		o.allocs = append(o.allocs, n)
	}
	if o.smoke {
		o.rounds, o.dur, o.lowDur, o.relayDur = 1, 300*time.Millisecond, 200*time.Millisecond, 200*time.Millisecond
		o.allocs = []int{20, 50}
	}

	// Only a real signal kills the servers and exits 130: the context's
	// own cancel (stop, when run returns) must not race main to an exit
	// status (it made a finished `make bench` fail with 130).
	ctx, stop := context.WithCancel(context.Background())
	defer stop()
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() { <-sigs; stop(); killAll(); os.Exit(130) }()
	defer killAll()

	if err := run(ctx, o); err != nil {
		killAll()
		fatal(err)
	}
}

// intList parses a comma-separated list of counts in 1..max, ascending.
func intList(flagName, v string, max int) []int {
	var out []int
	for _, f := range strings.Split(v, ",") {
		var n int
		if _, err := fmt.Sscan(f, &n); err != nil || n <= 0 || n > max || (len(out) > 0 && n <= out[len(out)-1]) {
			fatal(fmt.Errorf("%s: %q is not an ascending list of counts from 1 to %d", flagName, v, max))
		}
		out = append(out, n)
	}
	return out
}

func fatal(err error) {
	fmt.Fprintln(os.Stderr, "stundbench:", err)
	os.Exit(1)
}

// figures[server][key] holds one value per round.
type figures map[string]map[string][]float64

func (f figures) add(srv, key string, v float64) {
	if f[srv] == nil {
		f[srv] = map[string][]float64{}
	}
	f[srv][key] = append(f[srv][key], v)
}

func run(ctx context.Context, o opts) error {
	servers := []string{"stund", "coturn"}
	if o.base != "" {
		servers = append(servers, "base")
	}
	if o.only != "" {
		servers = []string{o.only}
	}
	figs := figures{}
	start := time.Now()
	for r := 0; r < o.rounds; r++ {
		order := servers
		if r%2 == 1 { // alternate the order: no server always runs first
			order = make([]string, len(servers))
			for i, sv := range servers {
				order[len(servers)-1-i] = sv
			}
		}
		if err := ceiling(o, figs); err != nil {
			return fmt.Errorf("echo ceiling: %w", err)
		}
		for _, name := range order {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			fmt.Fprintf(os.Stderr, "round %d/%d: %s (%.0fs elapsed)\n", r+1, o.rounds, name, time.Since(start).Seconds())
			o.round = r + 1
			if err := round(o, name, figs); err != nil {
				return fmt.Errorf("round %d, %s: %w", r+1, name, err)
			}
		}
	}
	print(o, figs, servers)
	if o.smoke && len(o.work) == 3 {
		// The smoke run asserts only that the harness works: both
		// servers answered every workload.
		for _, s := range servers {
			for _, k := range []string{"bind.rate", "alloc.rate", "relay.cd.100.1.rate", "relay.send.100.1.rate"} {
				if v := median(figs[s][k]); !(v > 0) {
					return fmt.Errorf("smoke: %s measured no %s", s, k)
				}
			}
		}
		fmt.Println("smoke: harness OK (both servers answered every workload)")
	}
	return nil
}

// ceiling measures the generator against a trivial in-process echo.
func ceiling(o opts, figs figures) error {
	echo, err := loadgen.NewEcho(1)
	if err != nil {
		return err
	}
	defer echo.Close()
	fs, closeFs, err := loadgen.BindingFlows(echo.Addr(), o.bindFlows)
	if err != nil {
		return err
	}
	res := loadgen.Run(fs, o.bindWindow, o.dur, 16)
	closeFs()
	figs.add("echo", "bind.rate", res.Rate())
	figs.add("echo", "bind.p99.load", us(res.Pct(99)))

	fs, closeFs, err = loadgen.BindingFlows(echo.Addr(), 64)
	if err != nil {
		return err
	}
	res = loadgen.Run(loadgen.WithPacket(fs, func(i int) loadgen.Packet { return loadgen.ChannelDataPacket(0x4000, 100) }), 2, o.relayDur, 16)
	closeFs()
	figs.add("echo", "relay.cd.100.64.rate", res.Rate())
	return nil
}

func us(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }

// round starts a fresh server, runs every workload against it, stops it.
func round(o opts, name string, figs figures) error {
	peer, err := loadgen.NewEcho(1)
	if err != nil {
		return err
	}
	defer peer.Close()

	srv, err := startServer(o, name, peer.Addr())
	if err != nil {
		return err
	}
	defer srv.stop()
	target := srv.addr
	pid := srv.cmd.Process.Pid

	// Memory and allocation churn first, on a server that has done
	// nothing else yet (RSS never shrinks back).
	time.Sleep(200 * time.Millisecond)
	p0, err := loadgen.ReadProc(pid)
	if err != nil {
		return err
	}
	figs.add(name, "rss.0", float64(p0.RSSKiB)/1024)
	figs.add(name, "threads.0", float64(p0.Threads))
	figs.add(name, "fds.0", float64(p0.FDs))
	if o.work["alloc"] {
		if err := allocChurn(o, name, figs, target, pid, p0); err != nil {
			return err
		}
	}
	if o.work["bind"] {
		if err := binding(o, name, figs, target, pid); err != nil {
			return err
		}
	}
	if o.work["relay"] {
		return relay(o, name, figs, target, pid, peer.Addr())
	}
	return nil
}

// allocChurn allocates up to each RSS checkpoint, then deletes every
// allocation with Refresh(0).
func allocChurn(o opts, name string, figs figures, target netip.AddrPort, pid int, p0 loadgen.ProcSample) error {
	var all []*loadgen.Alloc
	var allocTime time.Duration
	prev := 0
	for _, n := range o.allocs {
		as, el, err := loadgen.Allocs(target, user, pass, n-prev, allocWorkers, 60*time.Second)
		all = append(all, as...)
		allocTime += el
		if err != nil {
			loadgen.Release(all, allocWorkers)
			return fmt.Errorf("allocating to %d: %w", n, err)
		}
		prev = n
		time.Sleep(200 * time.Millisecond)
		p, err := loadgen.ReadProc(pid)
		if err != nil {
			return err
		}
		figs.add(name, fmt.Sprintf("rss.%d", n), float64(p.RSSKiB)/1024)
		figs.add(name, fmt.Sprintf("kib.per.alloc.%d", n), float64(p.RSSKiB-p0.RSSKiB)/float64(n))
		figs.add(name, fmt.Sprintf("threads.%d", n), float64(p.Threads))
		figs.add(name, fmt.Sprintf("fds.%d", n), float64(p.FDs))
	}
	pA, _ := loadgen.ReadProc(pid)
	figs.add(name, "alloc.rate", float64(len(all))/allocTime.Seconds())
	figs.add(name, "alloc.cpu", (pA.CPUSeconds-p0.CPUSeconds)*1e6/float64(len(all)))
	done := profile(o, name, "refresh", 2*time.Second) // the deletions take about a second
	okN, el := loadgen.Release(all, allocWorkers)
	pR, _ := loadgen.ReadProc(pid)
	done()
	if okN < len(all)*99/100 {
		return fmt.Errorf("refresh(0): %d of %d succeeded", okN, len(all))
	}
	figs.add(name, "refresh.rate", float64(okN)/el.Seconds())
	figs.add(name, "refresh.cpu", (pR.CPUSeconds-pA.CPUSeconds)*1e6/float64(okN))
	return nil
}

func binding(o opts, name string, figs figures, target netip.AddrPort, pid int) error {
	// STUN Binding: low load (one request at a time), then many in flight.
	fs, closeFs, err := loadgen.BindingFlows(target, o.bindFlows)
	if err != nil {
		return err
	}
	defer closeFs()
	res := loadgen.Run(fs[:1], 1, o.lowDur, 1)
	figs.add(name, "bind.p50.low", us(res.Pct(50)))
	figs.add(name, "bind.p99.low", us(res.Pct(99)))
	b0, _ := loadgen.ReadProc(pid)
	done := profile(o, name, "bind", o.dur)
	res = loadgen.Run(fs, o.bindWindow, o.dur, 16)
	done()
	b1, _ := loadgen.ReadProc(pid)
	if res.Recv == 0 {
		return errors.New("no Binding replies")
	}
	figs.add(name, "bind.rate", res.Rate())
	figs.add(name, "bind.cpu", (b1.CPUSeconds-b0.CPUSeconds)*1e6/float64(res.Recv))
	figs.add(name, "bind.p99.load", us(res.Pct(99)))
	figs.add(name, "bind.loss", res.Loss()*100)
	return nil
}

func relay(o opts, name string, figs figures, target netip.AddrPort, pid int, peerAddr netip.AddrPort) error {
	// Relay: 64 allocations with a channel, 64 with a permission only.
	maxN := o.relayCounts[len(o.relayCounts)-1]
	cdAllocs, _, err := loadgen.Allocs(target, user, pass, maxN, 8, 20*time.Second)
	defer loadgen.Release(cdAllocs, 8)
	if err != nil {
		return err
	}
	sdAllocs, _, err := loadgen.Allocs(target, user, pass, maxN, 8, 20*time.Second)
	defer loadgen.Release(sdAllocs, 8)
	if err != nil {
		return err
	}
	cd, err := loadgen.RelayFlows(cdAllocs, peerAddr, true, 100)
	if err != nil {
		return fmt.Errorf("channel bind: %w", err)
	}
	sd, err := loadgen.RelayFlows(sdAllocs, peerAddr, false, 100)
	if err != nil {
		return fmt.Errorf("permission: %w", err)
	}
	res := loadgen.Run(cd[:1], 1, o.lowDur, 1)
	figs.add(name, "relay.p50.low", us(res.Pct(50)))
	figs.add(name, "relay.p99.low", us(res.Pct(99)))
	for _, kind := range []string{"cd", "send"} {
		done := profile(o, name, "relay-"+kind, time.Duration(len(o.relaySizes)*len(o.relayCounts))*o.relayDur)
		for _, size := range o.relaySizes {
			for _, n := range o.relayCounts {
				var flows []loadgen.Flow
				if kind == "cd" {
					flows = loadgen.WithPacket(cd[:n], func(i int) loadgen.Packet { return loadgen.ChannelDataPacket(uint16(0x4000+i), size) })
				} else {
					flows = loadgen.WithPacket(sd[:n], func(i int) loadgen.Packet { return loadgen.SendPacket(peerAddr, size) })
				}
				// About 64 round trips in flight in total: enough to
				// keep both cores busy, few enough that 1200-byte
				// packets fit the default socket buffers.
				window := 64 / n
				if window < 2 {
					window = 2
				}
				c0, _ := loadgen.ReadProc(pid)
				m0, _ := loadgen.ReadMachineCPU()
				res := loadgen.Run(flows, window, o.relayDur, 16)
				m1, _ := loadgen.ReadMachineCPU()
				c1, _ := loadgen.ReadProc(pid)
				k := fmt.Sprintf("relay.%s.%d.%d", kind, size, n)
				figs.add(name, k+".rate", res.Rate())
				if res.Recv > 0 {
					figs.add(name, k+".cpu", (c1.CPUSeconds-c0.CPUSeconds)*1e6/float64(res.Recv))
					// the generator's share is the same work whatever
					// the server; the kernel relay's is only here
					figs.add(name, k+".mcpu", (m1-m0)*1e6/float64(res.Recv))
				}
				figs.add(name, k+".loss", res.Loss()*100)
				figs.add(name, k+".p99", us(res.Pct(99)))
			}
		}
		done() // one CPU profile at a time
	}
	return nil
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

type row struct{ key, label string }

func rows(o opts) []row {
	r := []row{
		{"bind.rate", "Binding requests/s (many in flight)"},
		{"bind.cpu", "Binding server CPU µs/request"},
		{"bind.loss", "Binding loss %"},
		{"bind.p50.low", "Binding RTT p50 µs, low load"},
		{"bind.p99.low", "Binding RTT p99 µs, low load"},
		{"bind.p99.load", "Binding RTT p99 µs, under load"},
		{"alloc.rate", "Allocations/s (401 + Allocate)"},
		{"alloc.cpu", "Allocation server CPU µs each"},
		{"refresh.rate", "Refresh(0) deletions/s"},
		{"refresh.cpu", "Refresh(0) server CPU µs each"},
		{"rss.0", "RSS MiB, 0 allocations"},
	}
	for _, n := range o.allocs {
		r = append(r,
			row{fmt.Sprintf("rss.%d", n), fmt.Sprintf("RSS MiB, %d allocations", n)},
			row{fmt.Sprintf("kib.per.alloc.%d", n), fmt.Sprintf("KiB RSS per allocation at %d", n)})
	}
	last := o.allocs[len(o.allocs)-1]
	r = append(r,
		row{"threads.0", "threads, idle"},
		row{fmt.Sprintf("threads.%d", last), fmt.Sprintf("threads at %d allocations", last)},
		row{"fds.0", "fds, idle"},
		row{fmt.Sprintf("fds.%d", last), fmt.Sprintf("fds at %d allocations", last)},
		row{"relay.p50.low", "Relay RTT p50 µs, low load (ChannelData 100 B)"},
		row{"relay.p99.low", "Relay RTT p99 µs, low load (ChannelData 100 B)"},
	)
	for _, kind := range []string{"cd", "send"} {
		kl := map[string]string{"cd": "ChannelData", "send": "Send/Data ind."}[kind]
		for _, size := range o.relaySizes {
			for _, n := range o.relayCounts {
				k := fmt.Sprintf("relay.%s.%d.%d", kind, size, n)
				d := fmt.Sprintf("%s %d B, %d alloc", kl, size, n)
				r = append(r,
					row{k + ".rate", d + ": round trips/s"},
					row{k + ".cpu", d + ": CPU µs/round trip"},
					row{k + ".mcpu", d + ": machine CPU µs/round trip"},
					row{k + ".loss", d + ": loss %"},
					row{k + ".p99", d + ": RTT p99 µs"})
			}
		}
	}
	return r
}

func print(o opts, figs figures, servers []string) {
	fmt.Printf("\nstundbench %s, %d round(s), medians; CPU = server utime+stime per operation, machine CPU = the whole machine's busy time (generator, server, kernel) per operation; a round trip through the relay is two relayed packets\n",
		time.Now().Format("2006-01-02 15:04"), o.rounds)
	fmt.Printf("generator ceiling (in-process echo): Binding %.0f req/s (p99 %.0f µs), ChannelData 100 B x64 %.0f round trips/s\n\n",
		median(figs["echo"]["bind.rate"]), median(figs["echo"]["bind.p99.load"]), median(figs["echo"]["relay.cd.100.64.rate"]))
	tw := tabwriter.NewWriter(os.Stdout, 2, 4, 2, ' ', tabwriter.AlignRight)
	idx := map[string]int{}
	for i, sv := range servers {
		idx[sv] = i
	}
	// Ratios: stund against coturn (the targets), and stund against
	// base when a baseline binary ran (before/after one change).
	var pairs [][2]int
	var heads []string
	for _, p := range [][2]string{{"stund", "coturn"}, {"stund", "base"}} {
		a, okA := idx[p[0]]
		b, okB := idx[p[1]]
		if okA && okB {
			pairs = append(pairs, [2]int{a, b})
			heads = append(heads, p[0]+"/"+p[1])
		}
	}
	fmt.Fprintf(tw, "figure\t%s\t%s\t\n", strings.Join(servers, "\t"), strings.Join(heads, "\t"))
	for _, r := range rows(o) {
		var cells []string
		var vals []float64
		measured := false
		for _, s := range servers {
			v := median(figs[s][r.key])
			measured = measured || len(figs[s][r.key]) > 0
			vals = append(vals, v)
			cells = append(cells, fmtNum(v))
		}
		if !measured {
			continue // a workload left out with -work
		}
		for _, p := range pairs {
			ratio := ""
			if vals[p[1]] != 0 {
				ratio = fmt.Sprintf("%.2f", vals[p[0]]/vals[p[1]])
			}
			cells = append(cells, ratio)
		}
		fmt.Fprintf(tw, "%s\t%s\t\n", r.label, strings.Join(cells, "\t"))
	}
	tw.Flush()
}

func fmtNum(v float64) string {
	switch {
	case v == 0:
		return "0"
	case v >= 1000:
		return fmt.Sprintf("%.0f", v)
	case v >= 10:
		return fmt.Sprintf("%.1f", v)
	default:
		return fmt.Sprintf("%.3f", v)
	}
}

// ---- server processes ----

type server struct {
	name string
	cmd  *exec.Cmd
	addr netip.AddrPort
}

var (
	procMu sync.Mutex
	procs  = map[*exec.Cmd]bool{}
)

func killAll() {
	procMu.Lock()
	defer procMu.Unlock()
	for c := range procs {
		_ = syscall.Kill(-c.Process.Pid, syscall.SIGKILL)
		_ = c.Wait()
		delete(procs, c)
	}
}

// pprofPort: stund's admin listener when -profile is given.
const pprofPort = 35799

// profile takes a CPU profile of stund (not coturn, not base) for d from
// its /debug/pprof/ into o.profDir; the returned func waits for it.
func profile(o opts, name, what string, d time.Duration) func() {
	if o.profDir == "" || name != "stund" {
		return func() {}
	}
	secs := int(d.Seconds())
	if secs < 1 {
		secs = 1
	}
	path := filepath.Join(o.profDir, fmt.Sprintf("stund-%s-r%d.pprof", what, o.round))
	done := make(chan struct{})
	go func() {
		defer close(done)
		c := &http.Client{Timeout: time.Duration(secs+10) * time.Second}
		resp, err := c.Get(fmt.Sprintf("http://127.0.0.1:%d/debug/pprof/profile?seconds=%d", pprofPort, secs))
		if err != nil {
			fmt.Fprintln(os.Stderr, "profile:", err)
			return
		}
		defer resp.Body.Close()
		f, err := os.Create(path)
		if err != nil {
			fmt.Fprintln(os.Stderr, "profile:", err)
			return
		}
		defer f.Close()
		_, _ = io.Copy(f, resp.Body)
	}()
	var once sync.Once
	return func() { once.Do(func() { <-done }) }
}

// stundArgs: stund on loopback, one IP, UDP only, every quota and
// per-source limit off (as coturn runs here).
func stundArgs(port int) []string {
	return []string{"--primary-ip", "127.0.0.1", "--single-ip",
		"--port", fmt.Sprint(port), "--alt-port", fmt.Sprint(port + 1), "--no-tcp",
		"--realm", realm, "--user", user + ":" + pass,
		"--allow-peer", "127.0.0.0/8", "--relay-ports", fmt.Sprintf("%d-%d", relayMin, relayMax),
		"--user-quota", "-1", "--total-quota", "-1", "--log-level", "error",
		// The per-source limits would measure the limiter: every
		// client here is 127.0.0.1, and coturn has no such limit.
		"--unauth-rate", "-1", "--alloc-rate", "-1"}
}

func startServer(o opts, name string, peer netip.AddrPort) (*server, error) {
	var args []string
	var bin string
	var port int
	switch name {
	case "stund":
		bin, port = o.stund, stundPort
		args = append(stundArgs(port), strings.Fields(o.stundArgs)...)
		if o.profDir != "" {
			args = append(args, "--metrics", fmt.Sprintf("127.0.0.1:%d", pprofPort), "--pprof")
		}
	case "base":
		bin, port = o.base, basePort
		args = append(stundArgs(port), strings.Fields(o.baseArgs)...)
	case "coturn":
		bin, port = o.coturn, coturnPort
		args = []string{"-n", "--no-tls", "--no-dtls", "--no-tcp", "--no-cli",
			"-L", "127.0.0.1", "--relay-ip", "127.0.0.1", "-p", fmt.Sprint(port),
			"--min-port", fmt.Sprint(relayMin), "--max-port", fmt.Sprint(relayMax),
			"-r", realm, "-a", "-u", user + ":" + pass,
			"--allowed-peer-ip=" + peer.Addr().String(), "--allow-loopback-peers",
			"-q", "0", "-Q", "0",
			"--log-file", "/dev/null", "--no-stdout-log", "--simple-log",
			"--pidfile", fmt.Sprintf("/tmp/stundbench-turnserver-%d.pid", os.Getpid())}
	default:
		return nil, fmt.Errorf("unknown server %q", name)
	}
	// A port someone else holds would silently split traffic (stund's
	// SO_REUSEPORT group takes in any same-UID socket): refuse to run.
	for _, pt := range []int{port, port + 1} {
		probe, err := net.ListenPacket("udp4", fmt.Sprintf("127.0.0.1:%d", pt))
		if err != nil {
			return nil, fmt.Errorf("%s: port %d is busy (another server on this machine?): %w", name, pt, err)
		}
		probe.Close()
	}
	cmd := exec.Command(bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	var stderr strings.Builder
	cmd.Stderr = &limitWriter{b: &stderr, n: 4096}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	procMu.Lock()
	procs[cmd] = true
	procMu.Unlock()
	s := &server{name: name, cmd: cmd, addr: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(port))}
	if err := waitReady(s.addr, 10*time.Second); err != nil {
		s.stop()
		return nil, fmt.Errorf("%s not answering Binding on %s: %w; stderr: %s", name, s.addr, err, stderr.String())
	}
	return s, nil
}

func (s *server) stop() {
	procMu.Lock()
	defer procMu.Unlock()
	if !procs[s.cmd] {
		return
	}
	_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = s.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		_ = syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
		<-done
	}
	delete(procs, s.cmd)
}

func waitReady(addr netip.AddrPort, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	for time.Now().Before(deadline) {
		fs, closeFs, err := loadgen.BindingFlows(addr, 1)
		if err != nil {
			return err
		}
		res := loadgen.Run(fs, 1, 50*time.Millisecond, 1)
		closeFs()
		if res.Recv > 0 {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return errors.New("timeout")
}

type limitWriter struct {
	b *strings.Builder
	n int
}

func (w *limitWriter) Write(p []byte) (int, error) {
	if r := w.n - w.b.Len(); r > 0 {
		if len(p) > r {
			w.b.Write(p[:r])
		} else {
			w.b.Write(p)
		}
	}
	return len(p), nil
}
