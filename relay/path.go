package relay

import (
	"context"
	"net"
	"net/netip"
	"time"
)

// openPath makes an allocation over cfg.Transport and a second, fresh
// socket behind the same NAT that the allocation permits (RFC 8656 §9):
// the two ends of a media path through the relay. It returns whatever it
// made, also on error; the caller closes it. A nil allocation with the
// error means the server may not have been reached at all.
func openPath(ctx context.Context, cfg Config, attemptTimeout time.Duration) (*Relay, *peer, error) {
	actx, cancel := context.WithTimeout(ctx, attemptTimeout)
	a, err := Dial(actx, cfg)
	cancel()
	if err != nil {
		return nil, nil, err
	}
	pr, err := newPeer(ctx, cfg, attemptTimeout)
	if err != nil {
		return a, nil, err
	}
	pctx, cancel := context.WithTimeout(ctx, attemptTimeout)
	err = a.Permit(pctx, pr.addr)
	cancel()
	return a, pr, err
}

// Path is a media path through the relay with natprobe at both ends: an
// allocation and a permitted peer socket behind the same NAT. natprobe's
// call test sends RTP from the peer to the relayed address and echoes it
// at the allocation, so both legs of a relayed call cross the real path.
type Path struct {
	a  *Relay
	pr *peer
}

// OpenPath opens a Path over cfg.Transport (default udp).
func OpenPath(ctx context.Context, cfg Config) (*Path, error) {
	if cfg.Transport == "" {
		cfg.Transport = UDP
	}
	timeout := cfg.AttemptTimeout
	if timeout <= 0 {
		timeout = DefaultAttemptTimeout
	}
	a, pr, err := openPath(ctx, cfg, timeout)
	p := &Path{a: a, pr: pr}
	if err != nil {
		p.Close()
		return nil, err
	}
	return p, nil
}

// Allocation is the relayed side: what the peer sends to RelayedAddr
// arrives here, and what is written to the peer's address goes back
// through the relay.
func (p *Path) Allocation() net.PacketConn { return p.a.PacketConn() }

// RelayedAddr is the allocation's relayed address.
func (p *Path) RelayedAddr() netip.AddrPort { return p.a.RelayedAddr() }

// Peer is the peer socket.
func (p *Path) Peer() net.PacketConn { return p.pr.conn }

// Close releases both ends.
func (p *Path) Close() {
	if p.pr != nil {
		p.pr.close()
	}
	if p.a != nil {
		p.a.Close()
	}
}
