// Package classifier is the natprobe engine: concurrent STUN transactions on
// fresh unconnected sockets, and the RFC 4787 verdict drawn from their
// evidence (docs/design.md).
//
// Every test runs on its own fresh sockets, all at once, so that the NAT
// state one test opens cannot bias another: the filtering socket only ever
// sends to the server's primary address before it asks for replies from the
// others (RFC 5780 §4.4 "sensitive to prior state"), the mapping socket
// talks to all four server addresses, the port test binds its own chosen
// local ports, the hairpin test its own pair.
package classifier

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/pion/transport/v5"
	"github.com/pion/transport/v5/stdnet"

	"github.com/stund/stund/internal/stunwire"
)

// Config is one natprobe run.
type Config struct {
	Server      string           // host[:port], default port 3478
	Net         transport.Net    // nil = the host's network (stdnet); tests pass a vnet.Net
	LocalIP     netip.Addr       // bind here; zero = the address the OS routes to the server from
	Hairpin     bool             // run the hairpinning test
	Lifetime    bool             // run the mapping lifetime search (slow: up to LifetimeMax)
	LifetimeMax time.Duration    // longest idle time the lifetime search tries; 0 = DefaultLifetimeMax
	Software    string           // SOFTWARE attribute of our requests (the CLI puts the probe ID here)
	ProbeID     string           // Report.ProbeID: names the run, as the SOFTWARE attribute does
	Progress    func(msg string) // optional progress callback, called from one goroutine at a time
	// SIP is the SIP ALG test (on unless SIP.Skip) and the call test.
	SIP SIPConfig
	// Timeout bounds everything but the lifetime search. A clean path
	// finishes in well under a second; loss makes the negative evidence
	// (filtering, hairpinning) take longer, and a field still unsettled at
	// the timeout is reported inconclusive. 0 = DefaultTimeout.
	Timeout time.Duration
}

// Defaults.
const (
	// DefaultPort is the STUN port (RFC 8489 §18.6).
	DefaultPort = 3478
	// DefaultTimeout leaves the 50 %-loss case (about 2 s of negative
	// evidence, see hypergeomZero) room to finish.
	DefaultTimeout = 6 * time.Second
	// DefaultLifetimeMax covers the UDP timeouts seen in practice, 30 s to
	// the 5 minutes RFC 4787 §4.3 recommends.
	DefaultLifetimeMax = 300 * time.Second
	// reachTimeout is how long the first reply may take before UDP is
	// declared blocked: every test's first request goes out at once (a
	// dozen sockets, each retransmitting every 100 ms), so even at 50 %
	// loss each way the chance that none is answered in 3 s is below 1e-9.
	reachTimeout = 3 * time.Second
	// defaultSoftware names us when the caller gives no SOFTWARE; it also
	// keeps requests at least 40 bytes (see buildRequest).
	defaultSoftware = "natprobe"
)

// Errors. Both come with a partial Report when one could be made.
var (
	// ErrUnreachable: no reply at all from the server over UDP.
	ErrUnreachable = errors.New("no STUN reply from the server over UDP")
	// ErrNotRFC5780: the server answers but gives no usable OTHER-ADDRESS
	// or does not honour CHANGE-REQUEST; the Report holds what one address
	// can tell (reflexive address, NAT presence, port assignment,
	// hairpinning, ALG).
	ErrNotRFC5780 = errors.New("server is not RFC 5780 capable")
)

// Probe classifies the NAT between this host and cfg.Server.
func Probe(ctx context.Context, cfg Config) (*Report, error) {
	start := time.Now()
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.LifetimeMax <= 0 {
		cfg.LifetimeMax = DefaultLifetimeMax
	}
	if cfg.Software == "" {
		cfg.Software = defaultSoftware
	}
	n := cfg.Net
	if n == nil {
		var err error
		if n, err = stdnet.NewNet(); err != nil {
			return nil, fmt.Errorf("network: %w", err)
		}
	}
	name, primary, err := resolveServer(n, cfg.Server)
	if err != nil {
		return nil, err
	}
	local := cfg.LocalIP
	if !local.IsValid() {
		if local, err = routeTo(n, primary); err != nil {
			return nil, fmt.Errorf("%w: no local address routes to %s: %v", ErrUnreachable, primary, err)
		}
	}
	p := &prober{
		cfg: cfg, name: name, primary: primary, localIP: local.Unmap(),
		reached: make(chan struct{}), srvReady: make(chan struct{}),
	}
	p.a = newAgent(n, cfg.Software)
	p.a.onArrival = p.onArrival
	p.a.reached = p.reached
	rep, err := p.run(ctx)
	if rep != nil {
		rep.DurationMS = time.Since(start).Milliseconds()
	}
	return rep, err
}

