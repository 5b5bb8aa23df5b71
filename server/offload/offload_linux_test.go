package offload

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// wait bounds every read that expects a packet: on loopback a packet
// arrives within microseconds, so this only ends a broken run.
const wait = 5 * time.Second

// rig is the fake server, relay, client and peer of one test. The client,
// peer and stranger live in the edge namespace, the server, relay and the
// program in the srv namespace; on loopback both are the same one.
type rig struct {
	edge, srv                   *netns
	server, relay, client, peer *net.UDPConn
	stranger                    *net.UDPConn
	strangerAddr                netip.AddrPort
	raw                         int // IPPROTO_RAW socket in edge: full checksums
	ch                          Channel
	off                         *Offload
}

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

// newRig puts everyone on loopback with distinct 127.x addresses in one
// fresh namespace: the peer is local, so the program hands the rewritten
// packet up the local stack.
func newRig(t testing.TB) *rig {
	needRoot(t)
	ns := newNetns(t)
	return openRig(t, ns, ns, Channel{
		Client: ap("127.0.0.3:40000"),
		Server: ap("127.0.0.1:3478"),
		Number: 0x4001,
		Relay:  ap("127.0.0.2:50000"),
		Peer:   ap("127.0.0.4:60000"),
	}, ap("127.0.0.5:60000"))
}

// newRig6 is newRig over IPv6: addresses from fd00::/64 on loopback.
func newRig6(t testing.TB) *rig {
	needRoot(t)
	ns := newNetns(t)
	for i := 1; i <= 5; i++ {
		ns.ip(t, "-6", "addr", "add", fmt.Sprintf("fd00::%d/128", i), "dev", "lo")
	}
	return openRig(t, ns, ns, Channel{
		Client: ap("[fd00::3]:40000"),
		Server: ap("[fd00::1]:3478"),
		Number: 0x4001,
		Relay:  ap("[fd00::2]:50000"),
		Peer:   ap("[fd00::4]:60000"),
	}, ap("[fd00::5]:60000"))
}

// newVethRig puts the server and relay in one namespace and the client,
// peer and stranger in another, joined by a veth pair: the program runs on
// a real Ethernet interface and must route and redirect the rewritten
// packet back out of it (bpf_fib_lookup, bpf_redirect_neigh).
func newVethRig(t testing.TB) *rig {
	return vethRig(t, nil, []string{"10.200.0.1/24", "10.200.0.4/24"},
		[]string{"10.200.0.2/24", "10.200.0.3/24", "10.200.0.5/24"}, Channel{
			Client: ap("10.200.0.2:40000"),
			Server: ap("10.200.0.1:3478"),
			Number: 0x4ABC,
			Relay:  ap("10.200.0.4:50000"),
			Peer:   ap("10.200.0.3:60000"),
		}, ap("10.200.0.5:60000"))
}

// newVethRig6 is newVethRig over IPv6 (neighbour discovery instead of ARP).
func newVethRig6(t testing.TB) *rig {
	return vethRig(t, []string{"nodad"}, []string{"fd01::1/64", "fd01::4/64"},
		[]string{"fd01::2/64", "fd01::3/64", "fd01::5/64"}, Channel{
			Client: ap("[fd01::2]:40000"),
			Server: ap("[fd01::1]:3478"),
			Number: 0x4ABC,
			Relay:  ap("[fd01::4]:50000"),
			Peer:   ap("[fd01::3]:60000"),
		}, ap("[fd01::5]:60000"))
}

// vethRig builds the two namespaces and the veth pair; addrFlags follow
// every address (nodad: the IPv6 addresses are usable at once).
func vethRig(t testing.TB, addrFlags, srvAddrs, edgeAddrs []string, ch Channel, stranger netip.AddrPort) *rig {
	needRoot(t)
	srv, edge := newNetns(t), newNetns(t)
	srv.ip(t, "link", "add", "o0", "type", "veth", "peer", "name", "o1", "netns", edge.name)
	for _, side := range []struct {
		ns    *netns
		dev   string
		addrs []string
	}{{srv, "o0", srvAddrs}, {edge, "o1", edgeAddrs}} {
		for _, a := range side.addrs {
			side.ns.ip(t, append([]string{"addr", "add", a, "dev", side.dev}, addrFlags...)...)
		}
		side.ns.ip(t, "link", "set", side.dev, "up")
	}
	return openRig(t, edge, srv, ch, stranger)
}

