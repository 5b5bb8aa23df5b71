package server

import (
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeClock is a manual clock: tests move time, nothing sleeps.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()

	return c.t
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func newTestQuotas(perUser, total int) (*Quotas, *fakeClock) {
	clk := &fakeClock{t: time.Unix(1_800_000_000, 0)}
	q := NewQuotas(perUser, total)
	q.now = clk.Now

	return q, clk
}

// allocate plays pion's sequence for one successful Allocate.
func allocate(q *Quotas, user string) bool {
	if !q.QuotaHandler()(user, testRealm, nil) {
		return false
	}
	q.OnCreated(user)

	return true
}

func TestQuotaPerUser(t *testing.T) {
	q, _ := newTestQuotas(2, 100)
	if !allocate(q, "a") || !allocate(q, "a") {
		t.Fatal("allocations under the user quota refused")
	}
	if allocate(q, "a") {
		t.Fatal("third allocation of a user with quota 2 accepted")
	}
	if !allocate(q, "b") {
		t.Fatal("another user refused because of a's quota")
	}
	if q.Active() != 3 || q.ActiveFor("a") != 2 || q.Refused() != 1 {
		t.Fatalf("Active=%d ActiveFor(a)=%d Refused=%d", q.Active(), q.ActiveFor("a"), q.Refused())
	}
	q.OnDeleted("a")
	if !allocate(q, "a") {
		t.Fatal("slot freed by OnDeleted not reusable")
	}
}

func TestQuotaTotal(t *testing.T) {
	q, _ := newTestQuotas(10, 3)
	for _, u := range []string{"a", "b", "c"} {
		if !allocate(q, u) {
			t.Fatalf("%s refused under the total quota", u)
		}
	}
	if allocate(q, "d") {
		t.Fatal("allocation beyond the total quota accepted")
	}
	q.OnDeleted("b")
	if !allocate(q, "d") {
		t.Fatal("slot freed by OnDeleted not reusable")
	}
	if q.Active() != 3 {
		t.Fatalf("Active = %d", q.Active())
	}
}

func TestQuotaUnlimitedAndZero(t *testing.T) {
	q, _ := newTestQuotas(-1, -1)
	for range 50 {
		if !allocate(q, "a") {
			t.Fatal("unlimited quota refused")
		}
	}
	z, _ := newTestQuotas(0, 10)
	if allocate(z, "a") {
		t.Fatal("per-user quota 0 accepted an allocation")
	}
}

// TestQuotaFailedAllocationReleases: pion may fail after QuotaHandler said
// yes (no free relay port); the reservation must not hold the slot forever.
func TestQuotaFailedAllocationReleases(t *testing.T) {
	q, clk := newTestQuotas(1, 1)
	h := q.QuotaHandler()
	if !h("a", testRealm, nil) {
		t.Fatal("first reservation refused")
	}
	// no OnCreated: the allocation failed
	if h("a", testRealm, nil) || h("b", testRealm, nil) {
		t.Fatal("an open reservation did not hold the slot")
	}
	clk.Add(reservationTTL)
	if !h("b", testRealm, nil) {
		t.Fatal("expired reservation still blocks the total quota")
	}
	q.OnCreated("b")
	clk.Add(reservationTTL)
	if h("a", testRealm, nil) {
		t.Fatal("a live allocation was expired like a reservation")
	}
	if q.Active() != 1 {
		t.Fatalf("Active = %d, want 1", q.Active())
	}
}

func TestQuotaDeleteWithoutCreate(t *testing.T) {
	q, _ := newTestQuotas(1, 1)
	q.OnDeleted("ghost")
	if q.Active() != 0 {
		t.Fatalf("Active = %d after a stray delete", q.Active())
	}
	if !allocate(q, "a") {
		t.Fatal("stray delete broke the counts")
	}
}

// TestQuotaConcurrentAllocates races many Allocates of one user: exactly the
// quota may succeed, whatever the interleaving (run with -race).
func TestQuotaConcurrentAllocates(t *testing.T) {
	const perUser = 5
	const tries = 64 // goroutines racing for perUser slots
	q, _ := newTestQuotas(perUser, 1000)
	var ok atomic.Int32
	var wg sync.WaitGroup
	start := make(chan struct{})
	for range tries {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			if allocate(q, "a") {
				ok.Add(1)
			}
		}()
	}
	close(start)
	wg.Wait()
	if ok.Load() != perUser || q.Active() != perUser {
		t.Fatalf("%d succeeded, Active=%d, want %d", ok.Load(), q.Active(), perUser)
	}
	for range perUser {
		q.OnDeleted("a")
	}
	if q.Active() != 0 || len(q.users) != 0 {
		t.Fatalf("Active=%d users=%d after deleting all", q.Active(), len(q.users))
	}
}