// resolveServer turns host[:port] into the name to report and the primary
// server address.
func resolveServer(n transport.Net, server string) (string, netip.AddrPort, error) {
	host, port := server, strconv.Itoa(DefaultPort)
	if h, p, err := net.SplitHostPort(server); err == nil {
		host, port = h, p
	} else {
		host = strings.TrimSuffix(strings.TrimPrefix(host, "["), "]")
	}
	if host == "" {
		return "", netip.AddrPort{}, fmt.Errorf("server %q: no host", server)
	}
	if pn, err := strconv.Atoi(port); err != nil || pn < 1 || pn > 65535 {
		return "", netip.AddrPort{}, fmt.Errorf("server %q: %q is not a port", server, port)
	}
	name := net.JoinHostPort(host, port)
	ua, err := n.ResolveUDPAddr("udp", name)
	if err != nil {
		return name, netip.AddrPort{}, fmt.Errorf("%w: resolving %s: %v", ErrUnreachable, name, err)
	}
	ap := stunwire.AddrPortOf(ua)
	if !ap.IsValid() || ap.Addr().IsUnspecified() {
		return name, netip.AddrPort{}, fmt.Errorf("%w: %s resolves to no usable address", ErrUnreachable, name)
	}
	return name, ap, nil
}

// routeTo asks the OS which local address it sends to dst from (a
// connected UDP socket sends nothing).
func routeTo(n transport.Net, dst netip.AddrPort) (netip.Addr, error) {
	c, err := n.Dial("udp", dst.String())
	if err != nil {
		return netip.Addr{}, err
	}
	defer c.Close()
	ap := stunwire.AddrPortOf(c.LocalAddr())
	if !ap.IsValid() || ap.Addr().IsUnspecified() {
		return netip.Addr{}, fmt.Errorf("the OS chose no source address")
	}
	return ap.Addr(), nil
}

// prober is one run: the agent, what the server told us, and each test's
// evidence (each written by its own goroutine, read after all finished).
type prober struct {
	cfg     Config
	name    string
	primary netip.AddrPort
	localIP netip.Addr
	a       *agent

	reached     chan struct{} // closed at the first reply of any kind
	reachedOnce sync.Once
	srvReady    chan struct{} // closed at the first success from the primary address
	srvOnce     sync.Once
	other       netip.AddrPort // OTHER-ADDRESS from that reply

	progressMu sync.Mutex

	mu         sync.Mutex
	obs        []observation
	algPairs   []algPair
	notCapable []string

	mapRes      mappingResult
	filtRes     filteringEvidence
	filtRan     bool
	filtReason  string // why the filtering test could not run
	portRes     portResult
	hairRes     hairpinResult
	lifetimeRes lifetimeResult
	sipRes      sipResult
}

func (p *prober) progress(format string, args ...any) {
	if p.cfg.Progress == nil {
		return
	}
	p.progressMu.Lock()
	defer p.progressMu.Unlock()
	p.cfg.Progress(fmt.Sprintf(format, args...))
}

