// Package loadgen is stund's load generator: pipelined STUN Binding,
// TURN allocation churn and relayed round trips over loopback, with the
// server's own cost read from /proc. It is written so that it is not the
// bottleneck: batched socket I/O (recvmmsg/sendmmsg), one goroutine per
// socket, no per-packet allocation. EchoServer measures its ceiling.
package loadgen

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// clockTicks is USER_HZ, the unit of utime/stime in /proc/PID/stat; it is
// 100 on every Linux architecture Go supports.
const clockTicks = 100

// ProcSample is what /proc says about one process at one instant.
type ProcSample struct {
	CPUSeconds float64 // utime+stime of all threads
	RSSKiB     int64   // VmRSS
	Threads    int     // kernel threads (coturn: its worker threads; Go: Ms)
	FDs        int     // open file descriptors
}

// ReadProc samples /proc/PID/{stat,status,fd}.
func ReadProc(pid int) (ProcSample, error) {
	var s ProcSample
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return s, err
	}
	// The command name is in parentheses and may contain spaces: the
	// fields we want come after the last ')'.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return s, fmt.Errorf("/proc/%d/stat: unparseable", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// After ')': state(3) ... utime is field 14, stime 15 (1-based in
	// proc(5)), i.e. indexes 11 and 12 here.
	if len(f) < 13 {
		return s, fmt.Errorf("/proc/%d/stat: short", pid)
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	s.CPUSeconds = float64(ut+st) / clockTicks

	st2, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return s, err
	}
	for _, line := range strings.Split(string(st2), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		switch k {
		case "VmRSS":
			n, _ := strconv.ParseInt(strings.TrimSuffix(v, " kB"), 10, 64)
			s.RSSKiB = n
		case "Threads":
			s.Threads, _ = strconv.Atoi(v)
		}
	}
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err == nil {
		s.FDs = len(ents)
	}
	return s, nil
}

// ReadMachineCPU is the whole machine's busy CPU time so far, in seconds,
// from /proc/stat's first line: user, nice, system, irq and softirq (not
// idle, iowait or the hypervisor's steal). Work the kernel does for a
// server in another process's context (an eBPF relay running in the
// sender's softirq) is in it, where no process's utime+stime has it.
func ReadMachineCPU() (float64, error) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, err
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	if len(f) < 8 || f[0] != "cpu" {
		return 0, fmt.Errorf("/proc/stat: unexpected first line %q", line)
	}
	var busy int64
	for _, i := range []int{1, 2, 3, 6, 7} { // user nice system irq softirq
		v, err := strconv.ParseInt(f[i], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/stat: field %d: %w", i, err)
		}
		busy += v
	}
	return float64(busy) / clockTicks, nil
}
