package classifier

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"github.com/stund/stund/internal/stunwire"
	"io"
	"math"
	mrand "math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/stund/stund/internal/rtpstat"
)

// CallReport is sip.rtp (and sip.rtp_relay): a G.711 call to the SIP
// mirror's media echo (--call), measured each way.
type CallReport struct {
	Packets    int     `json:"packets"`      // RTP packets sent
	LossPctOut float64 `json:"loss_pct_out"` // lost toward the echo (its receive count)
	LossPctIn  float64 `json:"loss_pct_in"`  // echoes lost on the way back
	// JitterMS is the worse direction's RFC 3550 §6.4.1 interarrival
	// jitter; JitterOutMS as the echo computed it on our stream,
	// JitterInMS ours on the echoes, which carry our RTP timestamps and so
	// include the outbound path's variation too.
	JitterMS    float64 `json:"jitter_ms"`
	JitterOutMS float64 `json:"jitter_out_ms"`
	JitterInMS  float64 `json:"jitter_in_ms"`
	RTTMS       float64 `json:"rtt_ms"`   // median round trip
	RFactor     float64 `json:"r_factor"` // ITU-T G.107 E-model
	MOS         float64 `json:"mos"`      // G.107 Annex B from R
	// RTPParityKept: the even local RTP port left as an even port;
	// RTCPAdjacent: RTCP from the next local port left from the next
	// external port (RFC 4787 §4.2.2, §4.2.3, for this real flow); null
	// when the echo did not say.
	RTPParityKept *bool  `json:"rtp_parity_kept"`
	RTCPAdjacent  *bool  `json:"rtcp_adjacent"`
	RTPSourcePort uint16 `json:"rtp_source_port,omitempty"` // the RTP flow's source port as the echo saw it
	Error         string `json:"error,omitempty"`           // why the call could not be measured
}

// The call test (--call): G.711 at 20 ms to the SIP mirror's media echo,
// RTP from an even local port, RTCP from the next (RFC 3550 §11).
const (
	// rtpInterval and rtpPayload are G.711's usual packetization: 20 ms
	// of 8 kHz samples, 160 bytes (RFC 3551 §4.5.14).
	rtpInterval = 20 * time.Millisecond
	rtpPayload  = 160
	rtpHeader   = 12
	// echoStamp is where the echo writes its stamp and how long it is
	// (server/sipmirror.StampOffset, StampLen); sendStampAt is where we
	// put our send time, after it.
	echoStamp, echoStampLen = 12, 10
	sendStampAt             = echoStamp + echoStampLen
	// rtcpEvery spaces our RTCP packets (RFC 3550 §6.2 suggests 5 s; the
	// test is short, and RTCP here only proves the RTCP port's mapping).
	rtcpEvery = 500 * time.Millisecond
	// callDrain waits for the last echoes after the last packet.
	callDrain = 500 * time.Millisecond
	// rtpPortTries bounds the search for a free even/odd local pair.
	rtpPortTries = 32
)

// callStats is what the receive side gathered.
type callStats struct {
	mu        sync.Mutex
	got       map[uint16]bool
	rtts      []time.Duration
	topSeq    int    // highest sequence echoed, -1 none
	topCount  uint32 // the echo's receive count stamped on it
	outJitter uint32 // the echo's jitter (RTP units) on it
	rtpPort   uint16 // our RTP source port as the echo saw it
	rtcpPort  uint16 // and RTCP's
	jitter    rtpstat.Jitter
}

// callTest runs a G.711 call of cfg.SIP.Call to the media echo at dst.
func (p *prober) callTest(ctx context.Context, dst netip.AddrPort) *CallReport {
	rtp, rtcp, err := p.bindRTPPair()
	if err != nil {
		return &CallReport{Error: err.Error()}
	}
	return runCall(ctx, rtp, rtcp, dst, int(p.cfg.SIP.Call/rtpInterval))
}

// RelayCall runs the call test through a TURN relay (relay.Path): RTP for
// d from peer to the relayed address, echoed at the allocation alloc the
// way the SIP mirror's media echo does, so that both legs of a relayed call
// cross the real path and loss and jitter are known each way. There is no
// RTCP (one allocation) and the peer's port is the OS's, so parity and
// adjacency are not measured. It closes alloc and peer.
func RelayCall(ctx context.Context, alloc, peer net.PacketConn, relayed netip.AddrPort, d time.Duration) *CallReport {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); echoAt(alloc) }()
	r := runCall(ctx, peer, nil, relayed, int(d/rtpInterval))
	_ = alloc.Close()
	wg.Wait()
	return r
}

