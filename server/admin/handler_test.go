package admin

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// fakeNode is a Node whose state the test sets and whose calls it reads.
type fakeNode struct {
	ready   Readiness
	reg     *prometheus.Registry
	allocs  []Allocation
	asked   []string // users Allocations was asked for
	killed  []string // ids KillAllocation ended
	users   []string // users KillUser was asked for
	drained int
}

func newFakeNode() *fakeNode {
	reg := prometheus.NewRegistry()
	reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "fake_up", Help: "1"}, func() float64 { return 1 }))
	t0 := time.Date(2026, 12, 4, 10, 0, 0, 0, time.UTC)
	return &fakeNode{
		ready: Readiness{State: StateServing, Allocations: 2, AllocationLimit: 10, RelayPortsLeft: 100},
		reg:   reg,
		allocs: []Allocation{
			{ID: "a1", User: "alice", Client: "192.0.2.1:4000", Transport: "udp", Relayed: "198.51.100.1:50000", Started: t0, BytesOut: 10, BytesIn: 20},
			{ID: "b1", User: "bob", Client: "192.0.2.2:4000", Transport: "tls", Relayed: "198.51.100.1:50002", Started: t0},
		},
	}
}

func (f *fakeNode) Readiness() Readiness           { return f.ready }
func (f *fakeNode) Registry() *prometheus.Registry { return f.reg }
func (f *fakeNode) Allocations(user string) []Allocation {
	f.asked = append(f.asked, user)
	var out []Allocation
	for _, a := range f.allocs {
		if user == "" || a.User == user {
			out = append(out, a)
		}
	}
	return out
}
func (f *fakeNode) KillAllocation(id string) bool {
	i := slices.IndexFunc(f.allocs, func(a Allocation) bool { return a.ID == id })
	if i < 0 {
		return false
	}
	f.killed = append(f.killed, id)
	f.allocs = slices.Delete(f.allocs, i, i+1)
	return true
}
func (f *fakeNode) KillUser(user string) int {
	f.users = append(f.users, user)
	n := len(f.allocs)
	f.allocs = slices.DeleteFunc(f.allocs, func(a Allocation) bool { return a.User == user })
	return n - len(f.allocs)
}
func (f *fakeNode) Drain() {
	f.drained++
	f.ready.State = StateDraining
}

const token = "s3cret-token-for-tests"

func do(h http.Handler, method, path, auth string) *httptest.ResponseRecorder {
	req := httptest.NewRequest(method, path, nil)
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, req)
	return rec
}

// TestProbesBeforeAttach: while stund binds its sockets the listener is
// alive (/healthz 200) but not ready (/readyz 503 "starting"), and neither
// /metrics nor the API act on a node that does not exist yet.
func TestProbesBeforeAttach(t *testing.T) {
	h := &Handler{}
	h.SetToken(token)
	for _, c := range []struct {
		method, path, auth string
		code               int
		body               string
	}{
		{"GET", "/healthz", "", 200, "ok"},
		{"GET", "/readyz", "", 503, `"state":"starting"`},
		{"GET", "/metrics", "", 503, "starting"},
		{"GET", "/allocations", "Bearer " + token, 503, "starting"},
		{"POST", "/drain", "", 401, ""},
	} {
		rec := do(h, c.method, c.path, c.auth)
		if rec.Code != c.code || !strings.Contains(rec.Body.String(), c.body) {
			t.Errorf("%s %s: %d %q, want %d containing %q", c.method, c.path, rec.Code, rec.Body, c.code, c.body)
		}
	}
}

// TestReadyz: the body is the node's Readiness, and only "serving" is 200.
func TestReadyz(t *testing.T) {
	for _, state := range []string{StateServing, StateDraining, StateFull, StateClosing} {
		f := newFakeNode()
		f.ready.State = state
		h := &Handler{}
		h.Attach(f)
		rec := do(h, "GET", "/readyz", "")
		want := http.StatusServiceUnavailable
		if state == StateServing {
			want = http.StatusOK
		}
		var got Readiness
		if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
			t.Fatalf("%s: body %q: %v", state, rec.Body, err)
		}
		if rec.Code != want || got != f.ready {
			t.Errorf("%s: %d %+v, want %d %+v", state, rec.Code, got, want, f.ready)
		}
		if ct := rec.Header().Get("Content-Type"); ct != "application/json" {
			t.Errorf("%s: Content-Type %q", state, ct)
		}
	}
}

