package server

import (
	"testing"

	"github.com/stund/stund/internal/stunwire"
)

func (s *Server) relaySocketAt(t *testing.T, addr string) *relaySocket {
	t.Helper()
	s.led.mu.RLock()
	defer s.led.mu.RUnlock()
	for ap, rs := range s.led.sockets {
		if ap.String() == addr {
			return rs
		}
	}
	return nil
}

func (p *relayPoller) has(rs *relaySocket) bool {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return p.socks[rs.token] == rs
}

// A UDP client's relay socket is read by a poller, a TCP client's by its
// own goroutine (a stream write may block); both relay both ways, and an
// allocation's end takes its socket off the poller.
func TestRelayPolling(t *testing.T) {
	s := startTURNServer(t, func(c *Config) {
		c.AllowPeers = mustPrefixes(t, "127.0.0.0/8")
		c.DisableTCP = false
	})
	if s.polls == nil {
		t.Skip("no epoll here: every relay socket has its own goroutine")
	}
	peer := udpPeer(t, "udp4")
	var sockets []*relaySocket
	for _, tc := range []struct {
		network, user string
		polled        bool
	}{{"udp4", "alice", true}, {"tcp", "bob", false}} {
		cl := allocClient(t, s, tc.network, tc.user)
		relay, err := cl.Allocate()
		if err != nil {
			t.Fatal(err)
		}
		relayToPeer(t, relay, peer, "hello from "+tc.user)
		for i := 0; i < 20; i++ { // more than one pass, batches of several
			if _, err := peer.WriteTo([]byte("to "+tc.user), relay.LocalAddr()); err != nil {
				t.Fatal(err)
			}
		}
		peerToClient(t, peer, relay, relay.LocalAddr(), "to "+tc.user)
		rs := s.relaySocketAt(t, stunwire.AddrPortOf(relay.LocalAddr()).String())
		if rs == nil {
			t.Fatalf("%s: no relay socket for %v", tc.network, relay.LocalAddr())
		}
		if rs.polled != tc.polled || (rs.poller != nil && !rs.poller.has(rs)) {
			t.Fatalf("%s client: polled %v (on its poller: %v), want %v", tc.network, rs.polled, rs.poller != nil, tc.polled)
		}
		sockets = append(sockets, rs)
		if err := relay.Close(); err != nil { // Refresh with lifetime 0
			t.Fatal(err)
		}
		cl.Close()
	}
	waitFor(t, "the relay sockets to close", func() bool {
		for _, rs := range sockets {
			if s.relaySocketAt(t, rs.addr.String()) != nil {
				return false
			}
		}
		return true
	})
	if p := sockets[0].poller; p.has(sockets[0]) {
		t.Fatal("a closed relay socket is still on its poller")
	}
}
