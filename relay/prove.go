package relay

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pion/stun/v4"
	"github.com/pion/transport/v5"
	"github.com/pion/transport/v5/stdnet"
)

const (
	// probeCount is how many packets the proof sends: enough for a median
	// RTT and a loss figure in steps of 10 %, few enough to stay well under
	// a second on any usable path.
	probeCount = 10
	// probeInterval spaces the probes so they do not leave as one burst
	// that a policer or a small queue would drop together; 10 probes take
	// 100 ms.
	probeInterval = 10 * time.Millisecond
	// echoWait is how long we wait for echoes after the last probe. A relay
	// with a round trip beyond a second is useless for media anyway.
	echoWait = time.Second
	// DefaultAttemptTimeout bounds one transport's connect + Allocate. An
	// authenticated Allocate is two round trips (401 challenge, then the
	// request); 3 s leaves room for pion's retransmissions (at 0, 0.2, 0.6,
	// 1.4 s) yet lets a blocked UDP fall through to TCP quickly.
	DefaultAttemptTimeout = 3 * time.Second
	// peerBindTimeout bounds the second socket's Binding request. The
	// server has just answered us, so a second of retries is plenty; when
	// it gets no answer UDP is blocked and the peer uses a relay itself.
	peerBindTimeout = time.Second
	// bindRTO is the first retransmission interval of that Binding,
	// doubled after each try (RFC 8489 §6.2.1 uses 500 ms on the open
	// internet; the server here has just answered, so we start faster).
	bindRTO = 100 * time.Millisecond
	// pollInterval is how often blocked reads wake up to check whether the
	// proof is over.
	pollInterval = 50 * time.Millisecond
)

// probeMagic starts every probe packet, so neither side mistakes a stray
// STUN message or someone else's datagram for one of ours. It is not a
// valid STUN (first two bits 0) nor ChannelData (0x40-0x7f) first byte.
var probeMagic = []byte("\xffNATPROBE")

// probeLen is magic, an 8-byte run token and a 4-byte sequence number.
var probeLen = len(probeMagic) + 8 + 4

// Proof is what Prove established about a relayed path.
type Proof struct {
	OK          bool           // at least one probe went peer → relay → allocation → relay → peer
	Transport   string         // how the client reached the TURN server: udp, tcp or tls
	RelayedAddr netip.AddrPort // XOR-RELAYED-ADDRESS of the allocation
	// Peer is how the second socket reached the relayed address: "udp"
	// (a plain socket behind the same NAT) or "relay" (UDP was blocked, so
	// it used an allocation of its own over the same transport).
	Peer     string
	PeerAddr netip.AddrPort // the second socket's address as the server sees it
	Sent     int            // probes sent
	Reached  int            // probes that reached the allocation
	Received int            // echoes that came back to the peer
	RTT      time.Duration  // median round trip of the echoed probes
	Loss     float64        // 1 - Received/Sent
	Err      error          // why OK is false; for a fallback, what failed before
}

// Prove allocates a relay and proves that it carries packets both ways,
// which is what a client behind a symmetric NAT falls back on: a second, fresh socket behind the same NAT learns
// its public address with a Binding request to the same server, the
// allocation permits that address (RFC 8656 §9), the second socket sends
// probeCount packets to the relayed address, and the allocation echoes each
// one back through the relay. RTT and loss are measured at the second
// socket.
//
// Transports are tried in order (default udp, tcp, tls); the next one is
// tried only when the server did not answer on the previous one (blocked,
// refused, timed out): a refusal such as 401 ends the search, since another
// transport would not fix it. The returned Proof is never nil; the error is
// non-nil exactly when Proof.OK is false.
func Prove(ctx context.Context, cfg Config, transports ...string) (*Proof, error) {
	if len(transports) == 0 {
		transports = DefaultTransports
	}
	attemptTimeout := cfg.AttemptTimeout
	if attemptTimeout <= 0 {
		attemptTimeout = DefaultAttemptTimeout
	}
	var errs []error
	var p *Proof
	for _, t := range transports {
		var fallThrough bool
		p, fallThrough = proveOne(ctx, cfg, t, attemptTimeout)
		if p.OK {
			if len(errs) > 0 {
				p.Err = errors.Join(errs...)
			}

			return p, nil
		}
		errs = append(errs, fmt.Errorf("%s: %w", t, p.Err))
		if !fallThrough || ctx.Err() != nil {
			break
		}
	}
	p.Err = errors.Join(errs...)

	return p, p.Err
}

// peer is the second socket of the proof.
type peer struct {
	conn  net.PacketConn
	addr  netip.AddrPort // as the TURN server sees it
	kind  string
	close func()
}