// onArrival learns server facts and reflexive addresses from every reply.
func (p *prober) onArrival(t *txn, arr arrival) {
	if arr.msg.class == classRequest {
		return
	}
	p.reachedOnce.Do(func() { close(p.reached) })
	if arr.msg.class != classSuccess {
		return
	}
	if t.opts.plain() && t.dst == p.primary {
		p.srvOnce.Do(func() {
			p.other = arr.msg.other
			close(p.srvReady)
		})
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if t.opts.plain() && arr.at == t.sock && arr.msg.xorMapped.IsValid() {
		p.obs = append(p.obs, observation{local: t.sock.local, dst: t.dst, mapped: arr.msg.xorMapped})
	}
	if arr.msg.mapped.IsValid() && arr.msg.xorMapped.IsValid() {
		p.algPairs = append(p.algPairs, algPair{mapped: arr.msg.mapped, xorMapped: arr.msg.xorMapped})
	}
}

func (p *prober) markNotCapable(why string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !slices.Contains(p.notCapable, why) {
		p.notCapable = append(p.notCapable, why)
	}
}

// alternate waits for the server's first answer and returns its alternate
// address when it is usable for RFC 5780 tests.
func (p *prober) alternate(ctx context.Context) (netip.AddrPort, bool) {
	select {
	case <-p.srvReady:
	case <-ctx.Done():
		return netip.AddrPort{}, false
	}
	o := p.other
	switch {
	case !o.IsValid():
		p.markNotCapable("the server's reply carries no OTHER-ADDRESS (a single-IP server, RFC 5780 §6)")
		return o, false
	case o.Addr().Is4() != p.primary.Addr().Is4():
		p.markNotCapable(fmt.Sprintf("OTHER-ADDRESS %s is not of the primary address's family", o))
		return o, false
	case o.Addr() == p.primary.Addr() || o.Port() == p.primary.Port():
		p.markNotCapable(fmt.Sprintf("OTHER-ADDRESS %s does not differ from %s in both IP and port (RFC 5780 §6)", o, p.primary))
		return o, false
	}
	return o, true
}

func (p *prober) listen(port uint16) (*socket, error) {
	return p.a.listen(netip.AddrPortFrom(p.localIP, port))
}

func (p *prober) run(ctx context.Context) (*Report, error) {
	defer p.a.close()
	testCtx, cancelTests := context.WithTimeout(ctx, p.cfg.Timeout)
	defer cancelTests()
	lifeCtx, cancelLife := context.WithCancel(ctx)
	defer cancelLife()

	p.progress("probing %s (%s) from %s", p.name, p.primary, p.localIP)
	var wg sync.WaitGroup
	spawn := func(f func()) {
		wg.Add(1)
		go func() { defer wg.Done(); f() }()
	}
	// The port test's first packets leave before any other test's, in
	// portOrder, so that no other socket's mapping lands between them.
	portTxns := p.startPortTest()
	spawn(func() { p.portTest(testCtx, portTxns) })
	spawn(func() { p.mappingTest(testCtx) })
	spawn(func() { p.filteringTest(testCtx) })
	if p.cfg.Hairpin {
		spawn(func() { p.hairpinTest(testCtx) })
	}
	if p.cfg.Lifetime {
		spawn(func() { p.lifetimeTest(lifeCtx) })
	}

	// The SIP test runs beside the NAT tests; it learns when they end so
	// that a server without a mirror costs at most sipAbsentGrace more.
	stunDone := make(chan struct{})
	var sipWG sync.WaitGroup
	if !p.cfg.SIP.Skip {
		sipWG.Add(1)
		go func() { defer sipWG.Done(); p.sipTest(testCtx, ctx, stunDone) }()
	}
	waitAll := func() { wg.Wait(); close(stunDone); sipWG.Wait() }

	reach := time.NewTimer(min(reachTimeout, p.cfg.Timeout))
	defer reach.Stop()
	select {
	case <-p.reached:
		reach.Stop()
	case <-reach.C:
		cancelTests()
		cancelLife()
		waitAll()
		err := fmt.Errorf("%w (%s, %d requests in %s)", ErrUnreachable, p.primary, p.a.stats().Sent, min(reachTimeout, p.cfg.Timeout))
		p.a.mu.Lock()
		if p.a.writeErr != nil {
			err = fmt.Errorf("%w; sending failed: %v", err, p.a.writeErr)
		}
		p.a.mu.Unlock()
		return p.unreachable(), err
	case <-ctx.Done():
		cancelTests()
		cancelLife()
		waitAll()
		return nil, ctx.Err()
	}
	waitAll()
	rep := p.report()
	p.mu.Lock()
	notCapable := slices.Clone(p.notCapable)
	p.mu.Unlock()
	if len(notCapable) > 0 {
		return rep, fmt.Errorf("%w: %s", ErrNotRFC5780, strings.Join(notCapable, "; "))
	}
	if err := ctx.Err(); err != nil {
		return rep, err
	}
	return rep, nil
}

// unreachable is the report of a run that got no reply at all.
func (p *prober) unreachable() *Report {
	r := p.baseReport()
	why := fmt.Sprintf("no reply to %d requests in %s", r.Stats.Sent, min(reachTimeout, p.cfg.Timeout))
	r.SetUDPBlocked(why)
	r.SIPRTP = sipVerdict(r, sipInputs{reachable: false})
	return r
}

func (p *prober) baseReport() *Report {
	r := &Report{
		Schema:             Schema,
		ProbeID:            p.cfg.ProbeID,
		Server:             p.name,
		Reasons:            map[string]string{},
		InconclusiveFields: []string{},
		Anomalies:          []string{},
	}
	r.Stats = p.a.stats()
	return r
}

// mappingResult is the mapping socket's evidence.
type mappingResult struct {
	ran    bool
	local  netip.AddrPort
	mapped netip.AddrPort // reflexive address from the primary server address
	ev     mappingEvidence
	reason string // why the mapping test could not run, when it did not
}

// mappingTest is RFC 5780 §4.3 on one fresh socket, all requests at once:
// the primary address first (it names the others), then the alternate IP on
// the primary port, the primary IP on the alternate port and the alternate
// address. It also sends an RFC 3489 request for the ALG check.
func (p *prober) mappingTest(ctx context.Context) {
	res := &p.mapRes
	s, err := p.listen(0)
	if err != nil {
		res.reason = fmt.Sprintf("cannot bind a socket: %v", err)
		return
	}
	res.ran, res.local = true, s.local
	res.ev.dst[0][0] = p.primary
	pp := p.a.newTxn(s, p.primary, plainOpts)
	classic := p.a.newTxn(s, p.primary, reqOpts{classic: true})
	classicCtx, stopClassic := context.WithCancel(ctx)
	var cw sync.WaitGroup
	cw.Add(1)
	go func() { defer cw.Done(); classic.exchange(classicCtx) }()
	defer func() {
		// The RFC 3489 request is a side check: give it the settle time
		// past the main tests, no more.
		select {
		case <-classic.doneCh():
		case <-time.After(p.a.settle()):
		case <-ctx.Done():
		}
		stopClassic()
		cw.Wait()
		if a, ok := classic.first(); ok && a.msg.class == classSuccess && a.msg.mapped.IsValid() && res.mapped.IsValid() {
			p.mu.Lock()
			p.algPairs = append(p.algPairs, algPair{mapped: a.msg.mapped, xorMapped: res.mapped})
			p.mu.Unlock()
		}
	}()

	txns := [2][2]*txn{{pp, nil}, {nil, nil}}
	if a, ok := pp.exchange(ctx); ok && a.msg.class == classSuccess {
		res.mapped = a.msg.mappedOf()
	}
	other, ok := p.alternate(ctx)
	if ok {
		res.ev.dst = [2][2]netip.AddrPort{
			{p.primary, netip.AddrPortFrom(p.primary.Addr(), other.Port())},
			{netip.AddrPortFrom(other.Addr(), p.primary.Port()), other},
		}
		var wg sync.WaitGroup
		for i := range 2 {
			for j := range 2 {
				if i == 0 && j == 0 {
					continue
				}
				txns[i][j] = p.a.newTxn(s, res.ev.dst[i][j], plainOpts)
				wg.Add(1)
				go func(t *txn) { defer wg.Done(); t.exchange(ctx) }(txns[i][j])
			}
		}
		wg.Wait()
	}
	for i := range 2 {
		for j := range 2 {
			if txns[i][j] == nil {
				continue
			}
			for _, a := range txns[i][j].got() {
				if a.msg.class != classSuccess || a.at != s {
					continue
				}
				if m := a.msg.mappedOf(); !slices.Contains(res.ev.seen[i][j], m) {
					res.ev.seen[i][j] = append(res.ev.seen[i][j], m)
				}
			}
		}
	}
	if ok {
		m, why := mappingVerdict(res.ev)
		p.progress("mapping: %s", strings.TrimSuffix(string(m)+" ("+why+")", " ()"))
	}
}

// filteringTest is RFC 5780 §4.4 as one evidence stream on a fresh socket
// that never sends anywhere but the primary address: the control (no
// change), test II (change IP and port) and test III (change port).
func (p *prober) filteringTest(ctx context.Context) {
	s, err := p.listen(0)
	if err != nil {
		p.filtReason = fmt.Sprintf("cannot bind a socket: %v", err)
		return
	}
	p.filtRan = true
	ctrl := p.a.newTxn(s, p.primary, plainOpts)
	cIP := p.a.newTxn(s, p.primary, changeOpts(stunwire.ChangeIP|stunwire.ChangePort))
	cPort := p.a.newTxn(s, p.primary, changeOpts(stunwire.ChangePort))
	res := p.a.collect(ctx, ctrl, [][]*txn{{cIP}, {cPort}}, func(o []outcome) bool {
		return o[0] == positive // an answer from a new IP settles EIF
	})
	ev := filteringEvidence{
		changeIPSilent:   res.outcomes[0] == negative,
		changePortSilent: res.outcomes[1] == negative,
		controlSent:      res.controlSent,
		controlHits:      res.controlHits,
	}
	for _, t := range []*txn{cIP, cPort} {
		for _, a := range t.got() {
			switch {
			case a.at != s:
			case a.msg.class == classError:
				ev.refused = a.msg.errCode
			case a.from == p.primary:
				ev.unchanged = true
			case a.from.Addr() != p.primary.Addr():
				ev.newIP = true
			default:
				ev.newPort = true
			}
		}
	}
	if ev.refused != 0 {
		p.markNotCapable(fmt.Sprintf("the server answers CHANGE-REQUEST with error %d", ev.refused))
	}
	if ev.unchanged {
		p.markNotCapable("the server ignores CHANGE-REQUEST: its \"changed\" replies come from the address the request went to")
	}
	p.filtRes = ev
	p.progress("filtering: change-IP test %s, change-port test %s", res.outcomes[0], res.outcomes[1])
}

// hairpinResult is the hairpin pair's evidence.
type hairpinResult struct {
	ran              bool
	received, silent bool
	reason           string
}

// hairpinTest: two fresh sockets learn their mapped addresses, then each
// sends to the other's (RFC 5780 §3.4; RFC 4787 §6). Sending both ways
// also opens each socket's own filter toward the other's external address,
// so that under endpoint-independent mapping a missing packet means the NAT
// does not hairpin, not that its filter dropped the packet.
func (p *prober) hairpinTest(ctx context.Context) {
	res := &p.hairRes
	h1, err1 := p.listen(0)
	h2, err2 := p.listen(0)
	if err := errors.Join(err1, err2); err != nil {
		res.reason = fmt.Sprintf("cannot bind the hairpin sockets: %v", err)
		return
	}
	res.ran = true
	var m [2]netip.AddrPort
	var wg sync.WaitGroup
	for i, s := range []*socket{h1, h2} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if a, ok := p.a.newTxn(s, p.primary, plainOpts).exchange(ctx); ok && a.msg.class == classSuccess {
				m[i] = a.msg.mappedOf()
			}
		}()
	}
	wg.Wait()
	if !m[0].IsValid() || !m[1].IsValid() {
		res.reason = "the hairpin sockets got no reflexive address"
		return
	}
	to2 := p.a.newHairpinTxn(h1, m[1], h2)
	to1 := p.a.newHairpinTxn(h2, m[0], h1)
	ctrl := p.a.newTxn(h1, p.primary, plainOpts)
	sr := p.a.collect(ctx, ctrl, [][]*txn{{to2, to1}}, nil)
	res.received = sr.outcomes[0] == positive
	res.silent = sr.outcomes[0] == negative
	if !res.received && !res.silent {
		res.reason = fmt.Sprintf("no hairpinned packet, but only %d of %d control requests were answered", sr.controlHits, sr.controlSent)
	}
	p.progress("hairpinning: %s", map[outcome]string{
		positive: "a packet to our own public address came back", negative: "nothing came back", undecided: "not settled",
	}[sr.outcomes[0]])
}

