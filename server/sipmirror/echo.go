package sipmirror

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/stund/stund/internal/rtpstat"
)

// Media echo limits.
const (
	// sipWindow: media is echoed only to an IP that had a SIP request
	// answered this recently; natprobe starts its call right after.
	sipWindow = 30 * time.Second
	// mediaFlowMax bounds one flow's echo: a call test of up to 30 s.
	mediaFlowMax = 30 * time.Second
	// mediaRate and mediaBurst bound one flow's echo rate: G.711 at
	// 20 ms is 50 packets/s, RTCP adds a few; 100/s with a 1 s burst
	// leaves room for jitter and nothing for a flood.
	mediaRate, mediaBurst = 100.0, 100.0
	// maxFlows and maxSIPSources bound the echo's tables.
	maxFlows, maxSIPSources = 1024, 4096
	// StampOffset is where the echo writes its stamp: after the 12-byte
	// RTP fixed header (RFC 3550 §5.1), or the RTCP header and SSRC;
	// StampLen bytes, big-endian: the flow's receive count (uint32), its
	// RFC 3550 §6.4.1 interarrival jitter in RTP timestamp units (uint32)
	// and the source port the echo saw (uint16), which tells the prober
	// whether the NAT kept RTP even and RTCP next to it.
	StampOffset, StampLen = 12, 10
	// rtpClock is G.711's RTP clock (RFC 3551 §4.5.14), which the jitter
	// is computed in.
	rtpClock = 8000
)

// echo is the media echo: an RTP socket on an even port and RTCP on the
// next.
type echo struct {
	m     *Mirror
	port  int
	socks [2]*net.UDPConn

	mu    sync.Mutex
	sip   map[netip.Addr]time.Time // last answered SIP request per IP
	flows map[flowKey]*flow
}

type flowKey struct {
	src  netip.AddrPort
	rtcp bool
}

type flow struct {
	first, lastTok time.Time
	tokens         float64
	count          uint32
	jitter         rtpstat.Jitter
}

// echoTries bounds the search for a free even/odd pair when port is 0.
const echoTries = 32

func newEcho(m *Mirror, ip netip.Addr, port int) (*echo, error) {
	e := &echo{m: m, sip: map[netip.Addr]time.Time{}, flows: map[flowKey]*flow{}}
	if port%2 != 0 {
		return nil, fmt.Errorf("sipmirror: media port %d: RTP needs an even port (RFC 3550 §11)", port)
	}
	var lastErr error
	for try := 0; try < echoTries; try++ {
		a, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(ip, uint16(port))))
		if err != nil {
			return nil, fmt.Errorf("sipmirror: media %s: %w", netip.AddrPortFrom(ip, uint16(port)), err)
		}
		p := a.LocalAddr().(*net.UDPAddr).Port
		if p%2 == 0 {
			b, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(ip, uint16(p+1))))
			if err == nil {
				e.socks, e.port = [2]*net.UDPConn{a, b}, p
				return e, nil
			}
			lastErr = err
		}
		_ = a.Close()
		if port != 0 {
			return nil, fmt.Errorf("sipmirror: media RTCP port %d: %w", port+1, lastErr)
		}
	}
	return nil, fmt.Errorf("sipmirror: no free even/odd media port pair in %d tries: %v", echoTries, lastErr)
}

func (e *echo) start(wg *sync.WaitGroup) {
	for i, s := range e.socks {
		wg.Add(1)
		go func() { defer wg.Done(); e.serve(s, i == 1) }()
	}
}

func (e *echo) close() {
	for _, s := range e.socks {
		_ = s.Close()
	}
}

// sawSIP records a SIP exchange with ip, which opens the echo to it.
func (e *echo) sawSIP(ip netip.Addr, now time.Time) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if _, ok := e.sip[ip]; !ok && len(e.sip) >= maxSIPSources {
		for k, t := range e.sip {
			if now.Sub(t) > sipWindow {
				delete(e.sip, k)
			}
		}
		if len(e.sip) >= maxSIPSources {
			e.m.stats.drop(DropMediaTable)
			return
		}
	}
	e.sip[ip] = now
}

func (e *echo) serve(s *net.UDPConn, rtcp bool) {
	buf := make([]byte, udpBuf)
	for {
		n, src, err := s.ReadFromUDPAddrPort(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue
		}
		src = netip.AddrPortFrom(src.Addr().Unmap(), src.Port())
		if !e.stamp(buf[:n], src, rtcp, time.Now()) {
			continue
		}
		// Same size as received, only to the source.
		if _, err := s.WriteToUDPAddrPort(buf[:n], src); err == nil {
			e.m.stats.mu.Lock()
			e.m.stats.echoes++
			e.m.stats.mu.Unlock()
		}
	}
}

// stamp applies the echo's rules to one packet and writes the stamp into
// it; false drops it (counted).
func (e *echo) stamp(p []byte, src netip.AddrPort, rtcp bool, now time.Time) bool {
	if len(p) < StampOffset+StampLen {
		e.m.stats.drop(DropMediaShort)
		return false
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if t, ok := e.sip[src.Addr()]; !ok || now.Sub(t) > sipWindow {
		e.m.stats.drop(DropMediaNoSIP)
		return false
	}
	k := flowKey{src, rtcp}
	f := e.flows[k]
	if f == nil {
		if len(e.flows) >= maxFlows {
			for fk, old := range e.flows {
				if now.Sub(old.first) > mediaFlowMax {
					delete(e.flows, fk)
				}
			}
			if len(e.flows) >= maxFlows {
				e.m.stats.drop(DropMediaTable)
				return false
			}
		}
		f = &flow{first: now, lastTok: now, tokens: mediaBurst}
		e.flows[k] = f
	}
	if now.Sub(f.first) > mediaFlowMax {
		e.m.stats.drop(DropMediaAge)
		return false
	}
	f.count++ // received, whether or not echoed: the prober's loss toward us
	f.tokens = min(mediaBurst, f.tokens+now.Sub(f.lastTok).Seconds()*mediaRate)
	f.lastTok = now
	if f.tokens < 1 {
		e.m.stats.drop(DropMediaRate)
		return false
	}
	f.tokens--
	if !rtcp {
		f.jitterAdd(p, now)
	}
	binary.BigEndian.PutUint32(p[StampOffset:], f.count)
	binary.BigEndian.PutUint32(p[StampOffset+4:], uint32(f.jitter.Value()))
	binary.BigEndian.PutUint16(p[StampOffset+8:], src.Port())
	return true
}

// jitterAdd feeds the RFC 3550 jitter estimator with one RTP packet: its
// arrival on the RTP clock, counted from the flow's first packet.
func (f *flow) jitterAdd(p []byte, now time.Time) {
	f.jitter.Add(uint32(now.Sub(f.first).Nanoseconds()*rtpClock/int64(time.Second)), binary.BigEndian.Uint32(p[4:8]))
}