// echoAt echoes every RTP packet c receives to its source, stamped as
// server/sipmirror's media echo stamps it (receive count, RFC 3550 jitter,
// source port), until c is closed.
func echoAt(c net.PacketConn) {
	var count uint32
	var j rtpstat.Jitter
	start := time.Now()
	readAll(c, func(b []byte, from net.Addr) {
		if len(b) < echoStamp+echoStampLen {
			return
		}
		count++
		j.Add(uint32(time.Since(start).Nanoseconds()*8000/int64(time.Second)), binary.BigEndian.Uint32(b[4:]))
		binary.BigEndian.PutUint32(b[echoStamp:], count)
		binary.BigEndian.PutUint32(b[echoStamp+4:], uint32(j.Value()))
		binary.BigEndian.PutUint16(b[echoStamp+8:], stunwire.AddrPortOf(from).Port())
		_, _ = c.WriteTo(b, from)
	})
}

// runCall sends n RTP packets every rtpInterval from rtp to dst (and RTCP
// from rtcp to the next port, when rtcp is not nil), gathers the echoes
// and closes both sockets.
func runCall(ctx context.Context, rtp, rtcp net.PacketConn, dst netip.AddrPort, n int) *CallReport {
	st := &callStats{got: map[uint16]bool{}, topSeq: -1}
	start := time.Now()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); readAll(rtp, func(b []byte, _ net.Addr) { st.takeRTP(b, time.Since(start)) }) }()
	if rtcp != nil {
		wg.Add(1)
		go func() { defer wg.Done(); readAll(rtcp, func(b []byte, _ net.Addr) { st.takeRTCP(b) }) }()
	}
	ssrc := mrand.Uint32()
	ts0 := mrand.Uint32()
	pkt := make([]byte, rtpHeader+rtpPayload)
	tick := time.NewTicker(rtpInterval)
	defer tick.Stop()
	to := net.UDPAddrFromAddrPort(dst)
	toRTCP := net.UDPAddrFromAddrPort(netip.AddrPortFrom(dst.Addr(), dst.Port()+1))
	var lastRTCP time.Time
	sent := 0
	for ; sent < n; sent++ {
		// RFC 3550 §5.1: V=2, PT=0 (PCMU), sequence, timestamp, SSRC.
		pkt[0], pkt[1] = 0x80, 0
		binary.BigEndian.PutUint16(pkt[2:], uint16(sent))
		binary.BigEndian.PutUint32(pkt[4:], ts0+uint32(sent*rtpPayload))
		binary.BigEndian.PutUint32(pkt[8:], ssrc)
		for i := rtpHeader; i < len(pkt); i++ {
			pkt[i] = 0xff // PCMU silence
		}
		binary.BigEndian.PutUint64(pkt[sendStampAt:], uint64(time.Since(start)))
		_, _ = rtp.WriteTo(pkt, to)
		if rtcp != nil && time.Since(lastRTCP) >= rtcpEvery {
			_, _ = rtcp.WriteTo(rtcpSR(ssrc), toRTCP)
			lastRTCP = time.Now()
		}
		select {
		case <-ctx.Done():
			n = sent + 1
		case <-tick.C:
		}
	}
	select {
	case <-ctx.Done():
	case <-time.After(callDrain):
	}
	_ = rtp.Close()
	if rtcp != nil {
		_ = rtcp.Close()
	}
	wg.Wait()
	r := st.report(sent)
	if rtcp == nil {
		r.RTPParityKept, r.RTCPAdjacent = nil, nil
	}
	return r
}

// rtcpSR is a minimal RTCP sender report (RFC 3550 §6.4.1): header, SSRC,
// and a zeroed sender info, 28 bytes.
func rtcpSR(ssrc uint32) []byte {
	b := make([]byte, 28)
	b[0], b[1] = 0x80, 200
	binary.BigEndian.PutUint16(b[2:], 6) // length in 32-bit words minus one
	binary.BigEndian.PutUint32(b[4:], ssrc)
	return b
}

// bindRTPPair binds an even local port and the next one.
func (p *prober) bindRTPPair() (net.PacketConn, net.PacketConn, error) {
	network := "udp4"
	if p.localIP.Is6() {
		network = "udp6"
	}
	var lastErr error
	for range rtpPortTries {
		port := uint16(sipRTPLo + 2*mrand.IntN((sipRTPHi-sipRTPLo)/2+1))
		a, err := p.a.net.ListenUDP(network, net.UDPAddrFromAddrPort(netip.AddrPortFrom(p.localIP, port)))
		if err != nil {
			lastErr = err
			continue
		}
		b, err := p.a.net.ListenUDP(network, net.UDPAddrFromAddrPort(netip.AddrPortFrom(p.localIP, port+1)))
		if err != nil {
			_ = a.Close()
			lastErr = err
			continue
		}
		return a, b, nil
	}
	return nil, nil, fmt.Errorf("no free even/odd local port pair in %d tries: %v", rtpPortTries, lastErr)
}

// readAll hands every datagram c reads to take until c is closed, or
// fails maxReadErrors times in a row.
func readAll(c net.PacketConn, take func(b []byte, from net.Addr)) {
	buf := make([]byte, 2048)
	for fails := 0; fails < maxReadErrors; {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF) || strings.Contains(err.Error(), "closed") {
				return
			}
			fails++
			continue
		}
		fails = 0
		take(buf[:n], from)
	}
}