// TestMetricsAndPprof: /metrics is the node's registry; the profiler only
// when asked for; unknown paths 404.
func TestMetricsAndPprof(t *testing.T) {
	h := &Handler{}
	h.Attach(newFakeNode())
	if rec := do(h, "GET", "/metrics", ""); rec.Code != 200 || !strings.Contains(rec.Body.String(), "fake_up 1") {
		t.Errorf("/metrics: %d %q", rec.Code, rec.Body)
	}
	if rec := do(h, "GET", "/debug/pprof/", ""); rec.Code != 404 {
		t.Errorf("/debug/pprof/ without Pprof: %d", rec.Code)
	}
	if rec := do(h, "GET", "/nope", ""); rec.Code != 404 {
		t.Errorf("/nope: %d", rec.Code)
	}
	h.Pprof = true
	if rec := do(h, "GET", "/debug/pprof/goroutine?debug=1", ""); rec.Code != 200 || !strings.Contains(rec.Body.String(), "goroutine profile") {
		t.Errorf("goroutine profile with Pprof: %d %.100q", rec.Code, rec.Body)
	}
}

// apiCalls is every route of the API, with a method it does not serve.
var apiCalls = []struct{ method, path, wrong string }{
	{"GET", "/allocations", "POST"},
	{"GET", "/allocations?user=alice", "DELETE"},
	{"DELETE", "/allocations/a1", "GET"},
	{"DELETE", "/users/alice/allocations", "GET"},
	{"POST", "/drain", "GET"},
}

// TestAPIOffWithoutToken: with no token every API path, whatever the
// method, is 404 and says why, and the node is never touched.
func TestAPIOffWithoutToken(t *testing.T) {
	f := newFakeNode()
	h := &Handler{}
	h.Attach(f)
	h.SetToken(token)
	h.SetToken("") // a reload that removes the token turns the API off
	for _, c := range apiCalls {
		for _, m := range []string{c.method, c.wrong} {
			rec := do(h, m, c.path, "Bearer "+token)
			if rec.Code != 404 || rec.Body.String() != APIOff {
				t.Errorf("%s %s: %d %q, want 404 %q", m, c.path, rec.Code, rec.Body, APIOff)
			}
		}
	}
	if f.asked != nil || f.killed != nil || f.users != nil || f.drained != 0 {
		t.Errorf("the node was called with the API off: %+v", f)
	}
}

// TestAPIAuth: a missing, wrong, truncated or non-Bearer token is 401 with
// a Bearer challenge, for every route, and nothing happens.
func TestAPIAuth(t *testing.T) {
	f := newFakeNode()
	h := &Handler{}
	h.Attach(f)
	h.SetToken(token)
	for _, auth := range []string{"", "Bearer", "Bearer ", "Bearer wrong", "Bearer " + token[:len(token)-1], "Bearer " + token + "x", "Basic " + token, "bearer" + token, token, "Bearer  " + token} {
		for _, c := range apiCalls {
			rec := do(h, c.method, c.path, auth)
			if rec.Code != 401 || !strings.HasPrefix(rec.Header().Get("WWW-Authenticate"), "Bearer") {
				t.Errorf("%s %s with %q: %d, WWW-Authenticate %q; want 401 Bearer", c.method, c.path, auth, rec.Code, rec.Header().Get("WWW-Authenticate"))
			}
		}
	}
	if f.asked != nil || f.killed != nil || f.users != nil || f.drained != 0 {
		t.Errorf("the node was called without the token: %+v", f)
	}
	// A rotated token: the old one stops working.
	h.SetToken("new-token-after-reload")
	if rec := do(h, "GET", "/allocations", "Bearer "+token); rec.Code != 401 {
		t.Errorf("old token after rotation: %d", rec.Code)
	}
	if rec := do(h, "GET", "/allocations", "Bearer new-token-after-reload"); rec.Code != 200 {
		t.Errorf("new token after rotation: %d", rec.Code)
	}
	if rec := do(h, "GET", "/allocations", "bearer new-token-after-reload"); rec.Code != 200 {
		t.Errorf("lower-case scheme (case-insensitive, RFC 9110 §11.1): %d", rec.Code)
	}
}

