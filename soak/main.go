// Command soak runs stund on loopback under allocation churn, relay
// traffic and malformed packets for a while, then checks that its RSS,
// goroutines and open file descriptors come back to within a tolerance of
// their baseline: what leaks under load shows here, not in unit tests.
//
//	go run ./soak -stund bin/stund -duration 10m   (make soak)
//
// Linux only (it reads /proc/PID). Every worker stops at the deadline;
// stund is killed at the end whatever happens.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pion/logging"
	"github.com/pion/stun/v4"
	"github.com/pion/turn/v5"
)

const (
	user, pass = "soak", "soak-pw"
	// Ports well away from the defaults and the tests' random ones.
	port, altPort = 34780, 34781
	metricsPort   = 34790
	relayMin      = 41000
	relayMax      = 41999
)

type sample struct {
	rssKiB, goroutines, fds int
}

func (s sample) String() string {
	return fmt.Sprintf("RSS %d KiB, goroutines %d, fds %d", s.rssKiB, s.goroutines, s.fds)
}

// counters of the workload, printed at the end.
var (
	allocs, allocErrs, relayed, echoed, junk, tcpConns atomic.Int64
)

func main() {
	bin := flag.String("stund", "bin/stund", "stund binary")
	dur := flag.Duration("duration", 10*time.Minute, "how long the load runs")
	tol := flag.Float64("tolerance", 0.10, "allowed growth over the baseline, as a fraction")
	settle := flag.Duration("settle", 90*time.Second, "longest wait for the figures to come back after the load")
	churners := flag.Int("churners", 4, "allocation churn workers")
	warmup := flag.Duration("warmup", 30*time.Second, "the same load before the baseline is taken")
	flag.Parse()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cmd := exec.Command(*bin,
		"--primary-ip", "127.0.0.1", "--alternate-ip", "127.0.0.2",
		"--port", strconv.Itoa(port), "--alt-port", strconv.Itoa(altPort),
		"--user", user+":"+pass, "--allow-peer", "127.0.0.0/8",
		"--relay-ports", fmt.Sprintf("%d-%d", relayMin, relayMax),
		"--user-quota", "-1", "--alloc-rate", "-1",
		"--metrics", fmt.Sprintf("127.0.0.1:%d", metricsPort),
		"--log-level", "error")
	cmd.Stdout, cmd.Stderr = io.Discard, os.Stderr
	if err := cmd.Start(); err != nil {
		fail("start stund: %v", err)
	}
	stundProc = cmd.Process
	defer killStund()
	pid := cmd.Process.Pid
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	go func() {
		// stund exiting on its own (a bind error, a crash) ends the soak:
		// the figures would be some other process's.
		err := <-exited
		if stopping.Load() {
			return
		}
		fmt.Fprintf(os.Stderr, "soak: stund exited: %v\n", err)
		os.Exit(1)
	}()
	if err := waitMetrics(20 * time.Second); err != nil {
		fail("stund did not come up: %v", err)
	}

	peer := startEcho(ctx)
	// Warm-up: the same load for -warmup, so that what the Go runtime
	// and the kernel grow once (heap arenas, pools, socket buffers) is in
	// the baseline, and what grows after it is what the load leaks.
	if *warmup > 0 {
		fmt.Printf("warm-up: %s of the same load\n", *warmup)
		load(pid, peer, time.Now().Add(*warmup), *churners, false)
		time.Sleep(5 * time.Second)
	}
	base := measure(pid)
	fmt.Printf("baseline: %v, Go heap in use %.1f MiB\n", base, metric("go_memstats_heap_inuse_bytes")/(1<<20))
	allocs.Store(0)
	allocErrs.Store(0)
	relayed.Store(0)
	echoed.Store(0)
	junk.Store(0)
	tcpConns.Store(0)

	peak := load(pid, peer, time.Now().Add(*dur), *churners, true)
	fmt.Printf("peak under load: %v\n", peak)

	// After the load: allocations were closed by their clients (Refresh
	// 0); TCP connections by both sides. Poll until the figures are back
	// or settle runs out.
	var end sample
	within := func(b, e int) bool { return float64(e) <= float64(b)*(1+*tol) }
	stop := time.Now().Add(*settle)
	for {
		end = measure(pid)
		ok := within(base.rssKiB, end.rssKiB) && within(base.goroutines, end.goroutines) && within(base.fds, end.fds)
		if ok || time.Now().After(stop) {
			break
		}
		time.Sleep(5 * time.Second)
	}
	fmt.Printf("after:    %v, Go heap in use %.1f MiB\n", end, metric("go_memstats_heap_inuse_bytes")/(1<<20))
	fmt.Printf("ratios:   RSS %.3f, goroutines %.3f, fds %.3f (limit %.2f)\n",
		ratio(end.rssKiB, base.rssKiB), ratio(end.goroutines, base.goroutines), ratio(end.fds, base.fds), 1+*tol)
	fmt.Printf("load:     %s, allocations %d (errors %d), relayed %d, echoed back %d, malformed %d, tcp conns %d\n",
		*dur, allocs.Load(), allocErrs.Load(), relayed.Load(), echoed.Load(), junk.Load(), tcpConns.Load())
	if !(within(base.rssKiB, end.rssKiB) && within(base.goroutines, end.goroutines) && within(base.fds, end.fds)) {
		fail("FAIL: not back within %.0f%% of the baseline", *tol*100)
	}
	fmt.Println("PASS")
}

