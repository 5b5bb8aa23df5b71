package udpio

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"
)

func listen(t testing.TB, network, addr string) *net.UDPConn {
	t.Helper()
	c, err := net.ListenPacket(network, addr)
	if err != nil {
		t.Skipf("listen %s %s: %v", network, addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return c.(*net.UDPConn)
}

func apOf(c *net.UDPConn) netip.AddrPort { return c.LocalAddr().(*net.UDPAddr).AddrPort() }

// payload i of size n: distinct bytes so a reordered or merged datagram shows.
func payload(i, n int) []byte {
	b := make([]byte, n)
	for j := range b {
		b[j] = byte(i*7 + j)
	}
	return b
}

// readAll reads want datagrams from c (plain reads, as a peer would).
func readAll(t *testing.T, c *net.UDPConn, want int) [][]byte {
	t.Helper()
	var got [][]byte
	buf := make([]byte, 70000)
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	for len(got) < want {
		n, _, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatalf("after %d of %d datagrams: %v", len(got), want, err)
		}
		got = append(got, bytes.Clone(buf[:n]))
	}
	return got
}

// Runs of equal sizes leave as GSO messages and arrive as the datagrams
// they were: same bytes, same boundaries, same order, to each destination.
func TestWriteRunsArriveAsDatagrams(t *testing.T) {
	src := listen(t, "udp4", "127.0.0.1:0")
	a := listen(t, "udp4", "127.0.0.1:0")
	b := listen(t, "udp4", "127.0.0.1:0")
	c := NewConn(src)
	if c == nil {
		t.Fatal("NewConn: nil for a kernel UDP socket")
	}
	sizes := []int{100, 100, 100, 60, 100, 1200, 1200, 1200, 7, 0, 100, 100}
	dests := []*net.UDPConn{a, a, a, a, a, b, b, b, b, a, a, a}
	var outs []Out
	want := map[*net.UDPConn][][]byte{}
	for i, n := range sizes {
		p := payload(i, n)
		outs = append(outs, Out{B: p, To: apOf(dests[i])})
		want[dests[i]] = append(want[dests[i]], p)
	}
	sent, err := NewBatch().Write(c, outs)
	if err != nil || sent != len(outs) {
		t.Fatalf("Write = %d, %v; want %d, nil", sent, err, len(outs))
	}
	for _, d := range []*net.UDPConn{a, b} {
		got := readAll(t, d, len(want[d]))
		for i := range got {
			if !bytes.Equal(got[i], want[d][i]) {
				t.Fatalf("datagram %d to %v: %d bytes, want %d (%x...)", i, apOf(d), len(got[i]), len(want[d][i]), got[i][:min(8, len(got[i]))])
			}
		}
	}
}

// runLen: equal sizes to one destination, a shorter last segment ends the
// run, a longer one or another destination starts a new one.
func TestRunLen(t *testing.T) {
	x := netip.MustParseAddrPort("127.0.0.1:1")
	y := netip.MustParseAddrPort("127.0.0.1:2")
	mk := func(to netip.AddrPort, sizes ...int) []Out {
		var o []Out
		for _, n := range sizes {
			o = append(o, Out{B: make([]byte, n), To: to})
		}
		return o
	}
	cases := []struct {
		outs []Out
		want int
	}{
		{mk(x, 100, 100, 100), 3},
		{mk(x, 100, 100, 50, 100), 3},
		{mk(x, 100, 200), 1},
		{append(mk(x, 100, 100), mk(y, 100)...), 2},
		{mk(x, 1500, 1500), 1}, // above maxGSOSegment
		{mk(x, 0, 0), 1},
		{mk(x, make([]int, 80)...), 1},
	}
	for i, c := range cases {
		if got := runLen(c.outs, true); got != c.want {
			t.Errorf("case %d: runLen = %d, want %d", i, got, c.want)
		}
	}
	if got := runLen(mk(x, 100, 100), false); got != 1 {
		t.Errorf("without GSO: runLen = %d, want 1", got)
	}
	long := make([]int, 100)
	for i := range long {
		long[i] = 100
	}
	if got := runLen(mk(x, long...), true); got != maxSegments {
		t.Errorf("100 equal datagrams: runLen = %d, want the kernel's cap %d", got, maxSegments)
	}
}

// A destination the socket cannot reach is skipped and reported; the
// others still go.
func TestWriteSkipsUnreachable(t *testing.T) {
	src := listen(t, "udp4", "127.0.0.1:0")
	a := listen(t, "udp4", "127.0.0.1:0")
	c := NewConn(src)
	outs := []Out{
		{B: []byte("one"), To: apOf(a)},
		{B: []byte("v6"), To: netip.MustParseAddrPort("[::1]:9")},
		{B: []byte("two"), To: apOf(a)},
	}
	sent, err := NewBatch().Write(c, outs)
	if sent != 2 || err != ErrFamily {
		t.Fatalf("Write = %d, %v; want 2, ErrFamily", sent, err)
	}
	got := readAll(t, a, 2)
	if string(got[0]) != "one" || string(got[1]) != "two" {
		t.Fatalf("got %q", got)
	}
}

// Read returns what is queued, with sources, lengths and truncation.
func TestReadBatch(t *testing.T) {
	for _, fam := range []struct{ network, addr string }{{"udp4", "127.0.0.1:0"}, {"udp6", "[::1]:0"}, {"udp", "[::]:0"}} {
		t.Run(fam.network+fam.addr, func(t *testing.T) {
			dst := listen(t, fam.network, fam.addr)
			from := "127.0.0.1:0"
			network := "udp4"
			if fam.network == "udp6" {
				from, network = "[::1]:0", "udp6"
			}
			s := listen(t, network, from)
			to := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), apOf(dst).Port())
			if network == "udp6" {
				to = netip.AddrPortFrom(netip.IPv6Loopback(), apOf(dst).Port())
			}
			for i := 0; i < 5; i++ {
				if _, err := s.WriteToUDPAddrPort(payload(i, 10+i*100), to); err != nil {
					t.Fatal(err)
				}
			}
			c := NewConn(dst)
			b := NewBatch()
			bufs := make([][]byte, 8)
			for i := range bufs {
				bufs[i] = make([]byte, 300)
			}
			got := 0
			deadline := time.Now().Add(2 * time.Second)
			for got < 5 && time.Now().Before(deadline) {
				n, err := b.Read(c, bufs[got:])
				if err != nil {
					t.Fatal(err)
				}
				for i := 0; i < n; i++ {
					k := got + i
					wantLen := 10 + k*100
					if b.Addr(i) != apOf(s) && b.Addr(i).Port() != apOf(s).Port() {
						t.Errorf("datagram %d from %v, want %v", k, b.Addr(i), apOf(s))
					}
					if b.Addr(i).Addr().Is4In6() {
						t.Errorf("datagram %d: source %v not unmapped", k, b.Addr(i))
					}
					if wantLen > 300 {
						if !b.Truncated(i) {
							t.Errorf("datagram %d (%d B into 300): not reported truncated", k, wantLen)
						}
						continue
					}
					if b.Len(i) != wantLen || !bytes.Equal(bufs[k][:wantLen], payload(k, wantLen)) || b.Truncated(i) {
						t.Errorf("datagram %d: len %d truncated %v, want %d", k, b.Len(i), b.Truncated(i), wantLen)
					}
				}
				got += n
			}
			if got != 5 {
				t.Fatalf("read %d of 5 datagrams", got)
			}
		})
	}
}

