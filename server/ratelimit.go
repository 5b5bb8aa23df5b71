package server

import (
	"crypto/rand"
	"math"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pion/turn/v5"
)

// Rate limits in front of everything a stranger can make stund send.
//
// A STUN server is a reflector: a spoofed Binding request makes it send a
// reply to the victim. server/binding keeps each reply within 2x the request;
// this file keeps the number of replies per victim bounded as well, so the
// server is never a useful amplifier or a cheap flood source. The same
// limiter type bounds the Allocate rate of one user (a leaked credential
// churning allocations) before the quota is asked.

// Defaults of the rate limits.
const (
	// DefaultUnauthRate is how many unauthenticated responses (Binding
	// replies over UDP, TURN 401 challenges) one source IP gets per
	// second. A natprobe run sends a few dozen Binding requests in a
	// burst and a WebRTC client a handful per call; a hundred per second
	// also leaves room for a few hundred clients behind one NAT doing
	// keepalives, while a reflection victim receives at most 100
	// replies/s of at most 2x their request size (server/binding).
	DefaultUnauthRate = 100
	// DefaultAllocRate is how many Allocates one user may make per
	// second (486 beyond, like the quota): a call needs one or two, so
	// ten per second never touches a real client, while a script churning
	// allocations with a leaked credential is held to it.
	DefaultAllocRate = 10
	// rateBurstSeconds: a bucket holds this many seconds of its rate, so
	// a client that was quiet may send a natprobe-sized burst at once.
	rateBurstSeconds = 4
	// minBurst keeps tiny rates usable: a bucket always holds at least
	// this many tokens.
	minBurst = 8
)

// Table geometry. The table has a fixed number of slots allocated once;
// an attacker spraying source addresses replaces entries, it never grows
// the table.
const (
	// rateShards spreads the lock: the grid's read loops (one per
	// SO_REUSEPORT socket, several per cell) hit different shards.
	rateShards = 64
	// rateWays is the associativity: a key may live in any of the 8 slots
	// of its set, so two busy sources rarely evict each other.
	rateWays = 8
	// DefaultRateTableSlots is the capacity of the per-IP table: 65536
	// sources at 16 bytes each (1 MiB). More simultaneous sources than
	// that share slots by eviction (see allow).
	DefaultRateTableSlots = 1 << 16
	// userRateTableSlots is the capacity of the per-user Allocate table:
	// users are authenticated, far fewer than source addresses.
	userRateTableSlots = 1 << 12
)

// rateTable is a fixed-capacity set of token buckets keyed by a 64-bit
// hash (GCRA form: one "theoretical arrival time" per key). A bucket whose
// TAT is in the past is full, which is the same as having no entry at all;
// eviction takes such an entry first, then the fullest, so a source being
// limited (TAT far in the future) is the last to lose its state. Nothing is
// allocated per packet and no goroutine runs: the clock is read on use.
type rateTable struct {
	interval  int64 // ns per token
	tolerance int64 // ns of burst: (burst-1) * interval
	sets      uint64
	now       func() time.Time
	shards    [rateShards]rateShard

	allowed, dropped, evicted atomic.Uint64
}

type rateShard struct {
	mu    sync.Mutex
	slots []rateSlot
	_     [40]byte // keep neighbouring shards' locks off one cache line
}

type rateSlot struct {
	key uint64 // 0: empty
	tat int64  // ns since the Unix epoch
}

// newRateTable returns buckets of rate tokens per second holding burst
// tokens, in a table of about slots entries. rate <= 0 returns nil, which
// allows everything (unlimited).
func newRateTable(rate float64, burst, slots int, now func() time.Time) *rateTable {
	if rate <= 0 || math.IsInf(rate, 1) || math.IsNaN(rate) {
		return nil
	}
	if burst < 1 {
		burst = 1
	}
	if now == nil {
		now = time.Now
	}
	interval := int64(float64(time.Second) / rate)
	if interval < 1 {
		interval = 1
	}
	sets := slots / (rateShards * rateWays)
	if sets < 1 {
		sets = 1
	}
	t := &rateTable{
		interval:  interval,
		tolerance: int64(burst-1) * interval,
		sets:      uint64(sets),
		now:       now,
	}
	for i := range t.shards {
		t.shards[i].slots = make([]rateSlot, sets*rateWays)
	}
	return t
}