func openRig(t testing.TB, edge, srv *netns, ch Channel, stranger netip.AddrPort) *rig {
	r := &rig{edge: edge, srv: srv, ch: ch, strangerAddr: stranger}
	var err error
	listen := func(a netip.AddrPort) *net.UDPConn {
		c, lerr := net.ListenUDP("udp", net.UDPAddrFromAddrPort(a))
		if lerr != nil && err == nil {
			err = lerr
		}
		return c
	}
	edge.do(t, func() {
		r.client = listen(ch.Client)
		r.peer = listen(ch.Peer)
		r.stranger = listen(stranger)
		if err == nil {
			// IPPROTO_RAW implies that the datagram carries its own IP
			// header, for IPv6 too.
			family := unix.AF_INET
			if ch.Client.Addr().Is6() {
				family = unix.AF_INET6
			}
			r.raw, err = unix.Socket(family, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	srv.do(t, func() {
		r.server = listen(ch.Server)
		r.relay = listen(ch.Relay)
		if err == nil {
			r.off, err = New(Config{Mode: ModeEBPF, Addrs: []netip.Addr{ch.Server.Addr(), ch.Relay.Addr()}})
		}
	})
	t.Cleanup(func() {
		for _, c := range []*net.UDPConn{r.server, r.relay, r.client, r.peer, r.stranger} {
			if c != nil {
				c.Close()
			}
		}
		if r.raw > 0 {
			unix.Close(r.raw)
		}
		r.off.Close()
	})
	if err != nil {
		// Only a kernel without BPF is a reason to skip; as root, anything
		// else (a verifier rejection above all) is a failure.
		if errors.Is(err, ebpf.ErrNotSupported) || errors.Is(err, unix.ENOSYS) {
			t.Skipf("BPF unavailable: %v", err)
		}
		t.Fatalf("%+v", err)
	}
	return r
}

// sendRaw sends one UDP datagram with a complete, software-computed
// checksum, as a NIC that does no checksum offload would deliver it: the
// receiving socket verifies it, so a wrong rewrite would be dropped.
func (r *rig) sendRaw(t *testing.T, from, to netip.AddrPort, payload []byte, breakCsum bool) {
	t.Helper()
	r.sendRawTTL(t, from, to, payload, breakCsum, 64)
}

func (r *rig) sendRawTTL(t *testing.T, from, to netip.AddrPort, payload []byte, breakCsum bool, ttl byte) {
	t.Helper()
	var pkt []byte
	var sa unix.Sockaddr
	if to.Addr().Is4() {
		pkt = udp4(from, to, payload, ttl)
		sa = &unix.SockaddrInet4{Addr: to.Addr().As4()}
	} else {
		pkt = udp6(from, to, payload, ttl)
		sa = &unix.SockaddrInet6{Addr: to.Addr().As16()}
	}
	if breakCsum {
		pkt[len(pkt)-len(payload)-2] ^= 0x5a // the UDP checksum
	}
	if err := unix.Sendto(r.raw, pkt, 0, sa); err != nil {
		t.Fatal(err)
	}
}

func udp4(from, to netip.AddrPort, payload []byte, ttl byte) []byte {
	ulen := 8 + len(payload)
	pkt := make([]byte, 20+ulen)
	pkt[0] = 0x45
	binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt)))
	pkt[8] = ttl
	pkt[9] = unix.IPPROTO_UDP
	s, d := from.Addr().As4(), to.Addr().As4()
	copy(pkt[12:], s[:])
	copy(pkt[16:], d[:])
	binary.BigEndian.PutUint16(pkt[10:], ^csum(0, pkt[:20]))
	u := pkt[20:]
	binary.BigEndian.PutUint16(u[0:], from.Port())
	binary.BigEndian.PutUint16(u[2:], to.Port())
	binary.BigEndian.PutUint16(u[4:], uint16(ulen))
	copy(u[8:], payload)
	pseudo := make([]byte, 12)
	copy(pseudo, s[:])
	copy(pseudo[4:], d[:])
	pseudo[9] = unix.IPPROTO_UDP
	binary.BigEndian.PutUint16(pseudo[10:], uint16(ulen))
	c := ^csum(uint32(csum(0, pseudo)), u)
	if c == 0 {
		c = 0xffff
	}
	binary.BigEndian.PutUint16(u[6:], c)
	return pkt
}

func udp6(from, to netip.AddrPort, payload []byte, hops byte) []byte {
	ulen := 8 + len(payload)
	pkt := make([]byte, 40+ulen)
	pkt[0] = 0x60
	binary.BigEndian.PutUint16(pkt[4:], uint16(ulen))
	pkt[6] = unix.IPPROTO_UDP
	pkt[7] = hops
	s, d := from.Addr().As16(), to.Addr().As16()
	copy(pkt[8:], s[:])
	copy(pkt[24:], d[:])
	u := pkt[40:]
	binary.BigEndian.PutUint16(u[0:], from.Port())
	binary.BigEndian.PutUint16(u[2:], to.Port())
	binary.BigEndian.PutUint16(u[4:], uint16(ulen))
	copy(u[8:], payload)
	pseudo := make([]byte, 40)
	copy(pseudo, s[:])
	copy(pseudo[16:], d[:])
	binary.BigEndian.PutUint32(pseudo[32:], uint32(ulen))
	pseudo[39] = unix.IPPROTO_UDP
	c := ^csum(uint32(csum(0, pseudo)), u)
	if c == 0 {
		c = 0xffff
	}
	binary.BigEndian.PutUint16(u[6:], c)
	return pkt
}

func csum(sum uint32, b []byte) uint16 {
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return uint16(sum)
}

func (r *rig) send(t *testing.T, c *net.UDPConn, to netip.AddrPort, payload []byte) {
	t.Helper()
	if _, err := c.WriteToUDPAddrPort(payload, to); err != nil {
		t.Fatal(err)
	}
}

// recv reads one datagram, failing the test if none comes.
func recv(t *testing.T, c *net.UDPConn) ([]byte, netip.AddrPort) {
	t.Helper()
	buf := make([]byte, 65536)
	_ = c.SetReadDeadline(time.Now().Add(wait))
	n, from, err := c.ReadFromUDPAddrPort(buf)
	if err != nil {
		t.Fatalf("%v: expected a datagram: %v", c.LocalAddr(), err)
	}
	return buf[:n], from
}

// expect reads one datagram and checks its source and bytes.
func expect(t *testing.T, what string, c *net.UDPConn, from netip.AddrPort, want []byte) {
	t.Helper()
	got, src := recv(t, c)
	if src != from {
		t.Fatalf("%s: from %v, want %v", what, src, from)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: got % x (%d bytes), want % x (%d bytes)", what, head(got), len(got), head(want), len(want))
	}
}

func head(b []byte) []byte {
	if len(b) > 16 {
		return b[:16]
	}
	return b
}

// chanData builds a ChannelData message (RFC 8656 §12.4), padded to a
// multiple of 4 when pad is set (RFC 8656 §12.5).
func chanData(num uint16, data []byte, pad bool) []byte {
	m := make([]byte, 4, 4+len(data)+3)
	binary.BigEndian.PutUint16(m, num)
	binary.BigEndian.PutUint16(m[2:], uint16(len(data)))
	m = append(m, data...)
	if pad {
		for len(m)%4 != 0 {
			m = append(m, 0xEE) // non-zero: padding must not leak or skew the checksum
		}
	}
	return m
}

func payload(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

// marker is a datagram the program never owns (it is no ChannelData and
// comes from no installed peer). Reading it first on a socket proves that
// nothing sent before it on the same path reached that socket.
var marker = []byte("marker: not ChannelData")

var sizes = []int{0, 1, 3, 4, 100, 1200}

func TestRelayBothWays(t *testing.T) { relayBothWays(t, newRig(t)) }

func TestRelayBothWaysVeth(t *testing.T) { relayBothWays(t, newVethRig(t)) }

func TestRelayBothWaysIPv6(t *testing.T) { relayBothWays(t, newRig6(t)) }

func TestRelayBothWaysVethIPv6(t *testing.T) { relayBothWays(t, newVethRig6(t)) }

func relayBothWays(t *testing.T, r *rig) {
	if err := r.off.Install(r.ch); err != nil {
		t.Fatal(err)
	}
	if err := r.off.Install(r.ch); err != nil {
		t.Fatalf("second Install (refresh): %v", err)
	}
	var want Counters
	for _, raw := range []bool{false, true} {
		for _, n := range sizes {
			for _, pad := range []bool{false, true} {
				data := payload(n, byte(n))
				msg := chanData(r.ch.Number, data, pad)
				if raw {
					r.sendRaw(t, r.ch.Client, r.ch.Server, msg, false)
				} else {
					r.send(t, r.client, r.ch.Server, msg)
				}
				expect(t, "to peer", r.peer, r.ch.Relay, data)
				want.PktsToPeer++
				want.BytesToPeer += uint64(n)
			}
			data := payload(n, byte(n+1))
			if raw {
				r.sendRaw(t, r.ch.Peer, r.ch.Relay, data, false)
			} else {
				r.send(t, r.peer, r.ch.Relay, data)
			}
			// What this program emits: header and data, no padding.
			expect(t, "to client", r.client, r.ch.Server, chanData(r.ch.Number, data, false))
			want.PktsToClient++
			want.BytesToClient += uint64(n)
		}
	}
	// The userspace sockets saw none of it.
	r.send(t, r.client, r.ch.Server, marker)
	expect(t, "server socket", r.server, r.ch.Client, marker)
	r.send(t, r.stranger, r.ch.Relay, marker)
	expect(t, "relay socket", r.relay, r.strangerAddr, marker)

	got, err := r.off.Counters(r.ch)
	if err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Fatalf("counters %+v, want %+v", got, want)
	}

	final, err := r.off.RemoveCounters(r.ch)
	if err != nil {
		t.Fatal(err)
	}
	if final != want {
		t.Fatalf("final counters %+v, want %+v", final, want)
	}
	// After Remove the same packets reach userspace, unmodified.
	for _, n := range sizes {
		msg := chanData(r.ch.Number, payload(n, 9), true)
		r.send(t, r.client, r.ch.Server, msg)
		expect(t, "server socket after Remove", r.server, r.ch.Client, msg)
		data := payload(n, 10)
		r.send(t, r.peer, r.ch.Relay, data)
		expect(t, "relay socket after Remove", r.relay, r.ch.Peer, data)
	}
	if _, err := r.off.Counters(r.ch); err == nil {
		t.Fatal("Counters after Remove: want an error, the channel is gone")
	}
}

// TestChecksumIsVerified proves that the raw-socket datagrams of
// TestRelayBothWays would have been dropped had their checksum been wrong:
// without it, a broken rewrite could pass unnoticed.
func TestChecksumIsVerified(t *testing.T) {
	for _, r := range []*rig{newRig(t), newRig6(t)} {
		r.sendRaw(t, r.ch.Client, r.ch.Server, []byte("bad checksum"), true)
		r.sendRaw(t, r.ch.Client, r.ch.Server, marker, false)
		expect(t, "server socket", r.server, r.ch.Client, marker)
	}
}

// TestNotOwnedPassesUntouched: what does not match an installed channel
// exactly reaches the userspace sockets byte for byte.
func TestNotOwnedPassesUntouched(t *testing.T) {
	r := newRig(t)
	if err := r.off.Install(r.ch); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name     string
		from     *net.UDPConn
		fromAddr netip.AddrPort
		to       netip.AddrPort
		sock     *net.UDPConn
		msg      []byte
	}{
		{"uninstalled channel", r.client, r.ch.Client, r.ch.Server, r.server, chanData(0x4002, payload(50, 1), false)},
		{"Length beyond the datagram", r.client, r.ch.Client, r.ch.Server, r.server, append(chanData(r.ch.Number, payload(8, 2), false)[:4], payload(6, 2)...)},
		{"more than 3 bytes after the data", r.client, r.ch.Client, r.ch.Server, r.server, append(chanData(r.ch.Number, payload(8, 3), false), 0, 0, 0, 0)},
		{"STUN Binding request", r.client, r.ch.Client, r.ch.Server, r.server, stunBinding()},
		{"stranger to the relay", r.stranger, r.strangerAddr, r.ch.Relay, r.relay, payload(100, 4)},
		{"peer to the server", r.peer, r.ch.Peer, r.ch.Server, r.server, chanData(r.ch.Number, payload(10, 5), false)},
	}
	for _, c := range cases {
		r.send(t, c.from, c.to, c.msg)
		expect(t, c.name, c.sock, c.fromAddr, c.msg)
	}
	got, err := r.off.Counters(r.ch)
	if err != nil {
		t.Fatal(err)
	}
	if got != (Counters{}) {
		t.Fatalf("counters %+v after packets the channel does not own", got)
	}
}

