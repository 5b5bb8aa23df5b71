package classifier

// txn.go is natprobe's STUN transaction layer: unconnected UDP sockets (a
// connected socket would drop the replies that come from the server's
// alternate address, which is the point of RFC 5780), one read goroutine per
// socket dispatching every datagram by transaction key to whichever
// transaction is waiting for it, on any socket, and two ways of sending:
//
//   - exchange: one transaction retransmitted until it is answered
//     (positive evidence: a reply settles the question at once);
//   - collect: an evidence stream, in which a control transaction and one or
//     more test transactions are retransmitted in lockstep until each test
//     is answered or its silence is statistically decisive (negative
//     evidence; see hypergeomZero).

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pion/transport/v5"

	"github.com/stund/stund/internal/stunwire"
)

// Timing. RFC 8489 §6.2.1 starts at RTO = 500 ms and doubles it, which
// suits a long-lived application sharing a congested path; it would make a
// loss-tolerant classification take tens of seconds. natprobe is a one-shot
// diagnostic that sends a bounded number of ~60-byte datagrams, so it paces
// like ICE connectivity checks do instead (RFC 8445 §14.2: one check every
// Ta = 50 ms per agent, here per transaction) and keeps the count bounded by
// the probe's deadline and maxSends.
const (
	// retransmitInterval spaces the copies of a transaction that waits for
	// a positive reply. 100 ms is about one continental RTT: on a lossless
	// path the reply comes before the first retransmission, and at 50 %
	// loss each way (a 25 % chance per copy) 30 copies in 3 s leave a
	// 2e-4 chance of no answer.
	retransmitInterval = 100 * time.Millisecond
	// trialPace spaces the copies of an evidence stream. Negative evidence
	// needs about twelve answered control copies on a clean path
	// (negativeAlpha), so 20 ms keeps a filtering verdict near 300 ms.
	trialPace = 20 * time.Millisecond
	// minSettle is how long a copy must have been out before its silence
	// counts: a reply to it could still be in flight before that. Real
	// paths rarely exceed 100 ms of jitter on top of the RTT.
	minSettle = 100 * time.Millisecond
	// settleRTTs scales the best RTT seen into the settle time, so that a
	// long path (satellite, 600 ms) waits proportionally longer.
	settleRTTs = 4
	// negativeAlpha is the largest chance we accept that a test which would
	// have been answered looked silent only because of loss. At 1e-6 the
	// default probe's three negative decisions turn loss into a stricter
	// verdict less than once in 300 000 runs.
	negativeAlpha = 1e-6
	// maxSends bounds the copies of one transaction whatever the deadline:
	// 30 s of trialPace.
	maxSends = 1500
	// readBufSize holds any datagram a STUN server sends natprobe (replies
	// are under 200 bytes; PADDING is never requested).
	readBufSize = 2048
)

// arrival is one datagram matched to a transaction.
type arrival struct {
	msg            message
	from           netip.AddrPort // the datagram's real source
	at             *socket        // the socket it arrived on
	when           time.Time
	originMismatch bool // RESPONSE-ORIGIN (or SOURCE-ADDRESS) differs from the real source
}

// Stats counts what natprobe's sockets saw; malformed and unmatched
// datagrams are dropped, never acted on.
type Stats struct {
	Sent           int64 `json:"sent"`            // datagrams sent (every copy)
	Received       int64 `json:"received"`        // datagrams read
	Malformed      int64 `json:"malformed"`       // failed parsing (framing, attribute, FINGERPRINT)
	Unmatched      int64 `json:"unmatched"`       // parsed, but for no transaction of this run
	OriginMismatch int64 `json:"origin_mismatch"` // replies whose RESPONSE-ORIGIN is not their source
}

