package server

import (
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// Per-user bandwidth cap on relayed traffic (--max-bps).
//
// Each user has two token buckets, one per direction (client to peer and
// peer to client), each filling at MaxBPS bits per second; all the user's
// UDP relay sockets draw from them, so opening more allocations buys no
// more bandwidth. A datagram over the cap is dropped and counted, which is
// what a congested link does to UDP: the user's own congestion control
// backs off, and nothing waits, so other users' packets never queue behind
// a capped one. Buckets exist only while the user has a relay socket open,
// so their number is bounded by the allocation quota.

// minBandwidthBurst is the smallest bucket: a few full-size datagrams, so
// that even a very low cap passes whole packets.
const minBandwidthBurst = 16 << 10

// errBandwidth is returned to pion for a datagram toward a peer that the
// cap dropped; pion counts it as a failed relay write and goes on.
var errBandwidth = errors.New("relay: per-user bandwidth cap reached; datagram dropped")

type bandwidth struct {
	bps       int64 // bits per second per direction; the receiver is nil when unlimited
	tolerance int64 // ns of burst
	now       func() time.Time

	mu    sync.Mutex
	users map[string]*userBW

	droppedPkts, droppedBytes atomic.Uint64
}

type userBW struct {
	refs    int // relay sockets open (under bandwidth.mu)
	in, out bucket
}

// bucket is a GCRA token bucket in bytes: tat is when the bytes sent so
// far would have drained at the cap.
type bucket struct{ tat atomic.Int64 }

// newBandwidth returns the cap, or nil (unlimited) for bps <= 0.
func newBandwidth(bps int64, now func() time.Time) *bandwidth {
	if bps <= 0 {
		return nil
	}
	if now == nil {
		now = time.Now
	}
	b := &bandwidth{bps: bps, now: now, users: map[string]*userBW{}}
	// A bucket holds one second of the cap, at least minBandwidthBurst:
	// video sends a keyframe as a burst well above its average rate.
	b.tolerance = max(int64(time.Second), b.cost(minBandwidthBurst))
	return b
}

// cost is how long n bytes take at the cap, in ns.
func (b *bandwidth) cost(n int) int64 {
	c := int64(n) * 8 * int64(time.Second) / b.bps
	if c < 1 {
		c = 1
	}
	return c
}

// take charges n bytes to one direction's bucket; false: over the cap.
func (b *bandwidth) take(k *bucket, n int) bool {
	now := b.now().UnixNano()
	cost := b.cost(n)
	for {
		old := k.tat.Load()
		t := max(old, now)
		if t-now > b.tolerance {
			b.droppedPkts.Add(1)
			b.droppedBytes.Add(uint64(n))
			return false
		}
		if k.tat.CompareAndSwap(old, t+cost) {
			return true
		}
	}
}

// wait charges n bytes to one direction's bucket and returns how long the
// caller must wait for them to be within the cap (0: they are). A stream
// cannot drop bytes the way a UDP relay drops a datagram, so RFC 6062 peer
// connections are slowed to the cap instead, as a congested link would.
func (b *bandwidth) wait(k *bucket, n int) time.Duration {
	now := b.now().UnixNano()
	cost := b.cost(n)
	for {
		old := k.tat.Load()
		t := max(old, now) + cost
		if k.tat.CompareAndSwap(old, t) {
			return time.Duration(max(0, t-now-b.tolerance))
		}
	}
}

// acquire returns userID's buckets, creating them on the user's first
// relay socket.
func (b *bandwidth) acquire(userID string) *userBW {
	b.mu.Lock()
	defer b.mu.Unlock()
	u := b.users[userID]
	if u == nil {
		u = &userBW{}
		b.users[userID] = u
	}
	u.refs++
	return u
}

// release drops a reference; the user's last relay socket closing forgets
// the buckets.
func (b *bandwidth) release(userID string, u *userBW) {
	b.mu.Lock()
	defer b.mu.Unlock()
	u.refs--
	if u.refs <= 0 && b.users[userID] == u {
		delete(b.users, userID)
	}
}

// tracked is the number of users with buckets (for tests).
func (b *bandwidth) tracked() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.users)
}

func (b *bandwidth) dropped() (pkts, bytes uint64) {
	if b == nil {
		return 0, 0
	}
	return b.droppedPkts.Load(), b.droppedBytes.Load()
}