// proveOne runs the proof over one transport. fallThrough says whether the
// failure looks like "this transport is blocked".
func proveOne(ctx context.Context, cfg Config, t string, attemptTimeout time.Duration) (p *Proof, fallThrough bool) {
	p = &Proof{Transport: t}
	cfg.Transport = t

	a, pr, err := openPath(ctx, cfg, attemptTimeout)
	if a != nil {
		defer a.Close()
		p.RelayedAddr = a.RelayedAddr()
	}
	if pr != nil {
		defer pr.close()
		p.Peer, p.PeerAddr = pr.kind, pr.addr
	}
	if err != nil {
		p.Err = err

		return p, a == nil && !serverAnswered(err)
	}

	exchange(ctx, a, pr, p)
	switch {
	case p.Received > 0:
		p.OK = true
	case p.Reached == 0:
		p.Err = fmt.Errorf("relay: none of %d probes from %s to the relayed address %s reached the allocation (the server or a firewall dropped them)",
			p.Sent, pr.addr, p.RelayedAddr)
	default:
		p.Err = fmt.Errorf("relay: %d of %d probes reached the allocation but no echo came back to %s",
			p.Reached, p.Sent, pr.addr)
	}

	return p, false
}

// serverAnswered is true when err carries the server's own refusal.
func serverAnswered(err error) bool {
	var re *RefusedError

	return errors.As(err, &re)
}

// newPeer opens the second socket. It first tries a plain UDP socket that
// learns its mapped address from the server (RFC 8489 Binding); when UDP to
// the server is blocked it falls back to a second allocation over the same
// transport, whose relayed address is then the peer's address.
func newPeer(ctx context.Context, cfg Config, attemptTimeout time.Duration) (*peer, error) {
	n := cfg.Net
	if n == nil {
		var err error
		if n, err = stdnet.NewNet(); err != nil {
			return nil, err
		}
	}
	addr, err := cfg.address(UDP)
	if err != nil {
		return nil, err
	}
	bctx, cancel := context.WithTimeout(ctx, peerBindTimeout)
	conn, mapped, udpErr := bindUDP(bctx, n, addr, cfg.Software)
	cancel()
	if udpErr == nil {
		return &peer{conn: conn, addr: mapped, kind: UDP, close: func() { _ = conn.Close() }}, nil
	}
	if cfg.Transport == UDP || cfg.Transport == "" {
		return nil, fmt.Errorf("relay: the second socket got no Binding answer from %s: %w", addr, udpErr)
	}
	actx, cancel := context.WithTimeout(ctx, attemptTimeout)
	b, err := Dial(actx, cfg)
	cancel()
	if err != nil {
		return nil, fmt.Errorf("relay: UDP to %s is blocked (%v) and the second allocation failed: %w", addr, udpErr, err)
	}

	return &peer{conn: b.PacketConn(), addr: b.RelayedAddr(), kind: "relay", close: b.Close}, nil
}

// bindUDP opens a fresh UDP socket and asks server for its mapped address
// (RFC 8489 §6.2.1 retransmissions, bounded by ctx).
func bindUDP(ctx context.Context, n transport.Net, server string, software string) (net.PacketConn, netip.AddrPort, error) {
	ua, err := n.ResolveUDPAddr("udp", server)
	if err != nil {
		return nil, netip.AddrPort{}, err
	}
	network, local := "udp4", "0.0.0.0:0"
	if ua.IP.To4() == nil {
		network, local = "udp6", "[::]:0"
	}
	conn, err := n.ListenPacket(network, local)
	if err != nil {
		return nil, netip.AddrPort{}, err
	}
	setters := []stun.Setter{stun.TransactionID, stun.BindingRequest}
	if software != "" {
		setters = append(setters, stun.NewSoftware(software))
	}
	setters = append(setters, stun.Fingerprint)
	req, err := stun.Build(setters...)
	if err != nil {
		_ = conn.Close()

		return nil, netip.AddrPort{}, err
	}

	buf := make([]byte, maxDatagram)
	rto := bindRTO
	for ctx.Err() == nil {
		if _, err := conn.WriteTo(req.Raw, ua); err != nil {
			_ = conn.Close()

			return nil, netip.AddrPort{}, err
		}
		next := time.Now().Add(rto)
		if dl, ok := ctx.Deadline(); ok && dl.Before(next) {
			next = dl
		}
		rto *= 2
		_ = conn.SetReadDeadline(next)
		for {
			k, _, err := conn.ReadFrom(buf)
			if err != nil {
				break // deadline: retransmit or give up
			}
			res := &stun.Message{Raw: append([]byte(nil), buf[:k]...)}
			if res.Decode() != nil || res.TransactionID != req.TransactionID || res.Type != stun.BindingSuccess {
				continue // not our answer: dropped
			}
			var xma stun.XORMappedAddress
			if err := xma.GetFrom(res); err != nil {
				var ma stun.MappedAddress
				if err := ma.GetFrom(res); err != nil {
					continue
				}
				xma.IP, xma.Port = ma.IP, ma.Port
			}
			ip, ok := netip.AddrFromSlice(xma.IP)
			if !ok {
				continue
			}
			_ = conn.SetReadDeadline(time.Time{})

			return conn, netip.AddrPortFrom(ip.Unmap(), uint16(xma.Port)), nil
		}
	}
	_ = conn.Close()

	return nil, netip.AddrPort{}, fmt.Errorf("no Binding response: %w", ctx.Err())
}

