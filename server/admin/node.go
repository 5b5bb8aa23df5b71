// Package admin is stund's admin listener: health, readiness, metrics,
// the profiler on request, and the operator's API (allocations, kill,
// drain) behind a bearer token.
package admin

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Node is what the admin listener needs from a running stund.
type Node interface {
	// Readiness is the node's state for /readyz.
	Readiness() Readiness
	// Registry holds the node's metrics.
	Registry() *prometheus.Registry
	// Allocations lists live allocations, only user's when user != ""
	// (a user ID such as "user:alice" or "rest:alice", or a bare name,
	// which matches both).
	Allocations(user string) []Allocation
	// KillAllocation ends one allocation at once; false if id is unknown.
	KillAllocation(id string) bool
	// KillUser ends every allocation of user and says how many.
	KillUser(user string) int
	// Drain starts a drain (idempotent): new allocations are refused or
	// redirected, existing ones run to their end.
	Drain()
}

// Readiness states.
const (
	StateServing  = "serving"
	StateDraining = "draining"
	StateFull     = "full"
	StateClosing  = "closing"
)

// Readiness is the body of /readyz: 200 when State is serving, else 503.
type Readiness struct {
	State string `json:"state"`
	// Allocations in use, and the node's limit (-1: none).
	Allocations     int `json:"allocations"`
	AllocationLimit int `json:"allocation_limit"`
	// RelayPortsLeft is how many relay ports are free (UDP and TCP relays
	// share the range; the smaller of the two).
	RelayPortsLeft int `json:"relay_ports_left"`
}

// Allocation is one live allocation as the API shows it.
type Allocation struct {
	ID        string    `json:"id"`
	User      string    `json:"user"`
	Realm     string    `json:"realm"`
	Client    string    `json:"client"`    // the client's address as the server sees it (after PROXY protocol)
	Server    string    `json:"server"`    // the server address it reached
	Transport string    `json:"transport"` // udp, tcp or tls (client to server)
	Relayed   string    `json:"relayed"`   // the relayed transport address
	Started   time.Time `json:"started"`
	BytesOut  uint64    `json:"bytes_to_peers"`
	BytesIn   uint64    `json:"bytes_from_peers"`
	PktsOut   uint64    `json:"packets_to_peers"`
	PktsIn    uint64    `json:"packets_from_peers"`
}

// StateStarting is /readyz's state before a node is attached: the admin
// listener answers while the sockets are still being bound.
const StateStarting = "starting"