// takeRTP records one echoed RTP packet.
func (st *callStats) takeRTP(b []byte, now time.Duration) {
	if len(b) != rtpHeader+rtpPayload {
		return
	}
	seq := binary.BigEndian.Uint16(b[2:])
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.got[seq] {
		return
	}
	st.got[seq] = true
	st.rtts = append(st.rtts, now-time.Duration(binary.BigEndian.Uint64(b[sendStampAt:])))
	if int(seq) > st.topSeq {
		st.topSeq = int(seq)
		st.topCount = binary.BigEndian.Uint32(b[echoStamp:])
		st.outJitter = binary.BigEndian.Uint32(b[echoStamp+4:])
	}
	st.rtpPort = binary.BigEndian.Uint16(b[echoStamp+8:])
	// RFC 3550 §A.8 on the echoes as they reach us, on the 8 kHz clock.
	st.jitter.Add(uint32(now.Nanoseconds()*8000/int64(time.Second)), binary.BigEndian.Uint32(b[4:]))
}

// takeRTCP records the source port the echo saw for our RTCP.
func (st *callStats) takeRTCP(b []byte) {
	if len(b) < echoStamp+echoStampLen {
		return
	}
	st.mu.Lock()
	st.rtcpPort = binary.BigEndian.Uint16(b[echoStamp+8:])
	st.mu.Unlock()
}

// report turns the gathered evidence into the call's figures.
func (st *callStats) report(sent int) *CallReport {
	st.mu.Lock()
	defer st.mu.Unlock()
	r := &CallReport{Packets: sent}
	if st.topSeq < 0 {
		r.Error = fmt.Sprintf("none of %d RTP packets came back from the media echo", sent)
		r.LossPctOut, r.LossPctIn = 100, 100
		return r
	}
	// The echo stamped the packet with the highest sequence s with how
	// many of the s+1 packets sent up to it arrived (count c); of the c
	// echoes it sent by then we got those with sequence <= s.
	c := float64(st.topCount)
	r.LossPctOut = 100 * (1 - c/float64(st.topSeq+1))
	r.LossPctIn = 100 * (1 - float64(len(st.got))/c)
	r.LossPctOut, r.LossPctIn = max(r.LossPctOut, 0), max(r.LossPctIn, 0)
	// RTP timestamp units of 1/8 ms (8 kHz), to the microsecond.
	r.JitterOutMS = math.Round(float64(st.outJitter)*125) / 1000
	r.JitterInMS = math.Round(st.jitter.Value()*125) / 1000
	r.JitterMS = max(r.JitterOutMS, r.JitterInMS)
	slices.Sort(st.rtts)
	r.RTTMS = float64(st.rtts[len(st.rtts)/2].Microseconds()) / 1000
	r.RFactor, r.MOS = eModel(r.RTTMS, r.JitterMS, max(r.LossPctOut, r.LossPctIn))
	r.RTPSourcePort = st.rtpPort
	if st.rtpPort != 0 {
		r.RTPParityKept = ptr(st.rtpPort%2 == 0)
	}
	if st.rtpPort != 0 && st.rtcpPort != 0 {
		r.RTCPAdjacent = ptr(st.rtcpPort == st.rtpPort+1)
	}
	return r
}

// eModel is ITU-T G.107's E-model for G.711 with packet-loss concealment,
// the defaults of G.107 Table 2 otherwise: R = 93.2 - Id - Ie,eff, where
// the one-way mouth-to-ear delay is half the RTT plus a jitter buffer of
// twice the jitter plus one 20 ms frame, Id is G.107's delay impairment
// in the simplified form of Cole and Rosenbluth (Id = 0.024 d + 0.11 (d -
// 177.3) above 177.3 ms), and Ie,eff = Ie + (95 - Ie) Ppl / (Ppl + Bpl)
// (G.107 §7.2.3 with BurstR = 1, random loss) with G.113 Appendix I's
// Ie = 0, Bpl = 25.1 for G.711 with PLC. MOS from R by G.107 Annex B.
func eModel(rttMS, jitterMS, lossPct float64) (r, mos float64) {
	d := rttMS/2 + 2*jitterMS + float64(rtpInterval/time.Millisecond)
	id := 0.024 * d
	if d > 177.3 {
		id += 0.11 * (d - 177.3)
	}
	const ie, bpl = 0, 25.1
	ieEff := ie + (95-ie)*lossPct/(lossPct+bpl)
	r = 93.2 - id - ieEff
	switch {
	case r <= 0:
		mos = 1
	case r >= 100:
		mos = 4.5
	default:
		mos = 1 + 0.035*r + r*(r-60)*(100-r)*7e-6
	}
	return math.Round(r*10) / 10, math.Round(mos*100) / 100
}
