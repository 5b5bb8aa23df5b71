package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stund/stund/internal/testutil"
)

// childEnv makes the test binary run stund's main instead of the tests, so
// that a test can signal a real stund process.
const childEnv = "STUNDTEST_RUN_MAIN"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) == "1" {
		main()
		return
	}
	os.Exit(m.Run())
}

// stundArgs are the flags of a stund on ports p (UDP and TCP) and q, with
// one user, logging to stderr at info.
func stundArgs(p, q int) []string {
	return []string{"--port", strconv.Itoa(p), "--alt-port", strconv.Itoa(q),
		"--realm", "stund.test", "--user", "alice:alice-pw", "--log-level", "info"}
}

// portsFree fails unless every socket stund bound on p and q (UDP on both
// IPs, TCP on the primary port of both) and the relay can be bound again.
func portsFree(t *testing.T, p, q int, relay string) {
	t.Helper()
	for _, ip := range []string{"127.0.0.1", "127.0.0.2"} {
		for _, port := range []int{p, q} {
			a := net.JoinHostPort(ip, strconv.Itoa(port))
			c, err := net.ListenPacket("udp4", a)
			if err != nil {
				t.Errorf("udp %s still bound after shutdown: %v", a, err)
				continue
			}
			c.Close()
		}
		a := net.JoinHostPort(ip, strconv.Itoa(p))
		l, err := net.Listen("tcp4", a)
		if err != nil {
			t.Errorf("tcp %s still bound after shutdown: %v", a, err)
			continue
		}
		l.Close()
	}
	if c, err := net.ListenPacket("udp4", relay); err != nil {
		t.Errorf("relay %s still bound after shutdown: %v", relay, err)
	} else {
		c.Close()
	}
}

// waitFor polls cond every 10 ms until it holds or testTimeout passes.
func waitFor(cond func() bool) bool {
	for deadline := time.Now().Add(testTimeout); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if cond() {
			return true
		}
	}
	return cond()
}

// stundProcess is a real stund process on free ports.
type stundProcess struct {
	cmd         *exec.Cmd
	out, errOut *testutil.SyncBuffer
	done        chan error
	p, q        int
}

// startProcess starts stund with a live allocation of alice's; it returns
// nil (after retrying) only when no free ports could be had.
func startProcess(t *testing.T) (*stundProcess, net.PacketConn) {
	t.Helper()
	for try := 0; try < 5; try++ {
		sp := &stundProcess{out: &testutil.SyncBuffer{}, errOut: &testutil.SyncBuffer{}, done: make(chan error, 1)}
		sp.p, sp.q = freeUDPPorts(t)
		sp.cmd = exec.Command(os.Args[0], stundArgs(sp.p, sp.q)...)
		sp.cmd.Env = append(os.Environ(), childEnv+"=1")
		sp.cmd.Stdout, sp.cmd.Stderr = sp.out, sp.errOut
		if err := sp.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { sp.done <- sp.cmd.Wait() }()
		t.Cleanup(func() { _ = sp.cmd.Process.Kill() }) // os.ErrProcessDone once it exited
		started := waitFor(func() bool {
			select {
			case err := <-sp.done:
				sp.done <- err
				return true
			default:
			}
			return strings.Contains(sp.out.String(), "listening on")
		})
		if !strings.Contains(sp.out.String(), "listening on") {
			select {
			case <-sp.done:
				if strings.Contains(sp.errOut.String(), "address already in use") {
					continue // lost a race for the ports
				}
			default:
			}
			t.Fatalf("stund did not start (started=%v): %s %s", started, sp.out.String(), sp.errOut.String())
		}
		relay, err := allocate(t, fmt.Sprintf("127.0.0.1:%d", sp.p), "alice", "alice-pw")
		if err != nil {
			t.Fatalf("allocate: %v", err)
		}
		return sp, relay
	}
	t.Fatal("no free ports after 5 tries")
	return nil, nil
}

// waitExit0 waits for a clean exit.
func (sp *stundProcess) waitExit0(t *testing.T, after string) {
	t.Helper()
	select {
	case err := <-sp.done:
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			t.Fatalf("exit status %d after %s, want 0; stderr: %s", ee.ExitCode(), after, sp.errOut.String())
		} else if err != nil {
			t.Fatal(err)
		}
	case <-time.After(testTimeout):
		t.Fatalf("stund still running %v after %s; stderr: %s", testTimeout, after, sp.errOut.String())
	}
}

// drain sends SIGTERM and waits for the drain to be logged.
func (sp *stundProcess) drain(t *testing.T) {
	t.Helper()
	if err := sp.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if !waitFor(func() bool { return strings.Contains(sp.errOut.String(), "draining") }) {
		t.Fatalf("no drain logged after SIGTERM: %s", sp.errOut.String())
	}
}

