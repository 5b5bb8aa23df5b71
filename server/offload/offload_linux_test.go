package offload

import (
	"bytes"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
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

// newVethRig puts the server and relay in one namespace and the client,
// peer and stranger in another, joined by a veth pair: the program runs on
// a real Ethernet interface and must route and redirect the rewritten
// packet back out of it (bpf_fib_lookup, bpf_redirect_neigh).
func newVethRig(t *testing.T) *rig {
	needRoot(t)
	srv, edge := newNetns(t), newNetns(t)
	srv.ip(t, "link", "add", "o0", "type", "veth", "peer", "name", "o1", "netns", edge.name)
	srv.ip(t, "addr", "add", "10.200.0.1/24", "dev", "o0")
	srv.ip(t, "addr", "add", "10.200.0.4/24", "dev", "o0")
	srv.ip(t, "link", "set", "o0", "up")
	for _, a := range []string{"10.200.0.2/24", "10.200.0.3/24", "10.200.0.5/24"} {
		edge.ip(t, "addr", "add", a, "dev", "o1")
	}
	edge.ip(t, "link", "set", "o1", "up")
	return openRig(t, edge, srv, Channel{
		Client: ap("10.200.0.2:40000"),
		Server: ap("10.200.0.1:3478"),
		Number: 0x4ABC,
		Relay:  ap("10.200.0.4:50000"),
		Peer:   ap("10.200.0.3:60000"),
	}, ap("10.200.0.5:60000"))
}

func openRig(t testing.TB, edge, srv *netns, ch Channel, stranger netip.AddrPort) *rig {
	r := &rig{edge: edge, srv: srv, ch: ch, strangerAddr: stranger}
	var err error
	listen := func(a netip.AddrPort) *net.UDPConn {
		c, lerr := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(a))
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
			r.raw, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
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
	pkt := udp4(from, to, payload, ttl)
	if breakCsum {
		pkt[26] ^= 0x5a
	}
	sa := &unix.SockaddrInet4{Addr: to.Addr().As4()}
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
	r := newRig(t)
	r.sendRaw(t, r.ch.Client, r.ch.Server, []byte("bad checksum"), true)
	r.sendRaw(t, r.ch.Client, r.ch.Server, marker, false)
	expect(t, "server socket", r.server, r.ch.Client, marker)
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
	if err := r.off.Close(); err != nil {
		t.Fatal(err)
	}
	if n := tcxPrograms(t, r.srv, lo); n != 0 {
		t.Fatalf("%d programs on lo ingress after Close, want 0", n)
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
}

// TestAutoWithoutPrivileges runs New(ModeAuto) in a child process with
// the privileges of nobody: it must return no Offload and a reason.
func TestAutoWithoutPrivileges(t *testing.T) {
	if os.Getenv("STUND_OFFLOAD_CHILD") == "1" {
		o, err := New(Config{Mode: ModeAuto, Interfaces: []string{"lo"}})
		if o != nil || err == nil {
			t.Fatalf("New(ModeAuto) unprivileged = %v, %v; want nil and a reason", o, err)
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
