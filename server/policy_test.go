package server

import (
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"
)

func mustPrefixes(t *testing.T, ss ...string) []netip.Prefix {
	t.Helper()
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}

	return out
}

// TestPeerPolicyDefault is the table over every family and embedded form the
// issue lists, with the default policy (no allow, no deny) and one own
// public address.
func TestPeerPolicyDefault(t *testing.T) {
	own := []netip.Addr{netip.MustParseAddr("198.19.0.1"), netip.MustParseAddr("8.8.4.4")}
	p := NewPeerPolicy(nil, nil, own)

	cases := []struct {
		ip   string
		want bool
	}{
		// global unicast: allowed, in every form that routes to it
		{"8.8.8.8", true},
		{"1.1.1.1", true},
		{"::ffff:8.8.8.8", true},       // IPv4-mapped (RFC 4291 §2.5.5.2) is 8.8.8.8
		{"2002:808:808::1", true},      // 6to4 (RFC 3056) of 8.8.8.8
		{"64:ff9b::808:808", true},     // NAT64 WKP (RFC 6052) of 8.8.8.8
		{"2606:4700:4700::1111", true}, // global IPv6
		{"2a00:1450:4001:80b::200e", true},

		// IPv4 specials (RFC 6890)
		{"0.0.0.0", false},
		{"0.1.2.3", false},
		{"10.0.0.1", false},
		{"10.255.255.255", false},
		{"100.64.0.1", false},
		{"100.127.255.254", false},
		{"127.0.0.1", false},
		{"127.255.255.254", false},
		{"169.254.169.254", false}, // cloud metadata
		{"169.254.0.1", false},
		{"172.16.0.1", false},
		{"172.31.255.255", false},
		{"192.0.0.170", false},
		{"192.0.2.1", false},
		{"192.88.99.1", false},
		{"192.168.1.1", false},
		{"198.18.0.1", false},
		{"198.51.100.7", false},
		{"203.0.113.9", false},
		{"224.0.0.1", false},
		{"239.255.255.250", false},
		{"240.0.0.1", false},
		{"255.255.255.255", false},
		// just outside the private ranges: global
		{"172.32.0.1", true},
		{"100.128.0.1", true},
		{"11.0.0.1", true},

		// IPv6 specials (RFC 4291)
		{"::", false},
		{"::1", false},
		{"fe80::1", false},
		{"fe80::1%eth0", false},
		{"fc00::1", false},
		{"fd12:3456:789a::1", false},
		{"fec0::1", false},
		{"ff02::1", false},
		{"ff0e::1", false},
		{"2001:db8::1", false},
		{"3fff::1", false},
		{"100::1", false},
		{"2001::1", false},          // Teredo
		{"64:ff9b:1::a00:1", false}, // local-use NAT64 (RFC 8215)
		{"4000::1", false},          // not in 2000::/3

		// IPv4-mapped forms of the IPv4 specials
		{"::ffff:127.0.0.1", false},
		{"::ffff:0.0.0.0", false},
		{"::ffff:10.1.2.3", false},
		{"::ffff:169.254.169.254", false},
		{"::ffff:100.64.0.1", false},
		{"::ffff:224.0.0.1", false},
		{"::ffff:255.255.255.255", false},
		{"::ffff:240.0.0.1", false},
		// IPv4-compatible forms (RFC 4291 §2.5.5.1, deprecated: all refused)
		{"::127.0.0.1", false},
		{"::10.0.0.1", false},
		{"::169.254.169.254", false},
		{"::8.8.8.8", false},
		// IPv4-translated (::ffff:0:a.b.c.d, RFC 2765) lies in ::/8
		{"::ffff:0:7f00:1", false},
		// 6to4 forms (RFC 3056 §2)
		{"2002:7f00:1::1", false},    // 127.0.0.1
		{"2002:a00:1::", false},      // 10.0.0.1
		{"2002:a9fe:a9fe::1", false}, // 169.254.169.254
		{"2002:6440:1::1", false},    // 100.64.0.1
		{"2002:c0a8:101::1", false},  // 192.168.1.1
		{"2002:e000:1::1", false},    // 224.0.0.1
		{"2002:ffff:ffff::1", false}, // 255.255.255.255
		{"2002::1", false},           // 0.0.0.0
		// NAT64 well-known prefix forms (RFC 6052 §2.1)
		{"64:ff9b::7f00:1", false},
		{"64:ff9b::a9fe:a9fe", false},
		{"64:ff9b::ac10:1", false},
		{"64:ff9b::6440:1", false},
		{"64:ff9b::e000:1", false},
		{"64:ff9b::", false},

		// the server's own addresses, in every form
		{"198.19.0.1", false}, // also benchmarking space
		{"8.8.4.4", false},
		{"::ffff:8.8.4.4", false},
		{"2002:808:404::1", false},
		{"64:ff9b::808:404", false},
	}
	// The handler pion is given (startTURN), over the policy in force.
	var live livePolicy
	live.swap(p)
	handler := live.permissionHandler()
	for _, c := range cases {
		ip := netip.MustParseAddr(c.ip)
		got, why := p.Explain(ip)
		if got != c.want {
			t.Errorf("Allowed(%s) = %v (%s), want %v", c.ip, got, why, c.want)
		}
		// pion hands the handler a net.IP; IPv4 arrives in 16-byte form.
		if h := handler(nil, net.IP(ip.AsSlice())); h != c.want {
			t.Errorf("PermissionHandler(%s) = %v, want %v", c.ip, h, c.want)
		}
		if ip.Is4() {
			if h := handler(nil, net.ParseIP(c.ip).To16()); h != c.want {
				t.Errorf("PermissionHandler(16-byte %s) = %v, want %v", c.ip, h, c.want)
			}
		}
	}
}

