package server

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/stund/stund/internal/testutil"
)

// Interop with STUN clients nobody here wrote: coturn's turnutils_stunclient
// and turnutils_natdiscovery, and the classic `stun` client (Debian packages
// coturn and stun-client), against the real server on 127.0.0.1 + 127.0.0.2.

// stunToolTimeout bounds each tool run (a safety net, not an assertion):
// natdiscovery waits 3 s for each of its few requests, stun a few seconds in
// all.
const stunToolTimeout = 30 * time.Second

// interopTool returns the path of a tool (Debian packages coturn and
// stun-client), skipping the test when it is not installed unless
// STUND_REQUIRE_INTEROP=1 (CI) makes that a failure.
func interopTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		testutil.SkipUnlessRequired(t, "%s not installed (Debian package coturn or stun-client): %v", name, err)
	}
	return p
}

// toolBindTries bounds the reruns of a tool whose own client socket lost a
// port race: coturn's clients bind a random port and the one after it, and
// on a busy test machine the second is sometimes taken. That is the tool's
// socket, not stund's; anything else fails at once.
const toolBindTries = 3

func runTool(t *testing.T, path string, args ...string) (string, int) {
	t.Helper()
	for try := 1; ; try++ {
		out, code := runToolOnce(t, path, args...)
		if try < toolBindTries && code != 0 && strings.Contains(out, "Address already in use") {
			t.Logf("%s: its own port was taken; running it again (%d/%d)", path, try, toolBindTries)
			continue
		}
		return out, code
	}
}

func runToolOnce(t *testing.T, path string, args ...string) (string, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), stunToolTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, args...).CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("%s %v: timed out after %v; output:\n%s", path, args, stunToolTimeout, out)
	}
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	t.Logf("%s %s (exit %d):\n%s", path, strings.Join(args, " "), code, out)
	return string(out), code
}

// startInteropServer starts stund on 127.0.0.1 + 127.0.0.2 with its
// default configuration: coturn's tools send a bare 20-byte Binding first
// and only go on if its answer carries OTHER-ADDRESS, which two-IP stund
// gives every request (server/binding).
func startInteropServer(t *testing.T) (*Server, [2][2]netip.AddrPort) {
	t.Helper()
	s := startServer(t, twoIPConfig())
	g := s.Grid()
	// The tools address the alternate IP with the primary port they were
	// given, so the grid must use the same two ports on both IPs.
	if g[0][0].Port() != g[1][0].Port() || g[0][1].Port() != g[1][1].Port() {
		t.Fatalf("grid ports differ between IPs: %v", g)
	}
	return s, g
}

func TestInteropTurnutilsStunclient(t *testing.T) {
	bin := interopTool(t, "turnutils_stunclient")
	for _, force := range []bool{false, true} {
		t.Run(fmt.Sprintf("force=%v", force), func(t *testing.T) {
			_, g := startInteropServer(t)
			// It starts with a bare 20-byte request (captured on the
			// wire). Without -f it goes on to CHANGE-REQUEST only if that
			// answer carries OTHER-ADDRESS; -f ("force RFC 5780
			// processing") goes on whatever the answer said.
			args := []string{"-p", fmt.Sprint(g[0][0].Port()), "127.0.0.1"}
			if force {
				args = append([]string{"-f"}, args...)
			}
			out, code := runTool(t, bin, args...)
			if code != 0 {
				t.Fatalf("exit %d", code)
			}
			// It prints XOR-MAPPED-ADDRESS as "UDP reflexive addr:
			// 127.0.0.1:N" and, when OTHER-ADDRESS came back, "Other addr:
			// : 127.0.0.2:<alt port>".
			if !strings.Contains(out, "UDP reflexive addr: 127.0.0.1:") {
				t.Errorf("no reflexive address in output")
			}
			if !strings.Contains(out, "Other addr: : "+g[1][1].String()) {
				t.Errorf("OTHER-ADDRESS %v not printed", g[1][1])
			}
			// The bare request is answered from where it went (RESPONSE-ORIGIN
			// in the bare answer), and the change-IP+port request that
			// follows from the diagonal: without -f it only follows
			// because the bare answer carried OTHER-ADDRESS.
			for _, origin := range []netip.AddrPort{g[0][0], g[1][1]} {
				if !strings.Contains(out, "Response origin: : "+origin.String()) {
					t.Errorf("RESPONSE-ORIGIN %v not printed", origin)
				}
			}
		})
	}
}

func TestInteropNatdiscovery(t *testing.T) {
	bin := interopTool(t, "turnutils_natdiscovery")
	s, g := startInteropServer(t)
	out, code := runTool(t, bin, "-m", "-f", "-p", fmt.Sprint(g[0][0].Port()), "127.0.0.1")
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	// With no NAT between, both verdicts must be endpoint-independent.
	for _, want := range []string{
		"NAT with Endpoint Independent Mapping!",
		"NAT with Endpoint Independent Filtering!",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("missing verdict %q", want)
		}
	}
	if strings.Contains(out, "Dependent") || strings.Contains(out, "timeout") || strings.Contains(out, "error") {
		t.Errorf("unexpected verdict or failure in output")
	}
	if st := s.binder.Stats(); st.ChangeIP == 0 || st.ChangePort == 0 {
		t.Errorf("the filtering test should have used change-IP+port: %+v", st)
	}
}

func TestInteropStunClient(t *testing.T) {
	bin := interopTool(t, "stun")
	s, g := startInteropServer(t)
	// stun-client 0.97 sends RFC 3489 requests (no cookie) with
	// CHANGE-REQUEST, follows CHANGED-ADDRESS, and prints its verdict; on
	// loopback there is no NAT, which it calls "Open".
	// Its default source port is fixed (and it also uses the next few),
	// so parallel test runs on one machine collide; give it free ones.
	out, code := runTool(t, bin, fmt.Sprintf("127.0.0.1:%d", g[0][0].Port()), "-v", "-p", fmt.Sprint(freeUDPPorts(t, 4)))
	if !strings.Contains(out, "Primary: Open") {
		t.Errorf("verdict is not \"Primary: Open\" (exit %d)", code)
	}
	// Its exit code ("Return value is 0x..") is a bit field: 0x01 = port
	// preserved, 0x10 = no hairpin, and the NAT type in between, where Open
	// is 0 (a run against a silent port exits 0x1c: Blocked 0x0c | 0x10).
	if code&^(0x01|0x10) != 0 {
		t.Errorf("exit 0x%02x: NAT type bits are not Open", code)
	}
	if st := s.binder.Stats(); st.RFC3489 == 0 || st.ChangeIP == 0 {
		t.Errorf("expected RFC 3489 requests with change-IP: %+v", st)
	}
}

// freeUDPPorts returns a port P such that P..P+n-1 were all free on
// 127.0.0.1 a moment ago, for tools that pick their own source ports.
func freeUDPPorts(t *testing.T, n int) int {
	t.Helper()
	for try := 0; try < 20; try++ {
		first, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		p := first.LocalAddr().(*net.UDPAddr).Port
		held := []*net.UDPConn{first}
		ok := p+n-1 <= 65535
		for k := 1; ok && k < n; k++ {
			c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: p + k})
			if err != nil {
				ok = false
				break
			}
			held = append(held, c)
		}
		for _, c := range held {
			_ = c.Close()
		}
		if ok {
			return p
		}
	}
	t.Fatalf("no %d consecutive free UDP ports", n)
	return 0
}