func stunBinding() []byte {
	m := make([]byte, 20)
	binary.BigEndian.PutUint16(m, 0x0001)
	binary.BigEndian.PutUint32(m[4:], 0x2112A442)
	copy(m[8:], "0123456789ab")
	return m
}

// TestCloseDetaches: after Close no program of ours is on the interface
// and channel traffic goes to the userspace sockets.
func TestCloseDetaches(t *testing.T) {
	r := newRig(t)
	if err := r.off.Install(r.ch); err != nil {
		t.Fatal(err)
	}
	var lo int
	r.srv.do(t, func() {
		ifc, err := net.InterfaceByName("lo")
		if err == nil {
			lo = ifc.Index
		}
	})
	if n := tcxPrograms(t, r.srv, lo); n != 1 {
		t.Fatalf("%d programs on lo ingress before Close, want 1", n)
	}
	if got := sysctl(t, r.srv, loForwarding4) + sysctl(t, r.srv, loForwarding6); got != "11" {
		t.Fatalf("loopback forwarding (v4, v6) %q while loaded, want 11", got)
	}
	if err := r.off.Close(); err != nil {
		t.Fatal(err)
	}
	if n := tcxPrograms(t, r.srv, lo); n != 0 {
		t.Fatalf("%d programs on lo ingress after Close, want 0", n)
	}
	// Close runs on a thread outside the namespace: the flags must still
	// be restored in the namespace New found them in.
	if got := sysctl(t, r.srv, loForwarding4) + sysctl(t, r.srv, loForwarding6); got != "00" {
		t.Fatalf("loopback forwarding (v4, v6) %q after Close, want 00 as New found them", got)
	}
	msg := chanData(r.ch.Number, payload(20, 1), false)
	r.send(t, r.client, r.ch.Server, msg)
	expect(t, "server socket after Close", r.server, r.ch.Client, msg)
	if err := r.off.Install(r.ch); !errors.Is(err, errClosed) {
		t.Fatalf("Install after Close: %v, want errClosed", err)
	}
}