func ratio(a, b int) float64 {
	if b == 0 {
		return 0
	}
	return float64(a) / float64(b)
}

// stundProc is killed by fail and at the end of main, so no stund
// outlives the soak.
var (
	stundProc *os.Process
	stopping  atomic.Bool
)

func killStund() {
	stopping.Store(true)
	if stundProc != nil {
		_ = stundProc.Kill()
	}
}

func fail(format string, a ...any) {
	killStund()
	fmt.Fprintf(os.Stderr, "soak: "+format+"\n", a...)
	os.Exit(1)
}

func measure(pid int) sample {
	var s sample
	if f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid)); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
				s.rssKiB, _ = strconv.Atoi(strings.Fields(v)[0])
			}
		}
		f.Close()
	}
	if ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid)); err == nil {
		s.fds = len(ents)
	}
	s.goroutines = int(metric("go_goroutines"))
	return s
}

var httpc = &http.Client{Timeout: 5 * time.Second}

func metric(name string) float64 {
	resp, err := httpc.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", metricsPort))
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	return -1
}

func waitMetrics(d time.Duration) error {
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		if metric("go_goroutines") > 0 {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("no /metrics on 127.0.0.1:%d", metricsPort)
}

// startEcho is the peer: it sends every datagram back.
func startEcho(ctx context.Context) net.Addr {
	pc, err := net.ListenPacket("udp4", "127.0.0.3:0")
	if err != nil {
		fail("peer: %v", err)
	}
	go func() { <-ctx.Done(); pc.Close() }()
	go func() {
		buf := make([]byte, 2048)
		for {
			n, a, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			_, _ = pc.WriteTo(buf[:n], a)
		}
	}()
	return pc.LocalAddr()
}

func client(network string) (*turn.Client, net.PacketConn, error) {
	lf := logging.NewDefaultLoggerFactory()
	lf.DefaultLogLevel = logging.LogLevelDisabled
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	var conn net.PacketConn
	if network == "tcp" {
		tc, err := net.DialTimeout("tcp4", addr, 5*time.Second)
		if err != nil {
			return nil, nil, err
		}
		tcpConns.Add(1)
		conn = turn.NewSTUNConn(tc)
	} else {
		pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
		if err != nil {
			return nil, nil, err
		}
		conn = pc
	}
	c, err := turn.NewClient(&turn.ClientConfig{
		STUNServerAddr: addr, TURNServerAddr: addr, Username: user, Password: pass,
		Conn: conn, LoggerFactory: lf, RTO: 200 * time.Millisecond,
	})
	if err != nil {
		conn.Close()
		return nil, nil, err
	}
	if err := c.Listen(); err != nil {
		c.Close()
		conn.Close()
		return nil, nil, err
	}
	return c, conn, nil
}

// withAllocation opens a client over network, allocates, runs use on the
// relay and closes everything, counting the allocation or its failure. It
// returns the client's own error (stund unreachable) so that the caller can
// back off; a refused Allocate is only counted.
func withAllocation(network string, use func(relay net.PacketConn)) error {
	c, conn, err := client(network)
	if err != nil {
		allocErrs.Add(1)
		return err
	}
	defer conn.Close()
	defer c.Close()
	relay, err := c.Allocate()
	if err != nil {
		allocErrs.Add(1)
		return nil
	}
	allocs.Add(1)
	defer relay.Close()
	use(relay)
	return nil
}

// churnOnce: allocate, relay a few datagrams through the echo peer, close.
func churnOnce(peer net.Addr, network string) {
	if err := withAllocation(network, func(relay net.PacketConn) { pingPong(relay, peer, 10) }); err != nil {
		time.Sleep(100 * time.Millisecond)
	}
}

func pingPong(relay net.PacketConn, peer net.Addr, n int) {
	buf := make([]byte, 1500)
	msg := make([]byte, 200)
	for i := 0; i < n; i++ {
		if _, err := relay.WriteTo(msg, peer); err != nil {
			return
		}
		relayed.Add(1)
		_ = relay.SetReadDeadline(time.Now().Add(time.Second))
		if _, _, err := relay.ReadFrom(buf); err == nil {
			echoed.Add(1)
		}
	}
}

// steadyRelay keeps two allocations busy for the whole run.
func steadyRelay(peer net.Addr, deadline time.Time) {
	var wg sync.WaitGroup
	for _, network := range []string{"udp", "tcp"} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_ = withAllocation(network, func(relay net.PacketConn) {
				for time.Now().Before(deadline) {
					pingPong(relay, peer, 100)
					time.Sleep(20 * time.Millisecond)
				}
			})
		}()
	}
	wg.Wait()
}

