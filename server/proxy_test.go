package server

import (
	"crypto/tls"
	"net"
	"net/netip"
	"testing"

	"github.com/pion/stun/v4"
	proxyproto "github.com/pires/go-proxyproto"
	"github.com/stund/stund/internal/stunwire"
)

// sendProxyHeader writes a PROXY protocol header of version v naming src
// as the client.
func sendProxyHeader(t *testing.T, c net.Conn, v byte, src netip.AddrPort) {
	t.Helper()
	h := proxyproto.HeaderProxyFromAddrs(v, net.TCPAddrFromAddrPort(src), c.RemoteAddr())
	if _, err := h.WriteTo(c); err != nil {
		t.Fatal(err)
	}
}

// mappedOver sends a Binding request on c and returns XOR-MAPPED-ADDRESS,
// or the zero AddrPort when the server answered nothing.
func mappedOver(t *testing.T, c net.Conn) netip.AddrPort {
	t.Helper()
	r := streamFront(t, c, "", "").exchange(stun.MustBuild(stun.TransactionID, stun.BindingRequest).Raw, false)
	if r == nil {
		return netip.AddrPort{}
	}
	var xor stun.XORMappedAddress
	if err := xor.GetFrom(r); err != nil {
		t.Fatalf("Binding answer without XOR-MAPPED-ADDRESS: %v", err)
	}
	a, _ := netip.AddrFromSlice(xor.IP)
	return netip.AddrPortFrom(a.Unmap(), uint16(xor.Port))
}

// TestProxyProtocol: from an allowed source the header's address is the
// client's (v1 and v2, TCP and TLS), and a header is required; from any
// other source a header is never honoured.
func TestProxyProtocol(t *testing.T) {
	client := netip.MustParseAddrPort("203.0.113.7:4242")
	allowed := startStreamServer(t, func(c *Config) { c.ProxyProtocolFrom = mustPrefixes(t, "127.0.0.0/8") })
	for _, v := range []byte{1, 2} {
		c, err := net.DialTimeout("tcp4", allowed.TCPAddrs()[0].String(), e2eTimeout)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		sendProxyHeader(t, c, v, client)
		if got := mappedOver(t, c); got != client {
			t.Errorf("PROXY v%d over TCP: XOR-MAPPED-ADDRESS %v, want %v", v, got, client)
		}
	}
	raw, err := net.DialTimeout("tcp4", allowed.TLSAddrs()[0].String(), e2eTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	sendProxyHeader(t, raw, 2, client)
	tc := tls.Client(raw, allowed.tlsCfg)
	if got := mappedOver(t, tc); got != client {
		t.Errorf("PROXY v2 then TLS: XOR-MAPPED-ADDRESS %v, want %v", got, client)
	}

	// From an allowed source, no header: closed unanswered.
	bare, err := net.DialTimeout("tcp4", allowed.TCPAddrs()[0].String(), e2eTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer bare.Close()
	go func() { _, _ = bare.Write(stun.MustBuild(stun.TransactionID, stun.BindingRequest).Raw) }()
	if got := waitClosedByServer(t, bare); len(got) != 0 {
		t.Errorf("a connection without the required header got %d bytes back", len(got))
	}

	// From a source not in the list, a header is not honoured: the
	// connection is closed on it, and the real address is the client's.
	other := startStreamServer(t, func(c *Config) { c.ProxyProtocolFrom = mustPrefixes(t, "192.0.2.0/24") })
	spoof, err := net.DialTimeout("tcp4", other.TCPAddrs()[0].String(), e2eTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer spoof.Close()
	sendProxyHeader(t, spoof, 2, client)
	go func() { _, _ = spoof.Write(stun.MustBuild(stun.TransactionID, stun.BindingRequest).Raw) }()
	if got := waitClosedByServer(t, spoof); len(got) != 0 {
		t.Errorf("a header from an untrusted source was answered (%d bytes)", len(got))
	}
	plain, err := net.DialTimeout("tcp4", other.TCPAddrs()[0].String(), e2eTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if got := mappedOver(t, plain); got != stunwire.AddrPortOf(plain.LocalAddr()) {
		t.Errorf("without a header: XOR-MAPPED-ADDRESS %v, want the real %v", got, plain.LocalAddr())
	}
}

// TestProxyProtocolPerIPLimit: the per-IP connection limit counts the
// client named in the header, not the load balancer.
func TestProxyProtocolPerIPLimit(t *testing.T) {
	s := startStreamServer(t, func(c *Config) {
		c.ProxyProtocolFrom = mustPrefixes(t, "127.0.0.0/8")
		c.MaxConnsPerIP = 1
	})
	open := func(src string) net.Conn {
		c, err := net.DialTimeout("tcp4", s.TCPAddrs()[0].String(), e2eTimeout)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		sendProxyHeader(t, c, 2, netip.MustParseAddrPort(src))
		return c
	}
	a, b := open("203.0.113.1:1000"), open("203.0.113.2:1000")
	if mappedOver(t, a) == (netip.AddrPort{}) || mappedOver(t, b) == (netip.AddrPort{}) {
		t.Fatal("two clients behind one load balancer: one was refused")
	}
	if got := mappedOver(t, open("203.0.113.1:2000")); got.IsValid() {
		t.Fatalf("a second connection of 203.0.113.1 over a limit of 1 was answered (%v)", got)
	}
}