func tcxPrograms(t *testing.T, ns *netns, ifindex int) int {
	var n int
	var err error
	ns.do(t, func() {
		var res *link.QueryResult
		res, err = link.QueryPrograms(link.QueryOptions{Target: ifindex, Attach: 46 /* BPF_TCX_INGRESS */})
		if err == nil {
			n = len(res.Programs)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestParseMode(t *testing.T) {
	for s, want := range map[string]Mode{"off": ModeOff, "auto": ModeAuto, "ebpf": ModeEBPF} {
		m, err := ParseMode(s)
		if err != nil || m != want {
			t.Fatalf("ParseMode(%q) = %v, %v", s, m, err)
		}
		if m.String() != s {
			t.Fatalf("%v.String() = %q", m, m.String())
		}
	}
	if _, err := ParseMode("on"); err == nil {
		t.Fatal(`ParseMode("on"): want an error`)
	}
}

func TestModeOff(t *testing.T) {
	o, err := New(Config{Mode: ModeOff})
	if o != nil || err != nil {
		t.Fatalf("New(ModeOff) = %v, %v; want nil, nil", o, err)
	}
	// A nil Offload answers with an error rather than a panic.
	ch := Channel{Client: ap("192.0.2.1:1"), Server: ap("192.0.2.2:3478"), Number: 0x4000,
		Relay: ap("192.0.2.2:50000"), Peer: ap("198.51.100.1:2")}
	if err := o.Install(ch); !errors.Is(err, errNotLoaded) {
		t.Fatalf("nil Install: %v", err)
	}
	if _, err := o.Counters(ch); !errors.Is(err, errNotLoaded) {
		t.Fatalf("nil Counters: %v", err)
	}
	if err := o.Close(); err != nil {
		t.Fatalf("nil Close: %v", err)
	}
}

// TestAutoWithoutPrivileges runs New(ModeAuto) in a child process with
// the privileges of nobody: it must return no Offload and a reason.
func TestAutoWithoutPrivileges(t *testing.T) {
	// Without root the test process is already what the check needs.
	if os.Getenv("STUND_OFFLOAD_CHILD") == "1" || os.Geteuid() != 0 {
		o, err := New(Config{Mode: ModeAuto, Interfaces: []string{"lo"}})
		if o != nil || err == nil {
			t.Fatalf("New(ModeAuto) unprivileged = %v, %v; want nil and a reason", o, err)
		}
		if !strings.Contains(err.Error(), "CAP_BPF") {
			t.Fatalf("reason %q does not say which privileges are missing", err)
		}
		t.Logf("reason: %v", err)
		return
	}
	needRoot(t)
	// The test binary must be executable by nobody.
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := dir + "/offload.test"
	b, err := os.ReadFile(exe)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	for d := dir; d != "/" && d != os.TempDir(); d = parent(d) {
		_ = os.Chmod(d, 0o755)
	}
	cmd := exec.Command(bin, "-test.run", "^TestAutoWithoutPrivileges$", "-test.v", "-test.count=1")
	cmd.Env = append(os.Environ(), "STUND_OFFLOAD_CHILD=1")
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("child: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "reason:") {
		t.Fatalf("child did not run the check:\n%s", out)
	}
	t.Logf("%s", out)
}

func parent(d string) string {
	i := strings.LastIndexByte(d, '/')
	if i <= 0 {
		return "/"
	}
	return d[:i]
}

// TestTTL: the relayed packet leaves with the TTL one less than it came
// (RFC 8656 §14), and a packet that would leave with TTL 0 is left to
// userspace.
func TestTTL(t *testing.T) {
	r := newRig(t)
	if err := r.off.Install(r.ch); err != nil {
		t.Fatal(err)
	}
	rc, err := r.peer.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_RECVTTL, 1)
	}); err != nil || serr != nil {
		t.Fatal(err, serr)
	}
	data := payload(33, 7)
	r.sendRawTTL(t, r.ch.Client, r.ch.Server, chanData(r.ch.Number, data, true), false, 50)
	buf, oob := make([]byte, 2048), make([]byte, 128)
	_ = r.peer.SetReadDeadline(time.Now().Add(wait))
	n, oobn, _, from, err := r.peer.ReadMsgUDPAddrPort(buf, oob)
	if err != nil {
		t.Fatal(err)
	}
	if from != r.ch.Relay || !bytes.Equal(buf[:n], data) {
		t.Fatalf("peer got % x from %v", head(buf[:n]), from)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		t.Fatal(err)
	}
	ttl := -1
	for _, m := range msgs {
		if m.Header.Level == unix.IPPROTO_IP && m.Header.Type == unix.IP_TTL && len(m.Data) >= 4 {
			ttl = int(binary.NativeEndian.Uint32(m.Data))
		}
	}
	if ttl != 49 {
		t.Fatalf("relayed TTL %d, want 49 (sent with 50)", ttl)
	}

	last := chanData(r.ch.Number, payload(8, 1), false)
	r.sendRawTTL(t, r.ch.Client, r.ch.Server, last, false, 1)
	expect(t, "TTL 1 to the server socket", r.server, r.ch.Client, last)
}

// TestLargestData: data up to 2048 bytes is relayed in the kernel; one
// byte more goes to the userspace socket untouched.
func TestLargestData(t *testing.T) {
	r := newRig(t)
	if err := r.off.Install(r.ch); err != nil {
		t.Fatal(err)
	}
	data := payload(2048, 3)
	r.send(t, r.client, r.ch.Server, chanData(r.ch.Number, data, false))
	expect(t, "2048 bytes to the peer", r.peer, r.ch.Relay, data)
	big := chanData(r.ch.Number, payload(2049, 4), true)
	r.send(t, r.client, r.ch.Server, big)
	expect(t, "2049 bytes to the server socket", r.server, r.ch.Client, big)
	r.send(t, r.peer, r.ch.Relay, data)
	expect(t, "2048 bytes to the client", r.client, r.ch.Server, chanData(r.ch.Number, data, false))
	r.send(t, r.peer, r.ch.Relay, big)
	expect(t, "2049+ bytes to the relay socket", r.relay, r.ch.Peer, big)
}

// TestTooBigForTheLink: a peer datagram that fills the veth's 1500-byte
// MTU cannot take the 4-byte ChannelData header without fragmenting, so
// the kernel leaves it to userspace (which may fragment) and counts why.
func TestTooBigForTheLink(t *testing.T) {
	r := newVethRig(t)
	if err := r.off.Install(r.ch); err != nil {
		t.Fatal(err)
	}
	full := payload(1500-20-8, 5)
	r.send(t, r.peer, r.ch.Relay, full)
	expect(t, "full-MTU datagram to the relay socket", r.relay, r.ch.Peer, full)
	fits := payload(1500-20-8-4, 6)
	r.send(t, r.peer, r.ch.Relay, fits)
	expect(t, "largest datagram that fits, to the client", r.client, r.ch.Server, chanData(r.ch.Number, fits, false))
	d, err := r.off.Declined()
	if err != nil {
		t.Fatal(err)
	}
	if d != (Declined{TooBig: 1}) {
		t.Fatalf("declined %+v, want TooBig 1 only", d)
	}
}

// TestKeysRefuseWhatTheProgramCannotRewrite: a channel whose client side
// and peer side differ in address family, or that needs IPv6 where it is
// off, stays in userspace.
func TestKeysRefuseWhatTheProgramCannotRewrite(t *testing.T) {
	v4 := Channel{Client: ap("192.0.2.1:1"), Server: ap("192.0.2.2:3478"), Number: 0x4000,
		Relay: ap("192.0.2.2:50000"), Peer: ap("198.51.100.1:2")}
	if _, _, _, _, err := keys(v4, false); err != nil {
		t.Fatalf("IPv4 channel: %v", err)
	}
	mixed := v4
	mixed.Peer = ap("[2001:db8::1]:2")
	if _, _, _, _, err := keys(mixed, true); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("IPv4 client, IPv6 peer: %v, want ErrUnsupported", err)
	}
	v6 := Channel{Client: ap("[2001:db8::1]:1"), Server: ap("[2001:db8::2]:3478"), Number: 0x4FFF,
		Relay: ap("[2001:db8::2]:50000"), Peer: ap("[2001:db8::3]:2")}
	if _, _, _, _, err := keys(v6, false); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("IPv6 with IPv6 off: %v, want ErrUnsupported", err)
	}
	if _, _, _, _, err := keys(v6, true); err != nil {
		t.Fatalf("IPv6 channel: %v", err)
	}
	bad := v4
	bad.Number = 0x5000
	if _, _, _, _, err := keys(bad, false); err == nil || errors.Is(err, ErrUnsupported) {
		t.Fatalf("channel 0x5000: %v, want an out-of-range error", err)
	}
}

