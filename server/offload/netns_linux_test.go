package offload

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"sync/atomic"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// needRoot skips when the test cannot create network namespaces and load
// BPF programs (not root, no ip(8), a container that denies BPF). CI runs
// as root on a machine that allows both, where these tests must run:
// STUND_REQUIRE_OFFLOAD=1 turns every such skip into a failure.
func needRoot(t testing.TB) {
	t.Helper()
	skip := t.Skip
	if os.Getenv("STUND_REQUIRE_OFFLOAD") == "1" {
		skip = t.Fatal
	}
	if os.Geteuid() != 0 {
		skip("needs root: creates a network namespace and loads a BPF program")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		skip("needs ip(8) from iproute2")
	}
	// A map is the cheapest BPF object: if root may not create one, the
	// kernel or the container denies BPF as such. Verifier rejections of
	// our program are not hidden by this: they fail in New.
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		skip(fmt.Sprintf("BPF unavailable to root here: %v", err))
		return
	}
	m.Close()
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
