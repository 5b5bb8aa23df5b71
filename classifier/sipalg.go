package classifier

// sipalg.go is the SIP ALG test: an INVITE with SDP over UDP and over TCP
// to the SIP mirror's SIP port (where ALGs look) and to its control port
// (where none does), compared field by field with what the mirror says it
// received (server/sipmirror). It runs beside the NAT tests, on its own
// sockets.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"github.com/stund/stund/internal/stunwire"
	mrand "math/rand/v2"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/stund/stund/internal/sipmsg"
)

// SIPConfig is the SIP part of a run.
type SIPConfig struct {
	Skip        bool          // --no-sip: no SIP test at all
	Port        uint16        // the mirror's SIP port; 0 = DefaultSIPPort
	ControlPort uint16        // the mirror's control port; 0 = DefaultSIPControlPort
	Call        time.Duration // --call: length of the call test; 0 = none
}

// SIP test constants.
const (
	// DefaultSIPPort and DefaultSIPControlPort are stund's defaults
	// (server/sipmirror).
	DefaultSIPPort        = 5060
	DefaultSIPControlPort = 5062
	// sipPadTo pads UDP INVITEs: the mirror never answers with more
	// bytes than the request, and its answer (headers, SDP and the
	// compressed request) stays under 1000 bytes for ours. 1200 leaves a
	// margin and stays under RFC 3261 §18.1.1's 1300-byte UDP limit.
	sipPadTo = 1200
	// sipPace spaces UDP copies, as ICE's Ta (RFC 8445 §14.2).
	sipPace = 50 * time.Millisecond
	// sipSettle: a copy's silence counts only after this long (an answer
	// may still be in flight before).
	sipSettle = 300 * time.Millisecond
	// sipAbsentGrace is how long past the NAT tests natprobe waits for a
	// control-port answer before it decides the server has no mirror.
	sipAbsentGrace = 200 * time.Millisecond
	// tcpWave connections to each port at once, at most tcpWaves waves of
	// tcpAttemptTimeout each: a SIP port that swallows every INVITE
	// while the control port answers every one is a drop after two waves
	// (1/C(24,12) < negativeAlpha); 1.5 s lets TCP retransmit a lost
	// segment three times (Linux's 200 ms minimum RTO, doubling).
	tcpWave           = 6
	tcpWaves          = 3
	tcpAttemptTimeout = 1500 * time.Millisecond
	// sipRTPLo..sipRTPHi is where the INVITE's SDP m= port is drawn, even
	// (RFC 3550 §11) and fresh for every INVITE: Linux's SIP helper
	// keeps a media expectation per announced port for 3 minutes and
	// drops a later INVITE from another socket announcing the same one
	// (lab/README.md), so a fixed port would make one run's verdict
	// depend on the run before.
	sipRTPLo, sipRTPHi = 16384, 32766
)

// sipResult is the SIP test's evidence.
type sipResult struct {
	ran       bool
	offered   bool
	udp, tcp  algEvidence
	sym       *SymmetricResponse
	mediaPort uint16
	call      *CallReport
}

// sipTest runs the ALG test over UDP and TCP at once; stunDone closes when
// the NAT tests have finished.
func (p *prober) sipTest(ctx, parent context.Context, stunDone <-chan struct{}) {
	res := &p.sipRes
	res.ran = true
	offered := make(chan struct{})
	var once sync.Once
	markOffered := func() { once.Do(func() { close(offered) }) }
	absent := make(chan struct{})
	finished := make(chan struct{})
	var watch sync.WaitGroup
	watch.Add(1)
	go func() {
		defer watch.Done()
		select {
		case <-stunDone:
		case <-offered:
			return
		case <-finished:
			return
		}
		t := time.NewTimer(sipAbsentGrace)
		defer t.Stop()
		select {
		case <-t.C:
			close(absent)
		case <-offered:
		case <-finished:
		}
	}()
	defer watch.Wait()
	defer close(finished)
	g := sipGate{offered: offered, markOffered: markOffered, absent: absent}
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); p.sipUDP(ctx, g) }()
	go func() { defer wg.Done(); p.sipTCP(ctx, g) }()
	wg.Wait()
	select {
	case <-offered:
		res.offered = true
	default:
	}
	res.udp.offered, res.tcp.offered = res.offered, res.offered
	p.progress("SIP ALG: udp %s, tcp %s", algVerdictFor(res.udp).Verdict, algVerdictFor(res.tcp).Verdict)
	if p.cfg.SIP.Call <= 0 {
		return
	}
	switch {
	case !res.offered:
		res.call = &CallReport{Error: "the server offers no SIP mirror, so no media echo"}
	case res.mediaPort == 0:
		res.call = &CallReport{Error: "the SIP mirror announced no media echo (its answer over UDP did not arrive, or the echo is off)"}
	default:
		p.progress("call test: %v of G.711 to the media echo", p.cfg.SIP.Call)
		callCtx, cancel := context.WithTimeout(parent, p.cfg.SIP.Call+2*callDrain)
		defer cancel()
		res.call = p.callTest(callCtx, netip.AddrPortFrom(p.primary.Addr(), res.mediaPort))
	}
}