func TestPeerPolicyAllowDeny(t *testing.T) {
	own := []netip.Addr{netip.MustParseAddr("127.0.0.1")}
	p := NewPeerPolicy(
		mustPrefixes(t, "127.0.0.0/8", "10.1.0.0/16", "::1/128", "::ffff:192.168.7.0/120"),
		mustPrefixes(t, "127.0.0.9/32", "8.8.8.0/24", "10.1.2.0/24", "2606:4700::/32"),
		own,
	)
	cases := []struct {
		ip   string
		want bool
	}{
		{"127.0.0.1", true}, // allow opens loopback, the own IP included (listeners stay closed, see RelayConn)
		{"127.0.0.2", true},
		{"::ffff:127.0.0.2", true}, // the same address
		{"2002:7f00:2::1", false},  // allow on IPv4 does not open the 6to4 form
		{"64:ff9b::7f00:2", false}, // nor the NAT64 form
		{"::127.0.0.2", false},     // nor the IPv4-compatible form
		{"127.0.0.9", false},       // deny beats allow
		{"::ffff:127.0.0.9", false},
		{"10.1.0.1", true},
		{"10.1.2.3", false}, // deny beats a wider allow
		{"10.2.0.1", false}, // still private
		{"::1", true},
		{"192.168.7.5", true}, // mapped allow prefix is unmapped
		{"192.168.8.5", false},
		{"8.8.8.8", false},          // deny on a global range
		{"::ffff:8.8.8.8", false},   // in every embedded form
		{"2002:808:808::1", false},  // 6to4
		{"64:ff9b::808:808", false}, // NAT64
		{"8.8.4.4", true},
		{"2606:4700:4700::1111", false},
		{"2a00:1450::1", true},
	}
	for _, c := range cases {
		got, why := p.Explain(netip.MustParseAddr(c.ip))
		if got != c.want {
			t.Errorf("Allowed(%s) = %v (%s), want %v", c.ip, got, why, c.want)
		}
	}
}

func TestPeerPolicyExplicitIPv6Allow(t *testing.T) {
	p := NewPeerPolicy(mustPrefixes(t, "2002:7f00::/24", "64:ff9b::7f00:0/104"), nil, nil)
	for _, s := range []string{"2002:7f00:1::1", "64:ff9b::7f00:1"} {
		if !p.Allowed(netip.MustParseAddr(s)) {
			t.Errorf("%s refused despite an explicit IPv6 allow", s)
		}
	}
	if p.Allowed(netip.MustParseAddr("127.0.0.1")) {
		t.Error("an allow of the 6to4 form opened plain 127.0.0.1")
	}
}

