package server

import (
	"context"
	"fmt"
	"github.com/stund/stund/internal/stunwire"
	"net"
	"net/netip"
	"runtime"
)

// udpSocketBuffer is the SO_RCVBUF/SO_SNDBUF asked for on each grid
// socket: 4 MiB absorbs a burst of ~2000 full-size datagrams while a read
// loop is descheduled, where Linux's default (208 KiB) overflowed in
// bench/ at 1200-byte relay rates. The kernel caps it at
// net.core.rmem_max/wmem_max; a smaller grant is not an error.
const udpSocketBuffer = 4 << 20

// maxReadLoops caps the sockets per grid address: one read loop per core
// pays (bench/README.md); more only adds wakeups.
const maxReadLoops = 8

// listenUDP binds the grid address ip:port. On the host's network it
// binds one socket per core with SO_REUSEPORT, so each gets its own read
// loop in pion; the kernel hashes a client's 4-tuple to one of them, so a
// client (and its TURN allocation) always meets the same socket. The
// first socket is the cell's own: Binding replies for other cells are
// sent from it (RFC 5780 §6.1 needs the exact source address, which every
// socket of the group shares). With a pion transport.Net (vnet in tests)
// it is one socket, as before, and so it is with port 0 (below).
func (s *Server) listenUDP(ip netip.Addr, port int) ([]net.PacketConn, error) {
	if s.cfg.Net != nil {
		c, err := s.net.ListenUDP(udpNetwork(ip), net.UDPAddrFromAddrPort(netip.AddrPortFrom(ip, uint16(port))))
		if err != nil {
			return nil, err
		}
		return []net.PacketConn{c}, nil
	}
	n := runtime.GOMAXPROCS(0)
	if n > maxReadLoops {
		n = maxReadLoops
	}
	// Port 0 (tests) gets one socket: an autobind with SO_REUSEPORT set
	// may land on a port another reuseport group of the same UID holds
	// (the kernel counts sharing as no conflict), and the two servers
	// would then split each other's traffic.
	if !reusePortSupported || s.cfg.Port == 0 || s.cfg.AltPort == 0 {
		n = 1
	}
	if n > 1 {
		// SO_REUSEPORT would let us join a group another process of
		// the same user already holds, and the two would split each
		// other's traffic silently. A plain bind first proves the port
		// is free; a later stund's plain bind then fails on our group.
		probe, err := net.ListenPacket(udpNetwork(ip), netip.AddrPortFrom(ip, uint16(port)).String())
		if err != nil {
			return nil, err
		}
		_ = probe.Close()
	}
	lc := net.ListenConfig{Control: controlUDP(n > 1)}
	var out []net.PacketConn
	for k := 0; k < n; k++ {
		c, err := lc.ListenPacket(context.Background(), udpNetwork(ip), netip.AddrPortFrom(ip, uint16(port)).String())
		if err != nil {
			for _, o := range out {
				_ = o.Close()
			}
			return nil, fmt.Errorf("socket %d of %d: %w", k+1, n, err)
		}
		if uc, ok := c.(*net.UDPConn); ok {
			_ = uc.SetReadBuffer(udpSocketBuffer)
			_ = uc.SetWriteBuffer(udpSocketBuffer)
		}
		out = append(out, c)
		port = int(stunwire.AddrPortOf(c.LocalAddr()).Port())
	}
	if n > 1 {
		if err := steerBySourceIP(out[0], n, ip.Unmap().Is4()); err != nil {
			for _, o := range out {
				_ = o.Close()
			}
			return nil, err
		}
	}
	return out, nil
}
