package main

import (
	"net"
	"strings"
	"testing"

	"github.com/pion/turn/v5"
)

// TestRelayCannotReachAdmin: with --allow-peer covering loopback, a TCP
// allocation (RFC 6062) reaches a peer on 127.0.0.1 but not the --metrics
// listener, whose pprof would hand out the command line (RFC 8656 §17):
// serve tells the server which listener that is.
func TestRelayCannotReachAdmin(t *testing.T) {
	admin, primary, _ := startStund(t, "--no-tcp=false", "--pprof",
		"--user", "alice:alice-pw", "--allow-peer", "127.0.0.0/8")
	adminAddr := strings.TrimPrefix(admin, "http://")

	conn, err := net.DialTimeout("tcp4", primary, testTimeout)
	if err != nil {
		t.Fatal(err)
	}
	c := turnClient(t, primary, "alice", "alice-pw", turn.NewSTUNConn(conn))
	alloc, err := c.AllocateTCP()
	if err != nil {
		t.Fatalf("AllocateTCP: %v", err)
	}
	defer alloc.Close()

	// The control: the same allocation reaches an ordinary loopback peer.
	peer, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer peer.Close()
	go func() {
		if pc, err := peer.Accept(); err == nil {
			pc.Close()
		}
	}()
	pc, err := alloc.Dial("tcp4", peer.Addr().String())
	if err != nil {
		t.Fatalf("Connect to an allowed peer: %v", err)
	}
	pc.Close()

	if ac, err := alloc.Dial("tcp4", adminAddr); err == nil {
		ac.Close()
		t.Fatalf("the relay connected to the admin listener %s", adminAddr)
	}
}