// burstFor is the bucket size for a rate: rateBurstSeconds of it, at
// least minBurst.
func burstFor(rate float64) int {
	b := rate * rateBurstSeconds
	if b < minBurst {
		return minBurst
	}
	if b > math.MaxInt32 {
		return math.MaxInt32
	}
	return int(b)
}

// allow takes one token from key's bucket; false means "over the rate",
// and is counted. A nil table allows everything.
func (t *rateTable) allow(key uint64) bool {
	if t == nil {
		return true
	}
	if key == 0 {
		key = 1 // 0 marks an empty slot
	}
	now := t.now().UnixNano()
	sh := &t.shards[key%rateShards]
	set := (key / rateShards) % t.sets
	sh.mu.Lock()
	ways := sh.slots[set*rateWays : (set+1)*rateWays]
	var slot *rateSlot
	victim := &ways[0]
	for i := range ways {
		w := &ways[i]
		if w.key == key {
			slot = w
			break
		}
		// The victim is an empty slot, else the one with the lowest
		// TAT: the fullest bucket, the least state lost.
		if victim.key != 0 && (w.key == 0 || w.tat < victim.tat) {
			victim = w
		}
	}
	if slot == nil {
		if victim.key != 0 && victim.tat > now {
			t.evicted.Add(1) // a bucket that still held state
		}
		*victim = rateSlot{key: key, tat: now}
		slot = victim
	}
	// GCRA (the token bucket as a virtual schedule): the request
	// conforms if the bucket's schedule is no more than the burst ahead
	// of now.
	tat := max(slot.tat, now)
	ok := tat-now <= t.tolerance
	if ok {
		slot.tat = tat + t.interval
	}
	sh.mu.Unlock()
	if ok {
		t.allowed.Add(1)
	} else {
		t.dropped.Add(1)
	}
	return ok
}

// counts returns the allowed, dropped and evicted counters (zeros for a
// nil table).
func (t *rateTable) counts() (allowed, dropped, evicted uint64) {
	if t == nil {
		return 0, 0, 0
	}
	return t.allowed.Load(), t.dropped.Load(), t.evicted.Load()
}

// Keys. The hash is seeded per process (hashSeed) so that nobody can pick
// source addresses that share one set of the table.

// ipKey hashes a source address: IPv4 by the address, IPv6 by its /64,
// the smallest block one subscriber is normally given (RFC 6177), so
// that one attacker with a /64 is one source, not 2^64.
func ipKey(seed uint64, a netip.Addr) uint64 {
	a = a.Unmap()
	b := a.As16()
	hi := be64(b[0:8])
	lo := be64(b[8:16])
	if a.Is6() {
		lo = 0x6464 // the /64
	}
	return mix64(mix64(hi^seed) ^ lo)
}

// stringKey hashes a user ID (FNV-1a, then the seeded mixer).
func stringKey(seed uint64, s string) uint64 {
	h := uint64(14695981039346656037)
	for i := 0; i < len(s); i++ {
		h ^= uint64(s[i])
		h *= 1099511628211
	}
	return mix64(h ^ seed)
}

func be64(b []byte) uint64 {
	_ = b[7]
	return uint64(b[0])<<56 | uint64(b[1])<<48 | uint64(b[2])<<40 | uint64(b[3])<<32 |
		uint64(b[4])<<24 | uint64(b[5])<<16 | uint64(b[6])<<8 | uint64(b[7])
}

// mix64 is the splitmix64 finaliser: every input bit moves every output
// bit.
func mix64(x uint64) uint64 {
	x ^= x >> 30
	x *= 0xbf58476d1ce4e5b9
	x ^= x >> 27
	x *= 0x94d049bb133111eb
	x ^= x >> 31
	return x
}

// limits is the server's set of rate limiters and abuse counters.
type limits struct {
	seed   uint64
	unauth *rateTable // per source IP: Binding replies and 401s
	alloc  *rateTable // per user: Allocates
	bw     *bandwidth // per user: relayed bytes (bandwidth.go)
	conns  connLimit  // per source IP: concurrent TCP/TLS connections

	// Stream read deadlines (the stream* constants; tests shorten them).
	firstTimeout, idleTimeout, authedTimeout time.Duration

	streamIdleClosed, streamRefused atomic.Uint64
}

