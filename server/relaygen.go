package server

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/pion/turn/v5"
)

// errRequestedPortOutsideRange refuses an Allocate asking for a relay port
// outside the operator's range: pion would bind any port the client names.
var errRequestedPortOutsideRange = errors.New("requested relay port is outside the relay port range")

// relayGenerator wraps pion's port-range generator: it keeps requested
// ports inside the configured range and puts the peer policy in front of
// every relay socket's writes and outgoing TCP connections.
type relayGenerator struct {
	inner    *turn.RelayAddressGeneratorPortRange
	min, max uint16
	live     *livePolicy // the peer policy in force (Reload swaps it)
	ops      *opsStats   // relayed packet and byte counters
	bw       *bandwidth  // per-user cap (bandwidth.go); nil: none
	led      *ledger     // relay sockets are recorded there (ledger.go)
	// local is the IP relays are bound on; the announced relayed address
	// carries its public form (--advertise), which the host may not have.
	local netip.Addr
}

func (g *relayGenerator) Validate() error { return g.inner.Validate() }

func (g *relayGenerator) checkPort(p int) error {
	if p != 0 && (p < int(g.min) || p > int(g.max)) {
		return fmt.Errorf("%w: %d not in %d-%d", errRequestedPortOutsideRange, p, g.min, g.max)
	}
	return nil
}

// AllocatePacketConn binds a UDP relay (RFC 8656 §7.2).
func (g *relayGenerator) AllocatePacketConn(c turn.AllocateListenerConfig) (net.PacketConn, net.Addr, error) {
	if err := g.checkPort(c.RequestedPort); err != nil {
		return nil, nil, err
	}
	conn, addr, err := g.inner.AllocatePacketConn(c)
	if err != nil {
		return nil, nil, err
	}
	return newRelaySocket(conn, addrPortOf(addr), c.UserID, g.led, g.live, g.ops, g.bw), addr, nil
}

// AllocateListener binds a TCP relay (RFC 6062 §5.1).
func (g *relayGenerator) AllocateListener(c turn.AllocateListenerConfig) (net.Listener, net.Addr, error) {
	if err := g.checkPort(c.RequestedPort); err != nil {
		return nil, nil, err
	}
	return g.inner.AllocateListener(c)
}

// AllocateConn opens an outgoing TCP connection to a peer (RFC 6062 §5.2);
// the peer is checked again here so that no path around the permission
// check reaches a refused address.
func (g *relayGenerator) AllocateConn(c turn.AllocateConnConfig) (net.Conn, error) {
	if ap := addrPortOf(c.RemoteAddr); !ap.IsValid() || !g.live.load().AllowedAddrPort(ap) {
		return nil, fmt.Errorf("%w: %v", ErrPeerRefused, c.RemoteAddr)
	}
	// pion binds the connection to the allocation's relayed address, the
	// announced one; behind a 1:1 NAT that is the public IP, which the host
	// cannot bind. Bind the private IP on the same port instead.
	if la, ok := c.LocalAddr.(*net.TCPAddr); ok && g.local.IsValid() {
		c.LocalAddr = &net.TCPAddr{IP: g.local.AsSlice(), Port: la.Port}
	}
	return g.inner.AllocateConn(c)
}
