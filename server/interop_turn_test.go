package server

import (
	"bytes"
	"context"
	"net"
	"net/netip"
	"os/exec"
	"regexp"
	"strconv"
	"testing"
	"time"
)

// interopTimeout bounds each external tool; uclient sends a handful of
// packets 20 ms apart, so a run takes about a second.
const interopTimeout = 30 * time.Second

// freeUDPPort asks the kernel for a free loopback port for a tool that only
// takes a port number. The port is released before the tool binds it; on a
// test machine nothing else races for it within milliseconds.
func freeUDPPort(t *testing.T) int {
	t.Helper()
	c, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()

	return c.LocalAddr().(*net.UDPAddr).Port
}

var (
	// the final summary line, not the per-second progress lines
	reSendRecv = regexp.MustCompile(`start_mclient: tot_send_msgs=(\d+), tot_recv_msgs=(\d+)`)
	reLost     = regexp.MustCompile(`Total lost packets (\d+)`)
)

// TestInteropTURNUClient relays coturn's turnutils_uclient through stund to
// turnutils_peer (an echo server) and checks that every message came back.
func TestInteropTURNUClient(t *testing.T) {
	uclient := interopTool(t, "turnutils_uclient")
	peerBin := interopTool(t, "turnutils_peer")

	s := startTURNServer(t, func(c *Config) { c.AllowPeers = mustPrefixes(t, "127.0.0.0/8") })
	srv := s.Grid()[0][0]

	ctx, cancel := context.WithTimeout(context.Background(), interopTimeout)
	defer cancel()

	peerPort := freeUDPPort(t)
	peer := exec.CommandContext(ctx, peerBin, "-L", "127.0.0.1", "-p", strconv.Itoa(peerPort))
	var peerOut bytes.Buffer
	peer.Stdout, peer.Stderr = &peerOut, &peerOut
	if err := peer.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		_ = peer.Process.Kill()
		_ = peer.Wait()
	}()
	waitUDPListening(t, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(peerPort)))

	// Send/Data indications only: coturn's uclient picks channel numbers at
	// random from the RFC 5766 range 0x4000-0x7FFF (0x709d seen here), which
	// RFC 8656 §12 narrowed to 0x4000-0x4FFF. pion grants the ChannelBind
	// but stund's demux drops ChannelData above 0x4FFF, so the channel mode
	// passes or fails by the draw. Channels are
	// covered with pion's client in TestTURNRelayBothWays.
	for _, mode := range []struct {
		name  string
		flags []string
	}{
		{"send", []string{"-s"}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			const msgs = 10 // enough to see loss, few enough to take ~1 s
			args := append([]string{
				"-u", "alice", "-w", "alice-pw",
				"-p", strconv.Itoa(int(srv.Port())),
				"-e", "127.0.0.1", "-r", strconv.Itoa(peerPort),
				"-L", "127.0.0.1",
				"-n", strconv.Itoa(msgs), "-m", "1", "-c", "-X",
			}, mode.flags...)
			args = append(args, srv.Addr().String())
			out, err := exec.CommandContext(ctx, uclient, args...).CombinedOutput()
			if err != nil {
				t.Fatalf("turnutils_uclient %v: %v\n%s", args, err, out)
			}
			m := reSendRecv.FindSubmatch(out)
			lost := reLost.FindSubmatch(out)
			if m == nil || lost == nil {
				t.Fatalf("no summary in the output:\n%s", out)
			}
			sent, _ := strconv.Atoi(string(m[1]))
			recv, _ := strconv.Atoi(string(m[2]))
			if sent != msgs || recv != msgs || string(lost[1]) != "0" {
				t.Fatalf("sent %d, received %d, lost %s; want %d/%d/0; demux %+v, policy refused %d\n%s",
					sent, recv, lost[1], msgs, msgs, s.Demux(), s.live.refused(), out)
			}
		})
	}
	if s.quotas.Active() != 0 && s.AllocationCount() == 0 {
		t.Errorf("quota count %d with no allocations", s.quotas.Active())
	}
}

// waitUDPListening waits (bounded) until a UDP socket is bound at ap: the
// kernel refuses a second bind on it while the tool holds it.
func waitUDPListening(t *testing.T, ap netip.AddrPort) {
	t.Helper()
	for i := 0; i < 100; i++ {
		c, err := net.ListenUDP("udp4", net.UDPAddrFromAddrPort(ap))
		if err != nil {
			return // taken: the tool is up
		}
		c.Close()
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("nothing bound %v after 2 s", ap)
}
