package server

import (
	"net"
	"sync"
	"time"

	"github.com/pion/turn/v5"
)

// reservationTTL is how long a slot granted by the QuotaHandler waits for
// its OnAllocationCreated. pion calls both in the same goroutine around one
// socket bind (microseconds); a reservation still open after this long
// belongs to an Allocate that failed after the quota check (port range
// exhausted, bind error) and is released, so failures never leak slots.
const reservationTTL = 5 * time.Second

// Quotas bounds allocations per user and in total (RFC 8656 §7.2 step 7:
// 486 Allocation Quota Reached, "based on the username used to authenticate
// the request"). pion asks QuotaHandler before creating an allocation and
// reports OnAllocationCreated/Deleted after; the handler reserves a slot so
// that two concurrent Allocates (different sockets, different goroutines)
// cannot both take the last one, and OnCreated turns the reservation into a
// live allocation.
type Quotas struct {
	perUser, total int // <0: unlimited
	now            func() time.Time

	mu      sync.Mutex
	users   map[string]*userQuota
	active  int // live allocations, all users
	pending int // open reservations, all users
	refused uint64
}

type userQuota struct {
	active  int
	pending []time.Time // reservation times, oldest first
}

// NewQuotas returns quotas of perUser allocations per user ID and total
// allocations overall; a negative value means unlimited, 0 refuses all.
func NewQuotas(perUser, total int) *Quotas {
	return &Quotas{perUser: perUser, total: total, now: time.Now, users: map[string]*userQuota{}}
}

// expire drops reservations older than reservationTTL. Called with mu held.
func (q *Quotas) expire(u *userQuota, now time.Time) {
	n := 0
	for n < len(u.pending) && now.Sub(u.pending[n]) >= reservationTTL {
		n++
	}
	if n > 0 {
		u.pending = append(u.pending[:0], u.pending[n:]...)
		q.pending -= n
	}
}

// expireAll sweeps every user: the total count must not be held up by a
// failed reservation of a user who never comes back.
func (q *Quotas) expireAll(now time.Time) {
	for id, u := range q.users {
		q.expire(u, now)
		if u.active == 0 && len(u.pending) == 0 {
			delete(q.users, id)
		}
	}
}

// Reserve takes a slot for userID if both quotas allow it.
func (q *Quotas) Reserve(userID string) bool {
	q.mu.Lock()
	defer q.mu.Unlock()

	now := q.now()
	if q.total >= 0 && q.active+q.pending >= q.total && q.pending > 0 {
		q.expireAll(now)
	}
	u := q.users[userID]
	if u == nil {
		u = &userQuota{}
		q.users[userID] = u
	}
	q.expire(u, now)

	if (q.total >= 0 && q.active+q.pending >= q.total) ||
		(q.perUser >= 0 && u.active+len(u.pending) >= q.perUser) {
		q.refused++
		if u.active == 0 && len(u.pending) == 0 {
			delete(q.users, userID)
		}

		return false
	}
	u.pending = append(u.pending, now)
	q.pending++

	return true
}

// QuotaHandler is the pion hook; pion passes the user ID our AuthHandler
// returned, and answers 486 when it returns false.
func (q *Quotas) QuotaHandler() turn.QuotaHandler {
	return func(userID, _ string, _ net.Addr) bool {
		return q.Reserve(userID)
	}
}

// OnCreated records a live allocation, consuming the user's oldest
// reservation. An allocation without one (the reservation expired, or the
// allocation did not pass through QuotaHandler) is still counted, so the
// counts always match what exists.
func (q *Quotas) OnCreated(userID string) {
	q.mu.Lock()
	defer q.mu.Unlock()

	u := q.users[userID]
	if u == nil {
		u = &userQuota{}
		q.users[userID] = u
	}
	if len(u.pending) > 0 {
		u.pending = u.pending[1:]
		q.pending--
	}
	u.active++
	q.active++
}

// OnDeleted records the end of an allocation.
func (q *Quotas) OnDeleted(userID string) {
	q.mu.Lock()
	defer q.mu.Unlock()

	u := q.users[userID]
	if u == nil || u.active == 0 {
		return // not ours to count (created before tracking began)
	}
	u.active--
	q.active--
	if u.active == 0 && len(u.pending) == 0 {
		delete(q.users, userID)
	}
}

// Active returns the number of live allocations.
func (q *Quotas) Active() int {
	q.mu.Lock()
	defer q.mu.Unlock()

	return q.active
}

// ActiveFor returns the number of live allocations of one user.
func (q *Quotas) ActiveFor(userID string) int {
	q.mu.Lock()
	defer q.mu.Unlock()

	if u := q.users[userID]; u != nil {
		return u.active
	}

	return 0
}

// Full reports whether the total quota is reached: a new Allocate would
// be refused whoever asks.
func (q *Quotas) Full() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.total >= 0 && q.active+q.pending >= q.total
}

// Refused returns how many Allocates were refused with 486.
func (q *Quotas) Refused() uint64 {
	q.mu.Lock()
	defer q.mu.Unlock()

	return q.refused
}

// SetLimits changes both quotas (a reload). Live allocations and open
// reservations are kept; a lowered quota refuses new Allocates until the
// counts are back under it, it never cuts an allocation.
func (q *Quotas) SetLimits(perUser, total int) {
	q.mu.Lock()
	defer q.mu.Unlock()

	q.perUser, q.total = perUser, total
}
