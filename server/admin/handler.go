package admin

// handler.go serves the admin listener: /healthz, /readyz and /metrics for
// probes and Prometheus, the profiler when asked for, and the operator's API
// behind a bearer token.

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"net/http"
	"net/http/pprof"
	"path"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// APIOff is the body of a 404 on an API path when no token is configured:
// the operator learns why the path is missing rather than guessing a typo.
const APIOff = "the admin API is off: start stund with --admin-token or --admin-token-file\n"

// Killed is the body of both DELETE answers: how many allocations ended.
type Killed struct {
	Killed int `json:"killed"`
}

// Handler serves the admin endpoints. It exists before the node does, so
// that the listener can answer /healthz while stund starts; Attach makes
// /readyz, /metrics and the API live.
type Handler struct {
	node    atomic.Pointer[attached]
	token   atomic.Pointer[[sha256.Size]byte]
	apiOnce sync.Once
	api     *http.ServeMux
	// Pprof serves Go's profiler under /debug/pprof/ (cmd/stund
	// --pprof). Off by default: a profile reveals internals and costs
	// CPU while it is taken, so only an operator asks for it. Set it
	// before the listener serves.
	Pprof bool
}

// attached is a node with its metrics handler, swapped in as one.
type attached struct {
	n       Node
	metrics http.Handler
}

// Attach makes n the node the endpoints report on and act upon.
func (h *Handler) Attach(n Node) {
	h.node.Store(&attached{n: n, metrics: promhttp.HandlerFor(n.Registry(), promhttp.HandlerOpts{})})
}

// SetToken sets the bearer token of the API; "" turns the API off. It may
// be called while serving (a reload rotates the token). Only the token's
// SHA-256 is kept, so that the comparison takes the same time whatever
// the length of the guess.
func (h *Handler) SetToken(token string) {
	if token == "" {
		h.token.Store(nil)
		return
	}
	sum := sha256.Sum256([]byte(token))
	h.token.Store(&sum)
}

// ServeHTTP serves /healthz (the process is up: always 200), /readyz (the
// node's Readiness as JSON: 200 when serving, else 503), /metrics
// (Prometheus text format; 503 before a node is attached), the profiler
// when Pprof is set, and the API: GET /allocations[?user=NAME],
// DELETE /allocations/{id}, DELETE /users/{name}/allocations, POST /drain.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch p := r.URL.Path; {
	case p == "/healthz":
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		_, _ = w.Write([]byte("ok\n"))
	case p == "/readyz":
		rd := Readiness{State: StateStarting}
		if a := h.node.Load(); a != nil {
			rd = a.n.Readiness()
		}
		code := http.StatusServiceUnavailable
		if rd.State == StateServing {
			code = http.StatusOK
		}
		writeJSON(w, code, rd)
	case p == "/metrics":
		a := h.node.Load()
		if a == nil {
			http.Error(w, "starting", http.StatusServiceUnavailable)
			return
		}
		a.metrics.ServeHTTP(w, r)
	case h.Pprof && strings.HasPrefix(p, "/debug/pprof/"):
		servePprof(w, r)
	case isAPIPath(p):
		h.serveAPI(w, r)
	default:
		http.NotFound(w, r)
	}
}

// isAPIPath reports whether p belongs to the token-protected API, so that
// every method and sub-path there gets the same 404/401 before routing.
func isAPIPath(p string) bool {
	return p == "/allocations" || strings.HasPrefix(p, "/allocations/") ||
		strings.HasPrefix(p, "/users/") || p == "/drain"
}

// serveAPI checks the token, then routes. The order matters: without a
// token nothing of the API answers, and an unauthenticated caller learns
// nothing but that a token is needed (RFC 6750 §3).
func (h *Handler) serveAPI(w http.ResponseWriter, r *http.Request) {
	want := h.token.Load()
	if want == nil {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		w.WriteHeader(http.StatusNotFound)
		_, _ = w.Write([]byte(APIOff))
		return
	}
	// RFC 9110 §11.1: the scheme name is case-insensitive.
	scheme, got, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	sum := sha256.Sum256([]byte(got))
	if !strings.EqualFold(scheme, "Bearer") || subtle.ConstantTimeCompare(sum[:], want[:]) != 1 {
		// RFC 6750 §3: the challenge names the scheme.
		w.Header().Set("WWW-Authenticate", `Bearer realm="stund admin"`)
		http.Error(w, "wrong or missing bearer token", http.StatusUnauthorized)
		return
	}
	a := h.node.Load()
	if a == nil {
		http.Error(w, "starting", http.StatusServiceUnavailable)
		return
	}
	if path.Clean(r.URL.Path) != r.URL.Path {
		// ServeMux would redirect; an API client wants the plain answer.
		http.NotFound(w, r)
		return
	}
	h.apiOnce.Do(func() { h.api = apiMux(func() Node { return h.node.Load().n }) })
	h.api.ServeHTTP(w, r)
}

// apiMux routes the API; node returns the attached node (never nil once
// serveAPI has checked). ServeMux answers 405 with Allow for a known path
// and another method.
func apiMux(node func() Node) *http.ServeMux {
	m := http.NewServeMux()
	m.HandleFunc("GET /allocations", func(w http.ResponseWriter, r *http.Request) {
		list := node().Allocations(r.URL.Query().Get("user"))
		if list == nil {
			list = []Allocation{} // [] rather than null: clients range over it
		}
		writeJSON(w, http.StatusOK, list)
	})
	m.HandleFunc("DELETE /allocations/{id}", func(w http.ResponseWriter, r *http.Request) {
		id := r.PathValue("id")
		if !node().KillAllocation(id) {
			http.Error(w, "no allocation "+strconv.Quote(id), http.StatusNotFound)
			return
		}
		writeJSON(w, http.StatusOK, Killed{Killed: 1})
	})
	m.HandleFunc("DELETE /users/{name}/allocations", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, Killed{Killed: node().KillUser(r.PathValue("name"))})
	})
	m.HandleFunc("POST /drain", func(w http.ResponseWriter, r *http.Request) {
		n := node()
		n.Drain()
		// 202: the drain has begun; it ends when the last allocation
		// does, which the body's count lets the caller follow.
		writeJSON(w, http.StatusAccepted, n.Readiness())
	})
	return m
}

// writeJSON answers v as JSON with status code.
func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// servePprof routes /debug/pprof/ as net/http/pprof does on
// http.DefaultServeMux (which stund never serves).
func servePprof(w http.ResponseWriter, r *http.Request) {
	switch strings.TrimPrefix(r.URL.Path, "/debug/pprof/") {
	case "cmdline":
		pprof.Cmdline(w, r)
	case "profile":
		pprof.Profile(w, r)
	case "symbol":
		pprof.Symbol(w, r)
	case "trace":
		pprof.Trace(w, r)
	default: // the index, and heap, goroutine, allocs, block, mutex, threadcreate
		pprof.Index(w, r)
	}
}