// TestSIGTERMProcess: SIGTERM drains a real stund process: the call in
// progress keeps its allocation (a Refresh still succeeds) while new
// Allocates are refused (508, no alternate), and stund exits 0 as soon as
// the last allocation ends, leaving every port it bound free.
func TestSIGTERMProcess(t *testing.T) {
	sp, relay := startProcess(t)
	relayAddr := relay.LocalAddr().String()
	sp.drain(t)
	if _, err := allocate(t, fmt.Sprintf("127.0.0.1:%d", sp.p), "alice", "alice-pw"); err == nil {
		t.Fatal("a new Allocate succeeded while draining")
	}
	select {
	case err := <-sp.done:
		t.Fatalf("stund exited (%v) with an allocation left: %s", err, sp.errOut.String())
	default:
	}
	relay.Close() // Refresh 0: the last allocation ends
	sp.waitExit0(t, "the last allocation ended")
	if log := sp.errOut.String(); !strings.Contains(log, "drained: no allocation left") {
		t.Errorf("no \"drained\" line in the log:\n%s", log)
	}
	portsFree(t, sp.p, sp.q, relayAddr)
}

// TestSecondSIGTERM: a second SIGTERM during a drain stops stund at once.
func TestSecondSIGTERM(t *testing.T) {
	sp, relay := startProcess(t)
	relayAddr := relay.LocalAddr().String()
	sp.drain(t)
	if err := sp.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	sp.waitExit0(t, "a second SIGTERM")
	if log := sp.errOut.String(); !strings.Contains(log, "second SIGTERM") || !strings.Contains(log, "allocations=1") {
		t.Errorf("no \"second SIGTERM\" line with the live allocation in the log:\n%s", log)
	}
	portsFree(t, sp.p, sp.q, relayAddr)
}

// TestSIGINTInProcess: run() itself, on SIGINT, returns 0 after closing
// every listener and the live allocation's relay socket: the ports are
// free again while this process still runs (a process exit would free
// them anyway).
func TestSIGINTInProcess(t *testing.T) {
	for try := 0; try < 5; try++ {
		p, q := freeUDPPorts(t)
		out, errOut := &testutil.SyncBuffer{}, &testutil.SyncBuffer{}
		done := make(chan int, 1)
		go func() { done <- run(context.Background(), append([]string{"stund"}, stundArgs(p, q)...), out, errOut) }()
		var code = -1
		waitFor(func() bool {
			select {
			case code = <-done:
				return true
			default:
			}
			return strings.Contains(out.String(), "listening on")
		})
		if code != -1 {
			if strings.Contains(errOut.String(), "address already in use") {
				continue
			}
			t.Fatalf("stund exited %d: %s", code, errOut.String())
		}
		if !strings.Contains(out.String(), "listening on") {
			t.Fatalf("stund did not start: %s", errOut.String())
		}
		relay, err := allocate(t, fmt.Sprintf("127.0.0.1:%d", p), "alice", "alice-pw")
		if err != nil {
			t.Fatalf("allocate: %v", err)
		}
		relayAddr := relay.LocalAddr().String()

		// run() has SIGINT registered (signal.NotifyContext) while it
		// serves, so this reaches it, not the default action.
		if err := syscall.Kill(os.Getpid(), syscall.SIGINT); err != nil {
			t.Fatal(err)
		}
		select {
		case code = <-done:
		case <-time.After(testTimeout):
			t.Fatalf("run did not return after SIGINT; stderr: %s", errOut.String())
		}
		if code != 0 {
			t.Fatalf("run returned %d after SIGINT, want 0; stderr: %s", code, errOut.String())
		}
		if log := errOut.String(); !strings.Contains(log, "shutting down") || !strings.Contains(log, "stund stopped") {
			t.Errorf("log lacks \"shutting down\" / \"stund stopped\":\n%s", log)
		}
		portsFree(t, p, q, relayAddr)
		return
	}
	t.Fatal("no free ports after 5 tries")
}

// TestCLIMisuse: an unknown flag or a positional argument prints what is
// wrong and the usage, exits 2 and binds nothing.
func TestCLIMisuse(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--bogus"}, "bogus"},
		{[]string{"extra-arg"}, "extra-arg"},
		{[]string{"--port", "3478", "extra-arg"}, "extra-arg"},
	} {
		code, out, errOut := runArgs(t, tc.args...)
		if code != exitUsage {
			t.Errorf("stund %v: exit %d, want %d", tc.args, code, exitUsage)
		}
		if !strings.Contains(errOut, tc.want) {
			t.Errorf("stund %v: stderr %q does not name %q", tc.args, errOut, tc.want)
		}
		if !strings.Contains(out+errOut, "USAGE:") || !strings.Contains(out+errOut, "--primary-ip") {
			t.Errorf("stund %v: no usage printed", tc.args)
		}
		if strings.Contains(out, "listening on") {
			t.Errorf("stund %v: started listening", tc.args)
		}
	}
}