// exchange sends the probes from the peer to the relayed address, echoes
// them at the allocation, and fills p's counters. It returns after all
// echoes came back or echoWait after the last probe, or when ctx ends.
func exchange(ctx context.Context, a *Relay, pr *peer, p *Proof) {
	var token [8]byte
	_, _ = rand.Read(token[:])
	done := make(chan struct{})
	var wg sync.WaitGroup
	var reached atomic.Int64

	// The allocation's side: echo each probe back to where it came from.
	// That is the peer's address as the relay saw it, which under an
	// address-and-port-dependent NAT differs from the Binding answer's
	// port; the permission covers it because it is per IP (RFC 8656 §9).
	relayed := a.PacketConn()
	wg.Go(func() {
		readProbes(relayed, done, token[:], func(pkt []byte, from net.Addr) {
			reached.Add(1)
			_, _ = relayed.WriteTo(pkt, from)
		})
	})

	// The peer's side: collect echoes.
	sentAt := make([]time.Time, probeCount)
	var mu sync.Mutex
	rtts := make([]time.Duration, 0, probeCount)
	seen := make([]bool, probeCount)
	all := make(chan struct{})
	wg.Go(func() {
		readProbes(pr.conn, done, token[:], func(pkt []byte, _ net.Addr) {
			seq := binary.BigEndian.Uint32(pkt[len(probeMagic)+8:])
			mu.Lock()
			if int(seq) < probeCount && !seen[seq] && !sentAt[seq].IsZero() {
				seen[seq] = true
				rtts = append(rtts, time.Since(sentAt[seq]))
				if len(rtts) == probeCount {
					close(all)
				}
			}
			mu.Unlock()
		})
	})

	dst := net.UDPAddrFromAddrPort(a.RelayedAddr())
	pkt := make([]byte, probeLen)
	copy(pkt, probeMagic)
	copy(pkt[len(probeMagic):], token[:])
	tick := time.NewTicker(probeInterval)
	sent := 0
	for seq := range probeCount {
		binary.BigEndian.PutUint32(pkt[len(probeMagic)+8:], uint32(seq))
		mu.Lock()
		sentAt[seq] = time.Now()
		mu.Unlock()
		if _, err := pr.conn.WriteTo(pkt, dst); err == nil {
			sent++
		}
		select {
		case <-ctx.Done():
		case <-tick.C:
		}
		if ctx.Err() != nil {
			break
		}
	}
	tick.Stop()
	wait := time.NewTimer(echoWait)
	select {
	case <-all:
	case <-wait.C:
	case <-ctx.Done():
	}
	wait.Stop()
	close(done)
	wg.Wait()

	mu.Lock()
	defer mu.Unlock()
	p.Sent, p.Reached, p.Received = sent, int(reached.Load()), len(rtts)
	if sent > 0 {
		p.Loss = 1 - float64(len(rtts))/float64(sent)
	}
	p.RTT = median(rtts)
}

// isProbe says whether b is one of this run's probe packets.
func isProbe(b, token []byte) bool {
	return len(b) == probeLen && bytes.HasPrefix(b, probeMagic) &&
		bytes.Equal(b[len(probeMagic):len(probeMagic)+8], token)
}

// median of d (0 for none); d is sorted in place.
func median(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	slices.Sort(d)
	if len(d)%2 == 1 {
		return d[len(d)/2]
	}

	return (d[len(d)/2-1] + d[len(d)/2]) / 2
}

// readProbes reads conn until done is closed or conn fails, waking every
// pollInterval to look at done, and hands handle each datagram that is one
// of this proof's probes (token); everything else is ignored. handle must
// not keep pkt.
func readProbes(conn net.PacketConn, done <-chan struct{}, token []byte, handle func(pkt []byte, from net.Addr)) {
	buf := make([]byte, maxDatagram)
	for {
		select {
		case <-done:
			return
		default:
		}
		_ = conn.SetReadDeadline(time.Now().Add(pollInterval))
		k, from, err := conn.ReadFrom(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}

			return
		}
		if isProbe(buf[:k], token) {
			handle(buf[:k], from)
		}
	}
}