// agent owns the sockets and transactions of one probe run.
type agent struct {
	net      transport.Net
	software string
	// onArrival is called (from a read goroutine, without locks held)
	// for every matched arrival; the prober learns server facts there.
	onArrival func(*txn, arrival)
	// reached, when set, is closed once the server has answered anything;
	// until then retransmissions back off (gap).
	reached <-chan struct{}

	mu        sync.Mutex
	txns      map[txKey]*txn
	socks     []*socket
	rttMin    time.Duration // best (arrival - first send) seen; 0 = none yet
	anomalies []string
	writeErr  error // the last failed send, for the unreachable message
	closed    bool

	readers                                                 sync.WaitGroup
	sent, received, malformed, unmatched, originMismatchCnt atomic.Int64
}

func newAgent(n transport.Net, software string) *agent {
	return &agent{net: n, software: software, txns: map[txKey]*txn{}}
}

// socket is one unconnected UDP socket and its read goroutine.
type socket struct {
	a      *agent
	conn   net.PacketConn
	local  netip.AddrPort
	closed atomic.Bool
}

// errClosed is returned when the agent has been closed.
var errClosed = errors.New("probe finished")

// listen binds a fresh socket on ap (port 0 = any) and starts reading it.
func (a *agent) listen(ap netip.AddrPort) (*socket, error) {
	network := "udp4"
	if ap.Addr().Is6() {
		network = "udp6"
	}
	conn, err := a.net.ListenUDP(network, net.UDPAddrFromAddrPort(ap))
	if err != nil {
		return nil, err
	}
	s := &socket{a: a, conn: conn, local: stunwire.AddrPortOf(conn.LocalAddr())}
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		_ = conn.Close()
		return nil, errClosed
	}
	a.socks = append(a.socks, s)
	a.readers.Add(1)
	a.mu.Unlock()
	go s.readLoop()
	return s, nil
}

// close stops every socket and waits for the read goroutines.
func (a *agent) close() {
	a.mu.Lock()
	a.closed = true
	socks := a.socks
	a.mu.Unlock()
	for _, s := range socks {
		s.close()
	}
	a.readers.Wait()
}

func (s *socket) close() {
	if s.closed.CompareAndSwap(false, true) {
		_ = s.conn.Close()
	}
}

// maxReadErrors bounds consecutive read errors on an open socket before its
// reader gives up (an OS that keeps failing a read will not stop).
const maxReadErrors = 100

func (s *socket) readLoop() {
	defer s.a.readers.Done()
	buf := make([]byte, readBufSize)
	errs := 0
	for {
		n, from, err := s.conn.ReadFrom(buf)
		if s.closed.Load() {
			return
		}
		if err != nil {
			// A truncated datagram is not ours to parse; any other
			// error is transient (e.g. an ICMP error surfaced on the
			// socket) until it repeats without end.
			if n > 0 {
				s.a.received.Add(1)
				s.a.malformed.Add(1)
			}
			if errs++; errs > maxReadErrors {
				return
			}
			continue
		}
		errs = 0
		s.a.dispatch(s, buf[:n], from, time.Now())
	}
}

// dispatch parses one datagram and hands it to its transaction.
func (a *agent) dispatch(s *socket, b []byte, from net.Addr, now time.Time) {
	a.received.Add(1)
	m, err := parseMessage(b)
	if err != nil {
		a.malformed.Add(1)
		return
	}
	if m.class == classIndication {
		a.unmatched.Add(1)
		return
	}
	a.mu.Lock()
	t := a.txns[m.key]
	a.mu.Unlock()
	// A request only counts for a hairpin probe (sent to our own mapped
	// address); a response only for a transaction we sent to a server.
	if t == nil || (m.class == classRequest) != t.hairpin {
		a.unmatched.Add(1)
		return
	}
	arr := arrival{msg: m, from: stunwire.AddrPortOf(from), at: s, when: now}
	if m.origin.IsValid() && m.class != classRequest && m.origin != arr.from {
		// RFC 5780 §7.3: RESPONSE-ORIGIN is the address the server sent
		// from; a different source means something in the path rewrote
		// it (or the server sits behind a NAT it does not advertise).
		arr.originMismatch = true
		a.originMismatchCnt.Add(1)
		a.note(fmt.Sprintf("a reply from %s says it was sent from %s (RESPONSE-ORIGIN): a middlebox rewrote the source, or the server is behind a NAT it does not advertise", arr.from, m.origin))
	}
	t.record(arr)
	if arr.msg.class != classRequest {
		a.mu.Lock()
		if rtt := arr.when.Sub(t.firstSend()); rtt > 0 && (a.rttMin == 0 || rtt < a.rttMin) {
			a.rttMin = rtt
		}
		a.mu.Unlock()
	}
	if a.onArrival != nil {
		a.onArrival(t, arr)
	}
}