func TestNoAllocations(t *testing.T) {
	src := listen(t, "udp4", "127.0.0.1:0")
	dst := listen(t, "udp4", "127.0.0.1:0")
	c, d := NewConn(src), NewConn(dst)
	b := NewBatch()
	outs := make([]Out, 8)
	for i := range outs {
		outs[i] = Out{B: payload(i, 100), To: apOf(dst)}
	}
	bufs := make([][]byte, MaxBatch)
	for i := range bufs {
		bufs[i] = make([]byte, 2048)
	}
	rb := NewBatch()
	allocs := testing.AllocsPerRun(100, func() {
		if _, err := b.Write(c, outs); err != nil {
			t.Fatal(err)
		}
		for got := 0; got < len(outs); {
			n, err := rb.Read(d, bufs)
			if err != nil {
				t.Fatal(err)
			}
			for i := 0; i < n; i++ {
				_ = rb.Addr(i)
			}
			got += n
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per batch, want 0", allocs)
	}
}

// BenchmarkWrite sends 32-datagram bursts to one receiver: per datagram
// WriteToUDPAddrPort (the reference, one sendto each), one sendmmsg without
// GSO, and GSO runs. On loopback the receiver's queueing runs in the
// sender's system call, so ns/op is the stack's cost per burst.
func BenchmarkWrite(b *testing.B) {
	for _, size := range []int{100, 1200} {
		for _, mode := range []string{"sendto", "sendmmsg", "gso"} {
			b.Run(fmt.Sprintf("%dB/%s", size, mode), func(b *testing.B) {
				src := listen(b, "udp4", "127.0.0.1:0")
				dst := listen(b, "udp4", "127.0.0.1:0")
				_ = dst.SetReadBuffer(8 << 20)
				c := NewConn(src)
				bt := NewBatch()
				to := apOf(dst)
				outs := make([]Out, 32)
				for i := range outs {
					outs[i] = Out{B: payload(i, size), To: to}
				}
				stop := drain(dst)
				b.SetBytes(int64(32 * size))
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					switch mode {
					case "sendto":
						for _, o := range outs {
							_, _ = src.WriteToUDPAddrPort(o.B, o.To)
						}
					case "sendmmsg":
						bt.single = true
						_, _ = bt.Write(c, outs)
					case "gso":
						_, _ = bt.Write(c, outs)
					}
				}
				b.StopTimer()
				stop()
			})
		}
	}
}

// drain reads dst in the background, so that a benchmark's receive queue
// never fills; stop ends it and waits.
func drain(dst *net.UDPConn) (stop func()) {
	quit, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		rc, rb := NewConn(dst), NewBatch()
		bufs := make([][]byte, MaxBatch)
		for i := range bufs {
			bufs[i] = make([]byte, 2048)
		}
		for {
			select {
			case <-quit:
				return
			default:
			}
			dst.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			_, _ = rb.Read(rc, bufs)
		}
	}()
	return func() { close(quit); <-done }
}