// sipGate tells the transports whether the mirror is known to be there,
// or given up on.
type sipGate struct {
	offered     <-chan struct{}
	markOffered func()
	absent      <-chan struct{}
}

// gaveUp reports whether the mirror was given up on.
func (g sipGate) gaveUp() bool {
	select {
	case <-g.absent:
		select {
		case <-g.offered:
			return false
		default:
			return true
		}
	default:
		return false
	}
}

func randToken() string {
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

func (p *prober) invite(transport string, local, dst netip.AddrPort, pad int) []byte {
	return sipmsg.Invite{
		Transport: transport, Local: local, Server: dst, RTPPort: uint16(sipRTPLo + 2*mrand.IntN((sipRTPHi-sipRTPLo)/2+1)),
		CallID: randToken() + "@natprobe", Branch: "z9hG4bK" + randToken(), Tag: randToken(), PadTo: pad,
	}.Build()
}

func (p *prober) sipPorts() (sip, ctl netip.AddrPort) {
	sp, cp := p.cfg.SIP.Port, p.cfg.SIP.ControlPort
	if sp == 0 {
		sp = DefaultSIPPort
	}
	if cp == 0 {
		cp = DefaultSIPControlPort
	}
	return netip.AddrPortFrom(p.primary.Addr(), sp), netip.AddrPortFrom(p.primary.Addr(), cp)
}

// sipAnswer is one mirror answer as it reached us.
type sipAnswer struct {
	report sipmsg.Report
	viaSrc netip.AddrPort // received=/rport= of the answer's top Via
}

// readAnswer parses a mirror answer to the request with callID.
func readAnswer(b []byte, stream bool, callID string) (sipAnswer, bool) {
	m, err := sipmsg.Parse(b, stream)
	if err != nil || m.Status != 200 {
		return sipAnswer{}, false
	}
	if id, _ := m.Get("call-id"); id != callID {
		return sipAnswer{}, false
	}
	rep, err := sipmsg.ParseReport(m.Body)
	if err != nil {
		return sipAnswer{}, false
	}
	a := sipAnswer{report: rep}
	via, _ := m.Get("via")
	var ip, port string
	for _, prm := range strings.Split(via, ";")[1:] {
		k, v, _ := strings.Cut(strings.TrimSpace(prm), "=")
		switch strings.ToLower(k) {
		case "received":
			ip = v
		case "rport":
			port = v
		}
	}
	if addr, err := netip.ParseAddr(ip); err == nil {
		if n, err := strconv.ParseUint(port, 10, 16); err == nil {
			a.viaSrc = netip.AddrPortFrom(addr.Unmap(), uint16(n))
		}
	}
	return a, true
}

func callIDOf(req []byte) string {
	m, err := sipmsg.Parse(req, false)
	if err != nil {
		return ""
	}
	id, _ := m.Get("call-id")
	return id
}

// errTCPUnsupported: the network (pion vnet in tests) has no TCP.
var errTCPUnsupported = errors.New("this network offers no TCP")

// tcpTry is one TCP exchange with the mirror.
type tcpTry struct {
	req         []byte
	ans         sipAnswer
	ok          bool
	established bool // the connection was made and the INVITE written
	refused     bool
	fail        string
}

// tcpExchange connects to dst, sends an INVITE and reads the answer.
func (p *prober) tcpExchange(ctx context.Context, dst netip.AddrPort) tcpTry {
	var t tcpTry
	timeout := tcpAttemptTimeout
	if d, ok := ctx.Deadline(); ok {
		timeout = min(timeout, time.Until(d))
	}
	if timeout <= 0 {
		t.fail = "no time left"
		return t
	}
	c, err := p.dialTCP(ctx, dst, timeout)
	if err != nil {
		t.refused = errors.Is(err, syscall.ECONNREFUSED)
		t.fail = fmt.Sprintf("connect: %v", err)
		if strings.Contains(err.Error(), "not supported") || strings.Contains(err.Error(), "unknown network") {
			t.fail = errTCPUnsupported.Error()
		}
		return t
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { _ = c.Close() })
	defer stop()
	_ = c.SetDeadline(time.Now().Add(timeout))
	t.req = p.invite("TCP", addrPortOfTCP(c.LocalAddr()), dst, 0)
	if _, err := c.Write(t.req); err != nil {
		t.fail = fmt.Sprintf("sending the INVITE: %v", err)
		return t
	}
	t.established = true
	buf := make([]byte, 0, sipmsg.MaxHeader+sipmsg.MaxBody)
	id := callIDOf(t.req)
	for len(buf) < cap(buf) {
		n, err := c.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if a, ok := readAnswer(buf, true, id); ok {
			t.ans, t.ok = a, true
			return t
		}
		if err != nil {
			t.fail = fmt.Sprintf("no answer after the INVITE (%d bytes back): %v", len(buf), err)
			return t
		}
	}
	t.fail = "an oversized answer"
	return t
}

// dialTCP connects within timeout, or until ctx ends: transport.Dialer has
// no context, so a dial that ctx abandons finishes (bounded by timeout) in
// its own goroutine, which closes what it got.
func (p *prober) dialTCP(ctx context.Context, dst netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	d := p.a.net.CreateDialer(&net.Dialer{Timeout: timeout, LocalAddr: &net.TCPAddr{IP: p.localIP.AsSlice()}})
	type result struct {
		c   net.Conn
		err error
	}
	ch := make(chan result, 1)
	go func() {
		c, err := d.Dial("tcp", dst.String())
		ch <- result{c, err}
	}()
	select {
	case r := <-ch:
		return r.c, r.err
	case <-ctx.Done():
		go func() {
			if r := <-ch; r.c != nil {
				_ = r.c.Close()
			}
		}()
		return nil, ctx.Err()
	}
}

func addrPortOfTCP(a net.Addr) netip.AddrPort {
	if t, ok := a.(*net.TCPAddr); ok {
		return stunwire.Unmap(t.AddrPort())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return stunwire.Unmap(ap)
}

// sipTCP runs the TCP ALG test in waves of tcpWave connections to each
// port at once. The SIP port's silence is a drop only as negative evidence
// (hypergeomZero, like the UDP and NAT tests): among connections that were
// established, the control port's answers must make it unlikely below
// negativeAlpha that the SIP port's unanswered ones were loss.
func (p *prober) sipTCP(ctx context.Context, g sipGate) {
	ev := &p.sipRes.tcp
	sipDst, ctlDst := p.sipPorts()
	var sipEst, ctlEst, ctlOK, sipAttempts, ctlAttempts int
	for wave := 0; wave < tcpWaves && ctx.Err() == nil; wave++ {
		var s, c [tcpWave]tcpTry
		// The wave ends early once both ports have answered: the rest
		// would only confirm it.
		waveCtx, endWave := context.WithCancel(ctx)
		var answered [2]atomic.Bool
		try := func(dst netip.AddrPort, out *tcpTry, port int) {
			*out = p.tcpExchange(waveCtx, dst)
			if out.ok {
				answered[port].Store(true)
				if answered[0].Load() && answered[1].Load() {
					endWave()
				}
			}
		}
		var wg sync.WaitGroup
		for i := range tcpWave {
			wg.Add(2)
			go func() { defer wg.Done(); try(sipDst, &s[i], 0) }()
			go func() { defer wg.Done(); try(ctlDst, &c[i], 1) }()
		}
		wg.Wait()
		endWave()
		if c[0].fail == errTCPUnsupported.Error() {
			ev.undecided = errTCPUnsupported.Error()
			return
		}
		for i := range tcpWave {
			sipAttempts++
			ctlAttempts++
			if c[i].established {
				ctlEst++
			}
			if c[i].ok {
				ctlOK++
				if !ev.control.answered {
					ev.control = portEvidence{answered: true, received: c[i].ans.report.Request}
					ev.sentControl = c[i].req
				}
			} else {
				ev.control.failure = c[i].fail
			}
			if s[i].established && !s[i].ok {
				sipEst++
			}
			if s[i].ok && !ev.sip.answered {
				ev.sip = portEvidence{answered: true, received: s[i].ans.report.Request}
				ev.sent = s[i].req
			} else if !s[i].ok {
				ev.sip.failure = s[i].fail
			}
		}
		if ctlOK > 0 {
			g.markOffered()
		}
		ev.silenceIsDrop = !ev.sip.answered && hypergeomZero(ctlEst, ctlOK, sipEst) < negativeAlpha
		ev.undecided = fmt.Sprintf("over TCP the SIP port answered none of %d connections (%d established; last: %s), the control port %d of %d (%d established)",
			sipAttempts, sipEst, ev.sip.failure, ctlOK, ctlAttempts, ctlEst)
		if (ev.sip.answered && ev.control.answered) || ev.silenceIsDrop {
			return
		}
		if ctlOK == 0 {
			// Nothing on the control port: wait until the UDP side
			// finds the mirror (then try again), or gives up on it.
			select {
			case <-g.offered:
			case <-g.absent:
				if g.gaveUp() {
					ev.undecided = "the control port did not answer over TCP: " + ev.control.failure
					return
				}
			case <-ctx.Done():
			}
		}
	}
}

// udpSIPSock is one UDP socket of the test: the INVITE it repeats, the
// answers it got and the STUN mapping of the socket.
type udpSIPSock struct {
	conn    net.PacketConn
	local   netip.AddrPort
	dst     netip.AddrPort
	req     []byte
	callID  string
	key     txKey
	stun    []byte
	stunDst netip.AddrPort // the STUN server's primary address

	mu      sync.Mutex
	sends   []time.Time
	answers []sipAnswer
	arrived []time.Time // when each answer came
	mapped  netip.AddrPort
}

func (p *prober) newUDPSIPSock(dst netip.AddrPort) (*udpSIPSock, error) {
	network := "udp4"
	if p.localIP.Is6() {
		network = "udp6"
	}
	c, err := p.a.net.ListenUDP(network, net.UDPAddrFromAddrPort(netip.AddrPortFrom(p.localIP, 0)))
	if err != nil {
		return nil, err
	}
	s := &udpSIPSock{conn: c, local: stunwire.AddrPortOf(c.LocalAddr()), dst: dst, key: newKey(false), stunDst: p.primary}
	s.req = p.invite("UDP", s.local, dst, sipPadTo)
	s.callID = callIDOf(s.req)
	s.stun = buildRequest(nil, s.key, p.cfg.Software, reqOpts{})
	return s, nil
}

// read takes answers and STUN replies until the socket is closed.
func (s *udpSIPSock) read() {
	buf := make([]byte, 65536)
	for {
		n, _, err := s.conn.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) || strings.Contains(err.Error(), "closed") {
				return
			}
			continue
		}
		if a, ok := readAnswer(buf[:n], false, s.callID); ok {
			s.mu.Lock()
			s.answers = append(s.answers, a)
			s.arrived = append(s.arrived, time.Now())
			s.mu.Unlock()
			continue
		}
		if m, err := parseMessage(buf[:n]); err == nil && m.key == s.key && m.class == classSuccess {
			s.mu.Lock()
			s.mapped = m.mappedOf()
			s.mu.Unlock()
		}
	}
}