// note records an anomaly once.
func (a *agent) note(s string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, x := range a.anomalies {
		if x == s {
			return
		}
	}
	a.anomalies = append(a.anomalies, s)
}

// settle is how long a copy must be out before its silence counts.
func (a *agent) settle() time.Duration {
	a.mu.Lock()
	defer a.mu.Unlock()
	return max(minSettle, settleRTTs*a.rttMin)
}

func (a *agent) stats() Stats {
	return Stats{
		Sent: a.sent.Load(), Received: a.received.Load(), Malformed: a.malformed.Load(),
		Unmatched: a.unmatched.Load(), OriginMismatch: a.originMismatchCnt.Load(),
	}
}

// txn is one STUN transaction: one key, one request, any number of copies.
type txn struct {
	a       *agent
	key     txKey // the current key; fixed except by downgrade (exchange's goroutine)
	sock    *socket
	dst     netip.AddrPort
	opts    reqOpts // immutable
	hairpin bool    // a request to our own mapped address: it arrives as a request
	want    *socket // a counting arrival must land here; nil = any socket
	pkt     []byte

	mu       sync.Mutex
	bare     bool // downgraded: the zero CHANGE-REQUEST is no longer sent
	sends    []time.Time
	arrivals []arrival
	hits     int
	done     chan struct{} // closed at the first counting arrival
}

// newTxn registers a transaction from s to the server address dst.
func (a *agent) newTxn(s *socket, dst netip.AddrPort, o reqOpts) *txn {
	return a.register(&txn{a: a, key: newKey(o.classic), sock: s, dst: dst, opts: o})
}

// newHairpinTxn registers a request from s to our own mapped address dst,
// which counts only when it arrives on want (RFC 5780 §3.4).
func (a *agent) newHairpinTxn(s *socket, dst netip.AddrPort, want *socket) *txn {
	return a.register(&txn{a: a, key: newKey(false), sock: s, dst: dst, hairpin: true, want: want})
}

func (a *agent) register(t *txn) *txn {
	t.done = make(chan struct{})
	t.pkt = buildRequest(nil, t.key, a.software, t.opts)
	a.mu.Lock()
	a.txns[t.key] = t
	a.mu.Unlock()
	return t
}

// send writes one more copy. A failed write is counted as sent: for the
// evidence it is a lost datagram like any other.
func (t *txn) send() {
	t.mu.Lock()
	if len(t.sends) >= maxSends {
		t.mu.Unlock()
		return
	}
	t.sends = append(t.sends, time.Now())
	pkt := t.pkt
	t.mu.Unlock()
	t.a.sent.Add(1)
	if _, err := t.sock.conn.WriteTo(pkt, net.UDPAddrFromAddrPort(t.dst)); err != nil && !t.sock.closed.Load() {
		t.a.mu.Lock()
		t.a.writeErr = err
		t.a.mu.Unlock()
	}
}

func (t *txn) record(arr arrival) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.arrivals = append(t.arrivals, arr)
	if t.want == nil || arr.at == t.want {
		if t.hits == 0 {
			close(t.done)
		}
		t.hits++
	}
}

func (t *txn) firstSend() time.Time {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.sends) == 0 {
		return time.Time{}
	}
	return t.sends[0]
}

func (t *txn) lastSend() time.Time {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.sends) == 0 {
		return time.Time{}
	}
	return t.sends[len(t.sends)-1]
}

// sentBefore counts the copies sent at or before cutoff.
func (t *txn) sentBefore(cutoff time.Time) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, s := range t.sends {
		if !s.After(cutoff) {
			n++
		}
	}
	return n
}

