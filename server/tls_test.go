package server

import (
	"crypto/tls"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/pion/stun/v4"
	"github.com/stund/stund/internal/stunwire"
	"github.com/stund/stund/internal/testutil"
)

// STUN and TURN over TLS (RFC 8489 §6.2.2, RFC 8656 §3.1) on the TLS
// listeners, with a self-signed certificate made here.

func startTLSServer(t *testing.T) (*Server, *tls.Config) {
	t.Helper()
	cert, pool := testutil.SelfSigned(t)
	s := startTURNServer(t, func(c *Config) {
		c.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		c.AllowPeers = mustPrefixes(t, "127.0.0.0/8")
	})
	if len(s.TLSAddrs()) != 2 {
		t.Fatalf("TLS listeners %v, want one per IP", s.TLSAddrs())
	}
	return s, &tls.Config{RootCAs: pool, ServerName: testutil.CertName, MinVersion: tls.VersionTLS12}
}

func dialTLS(t *testing.T, addr netip.AddrPort, cfg *tls.Config) *tls.Conn {
	t.Helper()
	d := &net.Dialer{Timeout: e2eTimeout}
	conn, err := tls.DialWithDialer(d, "tcp", addr.String(), cfg)
	if err != nil {
		t.Fatalf("TLS to %v: %v", addr, err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// TestTLSBinding: a Binding request over TLS, on each IP's TLS listener, is
// answered with XOR-MAPPED-ADDRESS naming the client's TCP source.
func TestTLSBinding(t *testing.T) {
	s, cli := startTLSServer(t)
	for _, addr := range s.TLSAddrs() {
		conn := dialTLS(t, addr, cli)
		req, err := stun.Build(stun.TransactionID, stun.BindingRequest, stun.Fingerprint)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := conn.Write(req.Raw); err != nil {
			t.Fatal(err)
		}
		_ = conn.SetReadDeadline(time.Now().Add(e2eTimeout))
		hdr := make([]byte, stunwire.HeaderSize)
		if _, err := io.ReadFull(conn, hdr); err != nil {
			t.Fatalf("%v: %v", addr, err)
		}
		n, _, err := stunwire.FrameLen(hdr)
		if err != nil {
			t.Fatal(err)
		}
		raw := append(hdr, make([]byte, n-len(hdr))...)
		if _, err := io.ReadFull(conn, raw[len(hdr):]); err != nil {
			t.Fatal(err)
		}
		r := decodeIf(raw, req.TransactionID)
		if r == nil || r.Type != stun.BindingSuccess {
			t.Fatalf("%v: answer %v", addr, r)
		}
		var xm stun.XORMappedAddress
		if err := xm.GetFrom(r); err != nil {
			t.Fatalf("%v: XOR-MAPPED-ADDRESS: %v", addr, err)
		}
		if want := stunwire.AddrPortOf(conn.LocalAddr()); xm.String() != want.String() {
			t.Errorf("%v: XOR-MAPPED-ADDRESS %v, want %v", addr, xm, want)
		}
	}
}

// TestTLSAllocate: pion's client allocates over TLS and relays a datagram
// to a UDP peer and back.
func TestTLSAllocate(t *testing.T) {
	s, cli := startTLSServer(t)
	addr := s.TLSAddrs()[0]
	c := newStreamTURNClient(t, dialTLS(t, addr, cli), addr, "alice", "alice-pw")
	relay, err := c.Allocate()
	if err != nil {
		t.Fatalf("Allocate over TLS: %v", err)
	}
	defer relay.Close()
	if s.AllocationCount() != 1 {
		t.Fatalf("allocations %d, want 1", s.AllocationCount())
	}

	peer := udpPeer(t, "udp4")
	from := relayToPeer(t, relay, peer, "over-tls")
	// More than 4 bytes: pion's stream framing (proto.STUNConn, on both
	// ends) waits for 9 bytes before it frames anything, so an 8-byte
	// ChannelData frame would sit until the next one.
	peerToClient(t, peer, relay, from, "back-to-client")
}