// sockState is what one socket of the UDP test has seen so far.
type sockState struct {
	settled     int // copies sent at least sipSettle ago
	settledHits int // answers that came by then: surely to those copies
	hits        int // all answers
	first       sipAnswer
	mapped      netip.AddrPort
}

// state is the socket's sockState at now. As in the NAT tests' evidence
// streams (txn.go evaluate), answers cannot be matched to copies, but one
// that arrived by the cutoff surely answers a copy sent before it.
func (s *udpSIPSock) state(now time.Time) sockState {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := sockState{hits: len(s.answers), mapped: s.mapped}
	cutoff := now.Add(-sipSettle)
	for _, t := range s.sends {
		if !t.After(cutoff) {
			st.settled++
		}
	}
	for _, t := range s.arrived {
		if !t.After(cutoff) {
			st.settledHits++
		}
	}
	if len(s.answers) > 0 {
		st.first = s.answers[0]
	}
	return st
}

func (s *udpSIPSock) send(stun bool) {
	s.mu.Lock()
	s.sends = append(s.sends, time.Now())
	need := !s.mapped.IsValid()
	s.mu.Unlock()
	_, _ = s.conn.WriteTo(s.req, net.UDPAddrFromAddrPort(s.dst))
	if stun && need {
		_, _ = s.conn.WriteTo(s.stun, net.UDPAddrFromAddrPort(s.stunDst))
	}
}