// abuseHooks lets tests run the limits on a fake clock and short stream
// timeouts (Config.abuse).
type abuseHooks struct {
	now                                      func() time.Time
	firstTimeout, idleTimeout, authedTimeout time.Duration
}

// LimitStats is a snapshot of what the abuse limits refused, for metrics.
type LimitStats struct {
	// UnauthAllowed and UnauthDropped count unauthenticated responses
	// (Binding replies over UDP, 401 challenges) sent and suppressed by
	// the per-IP rate limit.
	UnauthAllowed, UnauthDropped uint64
	// UnauthEvicted counts per-IP buckets that were replaced while still
	// holding state (more active sources than the table holds).
	UnauthEvicted uint64
	// AllocRateRefused counts Allocates refused (486) by the per-user
	// rate limit.
	AllocRateRefused uint64
	// BandwidthDroppedPackets and BandwidthDroppedBytes count relayed
	// datagrams dropped by the per-user bandwidth cap, both directions.
	BandwidthDroppedPackets, BandwidthDroppedBytes uint64
	// StreamRefused counts TCP/TLS connections closed at accept because
	// their source IP had too many open; StreamIdle those closed for
	// sending nothing (or half a frame) for too long.
	StreamRefused, StreamIdle uint64
}

// Limits returns the abuse counters.
func (s *Server) Limits() LimitStats {
	var st LimitStats
	st.UnauthAllowed, st.UnauthDropped, st.UnauthEvicted = s.limits.unauth.counts()
	_, st.AllocRateRefused, _ = s.limits.alloc.counts()
	st.BandwidthDroppedPackets, st.BandwidthDroppedBytes = s.limits.bw.dropped()
	st.StreamRefused = s.limits.streamRefused.Load()
	st.StreamIdle = s.limits.streamIdleClosed.Load()
	return st
}

// initLimits builds the limiters from the configuration (withDefaults
// has run).
func (s *Server) initLimits(h *abuseHooks) {
	l := &s.limits
	l.seed = randomSeed()
	l.firstTimeout, l.idleTimeout, l.authedTimeout = streamFirstTimeout, streamIdleTimeout, streamAuthedIdleTimeout
	var now func() time.Time
	if h != nil {
		now = h.now
		l.firstTimeout, l.idleTimeout, l.authedTimeout = h.firstTimeout, h.idleTimeout, h.authedTimeout
	}
	if r := s.cfg.UnauthRate; r > 0 {
		l.unauth = newRateTable(r, burstFor(r), DefaultRateTableSlots, now)
	}
	if r := s.cfg.AllocRate; r > 0 {
		l.alloc = newRateTable(r, burstFor(r), userRateTableSlots, now)
	}
	l.bw = newBandwidth(s.cfg.MaxBPS, now)
	l.conns.init(s.cfg.MaxConnsPerIP)
}

// allowUnauth takes a token for one unauthenticated response to src
// (RFC 8489 §9.2.4: the 401 a request without credentials gets; RFC 8489
// Binding replies): false means send nothing. The guard in front of pion
// calls it before each 401; the demultiplexer before each UDP Binding
// reply.
func (s *Server) allowUnauth(src netip.Addr) bool {
	if s.limits.unauth == nil {
		return true
	}
	return s.limits.unauth.allow(ipKey(s.limits.seed, src))
}

// allowAllocate takes a token from userID's Allocate rate.
func (s *Server) allowAllocate(userID string) bool {
	if s.limits.alloc == nil {
		return true
	}
	return s.limits.alloc.allow(stringKey(s.limits.seed, userID))
}

