package offload

import (
	"encoding/binary"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BenchmarkToPeer measures ChannelData client->peer packets per second
// through the kernel path against a userspace relay loop (read on the
// server socket, strip the header, write from the relay socket: what a
// relay without offload does at the least) in the same run, on loopback in
// a fresh namespace, and reports the ratio. Both paths carry the same
// frames with the same window of packets in flight; the rounds alternate
// so that neither gets a warmer machine.
//
//	go test -run '^$' -bench ToPeer -benchtime 200000x ./server/offload/
func BenchmarkToPeer(b *testing.B) {
	for _, size := range []int{100, 1200} {
		b.Run(sizeName(size), func(b *testing.B) { benchToPeer(b, size) })
	}
}

func sizeName(n int) string {
	return map[int]string{100: "100B", 1200: "1200B"}[n]
}

// window is the number of datagrams in flight: enough to keep both paths
// busy, far below what the 4 MiB receive buffer holds, so nothing is lost.
const window = 32

func benchToPeer(b *testing.B, size int) {
	r := newRig(b)
	if err := r.off.Install(r.ch); err != nil {
		b.Fatal(err)
	}
	// The userspace path: a second client whose channel is not installed,
	// relayed by a goroutine, as pion's read loop would.
	var client2 *net.UDPConn
	r.srv.do(b, func() {
		var err error
		client2, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(ap("127.0.0.6:40001")))
		if err != nil {
			b.Fatal(err)
		}
	})
	defer client2.Close()
	for _, c := range []*net.UDPConn{r.peer, r.server} {
		_ = c.SetReadBuffer(4 << 20)
	}
	stop := make(chan struct{})
	relayed := make(chan struct{})
	go func() {
		defer close(relayed)
		buf := make([]byte, 2048)
		for {
			select {
			case <-stop:
				return
			default:
			}
			_ = r.server.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
			n, _, err := r.server.ReadFromUDPAddrPort(buf)
			if err != nil || n < 4 {
				continue
			}
			l := int(binary.BigEndian.Uint16(buf[2:]))
			if 4+l > n {
				continue
			}
			_, _ = r.relay.WriteToUDPAddrPort(buf[4:4+l], r.ch.Peer)
		}
	}()
	defer func() { close(stop); <-relayed }()

	msg := chanData(r.ch.Number, payload(size, 1), false)
	var kernel, user, kernelCPU, userCPU time.Duration
	const rounds = 4
	per := b.N/rounds + 1
	b.ResetTimer()
	for i := 0; i < rounds; i++ {
		c0 := cpuTime(b)
		kernel += pump(b, r.client, r.ch.Server, r.peer, msg, per)
		c1 := cpuTime(b)
		user += pump(b, client2, r.ch.Server, r.peer, msg, per)
		c2 := cpuTime(b)
		kernelCPU += c1 - c0
		userCPU += c2 - c1
	}
	b.StopTimer()
	pkts := float64(per * rounds)
	kpps, upps := pkts/kernel.Seconds(), pkts/user.Seconds()
	b.ReportMetric(kpps, "kernel-pkt/s")
	b.ReportMetric(upps, "user-pkt/s")
	b.ReportMetric(kpps/upps, "pps-kernel/user")
	// CPU of the whole process (sender and receiver included, and the
	// softirq work loopback runs in their system calls) per packet.
	kcpu, ucpu := float64(kernelCPU.Nanoseconds())/pkts, float64(userCPU.Nanoseconds())/pkts
	b.ReportMetric(kcpu, "kernel-cpu-ns/pkt")
	b.ReportMetric(ucpu, "user-cpu-ns/pkt")
	b.ReportMetric(kcpu/ucpu, "cpu-kernel/user")
	c, err := r.off.Counters(r.ch)
	if err != nil {
		b.Fatal(err)
	}
	if c.PktsToPeer != uint64(per*rounds) {
		b.Fatalf("kernel counted %d packets to the peer, sent %d", c.PktsToPeer, per*rounds)
	}
}

// cpuTime is the process's user and system CPU time so far.
func cpuTime(b *testing.B) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// pump sends n datagrams from c to dst with at most window in flight and
// returns how long until the peer had read them all. A lost datagram ends
// the run after a second without progress instead of hanging.
func pump(b *testing.B, c *net.UDPConn, dst netip.AddrPort, peer *net.UDPConn, msg []byte, n int) time.Duration {
	tokens := make(chan struct{}, window)
	for i := 0; i < window; i++ {
		tokens <- struct{}{}
	}
	done := make(chan int, 1)
	go func() {
		buf := make([]byte, 2048)
		got := 0
		for got < n {
			_ = peer.SetReadDeadline(time.Now().Add(time.Second))
			if _, _, err := peer.ReadFromUDPAddrPort(buf); err != nil {
				break
			}
			got++
			tokens <- struct{}{}
		}
		done <- got
	}()
	start := time.Now()
	for i := 0; i < n; i++ {
		select {
		case <-tokens:
		case got := <-done:
			b.Fatalf("peer stopped after %d of %d datagrams", got, n)
		}
		if _, err := c.WriteToUDPAddrPort(msg, dst); err != nil {
			b.Fatal(err)
		}
	}
	if got := <-done; got != n {
		b.Fatalf("peer read %d of %d datagrams", got, n)
	}
	return time.Since(start)
}
