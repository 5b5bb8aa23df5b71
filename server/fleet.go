package server

import (
	"context"
	"encoding/json"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stund/stund/server/admin"
)

// Running a node of a fleet: drain, redirect, the admin API's view of the
// allocations, and one usage record per allocation.
//
// A drain (SIGTERM, POST /drain) stops taking new allocations and lets the
// ones in progress run to their natural end: Binding, and every request and
// datagram of an existing allocation, are served as before; a new Allocate
// gets 300 Try Alternate naming the next --alternate-server (RFC 8489 §10,
// RFC 8656 §7.2), or 508 without one. A node that is full (the total
// quota) redirects the same way, so a fleet spills over instead of
// refusing.

// drainPoll is how often WaitDrained looks at the allocation count: an
// exit a fraction of a second after the last allocation ends is prompt
// enough for a rolling restart.
const drainPoll = 200 * time.Millisecond

// fleet is the node's drain state and its alternates.
type fleet struct {
	draining atomic.Bool
	started  chan struct{} // closed when a drain starts
	alts     []netip.AddrPort
	next     atomic.Uint32 // round robin over alts
}

// Drain starts a drain; it is idempotent.
func (s *Server) Drain() {
	if s.fleet.draining.CompareAndSwap(false, true) {
		close(s.fleet.started)
		s.log.Info("draining: new allocations are redirected or refused, existing ones run to their end",
			"allocations", s.AllocationCount(), "alternates", len(s.fleet.alts))
	}
}

// DrainStarted is closed when a drain starts (Drain: SIGTERM in
// cmd/stund, or the admin API's POST /drain).
func (s *Server) DrainStarted() <-chan struct{} { return s.fleet.started }

// Draining reports whether a drain has started.
func (s *Server) Draining() bool { return s.fleet.draining.Load() }

// WaitDrained returns nil once no allocation is left, or ctx's error.
func (s *Server) WaitDrained(ctx context.Context) error {
	t := time.NewTicker(drainPoll)
	defer t.Stop()
	for s.AllocationCount() > 0 {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
	return nil
}

// admitAllocate decides a new Allocate before pion sees it: 0 to go on,
// 300 with the alternate to name, or 508 (draining, no alternate).
func (s *Server) admitAllocate() (int, netip.AddrPort) {
	draining := s.Draining()
	if !draining && !s.quotas.Full() {
		return 0, netip.AddrPort{}
	}
	if n := len(s.fleet.alts); n > 0 {
		return 300, s.fleet.alts[int(s.fleet.next.Add(1)-1)%n]
	}
	if draining {
		return 508, netip.AddrPort{} // RFC 8656 §7.2: Insufficient Capacity
	}
	return 0, netip.AddrPort{} // full: pion's quota check answers 486
}

// Readiness is the node's state for /readyz.
func (s *Server) Readiness() admin.Readiness {
	r := admin.Readiness{State: admin.StateServing, Allocations: s.AllocationCount(), AllocationLimit: s.cfg.TotalQuota}
	if r.AllocationLimit < 0 {
		r.AllocationLimit = -1
	}
	udp, tcp := s.led.relaysInUse()
	r.RelayPortsLeft = max(0, int(s.cfg.RelayPortMax)-int(s.cfg.RelayPortMin)+1-max(udp, tcp))
	switch {
	case s.closing.Load():
		r.State = admin.StateClosing
	case s.Draining():
		r.State = admin.StateDraining
	case s.quotas.Full():
		r.State = admin.StateFull
	}
	return r
}

// Allocations lists the live allocations, only user's when user != "".
func (s *Server) Allocations(user string) []admin.Allocation {
	as := s.led.all(user)
	out := make([]admin.Allocation, 0, len(as))
	for _, a := range as {
		v := a.view()
		k := s.kern.live(a) // what the kernel relayed and has not booked yet
		v.PktsOut += k.PktsToPeer
		v.BytesOut += k.BytesToPeer
		v.PktsIn += k.PktsToClient
		v.BytesIn += k.BytesToClient
		out = append(out, v)
	}
	return out
}

// KillAllocation ends one allocation at once: its relay closes, pion
// deletes it, and the next request on its 5-tuple gets 437.
func (s *Server) KillAllocation(id string) bool {
	a := s.led.byIDLookup(id)
	if a == nil {
		return false
	}
	s.log.Info("allocation killed", "id", id, "user", a.user, "client", a.tuple.src.String())
	a.kill()
	return true
}

// KillUser ends every allocation of user (an ID, or a bare name of
// either kind).
func (s *Server) KillUser(user string) int {
	as := s.led.all(user)
	for _, a := range as {
		a.kill()
	}
	if len(as) > 0 {
		s.log.Info("allocations killed", "user", user, "count", len(as))
	}
	return len(as)
}

// view is the admin API's form of an allocation.
func (a *allocation) view() admin.Allocation {
	v := admin.Allocation{
		ID: a.id, User: a.user, Realm: a.realm, Client: a.tuple.src.String(), Server: a.tuple.dst.String(),
		Transport: a.transport, Relayed: a.relay.String(), Started: a.created,
	}
	if u := a.usage; u != nil {
		v.BytesOut, v.BytesIn = u.bytesOut.Load(), u.bytesIn.Load()
		v.PktsOut, v.PktsIn = u.pktsOut.Load(), u.pktsIn.Load()
	}
	return v
}

// UsageRecord is what stund writes when an allocation ends: to the log as
// one structured line and, with Config.UsageLog, as one JSON line.
type UsageRecord struct {
	admin.Allocation
	Ended    time.Time `json:"ended"`
	Duration float64   `json:"duration_s"`
	// Reason is why it ended: expired, deleted, closed, killed, drained
	// (the node stopped after a drain), shutdown (stopped without one).
	Reason string `json:"reason"`
}

// usageSink writes usage records as JSON lines.
type usageSink struct {
	mu sync.Mutex
	w  interface{ Write([]byte) (int, error) }
}

func (u *usageSink) write(r UsageRecord) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	b = append(b, '\n')
	u.mu.Lock()
	defer u.mu.Unlock()
	_, err = u.w.Write(b)
	return err
}

// endAll writes the usage record of every allocation still live when
// the node stops (pion closes them without reporting each).
func (s *Server) endAll() {
	why := "shutdown"
	if s.Draining() {
		why = endDrained
	}
	for _, a := range s.led.all("") {
		a.ending(why)
		if s.led.deleted(a.tuple) != nil {
			s.allocationEnded(a)
		}
	}
}

// allocationEnded writes a's usage record.
func (s *Server) allocationEnded(a *allocation) {
	now := time.Now()
	r := UsageRecord{Allocation: a.view(), Ended: now, Duration: now.Sub(a.created).Seconds(), Reason: a.endReason()}
	s.ops.allocDurations.Observe(r.Duration)
	s.log.Info("allocation ended", "id", r.ID, "user", r.User, "realm", r.Realm, "client", r.Client,
		"transport", r.Transport, "relayed", r.Relayed, "duration_s", r.Duration, "reason", r.Reason,
		"bytes_to_peers", r.BytesOut, "bytes_from_peers", r.BytesIn,
		"packets_to_peers", r.PktsOut, "packets_from_peers", r.PktsIn)
	if s.usage != nil {
		if err := s.usage.write(r); err != nil {
			s.ops.usageErrors.Add(1)
		}
	}
}