// Port-assignment test (RFC 4787 §4.2).
const (
	// portTestSockets binds this many consecutive local ports from an even
	// one: four even/odd pairs.
	portTestSockets = 8
	// portRangeLo..portRangeHi is where the block is chosen, at random:
	// RFC 5780 §4.1 recommends 32768-49151 for randomly chosen test ports.
	portRangeLo, portRangeHi = 32768, 49151
	// portBaseTries bounds the search for a free block.
	portBaseTries = 16
)

// portOrder is the order in which the sockets (by offset from the even
// base) send their first packet. A NAT that hands out ports sequentially
// would give the odd port of the first pair the lower external port, so it
// shows neither contiguity nor parity; a NAT that really preserves them
// does so whatever the order.
var portOrder = [portTestSockets]int{1, 0, 2, 3, 5, 4, 6, 7}

type portResult struct {
	ran     bool
	reason  string
	samples []portSample
}

// startPortTest binds the port block and sends each socket's first request,
// in portOrder.
func (p *prober) startPortTest() []*txn {
	var socks []*socket
	var lastErr error
	for try := 0; try < portBaseTries && socks == nil; try++ {
		base := uint16(portRangeLo + 2*rand.IntN((portRangeHi-portRangeLo-portTestSockets)/2))
		for i := range portTestSockets {
			s, err := p.listen(base + uint16(i))
			if err != nil {
				lastErr = err
				for _, x := range socks {
					x.close()
				}
				socks = nil
				break
			}
			socks = append(socks, s)
		}
	}
	if socks == nil {
		p.portRes.reason = fmt.Sprintf("could not bind %d consecutive local ports in %d tries: %v", portTestSockets, portBaseTries, lastErr)
		return nil
	}
	p.portRes.ran = true
	txns := make([]*txn, portTestSockets)
	for _, i := range portOrder {
		txns[i] = p.a.newTxn(socks[i], p.primary, plainOpts)
		txns[i].send()
	}
	return txns
}

