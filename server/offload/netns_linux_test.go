package offload

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// needRoot skips when the test cannot create network namespaces and load
// BPF programs; CI runs as root, where these tests must run.
func needRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a network namespace and loads a BPF program")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs ip(8) from iproute2")
	}
}

var nsSeq atomic.Int32

// netns is a network namespace the test created and deletes at cleanup.
type netns struct {
	name string
	fd   int
}

func newNetns(t testing.TB) *netns {
	t.Helper()
	name := fmt.Sprintf("stund-offload-%d-%d", os.Getpid(), nsSeq.Add(1))
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	fd, err := unix.Open("/run/netns/"+name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fd) })
	ns := &netns{name: name, fd: fd}
	ns.ip(t, "link", "set", "lo", "up")
	return ns
}

// ip runs ip(8) inside the namespace.
func (ns *netns) ip(t testing.TB, args ...string) {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"-n", ns.name}, args...)...).CombinedOutput()
	if err != nil {
		t.Fatalf("ip -n %s %v: %v: %s", ns.name, args, err, out)
	}
}

// do runs fn on an OS thread inside the namespace: sockets it opens and
// interfaces it resolves belong there. The thread is never returned to
// the Go scheduler (it exits with the goroutine), so no other goroutine
// runs in the namespace by accident.
func (ns *netns) do(t testing.TB, fn func()) {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Setns(ns.fd, unix.CLONE_NEWNET); err != nil {
			done <- err
			return
		}
		defer func() {
			if r := recover(); r != nil {
				done <- fmt.Errorf("panic: %v", r)
			}
		}()
		fn()
		done <- nil
	}()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