// TestAPI: each route with the token, and 405 for the wrong method.
func TestAPI(t *testing.T) {
	auth := "Bearer " + token
	for _, c := range []struct {
		name, method, path string
		code               int
		check              func(t *testing.T, f *fakeNode, body string)
	}{
		{"list", "GET", "/allocations", 200, func(t *testing.T, f *fakeNode, body string) {
			var got []Allocation
			if err := json.Unmarshal([]byte(body), &got); err != nil || len(got) != 2 || got[0].ID != "a1" || got[0].BytesIn != 20 || !got[0].Started.Equal(f.allocs[0].Started) {
				t.Errorf("list %q: %+v %v", body, got, err)
			}
			if !slices.Equal(f.asked, []string{""}) {
				t.Errorf("asked %q, want every user", f.asked)
			}
		}},
		{"list one user", "GET", "/allocations?user=bob", 200, func(t *testing.T, f *fakeNode, body string) {
			var got []Allocation
			if err := json.Unmarshal([]byte(body), &got); err != nil || len(got) != 1 || got[0].ID != "b1" {
				t.Errorf("list bob %q: %v", body, err)
			}
			if !slices.Equal(f.asked, []string{"bob"}) {
				t.Errorf("asked %q, want bob", f.asked)
			}
		}},
		{"list nobody's", "GET", "/allocations?user=carol", 200, func(t *testing.T, f *fakeNode, body string) {
			if strings.TrimSpace(body) != "[]" {
				t.Errorf("empty list is %q, want []", body)
			}
		}},
		{"kill one", "DELETE", "/allocations/a1", 200, func(t *testing.T, f *fakeNode, body string) {
			if !slices.Equal(f.killed, []string{"a1"}) || !strings.Contains(body, `"killed":1`) {
				t.Errorf("killed %q, body %q", f.killed, body)
			}
		}},
		{"kill unknown", "DELETE", "/allocations/zz", 404, func(t *testing.T, f *fakeNode, body string) {
			if f.killed != nil || !strings.Contains(body, `"zz"`) {
				t.Errorf("killed %q, body %q", f.killed, body)
			}
		}},
		{"kill escaped id", "DELETE", "/allocations/udp%2F192.0.2.1:4000", 404, func(t *testing.T, f *fakeNode, body string) {
			if !strings.Contains(body, `"udp/192.0.2.1:4000"`) {
				t.Errorf("the id was not unescaped: %q", body)
			}
		}},
		{"kill user", "DELETE", "/users/alice/allocations", 200, func(t *testing.T, f *fakeNode, body string) {
			if !slices.Equal(f.users, []string{"alice"}) || strings.TrimSpace(body) != `{"killed":1}` {
				t.Errorf("users %q, body %q", f.users, body)
			}
		}},
		{"kill user escaped", "DELETE", "/users/1733000000%3Aal%2Fice/allocations", 200, func(t *testing.T, f *fakeNode, body string) {
			if !slices.Equal(f.users, []string{"1733000000:al/ice"}) || strings.TrimSpace(body) != `{"killed":0}` {
				t.Errorf("users %q, body %q", f.users, body)
			}
		}},
		{"drain", "POST", "/drain", 202, func(t *testing.T, f *fakeNode, body string) {
			if f.drained != 1 || !strings.Contains(body, `"state":"draining"`) {
				t.Errorf("drained %d, body %q", f.drained, body)
			}
		}},
		{"no such route", "GET", "/allocations/a1/peers", 404, nil},
		{"no user", "DELETE", "/users//allocations", 404, nil},
		{"POST /allocations", "POST", "/allocations", 405, nil},
		{"GET /allocations/{id}", "GET", "/allocations/a1", 405, nil},
		{"GET /users/…", "GET", "/users/alice/allocations", 405, nil},
		{"GET /drain", "GET", "/drain", 405, nil},
		{"DELETE /drain", "DELETE", "/drain", 405, nil},
	} {
		t.Run(c.name, func(t *testing.T) {
			f := newFakeNode()
			h := &Handler{}
			h.Attach(f)
			h.SetToken(token)
			rec := do(h, c.method, c.path, auth)
			if rec.Code != c.code {
				t.Fatalf("%s %s: %d %q, want %d", c.method, c.path, rec.Code, rec.Body, c.code)
			}
			if c.check != nil {
				c.check(t, f, rec.Body.String())
				return
			}
			if f.asked != nil || f.killed != nil || f.users != nil || f.drained != 0 {
				t.Errorf("the node was called: %+v", f)
			}
			if c.code == 405 && rec.Header().Get("Allow") == "" {
				t.Error("405 without Allow")
			}
		})
	}
}