func (p *prober) portTest(ctx context.Context, txns []*txn) {
	if txns == nil {
		return
	}
	samples := make([]portSample, len(txns))
	var wg sync.WaitGroup
	for i, t := range txns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if a, ok := t.resend(ctx); ok && a.msg.class == classSuccess {
				samples[i] = portSample{local: t.sock.local, mapped: a.msg.mappedOf()}
			}
		}()
	}
	wg.Wait()
	for _, s := range samples {
		if s.mapped.IsValid() {
			p.portRes.samples = append(p.portRes.samples, s)
		}
	}
}

// report assembles the verdicts, in the order of the Report's fields: each
// step reads the evidence its test left and settles its fields or lists
// them inconclusive with the reason.
func (p *prober) report() *Report {
	r := p.baseReport()
	capable, incapable := p.alternateNow()
	p.mu.Lock()
	obs := slices.Clone(p.obs)
	algPairs := slices.Clone(p.algPairs)
	notCapable := slices.Clone(p.notCapable)
	p.mu.Unlock()
	if incapable == "" {
		incapable = strings.Join(notCapable, "; ")
	}

	p.reportAddresses(r, obs)
	p.reportMapping(r, capable, incapable)
	p.reportFiltering(r)
	p.reportHairpinning(r)
	p.reportPorts(r)

	pool, why := poolingVerdict(obs)
	r.IPPooling = pool
	note(r, "ip_pooling", why, pool == nil)

	p.reportLifetime(r)

	// ALG: the STUN payload check (not a NAT ambiguity when unmeasured, a
	// server limitation), and the SIP test (sipalg.go).
	alg, why := algVerdict(algPairs)
	r.STUNPayloadRewritten = alg
	note(r, "stun_payload_rewritten", why, false)
	if alg != nil && *alg {
		r.Anomalies = append(r.Anomalies, "a middlebox rewrote the mapped address inside a STUN reply (MAPPED-ADDRESS differs from XOR-MAPPED-ADDRESS)")
	}
	for f, w := range p.sipReport(r) {
		note(r, f, w.why, w.unsettled)
	}

	lt, why := legacyType(r.NATDetected, r.Mapping, r.Filtering)
	r.LegacyType = lt
	note(r, "legacy_type", why, lt == LegacyInconclusive)

	over := p.reportAnomalies(r, obs, notCapable)
	r.SIPRTP = sipVerdict(r, sipInputs{overloading: over, lifetimeMeasured: p.cfg.Lifetime, reachable: true})
	r.Stats = p.a.stats()
	return r
}

