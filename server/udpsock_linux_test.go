package server

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"runtime"
	"testing"
	"time"
)

// TestReusePortSteersBySourceIP: in a SO_REUSEPORT group every flow of one
// client IP reaches the same socket (so TURN state spanning a client's
// ports, like an RTP/RTCP reservation, stays in one allocation manager),
// and different client IPs are spread by their address.
func TestReusePortSteersBySourceIP(t *testing.T) {
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(2))
	var socks []net.PacketConn
	for try := 0; try < 10 && socks == nil; try++ {
		probe := udpSocket(t)
		p := probe.LocalAddr().(*net.UDPAddr).Port
		_ = probe.Close()
		s := &Server{cfg: Config{Port: p, AltPort: p + 1}}
		if got, err := s.listenUDP(netip.MustParseAddr("127.0.0.1"), p); err == nil {
			socks = got
		}
	}
	if len(socks) != 2 {
		t.Fatalf("want a group of 2 sockets, got %d", len(socks))
	}
	defer func() {
		for _, c := range socks {
			_ = c.Close()
		}
	}()
	dst := socks[0].LocalAddr().(*net.UDPAddr)

	// which returns the index of the group socket that got the datagram.
	which := func(t *testing.T) int {
		t.Helper()
		buf := make([]byte, 64)
		for round := 0; round < 20; round++ {
			for i, c := range socks {
				_ = c.SetReadDeadline(time.Now().Add(10 * time.Millisecond))
				if _, _, err := c.ReadFrom(buf); err == nil {
					return i
				} else if !errors.Is(err, os.ErrDeadlineExceeded) {
					t.Fatal(err)
				}
			}
		}
		t.Fatal("datagram reached no socket of the group")
		return -1
	}
	send := func(t *testing.T, from string) {
		t.Helper()
		c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.ParseIP(from)})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.WriteTo([]byte("x"), dst); err != nil {
			t.Fatal(err)
		}
	}
	for _, ip := range []string{"127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"} {
		want := int(netip.MustParseAddr(ip).As4()[3]) % 2 // the program: last 32 bits mod 2
		for port := 0; port < 8; port++ {                 // 8 source ports of one IP: one socket
			send(t, ip)
			if got := which(t); got != want {
				t.Fatalf("flow %d from %s reached socket %d, want %d", port, ip, got, want)
			}
		}
	}
}