// TestPeerPolicyDataPath covers the port-level rules: the server's own
// listeners stay refused even when the IP is allowed, and relay-to-relay on
// an own global address is limited to the relay port range.
func TestPeerPolicyDataPath(t *testing.T) {
	lst := []netip.AddrPort{netip.MustParseAddrPort("127.0.0.1:3478"), netip.MustParseAddrPort("[2a01::5]:3478")}
	own := []netip.Addr{netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("2a01::5")}

	rig := NewPeerPolicy(mustPrefixes(t, "127.0.0.0/8"), nil, own).WithListeners(lst)
	for _, c := range []struct {
		ap   string
		want bool
	}{
		{"127.0.0.1:3478", false}, // own listener: never, whatever allow says
		{"[::ffff:127.0.0.1]:3478", false},
		{"127.0.0.1:40000", true}, // an explicitly allowed own IP, other port
		{"127.0.0.2:3478", false}, // loopback: a wildcard listener answers there too
		{"[::1]:3478", false},     // the same, IPv6
		{"0.0.0.0:3478", false},   // connecting to the unspecified address reaches the host
		{"127.0.0.2:40000", true}, // allowed, not a listener port
		{"[::ffff:127.0.0.2]:3478", false},
		{"10.0.0.1:9", false},
	} {
		if got := rig.AllowedAddrPort(netip.MustParseAddrPort(c.ap)); got != c.want {
			t.Errorf("rig AllowedAddrPort(%s) = %v, want %v", c.ap, got, c.want)
		}
	}

	pub := NewPeerPolicy(nil, nil, own).WithListeners(lst)
	if pub.Allowed(netip.MustParseAddr("2a01::5")) {
		t.Error("own global address allowed without a relay port range")
	}
	pub = pub.WithRelayPorts(49152, 65535)
	if !pub.Allowed(netip.MustParseAddr("2a01::5")) {
		t.Error("own global address refused at the IP level although relay ports are known")
	}
	if pub.Allowed(netip.MustParseAddr("127.0.0.1")) {
		t.Error("own loopback address got the relay-to-relay exception")
	}
	for _, c := range []struct {
		ap   string
		want bool
	}{
		{"[2a01::5]:49152", true},
		{"[2a01::5]:65535", true},
		{"[2a01::5]:3478", false},
		{"[2a01::5]:22", false},
		{"[2a01::5]:49151", false},
		{"[2a01::6]:22", true},
	} {
		if got := pub.AllowedAddrPort(netip.MustParseAddrPort(c.ap)); got != c.want {
			t.Errorf("public AllowedAddrPort(%s) = %v, want %v", c.ap, got, c.want)
		}
	}
}

// TestPolicyRelayConnRefuses: the relay socket the server hands pion
// (newRelayConn) refuses a write to the server's own listener and counts
// it, and lets a write to another allowed peer through.
func TestPolicyRelayConnRefuses(t *testing.T) {
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	dst, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	lst := netip.MustParseAddrPort(dst.LocalAddr().String())

	var live livePolicy
	live.swap(NewPeerPolicy(mustPrefixes(t, "127.0.0.0/8"), nil, []netip.Addr{lst.Addr()}).WithListeners([]netip.AddrPort{lst}))
	var ops opsStats
	rc := testRelaySocket(t, pc, "alice", newLedger(), &live, &ops, nil)
	if _, err := rc.WriteTo([]byte("x"), dst.LocalAddr()); !errors.Is(err, ErrPeerRefused) {
		t.Fatalf("write to the server's own listener: %v, want ErrPeerRefused", err)
	}
	if got := ops.relayRefused.Load(); got != 1 {
		t.Fatalf("relayRefused = %d, want 1", got)
	}
	other, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if _, err := rc.WriteTo([]byte("y"), other.LocalAddr()); err != nil {
		t.Fatalf("write to an allowed peer: %v", err)
	}
}

func TestPeerPolicyReasonsNameTheRange(t *testing.T) {
	p := NewPeerPolicy(nil, nil, nil)
	_, why := p.Explain(netip.MustParseAddr("2002:a9fe:a9fe::1"))
	if !strings.Contains(why, "169.254.169.254") {
		t.Errorf("reason %q does not name the embedded address", why)
	}
	if p.Allowed(netip.Addr{}) {
		t.Error("the zero Addr was allowed")
	}
	var live livePolicy
	live.swap(p)
	if live.permissionHandler()(nil, net.IP{1, 2, 3}) {
		t.Error("a 3-byte net.IP was allowed")
	}
	if live.refused() != 1 {
		t.Errorf("refused() = %d after one refusal, want 1", live.refused())
	}
}