// The poller names the sockets that have datagrams, keeps naming one
// until it is drained (level-triggered), forgets a removed one, and its
// Wait ends when it is closed.
func TestPoller(t *testing.T) {
	p, err := NewPoller()
	if err != nil {
		t.Fatal(err)
	}
	a, b := listen(t, "udp4", "127.0.0.1:0"), listen(t, "udp4", "127.0.0.1:0")
	ca, cb := NewConn(a), NewConn(b)
	if err := p.Add(ca, 1<<40|7); err != nil {
		t.Fatal(err)
	}
	if err := p.Add(cb, 9); err != nil {
		t.Fatal(err)
	}
	src := listen(t, "udp4", "127.0.0.1:0")
	for i := 0; i < 3; i++ {
		if _, err := src.WriteToUDPAddrPort([]byte("x"), apOf(b)); err != nil {
			t.Fatal(err)
		}
	}
	n, err := p.Wait()
	if err != nil || n != 1 || p.Token(0) != 9 {
		t.Fatalf("Wait = %d, %v, token %d; want 1 ready socket, token 9", n, err, p.Token(0))
	}
	rb := NewBatch()
	bufs := [][]byte{make([]byte, 64)} // one at a time: b stays ready
	if k, err := rb.ReadNow(cb, bufs, 0, -1); k != 1 || err != nil {
		t.Fatalf("ReadNow = %d, %v", k, err)
	}
	if n, _ := p.Wait(); n != 1 || p.Token(0) != 9 {
		t.Fatalf("b still holds 2 datagrams: Wait = %d token %d", n, p.Token(0))
	}
	bufs = append(bufs, make([]byte, 64), make([]byte, 64))
	if k, _ := rb.ReadNow(cb, bufs, 0, -1); k != 2 {
		t.Fatalf("ReadNow drained %d, want 2", k)
	}
	if k, err := rb.ReadNow(cb, bufs, 0, -1); k != 0 || err != nil {
		t.Fatalf("ReadNow on an empty socket = %d, %v; want 0, nil", k, err)
	}
	if err := p.Remove(cb); err != nil {
		t.Fatal(err)
	}
	_, _ = src.WriteToUDPAddrPort([]byte("y"), apOf(b)) // removed: not reported
	_, _ = src.WriteToUDPAddrPort([]byte("z"), apOf(a))
	if n, _ := p.Wait(); n != 1 || p.Token(0) != 1<<40|7 {
		t.Fatalf("Wait = %d token %d; want only a (64-bit token intact)", n, p.Token(0))
	}
	if _, err := rb.ReadNow(ca, bufs, 0, -1); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { _, err := p.Wait(); done <- err }()
	time.Sleep(20 * time.Millisecond) // let Wait block (either order is correct)
	p.Close()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Wait on a closed poller: no error")
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Wait did not end when the poller closed")
	}
	a.Close()
	if _, err := rb.ReadNow(ca, bufs, 0, -1); err == nil {
		t.Fatal("ReadNow on a closed socket: no error")
	}
}