// hitsBefore counts the counting arrivals that came in at or before cutoff:
// with one key for every copy a reply cannot be matched to its copy, but
// one that arrived by cutoff surely answers a copy sent before it.
func (t *txn) hitsBefore(cutoff time.Time) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for _, a := range t.arrivals {
		if (t.want == nil || a.at == t.want) && !a.when.After(cutoff) {
			n++
		}
	}
	return n
}

func (t *txn) hitCount() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.hits
}

// got returns a copy of every arrival so far.
func (t *txn) got() []arrival {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]arrival(nil), t.arrivals...)
}

// first returns the first counting arrival.
func (t *txn) first() (arrival, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, a := range t.arrivals {
		if t.want == nil || a.at == t.want {
			return a, true
		}
	}
	return arrival{}, false
}

// exchange sends t every retransmitInterval (backing off until the server
// first answers anything, see gap) until it is answered or ctx ends, and
// returns the first counting arrival.
func (t *txn) exchange(ctx context.Context) (arrival, bool) {
	t.send()
	return t.resend(ctx)
}

// resend is exchange after the first copy has already been sent.
func (t *txn) resend(ctx context.Context) (arrival, bool) {
	gap := t.a.gap(0, retransmitInterval)
	timer := time.NewTimer(gap)
	defer timer.Stop()
	for {
		select {
		case <-t.doneCh():
			if a, ok := t.first(); ok && t.downgradable(a) {
				t.downgrade()
				t.send()
				continue
			}
			return t.first()
		case <-ctx.Done():
			return t.first() // a reply may have raced the deadline
		case <-timer.C:
			t.send()
			gap = t.a.gap(gap, retransmitInterval)
			timer.Reset(gap)
		case <-t.a.firstReply(gap != retransmitInterval):
			// Someone else's answer ends the back-off: resume the pace.
			gap = retransmitInterval
			timer.Reset(gap)
		}
	}
}

// Before the server has answered anything, copies are spaced by a doubling
// gap (100 ms, 200 ms, ... up to maxSilentGap): a dozen transactions
// retransmitting at full pace toward an address that never answers would
// send hundreds of datagrams before the probe gives up, while the first
// copies of all of them together already make a lossy path answer.
const maxSilentGap = time.Second

// firstReply returns the channel closed at the server's first answer when
// waiting for it matters, else nil (a case that never fires).
func (a *agent) firstReply(backingOff bool) <-chan struct{} {
	if !backingOff {
		return nil
	}
	return a.reached
}

// gap returns the wait before the next copy: pace once the server has
// answered, else the doubling gap after prev.
func (a *agent) gap(prev, pace time.Duration) time.Duration {
	if a.reached != nil {
		select {
		case <-a.reached:
			return pace
		default:
		}
	}
	return min(max(2*prev, retransmitInterval), maxSilentGap)
}

func (t *txn) doneCh() <-chan struct{} {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.done
}

// downgradable: a request with a zero CHANGE-REQUEST that the server
// refused with 420 (a single-IP server, RFC 5780 §6).
func (t *txn) downgradable(a arrival) bool {
	t.mu.Lock()
	bare := t.bare
	t.mu.Unlock()
	return a.msg.class == classError && a.msg.errCode == 420 && t.opts.sendChange && t.opts.change == 0 && !bare
}

// downgrade turns t into a bare Binding request under a new key (replies
// to the old one are ignored from now on) and forgets the refusal.
func (t *txn) downgrade() {
	k := newKey(false)
	t.mu.Lock()
	old := t.key
	t.key, t.bare = k, true
	o := t.opts
	o.sendChange = false
	t.pkt = buildRequest(nil, k, t.a.software, o)
	t.arrivals, t.hits, t.done = nil, 0, make(chan struct{})
	t.mu.Unlock()
	t.a.mu.Lock()
	delete(t.a.txns, old)
	t.a.txns[k] = t
	t.a.mu.Unlock()
}

// outcome of one test in an evidence stream.
type outcome int8

const (
	undecided outcome = iota
	positive          // a test copy was answered: conclusive at once
	negative          // the test stayed silent while the control was answered, beyond negativeAlpha
)

