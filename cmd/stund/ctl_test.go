package main

import (
	"bytes"
	"encoding/json"
	"net"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/stund/stund/server/admin"
)

// ctlNode is an admin.Node that records what stund ctl asked of it.
type ctlNode struct {
	allocs  []admin.Allocation
	asked   []string
	killed  []string
	users   []string
	drained int
}

func (n *ctlNode) Readiness() admin.Readiness {
	st := admin.StateServing
	if n.drained > 0 {
		st = admin.StateDraining
	}
	return admin.Readiness{State: st, Allocations: len(n.allocs), AllocationLimit: -1}
}
func (n *ctlNode) Registry() *prometheus.Registry { return prometheus.NewRegistry() }
func (n *ctlNode) Allocations(user string) []admin.Allocation {
	n.asked = append(n.asked, user)
	var out []admin.Allocation
	for _, a := range n.allocs {
		if user == "" || a.User == user {
			out = append(out, a)
		}
	}
	return out
}
func (n *ctlNode) KillAllocation(id string) bool {
	for i, a := range n.allocs {
		if a.ID == id {
			n.allocs = slices.Delete(n.allocs, i, i+1)
			n.killed = append(n.killed, id)
			return true
		}
	}
	return false
}
func (n *ctlNode) KillUser(user string) int {
	n.users = append(n.users, user)
	before := len(n.allocs)
	n.allocs = slices.DeleteFunc(n.allocs, func(a admin.Allocation) bool { return a.User == user })
	return before - len(n.allocs)
}
func (n *ctlNode) Drain() { n.drained++ }

const ctlToken = "ctl-test-token-0123456789"

// ctlServer is the real admin.Handler over a ctlNode, on loopback.
func ctlServer(t *testing.T, token string) (*ctlNode, string) {
	t.Helper()
	started := time.Now().Add(-90 * time.Second)
	n := &ctlNode{allocs: []admin.Allocation{
		{ID: "udp-1", User: "alice", Client: "192.0.2.1:40000", Transport: "udp", Relayed: "198.51.100.1:50000", Started: started, BytesOut: 1536, BytesIn: 10},
		{ID: "tls/2", User: "1733000000:bob", Client: "192.0.2.2:40001", Transport: "tls", Relayed: "198.51.100.1:50002", Started: started, BytesIn: 3 << 20},
	}}
	h := &admin.Handler{}
	h.Attach(n)
	h.SetToken(token)
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return n, srv.URL
}

// TestCtl: each command against the real handler, with the flags before
// or after the command and the token from the environment.
func TestCtl(t *testing.T) {
	n, url := ctlServer(t, ctlToken)
	ctl := func(args ...string) string {
		t.Helper()
		code, out, errOut := runArgs(t, append([]string{"ctl"}, args...)...)
		if code != 0 {
			t.Fatalf("stund ctl %q: exit %d, stderr %q", args, code, errOut)
		}
		return out
	}
	out := ctl("--admin", url, "--admin-token", ctlToken, "list")
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 4 || !strings.HasPrefix(lines[0], "ID ") || lines[3] != "2 allocation(s)" {
		t.Fatalf("list:\n%s", out)
	}
	for _, want := range []string{"udp-1", "alice", "192.0.2.1:40000", "udp", "198.51.100.1:50000", "1.5 KiB", "10 B"} {
		if !strings.Contains(lines[1], want) {
			t.Errorf("row %q lacks %q", lines[1], want)
		}
	}
	if !strings.Contains(lines[2], "3.0 MiB") || !strings.Contains(lines[2], "1733000000:bob") {
		t.Errorf("row %q", lines[2])
	}

	t.Setenv("STUND_ADMIN_TOKEN", ctlToken)
	var got []admin.Allocation
	if err := json.Unmarshal([]byte(ctl("list", "--admin", url, "--user", "1733000000:bob", "--json")), &got); err != nil || len(got) != 1 || got[0].ID != "tls/2" || got[0].BytesIn != 3<<20 {
		t.Errorf("list --json --user: %+v %v", got, err)
	}
	if n.asked[len(n.asked)-1] != "1733000000:bob" {
		t.Errorf("asked for %q", n.asked)
	}

	if out := ctl("--admin", url, "kill", "tls/2"); out != "killed tls/2\n" || !slices.Equal(n.killed, []string{"tls/2"}) {
		t.Errorf("kill: %q, killed %q", out, n.killed)
	}
	if out := ctl("--admin", url, "kill", "--user", "alice"); out != "killed 1 allocation(s) of alice\n" || !slices.Equal(n.users, []string{"alice"}) {
		t.Errorf("kill --user: %q, users %q", out, n.users)
	}
	if out := ctl("--admin", url+"/", "drain"); out != "draining: 0 allocation(s) left\n" || n.drained != 1 {
		t.Errorf("drain: %q, drained %d", out, n.drained)
	}
}