// One Write through the ring sends from several sockets; each datagram
// leaves from its own socket, to its destination, whole; a closed socket
// fails only its own send; nothing is allocated.
func TestRing(t *testing.T) {
	r, err := NewRing()
	if err != nil {
		t.Skipf("no io_uring here: %v", err)
	}
	defer r.Close()
	dst := listen(t, "udp4", "127.0.0.1:0")
	var socks []*net.UDPConn
	var outs []RingOut
	for i := 0; i < 5; i++ {
		s := listen(t, "udp4", "127.0.0.1:0")
		socks = append(socks, s)
		outs = append(outs, RingOut{C: NewConn(s), Out: Out{B: payload(i, 50+i), To: apOf(dst)}})
	}
	socks[3].Close() // its send fails, alone
	res, err := r.Write(outs)
	if err != nil {
		t.Fatal(err)
	}
	for i, n := range res {
		if i == 3 {
			if n >= 0 {
				t.Errorf("send from a closed socket: %d", n)
			}
			continue
		}
		if int(n) != 50+i {
			t.Errorf("send %d: res %d, want %d", i, n, 50+i)
		}
	}
	got := map[netip.AddrPort][]byte{}
	buf := make([]byte, 256)
	dst.SetReadDeadline(time.Now().Add(2 * time.Second))
	for len(got) < 4 {
		n, from, err := dst.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatal(err)
		}
		got[from] = bytes.Clone(buf[:n])
	}
	for i, s := range socks {
		if i == 3 {
			continue
		}
		if !bytes.Equal(got[apOf(s)], payload(i, 50+i)) {
			t.Errorf("from socket %d: %q", i, got[apOf(s)])
		}
	}
	live := append(outs[:3:3], outs[4])
	allocs := testing.AllocsPerRun(50, func() {
		if _, err := r.Write(live); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < len(live); i++ {
			if _, _, err := dst.ReadFromUDPAddrPort(buf); err != nil {
				t.Fatal(err)
			}
		}
	})
	if allocs != 0 {
		t.Fatalf("%v allocations per ring write", allocs)
	}
}

// BenchmarkManySockets sends 32 datagrams, each from its own socket (a
// relay with many allocations): one sendto each (the reference) against
// one io_uring submission for all.
func BenchmarkManySockets(b *testing.B) {
	for _, mode := range []string{"sendto", "ring"} {
		b.Run(mode, func(b *testing.B) {
			r, err := NewRing()
			if err != nil {
				b.Skip(err)
			}
			defer r.Close()
			dst := listen(b, "udp4", "127.0.0.1:0")
			_ = dst.SetReadBuffer(8 << 20)
			var socks []*net.UDPConn
			var outs []RingOut
			for i := 0; i < MaxBatch; i++ {
				s := listen(b, "udp4", "127.0.0.1:0")
				socks = append(socks, s)
				outs = append(outs, RingOut{C: NewConn(s), Out: Out{B: payload(i, 100), To: apOf(dst)}})
			}
			stop := drain(dst)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if mode == "ring" {
					_, _ = r.Write(outs)
					continue
				}
				for j, o := range outs {
					_, _ = socks[j].WriteToUDPAddrPort(o.Out.B, o.Out.To)
				}
			}
			b.StopTimer()
			stop()
		})
	}
}

// A ring given up on (the kernel stopped completing sends) or closed
// refuses every later Write with ErrRingBroken, touching nothing.
func TestRingRetired(t *testing.T) {
	for _, how := range []string{"abandoned", "closed"} {
		r, err := NewRing()
		if err != nil {
			t.Skipf("no io_uring here: %v", err)
		}
		if how == "abandoned" {
			r.abandon(syscall.EAGAIN)
		} else {
			r.Close()
		}
		s := listen(t, "udp4", "127.0.0.1:0")
		res, err := r.Write([]RingOut{{C: NewConn(s), Out: Out{B: []byte("x"), To: apOf(s)}}})
		if err != ErrRingBroken || len(res) != 1 || res[0] >= 0 {
			t.Errorf("%s ring: Write = %v, %v; want a failed send and ErrRingBroken", how, res, err)
		}
		if err := r.Close(); err != nil {
			t.Errorf("%s ring: Close = %v", how, err)
		}
	}
}