// note records why for field (when there is a reason to give) and lists
// the field inconclusive when the evidence left it unsettled.
func note(r *Report, field, why string, unsettled bool) {
	if why != "" {
		r.Reasons[field] = why
	}
	if unsettled {
		r.MarkInconclusive(field, "")
	}
}

// reportAddresses fills in the local and reflexive addresses, the server's
// alternate address and whether a NAT is there at all.
func (p *prober) reportAddresses(r *Report, obs []observation) {
	r.LocalAddress, r.MappedAddress = p.mapRes.local, p.mapRes.mapped
	if !r.MappedAddress.IsValid() && len(obs) > 0 {
		r.LocalAddress, r.MappedAddress = obs[0].local, obs[0].mapped
	}
	select {
	case <-p.srvReady: // p.other is set before srvReady closes
		r.ServerOtherAddress = p.other
	default:
	}
	if len(obs) == 0 {
		note(r, "nat_detected", "no reflexive address was learnt", true)
		return
	}
	nat := false
	for _, o := range obs {
		nat = nat || o.mapped != o.local
	}
	r.NATDetected = &nat
}

// reportMapping is the RFC 4787 §4.1 mapping verdict; it needs the
// server's alternate address (capable), and incapable says why it is not
// usable.
func (p *prober) reportMapping(r *Report, capable bool, incapable string) {
	switch {
	case !p.mapRes.ran:
		r.Mapping = MappingInconclusive
		note(r, "mapping", p.mapRes.reason, true)
	case !capable:
		r.Mapping = MappingInconclusive
		note(r, "mapping", "needs the server's alternate address: "+incapable, true)
	default:
		m, why := mappingVerdict(p.mapRes.ev)
		r.Mapping = m
		note(r, "mapping", why, m == MappingInconclusive)
	}
}