// TestCtlErrors: every failure exits non-zero and says what to check;
// misuse exits 2 with the command's help.
func TestCtlErrors(t *testing.T) {
	n, url := ctlServer(t, ctlToken)
	_, offURL := ctlServer(t, "")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadURL := "http://" + ln.Addr().String()
	ln.Close() // nothing listens there any more

	for _, c := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--admin", url, "list"}, 1, "wrong or missing --admin-token"},
		{[]string{"--admin", url, "--admin-token", "not-the-token-at-all", "drain"}, 1, "wrong or missing --admin-token"},
		{[]string{"--admin", url, "--admin-token", ctlToken, "kill", "no-such-id"}, 1, `404 Not Found: no allocation "no-such-id"`},
		{[]string{"--admin", offURL, "--admin-token", ctlToken, "list"}, 1, "the admin API is off"},
		{[]string{"--admin", deadURL, "list"}, 1, "nothing listens at " + deadURL},
		{[]string{"--admin", "http://127.0.0.1:1:2", "list"}, 1, "--admin"},
		{nil, exitUsage, "list, kill or drain"},
		{[]string{"frobnicate"}, exitUsage, `unknown command "frobnicate"`},
		{[]string{"--bogus", "list"}, exitUsage, "bogus"},
		{[]string{"kill"}, exitUsage, "give one allocation ID or --user NAME"},
		{[]string{"kill", "a", "b"}, exitUsage, "give one allocation ID or --user NAME"},
		{[]string{"kill", "--user", "alice", "a"}, exitUsage, "give one allocation ID or --user NAME"},
		{[]string{"list", "extra"}, exitUsage, `unexpected argument "extra"`},
		{[]string{"drain", "now"}, exitUsage, `unexpected argument "now"`},
	} {
		code, out, errOut := runArgs(t, append([]string{"ctl"}, c.args...)...)
		if code != c.code || !strings.Contains(errOut, c.want) {
			t.Errorf("stund ctl %q: exit %d, stderr %q; want %d and %q", c.args, code, errOut, c.code, c.want)
		}
		if c.code == exitUsage && !strings.Contains(out, "USAGE:") {
			t.Errorf("stund ctl %q: no usage printed: %q", c.args, out)
		}
	}
	if n.killed != nil || n.users != nil || n.drained != 0 {
		t.Errorf("a failed call changed the node: %+v", n)
	}
}

// TestCtlCompletion: the commands are offered after "stund" and "stund
// ctl", and each command's flags after it.
func TestCtlCompletion(t *testing.T) {
	for _, c := range []struct {
		args []string
		want []string
	}{
		{nil, []string{"ctl"}},
		{[]string{"ctl"}, []string{"--admin", "--admin-token", "list", "kill", "drain"}},
		{[]string{"ctl", "list"}, []string{"--user", "--json", "--admin"}},
		{[]string{"ctl", "kill", "--us"}, []string{"--user"}},
	} {
		code, out, _ := runArgs(t, append(c.args, "--generate-bash-completion")...)
		got := strings.Fields(out)
		for _, w := range c.want {
			if code != 0 || !slices.Contains(got, w) {
				t.Errorf("%q: exit %d, completions %q lack %q", c.args, code, got, w)
			}
		}
	}
}

// TestPrintAllocations: the table's age and byte columns.
func TestPrintAllocations(t *testing.T) {
	now := time.Date(2026, 12, 5, 12, 0, 0, 0, time.UTC)
	var b bytes.Buffer
	err := printAllocations(&b, []admin.Allocation{{ID: "x", User: "u", Client: "c", Transport: "tcp", Relayed: "r", Started: now.Add(-(time.Hour + 2*time.Minute + 3*time.Second + 400*time.Millisecond)), BytesOut: 5 << 30, BytesIn: 1023}}, now)
	if err != nil {
		t.Fatal(err)
	}
	want := "ID  USER  CLIENT  TRANSPORT  RELAYED  AGE     TO PEERS  FROM PEERS\n" +
		"x   u     c       tcp        r        1h2m3s  5.0 GiB   1023 B\n" +
		"1 allocation(s)\n"
	if b.String() != want {
		t.Errorf("table:\n%s\nwant:\n%s", b.String(), want)
	}
}