func (o outcome) String() string {
	switch o {
	case positive:
		return "positive"
	case negative:
		return "negative"
	}
	return "undecided"
}

// streamResult is what an evidence stream saw, for verdicts and reasons.
type streamResult struct {
	outcomes []outcome
	// controlSent/controlHits are the settled control copies and their
	// answers when the stream stopped; testSent the settled copies of
	// each test group.
	controlSent, controlHits int
	testSent                 []int
}

// collect runs an evidence stream on control and the test groups (a group
// is one hypothesis; a reply to any of its transactions is positive). Every
// trialPace it sends one copy of the control and of each undecided group's
// transactions, then re-evaluates: a group is positive once any of its
// transactions is answered, negative once the chance that its silence is
// only loss falls below negativeAlpha. stop, when it returns true, ends the
// stream early (e.g. one positive settles the others). ctx bounds it.
//
// Loss does not push a verdict toward "negative": the control shares the
// socket, the server address and the path of the tests, and the copies are
// interleaved, so loss thins the control's answers exactly as much as it
// would thin the tests', and the decision waits for as many answered control
// copies as the observed loss requires.
func (a *agent) collect(ctx context.Context, control *txn, groups [][]*txn, stop func([]outcome) bool) streamResult {
	res := streamResult{outcomes: make([]outcome, len(groups)), testSent: make([]int, len(groups))}
	var timer *time.Timer
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	gap := time.Duration(0)
	for round := 0; round < maxSends; round++ {
		control.send()
		for g, group := range groups {
			if res.outcomes[g] == undecided {
				for _, t := range group {
					t.send()
				}
			}
		}
		a.evaluate(control, groups, &res)
		if allDecided(res.outcomes) || (stop != nil && stop(res.outcomes)) {
			return res
		}
		gap = a.gap(gap, trialPace)
		if timer == nil {
			timer = time.NewTimer(gap)
		} else {
			timer.Reset(gap)
		}
		select {
		case <-ctx.Done():
			a.evaluate(control, groups, &res) // count what came in meanwhile
			return res
		case <-timer.C:
		case <-a.firstReply(gap != trialPace):
			// The server's first answer ends the back-off at once.
		}
	}
	return res
}

func (a *agent) evaluate(control *txn, groups [][]*txn, res *streamResult) {
	// Only copies sent before cutoff have had their chance to be
	// answered; only answers that arrived by then are surely theirs.
	// Counting later answers would credit the control with replies to
	// copies whose test twins are not counted yet.
	cutoff := time.Now().Add(-a.settle())
	res.controlSent = control.sentBefore(cutoff)
	res.controlHits = min(control.hitsBefore(cutoff), res.controlSent)
	for g, group := range groups {
		if res.outcomes[g] != undecided {
			continue
		}
		n := 0
		for _, t := range group {
			if t.hitCount() > 0 {
				res.outcomes[g] = positive
			}
			n += t.sentBefore(cutoff)
		}
		res.testSent[g] = n
		if res.outcomes[g] == undecided && hypergeomZero(res.controlSent, res.controlHits, n) < negativeAlpha {
			res.outcomes[g] = negative
		}
	}
}

func allDecided(o []outcome) bool {
	for _, x := range o {
		if x == undecided {
			return false
		}
	}
	return true
}

// hypergeomZero is the one-sided Fisher exact test for "the tests are
// answered as often as the control": given nc settled control copies of
// which c were answered and nt settled test copies none of which was, it is
// the probability that, with every copy equally likely to be answered, all c
// answers fell on the control side: C(nc, c) / C(nc+nt, c). It needs no
// estimate of the loss rate: on a clean path 12 answered rounds reach 4e-7;
// at 50 % loss each way about 20 control answers are needed.
func hypergeomZero(nc, c, nt int) float64 {
	if c <= 0 || nt <= 0 {
		return 1
	}
	p := 1.0
	for i := 0; i < c; i++ {
		p *= float64(nc-i) / float64(nc+nt-i)
	}
	return p
}
