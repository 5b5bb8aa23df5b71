package server

import (
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/stund/stund/internal/stunwire"
	"github.com/stund/stund/internal/testutil"
	"github.com/stund/stund/server/offload"
)

// needOffload skips unless this process may load BPF programs (root);
// STUND_REQUIRE_OFFLOAD=1 (CI) turns the skip into a failure.
func needOffload(t *testing.T) {
	t.Helper()
	if os.Geteuid() == 0 {
		return
	}
	if os.Getenv("STUND_REQUIRE_OFFLOAD") == "1" {
		t.Fatal("the kernel relay tests need root")
	}
	t.Skip("the kernel relay needs root (CAP_BPF, CAP_NET_ADMIN)")
}

// TestKernelRelay: through a real stund with --offload ebpf, a bound UDP
// channel is relayed by the kernel both ways, byte-exact; the data plane
// in userspace sees none of that ChannelData; when the channel's
// allocation ends its usage record counts what the peer received; and
// without a channel (Send/Data indications) userspace relays as before.
func TestKernelRelay(t *testing.T) {
	needOffload(t)
	var usage testutil.SyncBuffer
	s := startTURNServer(t, func(c *Config) {
		c.Offload = offload.ModeEBPF
		c.AllowPeers = mustPrefixes(t, "127.0.0.0/8")
		c.UsageLog = &usage
	})
	if s.kern == nil {
		t.Fatal("--offload ebpf started without the kernel relay")
	}
	_, relay := allocRelay(t, s, "udp4", "alice")
	peer := udpPeer(t, "udp4")
	relayToPeer(t, relay, peer, "hello") // permission, then pion's client binds a channel
	waitFor(t, "the channel in the kernel", func() bool { return s.kern.offloaded(s.led.all("")) == 1 })

	before := s.data.stats().Relayed
	buf := make([]byte, 1500)
	const n = 50
	for i := 0; i < n; i++ {
		msg := []byte{byte(i), 'k', 'e', 'r', 'n', 'e', 'l'}[:1+i%7]
		if _, err := relay.WriteTo(msg, peer.LocalAddr()); err != nil {
			t.Fatal(err)
		}
		_ = peer.SetReadDeadline(time.Now().Add(e2eTimeout))
		m, _, err := peer.ReadFrom(buf)
		if err != nil || string(buf[:m]) != string(msg) {
			d, _ := s.kern.o.Declined()
			t.Fatalf("to peer %d: %q, %v; want %q (declined %+v, kernel %+v)", i, buf[:m], err, msg, d, s.kern.live(s.led.all("")[0]))
		}
		if _, err := peer.WriteTo(msg, relay.LocalAddr()); err != nil {
			t.Fatal(err)
		}
		_ = relay.SetReadDeadline(time.Now().Add(e2eTimeout))
		m, _, err = relay.ReadFrom(buf)
		if err != nil || string(buf[:m]) != string(msg) {
			t.Fatalf("to client %d: %q, %v; want %q", i, buf[:m], err, msg)
		}
	}
	if got := s.data.stats().Relayed - before; got > 2 {
		t.Fatalf("userspace relayed %d of the %d ChannelData frames of an offloaded channel", got, n)
	}
	as := s.Allocations("alice")
	if len(as) != 1 || as[0].PktsOut < n || as[0].PktsIn < n {
		t.Fatalf("live usage %+v: the kernel's %d packets each way are missing", as, n)
	}
	// The permission expires (pion's event, as its timer would fire it):
	// the kernel stops relaying at once, and so does userspace.
	a := s.led.all("alice")[0]
	s.eventHandler().OnPermissionDeleted(udpAddrOf(a.tuple.src), udpAddrOf(a.tuple.dst), "UDP", a.user, a.realm, nil, peer.LocalAddr().(*net.UDPAddr).IP)
	if s.kern.offloaded(s.led.all("")) != 0 {
		t.Fatal("the channel stayed in the kernel after its peer's permission ended")
	}
	if _, err := relay.WriteTo([]byte("late"), peer.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	_ = peer.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if m, _, err := peer.ReadFrom(buf); err == nil {
		t.Fatalf("relayed %q after the permission ended", buf[:m])
	}
	relay.Close() // Refresh 0: the allocation ends, the usage is booked
	// The record is written after the channels left the kernel and their
	// counts were booked.
	waitFor(t, "the usage record", func() bool { return len(usageRecords(t, usage.String())) == 1 })
	recs := usageRecords(t, usage.String())
	if len(recs) != 1 || recs[0].PktsOut < n || recs[0].PktsIn < n {
		t.Fatalf("usage records %+v: want the kernel's %d packets each way", recs, n)
	}
}

func udpAddrOf(ap netip.AddrPort) *net.UDPAddr { return net.UDPAddrFromAddrPort(ap) }

// TestKernelRelayKeepsListenersOutOfReach: a channel to one of the host's
// protected listeners (here the admin listener's stand-in) is never put in
// the kernel, which does not check the peer policy per packet; userspace
// refuses its data.
func TestKernelRelayKeepsListenersOutOfReach(t *testing.T) {
	needOffload(t)
	admin := udpPeer(t, "udp4") // a UDP socket on a protected port
	s := startTURNServer(t, func(c *Config) {
		c.Offload = offload.ModeEBPF
		c.AllowPeers = mustPrefixes(t, "127.0.0.0/8")
		c.ProtectedListeners = []netip.AddrPort{stunwire.AddrPortOf(admin.LocalAddr())}
	})
	_, relay := allocRelay(t, s, "udp4", "alice")
	for i := 0; i < 20; i++ { // pion's client binds a channel after the first writes
		if _, err := relay.WriteTo([]byte("GET /debug/pprof/cmdline"), admin.LocalAddr()); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, "the channel", func() bool {
		as := s.led.all("alice")
		if len(as) != 1 {
			return false
		}
		as[0].mu.Lock()
		defer as[0].mu.Unlock()
		return len(as[0].chans) == 1
	})
	if n := s.kern.offloaded(s.led.all("")); n != 0 {
		t.Fatalf("%d channels to a protected listener in the kernel", n)
	}
	if _, err := relay.WriteTo([]byte("GET /debug/pprof/cmdline"), admin.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	_ = admin.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, _, err := admin.ReadFrom(make([]byte, 100)); err == nil {
		t.Fatalf("the protected listener received %d bytes through the relay", n)
	}
}

// TestKernelRelayReloadNarrows: a reload that denies a peer takes its
// channel out of the kernel at once, as userspace refuses its next packet.
func TestKernelRelayReloadNarrows(t *testing.T) {
	needOffload(t)
	s := startTURNServer(t, func(c *Config) {
		c.Offload = offload.ModeEBPF
		c.AllowPeers = mustPrefixes(t, "127.0.0.0/8")
	})
	_, relay := allocRelay(t, s, "udp4", "alice")
	peer := udpPeer(t, "udp4")
	relayToPeer(t, relay, peer, "hello")
	waitFor(t, "the channel in the kernel", func() bool { return s.kern.offloaded(s.led.all("")) == 1 })
	cfg := s.cfg
	cfg.DenyPeers = mustPrefixes(t, stunwire.AddrPortOf(peer.LocalAddr()).Addr().String()+"/32")
	if err := s.Reload(cfg); err != nil {
		t.Fatal(err)
	}
	if n := s.kern.offloaded(s.led.all("")); n != 0 {
		t.Fatalf("%d channels to a now-denied peer still in the kernel", n)
	}
	if _, err := relay.WriteTo([]byte("after the reload"), peer.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	_ = peer.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, _, err := peer.ReadFrom(make([]byte, 100)); err == nil {
		t.Fatalf("the denied peer received %d bytes", n)
	}
}
