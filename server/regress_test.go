package server

import (
	"testing"
	"time"

	"github.com/pion/stun/v4"
)

// historicalCrashers are inputs that crashed STUN/TURN servers, each sent
// on a 5-tuple that holds an allocation, so pion gets as far into its
// handlers as such a message can take it.
func historicalCrashers(stream bool) map[string][]byte {
	tx := func(t stun.MessageType, attrs ...stun.Setter) []byte {
		return stun.MustBuild(append([]stun.Setter{stun.TransactionID, t}, attrs...)...).Raw
	}
	send := stun.NewType(stun.MethodSend, stun.ClassIndication)
	alloc := stun.NewType(stun.MethodAllocate, stun.ClassRequest)
	raw := func(t stun.AttrType, v []byte) stun.Setter { return stun.RawAttribute{Type: t, Value: v} }
	m := map[string][]byte{
		// GHSA-34rh-wp3j-6cxc: pion/stun panicked on a zero-length
		// XOR address (here XOR-PEER-ADDRESS of a Send indication).
		"Send with zero-length XOR-PEER-ADDRESS": zeroLengthPeerSend(),
		"Send with 1-byte XOR-PEER-ADDRESS":      tx(send, raw(stun.AttrXORPeerAddress, []byte{0}), raw(stun.AttrData, []byte("x"))),
		"Send with family 0 XOR-PEER-ADDRESS":    tx(send, raw(stun.AttrXORPeerAddress, []byte{0, 0, 0, 9, 1, 2, 3, 4}), raw(stun.AttrData, []byte("x"))),
		"Send with IPv6 family, IPv4 length":     tx(send, raw(stun.AttrXORPeerAddress, []byte{0, 2, 0, 9, 1, 2, 3, 4}), raw(stun.AttrData, []byte("x"))),
		"Send without DATA":                      tx(send, raw(stun.AttrXORPeerAddress, []byte{0, 1, 0, 9, 1, 2, 3, 4})),
		"Allocate with zero-length attributes": tx(alloc, raw(stun.AttrRequestedTransport, nil), raw(stun.AttrUsername, nil),
			raw(stun.AttrRealm, nil), raw(stun.AttrNonce, nil), raw(stun.AttrMessageIntegrity, nil)),
		"Allocate with zero-length FINGERPRINT": tx(alloc, raw(stun.AttrFingerprint, nil)),
		"ChannelData on an unbound channel":     {0x40, 0x01, 0x00, 0x04, 1, 2, 3, 4},
		"empty ChannelData":                     {0x4f, 0xff, 0x00, 0x00},
		// 32 zero bytes crashed pion/turn v3 with pion/stun v2 (see
		// DEVELOPERS.md).
		"zeros": make([]byte, 32),
	}
	if stream {
		// Over a stream pion closes the connection on zeros (they are
		// not cookie STUN): TestHistoricalCrashers sends them last.
		delete(m, "zeros")
	} else {
		m["ChannelData claiming more than it carries"] = []byte{0x40, 0x00, 0xff, 0xff, 1, 2}
		m["truncated STUN header"] = []byte{0x00, 0x16, 0x00, 0x08, 0x21, 0x12}
	}
	return m
}

// TestHistoricalCrashers replays them over UDP and TCP against the real
// server: afterwards the same connection still gets Binding answers, the
// allocation still relays, and a fresh client is still served.
func TestHistoricalCrashers(t *testing.T) {
	for _, network := range []string{"udp", "tcp"} {
		t.Run(network, func(t *testing.T) {
			s := startTURNServer(t, func(c *Config) {
				c.DisableTCP = false
				c.AllowPeers = mustPrefixes(t, "127.0.0.0/8")
			})
			peer := udpPeer(t, "udp4")
			c, inject := injectingClient(t, s, network, "alice")
			relay, err := c.Allocate()
			if err != nil {
				t.Fatalf("Allocate: %v", err)
			}
			defer relay.Close()

			for name, pkt := range historicalCrashers(network == "tcp") {
				inject(pkt)
				if _, err := c.SendBindingRequest(); err != nil {
					t.Fatalf("after %q: no Binding answer on the same connection: %v", name, err)
				}
			}
			// The allocation survived: data still reaches a peer.
			if _, err := relay.WriteTo([]byte("alive"), peer.LocalAddr()); err != nil {
				t.Fatal(err)
			}
			_ = peer.SetReadDeadline(time.Now().Add(e2eTimeout))
			buf := make([]byte, 64)
			if n, _, err := peer.ReadFrom(buf); err != nil || string(buf[:n]) != "alive" {
				t.Fatalf("relay after the crashers: %q %v", buf[:n], err)
			}
			if network == "tcp" {
				// pion's STUNConn ends a connection whose frame is
				// neither cookie STUN nor ChannelData; the server
				// must survive it.
				inject(make([]byte, 40))
			}
			// And a fresh client is served.
			exchange(t, udpSocket(t), s.Grid()[0][0])
		})
	}
}
