package server

import (
	"net"
	"net/netip"

	proxyproto "github.com/pires/go-proxyproto"
	"github.com/stund/stund/internal/stunwire"
)

// PROXY protocol (v1 and v2) in front of the TCP and TLS listeners, for a
// node behind an L4 load balancer: the header carries the client's address,
// which then is the client's address everywhere (XOR-MAPPED-ADDRESS, the
// per-IP limits, nonces, allocations, logs, usage records). Only sources in
// --proxy-protocol-from may send one, and from them it is required: a
// connection without a valid header is closed. From any other source a
// header is never honoured (the listener does not even look for it, and
// the framer then closes the connection on its bytes as junk).

// proxyListener wraps l when PROXY protocol sources are configured.
func proxyListener(l net.Listener, from []netip.Prefix) net.Listener {
	if len(from) == 0 {
		return l
	}
	return &proxyproto.Listener{
		Listener: l,
		ConnPolicy: func(o proxyproto.ConnPolicyOptions) (proxyproto.Policy, error) {
			ip := stunwire.AddrPortOf(o.Upstream).Addr()
			for _, p := range from {
				if p.Contains(ip) {
					return proxyproto.REQUIRE, nil
				}
			}
			return proxyproto.SKIP, nil
		},
		// The header is the start of the first frame: it has the frame's
		// bound (the connection's frameLoop reads it, never Accept).
		ReadHeaderTimeout: streamFirstTimeout,
	}
}
