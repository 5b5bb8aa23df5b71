package main

import (
	"github.com/stund/stund/server"
	"github.com/stund/stund/server/admin"
)

// TODO(merge): delete this file and pass the *server.Server to
// admin.Handler.Attach once server implements admin.Node (drain, kill and
// the allocation list are being built in server/ in parallel). Until then
// it adapts what server exports today, so that the admin listener, the
// --admin-token wiring and stund ctl build and run against a real server.
type nodeAdapter struct{ *server.Server }

var _ admin.Node = nodeAdapter{}

// Readiness knows only serving or closing: server has no drain yet, and
// exports neither its quota nor its free relay ports (-1: unknown).
func (n nodeAdapter) Readiness() admin.Readiness {
	r := admin.Readiness{State: admin.StateClosing, Allocations: n.AllocationCount(), AllocationLimit: -1, RelayPortsLeft: -1}
	if n.Ready() {
		r.State = admin.StateServing
	}
	return r
}

func (nodeAdapter) Allocations(string) []admin.Allocation { return nil }
func (nodeAdapter) KillAllocation(string) bool            { return false }
func (nodeAdapter) KillUser(string) int                   { return 0 }
func (nodeAdapter) Drain()                                {}