// sipUDP runs the UDP ALG test: both ports in lockstep every sipPace until
// the SIP port answers or its silence is beyond loss (hypergeomZero, as the
// NAT tests' negative evidence), then the control port until it answers.
func (p *prober) sipUDP(ctx context.Context, g sipGate) {
	ev := &p.sipRes.udp
	sipDst, ctlDst := p.sipPorts()
	ss, err1 := p.newUDPSIPSock(sipDst)
	cs, err2 := p.newUDPSIPSock(ctlDst)
	if err := errors.Join(err1, err2); err != nil {
		ev.undecided = fmt.Sprintf("cannot bind a UDP socket: %v", err)
		return
	}
	var wg sync.WaitGroup
	for _, s := range []*udpSIPSock{ss, cs} {
		wg.Add(1)
		go func() { defer wg.Done(); s.read() }()
	}
	defer func() { _ = ss.conn.Close(); _ = cs.conn.Close(); wg.Wait() }()
	ev.sent, ev.sentControl = ss.req, cs.req
	tick := time.NewTicker(sipPace)
	defer tick.Stop()
	var sip, ctl sockState
	for round := 0; round < maxSends; round++ {
		now := time.Now()
		sip, ctl = ss.state(now), cs.state(now)
		if ctl.hits > 0 {
			g.markOffered()
		}
		ev.silenceIsDrop = sip.hits == 0 && hypergeomZero(ctl.settled, min(ctl.settledHits, ctl.settled), sip.settled) < negativeAlpha
		if (sip.hits > 0 || ev.silenceIsDrop) && ctl.hits > 0 && ctl.mapped.IsValid() {
			break
		}
		if ctl.hits == 0 && g.gaveUp() {
			break
		}
		if sip.hits == 0 && !ev.silenceIsDrop {
			ss.send(false)
		}
		if ctl.hits == 0 || (sip.hits == 0 && !ev.silenceIsDrop) || !ctl.mapped.IsValid() {
			cs.send(true)
		}
		select {
		case <-ctx.Done():
			round = maxSends
		case <-tick.C:
		}
	}
	if sip.hits > 0 {
		ev.sip = portEvidence{answered: true, received: sip.first.report.Request}
		p.sipRes.mediaPort = sip.first.report.MediaPort
	}
	if ctl.hits > 0 {
		ev.control = portEvidence{answered: true, received: ctl.first.report.Request}
		p.sipRes.mediaPort = ctl.first.report.MediaPort
	}
	ev.undecided = fmt.Sprintf("over UDP the SIP port answered %d of %d copies, the control port %d of %d", sip.hits, sip.settled, ctl.hits, ctl.settled)
	p.sipRes.sym = symmetricVerdict(ctl.mapped, ctl.first.report.Source, cs.local, ctl.hits > 0, ctl.first.viaSrc)
}
