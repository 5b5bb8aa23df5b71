package classifier

// lifetime.go searches for the idle time after which the NAT drops a UDP
// mapping (RFC 5780 §4.6, RFC 4787 §4.3). RFC 5780 describes a binary
// search on one source port X, refreshing X between tries; each try then
// costs its whole idle time in sequence. natprobe instead opens one fresh
// socket per candidate idle time, all at the start, and leaves each idle
// for its own time: the whole search takes as long as the longest idle time
// it reaches, and no probe of one socket can refresh another's mapping.
//
// Each socket X sends one Binding request (its mapping is then refreshed
// for the last time) and stays silent. When its idle time is up, a control
// socket Y sends Binding requests with RESPONSE-PORT = X's external port
// (RFC 5780 §7.5): the server answers to Y's external IP on that port,
// which is X's mapping if it still exists. A reply on X: alive. A reply on
// Y, or decisive silence while Y's own control requests are answered (the
// same evidence stream as filtering): gone. The search stops at the first
// gone point; later (longer) idle times would be gone too.

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"time"
)

// lifetimeCandidates are the idle times tried, up to LifetimeMax (which is
// always tried last): dense where common NAT timers sit (30 s, 60 s, 2 and
// 5 minutes) so that the bracket is tight there.
var lifetimeCandidates = []time.Duration{
	5 * time.Second, 10 * time.Second, 20 * time.Second, 30 * time.Second,
	45 * time.Second, 60 * time.Second, 90 * time.Second, 120 * time.Second,
	180 * time.Second, 240 * time.Second, 300 * time.Second, 450 * time.Second,
	600 * time.Second, 900 * time.Second, 1200 * time.Second, 1800 * time.Second,
	3600 * time.Second,
}

// lifetimeProbeTimeout bounds the evidence stream at one idle time; the
// idle time measured is the time of the stream's first copy, so a long
// stream only widens the bracket's "gone" end.
const lifetimeProbeTimeout = 10 * time.Second

// lifetimeSchedule returns the idle times to try for a given maximum.
func lifetimeSchedule(maxIdle time.Duration) []time.Duration {
	var out []time.Duration
	for _, c := range lifetimeCandidates {
		if c < maxIdle {
			out = append(out, c)
		}
	}
	return append(out, maxIdle)
}

type lifetimeResult struct {
	points []lifetimePoint
	reason string // why the search stopped short, when it did
}

func (p *prober) lifetimeTest(ctx context.Context) {
	res := &p.lifetimeRes
	idles := lifetimeSchedule(p.cfg.LifetimeMax)
	p.progress("lifetime: holding %d idle mappings, up to %s", len(idles), p.cfg.LifetimeMax)

	y, err := p.listen(0)
	if err != nil {
		res.reason = fmt.Sprintf("cannot bind the control socket: %v", err)
		return
	}
	// The sockets' first exchanges are bounded like the default probe.
	setupCtx, cancelSetup := context.WithTimeout(ctx, p.cfg.Timeout)
	defer cancelSetup()
	type held struct {
		sock   *socket
		mapped netip.AddrPort
		quiet  time.Time // the last packet X sent: its mapping's idle clock starts here
	}
	xs := make([]held, len(idles))
	var wg sync.WaitGroup
	for i := range idles {
		s, err := p.listen(0)
		if err != nil {
			res.reason = fmt.Sprintf("cannot bind socket %d of the search: %v", i, err)
			return
		}
		xs[i].sock = s
		wg.Add(1)
		go func() {
			defer wg.Done()
			t := p.a.newTxn(s, p.primary, plainOpts)
			if a, ok := t.exchange(setupCtx); ok && a.msg.class == classSuccess {
				xs[i].mapped, xs[i].quiet = a.msg.mappedOf(), t.lastSend()
			}
		}()
	}
	var yMapped netip.AddrPort
	if a, ok := p.a.newTxn(y, p.primary, plainOpts).exchange(setupCtx); ok && a.msg.class == classSuccess {
		yMapped = a.msg.mappedOf()
	}
	wg.Wait()
	if !yMapped.IsValid() {
		res.reason = "the control socket got no reflexive address"
		return
	}

	for i, idle := range idles {
		x := xs[i]
		if !x.mapped.IsValid() {
			res.points = append(res.points, lifetimePoint{idle: idle})
			continue
		}
		if x.mapped.Addr() != yMapped.Addr() {
			// RESPONSE-PORT answers to Y's external IP: it must be X's.
			res.reason = fmt.Sprintf("the NAT gave the control socket another external IP (%s, not %s), so RESPONSE-PORT cannot reach the idle mapping", yMapped.Addr(), x.mapped.Addr())
			return
		}
		select {
		case <-time.After(time.Until(x.quiet.Add(idle))):
		case <-ctx.Done():
			res.reason = fmt.Sprintf("stopped before the %s point: %v", idle, ctx.Err())
			return
		}
		pt, stop := p.lifetimeProbe(ctx, y, x.sock, x.mapped, x.quiet)
		res.points = append(res.points, pt)
		p.progress("lifetime: after %s idle the mapping is %s", pt.idle.Round(time.Second), map[outcome]string{positive: "alive", negative: "gone", undecided: "unknown"}[pt.state])
		if stop != "" {
			res.reason = stop
			return
		}
		if pt.state == negative {
			return
		}
	}
}

// lifetimeProbe tests one idle mapping (x, mapped, idle since quiet) from
// the control socket y. stop is set when the search cannot go on.
func (p *prober) lifetimeProbe(ctx context.Context, y, x *socket, mapped netip.AddrPort, quiet time.Time) (lifetimePoint, string) {
	ctx, cancel := context.WithTimeout(ctx, lifetimeProbeTimeout)
	defer cancel()
	ctrl := p.a.newTxn(y, p.primary, plainOpts)
	probe := p.a.register(&txn{a: p.a, key: newKey(false), sock: y, dst: p.primary,
		opts: reqOpts{responsePort: mapped.Port()}, want: x})
	// A reply on any socket but X (on Y: the NAT gave X's old port to
	// Y's new mapping) or an error (RESPONSE-PORT refused) ends the stream.
	elsewhere := func() (arrival, bool) {
		for _, a := range probe.got() {
			if a.at != x {
				return a, true
			}
		}
		return arrival{}, false
	}
	sr := p.a.collect(ctx, ctrl, [][]*txn{{probe}}, func([]outcome) bool {
		_, ok := elsewhere()
		return ok
	})
	first := probe.firstSend()
	pt := lifetimePoint{idle: first.Sub(quiet)}
	if a, ok := elsewhere(); ok && sr.outcomes[0] != positive {
		if a.msg.class == classError {
			return pt, fmt.Sprintf("the server refused RESPONSE-PORT (error %d; RFC 5780 §5 lets it)", a.msg.errCode)
		}
		// RFC 5780 §4.6: the reply came back on Y: X's mapping is gone.
		pt.state = negative
		pt.idle = time.Since(quiet)
		return pt, ""
	}
	switch sr.outcomes[0] {
	case positive:
		pt.state = positive // alive when the first copy was sent, at the latest
	case negative:
		// Gone by the last settled copy: the latest time is the safe end
		// of the bracket.
		pt.state = negative
		pt.idle = probe.lastSend().Sub(quiet)
	}
	return pt, ""
}