// reportFiltering is the RFC 4787 §5 filtering verdict, with what the
// mapping socket learnt about which server addresses answer at all.
func (p *prober) reportFiltering(r *Report) {
	if !p.filtRan {
		r.Filtering = FilteringInconclusive
		note(r, "filtering", p.filtReason, true)
		return
	}
	ev := p.filtRes
	ev.otherReaches = len(p.mapRes.ev.seen[1][1]) > 0
	ev.altPortReaches = len(p.mapRes.ev.seen[0][1]) > 0
	f, why := filteringVerdict(ev)
	r.Filtering = f
	note(r, "filtering", why, f == FilteringInconclusive)
}

// reportHairpinning is the RFC 4787 §6 verdict; it needs the mapping and
// filtering verdicts to tell a missing hairpin from a filtered one.
func (p *prober) reportHairpinning(r *Report) {
	switch {
	case !p.cfg.Hairpin:
		note(r, "hairpinning", "skipped (--no-hairpin)", false)
	case !p.hairRes.ran || (!p.hairRes.received && !p.hairRes.silent):
		note(r, "hairpinning", p.hairRes.reason, true)
	default:
		hp, why, unsettled := hairpinVerdict(p.hairRes.received, p.hairRes.silent, r.Mapping, r.Filtering)
		r.Hairpinning = hp
		note(r, "hairpinning", why, unsettled)
	}
}

// reportPorts is the RFC 4787 §4.2 port assignment: preservation, parity,
// contiguity.
func (p *prober) reportPorts(r *Report) {
	if !p.portRes.ran {
		for _, f := range []string{"port_preservation", "port_parity", "port_contiguity"} {
			note(r, f, p.portRes.reason, false)
		}
		return
	}
	var why map[string]string
	r.PortPreservation, r.PortParity, r.PortContiguity, why = portVerdicts(p.portRes.samples)
	for f, w := range why {
		note(r, f, w, true)
	}
}

// reportLifetime is the RFC 4787 §4.3 mapping lifetime, when the search
// ran (--lifetime).
func (p *prober) reportLifetime(r *Report) {
	if !p.cfg.Lifetime {
		return
	}
	lt, why := lifetimeVerdict(p.lifetimeRes.points)
	if p.lifetimeRes.reason != "" {
		why = strings.TrimPrefix(why+"; "+p.lifetimeRes.reason, "; ")
	}
	r.MappingLifetime = lt
	note(r, "mapping_lifetime", why, lt == nil)
}

// reportAnomalies lists what fits no field: the agent's observations, port
// overloading (returned: the SIP reading needs it) and why the server is
// not RFC 5780 capable.
func (p *prober) reportAnomalies(r *Report, obs []observation, notCapable []string) (overloading bool) {
	p.a.mu.Lock()
	r.Anomalies = append(r.Anomalies, p.a.anomalies...)
	p.a.mu.Unlock()
	overloading = overloadingSeen(obs)
	if overloading {
		r.Anomalies = append(r.Anomalies, "port overloading: two of this host's sockets got the same external address toward the same server address")
	}
	r.Anomalies = append(r.Anomalies, notCapable...)
	return overloading
}

// alternateNow is alternate without waiting (after the tests ended): whether
// the RFC 5780 tests could run, and if not, why.
func (p *prober) alternateNow() (bool, string) {
	select {
	case <-p.srvReady:
	default:
		return false, fmt.Sprintf("no success reply from the primary address %s", p.primary)
	}
	_, ok := p.alternate(context.Background())
	return ok, ""
}