func sysctl(t *testing.T, ns *netns, path string) string {
	var b []byte
	var err error
	ns.do(t, func() { b, err = os.ReadFile(path) })
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// TestChainContinues: a packet the program leaves alone goes on to the
// next program on the same hook (an operator's firewall, say), while one
// it relays does not. A counting program attached after ours tells.
func TestChainContinues(t *testing.T) {
	r := newRig(t)
	if err := r.off.Install(r.ch); err != nil {
		t.Fatal(err)
	}
	counter, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 8, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer counter.Close()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type:    ebpf.SchedCLS,
		License: "GPL",
		Instructions: asm.Instructions{
			asm.StoreImm(asm.RFP, -4, 0, asm.Word),
			asm.LoadMapPtr(asm.R1, counter.FD()),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, -4),
			asm.FnMapLookupElem.Call(),
			asm.JEq.Imm(asm.R0, 0, "out"),
			asm.Mov.Imm(asm.R1, 1),
			asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
			asm.Mov.Imm(asm.R0, 0).WithSymbol("out"), // TC_ACT_OK
			asm.Return(),
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	var l link.Link
	r.srv.do(t, func() {
		var ifc *net.Interface
		if ifc, err = net.InterfaceByName("lo"); err == nil {
			l, err = link.AttachTCX(link.TCXOptions{Interface: ifc.Index, Program: prog,
				Attach: ebpf.AttachTCXIngress, Anchor: link.Tail()})
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	seen := func() uint64 {
		var v uint64
		if err := counter.Lookup(uint32(0), &v); err != nil {
			t.Fatal(err)
		}
		return v
	}

	data := payload(10, 1)
	r.send(t, r.client, r.ch.Server, chanData(r.ch.Number, data, false))
	expect(t, "relayed", r.peer, r.ch.Relay, data)
	if n := seen(); n != 0 {
		t.Fatalf("the next program saw %d packets after a relayed one, want 0", n)
	}
	other := chanData(0x4002, data, false)
	r.send(t, r.client, r.ch.Server, other)
	expect(t, "not ours", r.server, r.ch.Client, other)
	if n := seen(); n == 0 {
		t.Fatal("the next program never saw the packet ours left alone")
	}
}

// TestRemoveUnderTraffic: with the client sending while the channel is
// removed, every datagram ends up exactly once either at the peer (relayed
// by the kernel, and then counted) or at the server socket (after
// Remove), and the final counters are what the peer received.
func TestRemoveUnderTraffic(t *testing.T) {
	r := newRig(t)
	if err := r.off.Install(r.ch); err != nil {
		t.Fatal(err)
	}
	for _, c := range []*net.UDPConn{r.peer, r.server} {
		forceReadBuffer(t, c, 8<<20)
	}
	const (
		before = 500   // datagrams sent before Remove starts
		total  = 20000 // an upper bound; the loop ends soon after Remove
	)
	data := payload(100, 9)
	msg := chanData(r.ch.Number, data, false)
	atPeer, atServer := make(chan int, 1), make(chan int, 1)
	drain := func(c *net.UDPConn, want []byte, out chan<- int) {
		buf := make([]byte, 2048)
		n := 0
		for i := 0; i < total; i++ {
			// Quiet for this long means the sender is done: loopback
			// delivers within microseconds.
			_ = c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
			m, _, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				break
			}
			if bytes.Equal(buf[:m], want) {
				n++
			}
		}
		out <- n
	}
	go drain(r.peer, data, atPeer)
	go drain(r.server, msg, atServer)

	// The first datagrams go while the channel is installed, then Remove
	// starts while the client keeps sending, and ten more follow once it
	// has returned: those must all reach the server socket.
	removed := make(chan Counters, 1)
	var final Counters
	sent, after := 0, -1
	for sent < total && after < 10 {
		if sent == before {
			go func() {
				c, err := r.off.RemoveCounters(r.ch)
				if err != nil {
					t.Error(err)
				}
				removed <- c
			}()
		}
		if after < 0 {
			select {
			case final = <-removed:
				after = 0
			default:
			}
		}
		r.send(t, r.client, r.ch.Server, msg)
		sent++
		if after >= 0 {
			after++
		}
	}
	if after < 0 {
		final = <-removed
	}
	p, srv := <-atPeer, <-atServer
	if p+srv != sent {
		t.Fatalf("peer %d + server socket %d = %d datagrams, sent %d", p, srv, p+srv, sent)
	}
	if final.PktsToPeer != uint64(p) || final.BytesToPeer != uint64(p*len(data)) {
		t.Fatalf("final counters %+v, the peer received %d datagrams", final, p)
	}
	if p < before || (after >= 0 && srv < after) {
		t.Fatalf("peer %d, server socket %d: want at least %d before Remove and %d after it returned", p, srv, before, after)
	}
	t.Logf("relayed by the kernel %d, by userspace after Remove %d", p, srv)
}

// forceReadBuffer sets SO_RCVBUFFORCE (root may exceed rmem_max), so that
// no datagram is lost while a test's reader is descheduled.
func forceReadBuffer(t testing.TB, c *net.UDPConn, n int) {
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, n)
	}); err != nil || serr != nil {
		t.Fatal(err, serr)
	}
}