// malformedOnce sends a batch of bad datagrams and a few bad TCP streams.
func malformedOnce() {
	dst := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port}
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		return
	}
	defer pc.Close()
	zeroPeer := stun.MustBuild(stun.TransactionID, stun.NewType(stun.MethodSend, stun.ClassIndication),
		stun.RawAttribute{Type: stun.AttrXORPeerAddress}, stun.RawAttribute{Type: stun.AttrData, Value: []byte("x")}).Raw
	bind := stun.MustBuild(stun.TransactionID, stun.BindingRequest).Raw
	for i := 0; i < 200; i++ {
		var b []byte
		switch i % 5 {
		case 0:
			b = make([]byte, 32)
		case 1:
			b = zeroPeer
		case 2:
			b = make([]byte, 1+rand.IntN(600))
			for j := range b {
				b[j] = byte(rand.Uint32())
			}
		case 3:
			b = append([]byte{0x40, 0x00, 0x04, 0x00}, make([]byte, 8)...)
		case 4:
			b = append([]byte(nil), bind...)
			b[len(b)-1] ^= byte(rand.IntN(255) + 1) // a corrupted transaction ID: still answered
		}
		_, _ = pc.WriteTo(b, dst)
		junk.Add(1)
	}
	// Bad streams: garbage, half a header, a header and silence.
	for _, b := range [][]byte{[]byte("GET / HTTP/1.1\r\n\r\n"), bind[:7], zeroPeer} {
		c, err := net.DialTimeout("tcp4", dst.String(), time.Second)
		if err != nil {
			continue
		}
		tcpConns.Add(1)
		_, _ = c.Write(b)
		c.Close()
	}
	time.Sleep(50 * time.Millisecond) // about 4000 bad datagrams/s
}

// load runs the workload until deadline, printing a sample every 10 s
// when verbose, and returns the peak figures.
func load(pid int, peer net.Addr, deadline time.Time, churners int, verbose bool) sample {
	var wg sync.WaitGroup
	for i := 0; i < churners; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			for n := 0; time.Now().Before(deadline); n++ {
				network := "udp"
				if (i+n)%3 == 0 {
					network = "tcp"
				}
				churnOnce(peer, network)
			}
		}(i)
	}
	wg.Add(2)
	go func() { defer wg.Done(); steadyRelay(peer, deadline) }()
	go func() {
		defer wg.Done()
		for time.Now().Before(deadline) {
			malformedOnce()
		}
	}()
	var peak sample
	for time.Now().Before(deadline) {
		time.Sleep(min(10*time.Second, time.Until(deadline)+time.Millisecond))
		s := measure(pid)
		peak = sample{max(peak.rssKiB, s.rssKiB), max(peak.goroutines, s.goroutines), max(peak.fds, s.fds)}
		if verbose {
			fmt.Printf("  %s left: %v (allocations %d, errors %d, relayed %d, echoed %d, junk %d, tcp conns %d)\n",
				time.Until(deadline).Round(time.Second), s, allocs.Load(), allocErrs.Load(), relayed.Load(), echoed.Load(), junk.Load(), tcpConns.Load())
		}
	}
	wg.Wait()
	return peak
}