// TCP/TLS connection bounds. pion runs one goroutine with a read buffer
// per accepted connection, so a connection that sends nothing must not be
// able to stay open forever (slowloris), and one source must not be able
// to open them without end.
const (
	// DefaultMaxConnsPerIP bounds concurrent TCP/TLS connections from one
	// source IP (an IPv6 /64). A TURN-over-TCP client holds one per
	// allocation; 64 covers an office of WebRTC users behind one NAT, and
	// keeps one host from taking more than 64 goroutines and sockets.
	DefaultMaxConnsPerIP = 64
	// streamFirstTimeout bounds the TLS handshake plus the first complete
	// frame, and the rest of any frame once its first bytes arrived: a
	// real client sends a whole STUN message at once, so 10 s is
	// generous, and a slowloris dribbling bytes is cut after it.
	streamFirstTimeout = 10 * time.Second
	// streamIdleTimeout bounds the silence between frames on a connection
	// that never authenticated (only Binding or 401s): a client that got
	// a 401 retries at once.
	streamIdleTimeout = 30 * time.Second
	// streamAuthedIdleTimeout bounds the silence on a connection that
	// carried a successful TURN request: its client refreshes before the
	// lifetime it was granted ends (RFC 8656 §7.3), at most
	// MaxAllocationLifetime, so a client cut after that has no allocation
	// left to lose.
	streamAuthedIdleTimeout = MaxAllocationLifetime + time.Minute
)

// connLimit counts open TCP/TLS connections per source IP. Entries exist
// only while connections do, so the map is bounded by the open sockets.
type connLimit struct {
	max  int // <= 0: unlimited
	mu   sync.Mutex
	open map[netip.Addr]int
}

func (l *connLimit) init(max int) {
	l.max = max
	l.open = map[netip.Addr]int{}
}

// connKey is the source as counted: the address, or an IPv6 address's /64.
func connKey(a netip.Addr) netip.Addr {
	a = a.Unmap()
	if a.Is6() {
		p, _ := a.Prefix(64)
		return p.Addr()
	}
	return a
}

// acquire counts a new connection from a; false: a has too many open.
func (l *connLimit) acquire(a netip.Addr) bool {
	if l.max <= 0 {
		return true
	}
	k := connKey(a)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open[k] >= l.max {
		return false
	}
	l.open[k]++
	return true
}

// release uncounts a connection that acquire counted.
func (l *connLimit) release(a netip.Addr) {
	if l.max <= 0 {
		return
	}
	k := connKey(a)
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.open[k] <= 1 {
		delete(l.open, k)
		return
	}
	l.open[k]--
}

// openFrom is the number of counted connections from a (for tests).
func (l *connLimit) openFrom(a netip.Addr) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.open[connKey(a)]
}

// readTimeout is how long the next read of a stream connection may
// wait: mid-frame (or before the first frame) streamFirstTimeout, between
// frames the idle timeout for its state.
func (l *limits) readTimeout(midFrame, started, authed bool) time.Duration {
	switch {
	case midFrame || !started:
		return l.firstTimeout
	case authed:
		return l.authedTimeout
	}
	return l.idleTimeout
}

// isTURNSuccess reports whether b, written by pion to a stream client, is
// a success response to a TURN request (not Binding, not ChannelData):
// the connection then carries authenticated TURN state.
func isTURNSuccess(b []byte) bool {
	if len(b) < 2 {
		return false
	}
	t := uint16(b[0])<<8 | uint16(b[1])
	// RFC 8489 §5: the top two bits of a STUN message are zero; class
	// bits C1 C0 = 1 0 is a success response; method 0x001 is Binding.
	return t&0xC000 == 0 && t&0x0110 == 0x0100 && t != 0x0101
}

// randomSeed seeds the table hashes from crypto/rand.
func randomSeed() uint64 {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return be64(b[:])
}

// allocRateThen puts the per-user Allocate rate in front of the quota
// handler: over the rate, pion answers 486 (RFC 8656 §7.2 step 7) and no
// quota slot is reserved.
func (s *Server) allocRateThen(next turn.QuotaHandler) turn.QuotaHandler {
	return func(userID, realm string, src net.Addr) bool {
		if !s.allowAllocate(userID) {
			return false
		}
		return next(userID, realm, src)
	}
}

// AllowUnauth takes a token from src's per-IP budget of unauthenticated
// answers. Other responders that a stranger can make stund send from the
// same addresses (the SIP mirror) share this one budget, so a reflection
// victim gets the same bound whichever protocol the spoofer uses.
func (s *Server) AllowUnauth(src netip.Addr) bool { return s.allowUnauth(src) }
