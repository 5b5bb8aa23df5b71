package loadgen

import (
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/net/ipv4"
)

// Batch sizes and timeouts of the packet engine.
const (
	// batch is how many datagrams one recvmmsg/sendmmsg moves: enough to
	// amortise the syscall, small enough that 64 buffers of 2 KiB stay
	// in cache.
	batch = 64
	// bufSize holds the largest packet we send (1200 bytes of payload
	// plus STUN framing) with room to spare.
	bufSize = 2048
	// stallTimeout: with no reply for this long the packets in flight
	// are presumed lost and the window is refilled. Loopback round
	// trips are tens of microseconds; 50 ms is a loss, not a delay.
	stallTimeout = 50 * time.Millisecond
	// drainTimeout is how long a flow keeps reading after it stopped
	// sending, so late replies are not counted as lost.
	drainTimeout = 100 * time.Millisecond
	// maxSamples bounds latency samples per flow.
	maxSamples = 1 << 15
)

// epoch is the zero of the timestamps written into packets.
var epoch = time.Now()

func nowNanos() int64 { return int64(time.Since(epoch)) }

// Packet describes one workload's request and how to read its reply.
type Packet struct {
	// Template is copied into every send buffer; the engine writes an
	// 8-byte send timestamp at TSOffset and a 4-byte sequence number at
	// SeqOffset (-1: none) in each copy.
	Template  []byte
	TSOffset  int
	SeqOffset int
	// Reply returns the timestamp carried by a reply, ok=false for a
	// datagram that is not a reply of this workload.
	Reply func(pkt []byte) (ts int64, ok bool)
}

// Flow is one client socket (connected to its target) and its packet.
type Flow struct {
	Conn   *net.UDPConn
	Packet Packet
}

// Result is what a run measured.
type Result struct {
	Sent, Recv uint64
	Duration   time.Duration
	Latency    []time.Duration // sorted samples
}

// Rate is completed round trips per second.
func (r Result) Rate() float64 {
	if r.Duration <= 0 {
		return 0
	}
	return float64(r.Recv) / r.Duration.Seconds()
}

// Loss is the fraction of requests that got no reply.
func (r Result) Loss() float64 {
	if r.Sent == 0 || r.Recv >= r.Sent {
		return 0
	}
	return float64(r.Sent-r.Recv) / float64(r.Sent)
}

// Pct returns the p-th percentile (0..100) of the latency samples.
func (r Result) Pct(p float64) time.Duration {
	if len(r.Latency) == 0 {
		return 0
	}
	i := int(p / 100 * float64(len(r.Latency)-1))
	return r.Latency[i]
}

// Run drives every flow for d with up to window requests in flight per
// flow, closed loop: each reply releases the next request. sampleEvery
// keeps one latency sample per that many replies (1: all).
func Run(flows []Flow, window int, d time.Duration, sampleEvery int) Result {
	if window > batch {
		window = batch
	}
	if sampleEvery < 1 {
		sampleEvery = 1
	}
	var (
		wg         sync.WaitGroup
		sent, recv atomic.Uint64
		mu         sync.Mutex
		lat        []time.Duration
	)
	start := time.Now()
	end := start.Add(d)
	for _, f := range flows {
		wg.Add(1)
		go func(f Flow) {
			defer wg.Done()
			s, r, l := runFlow(f, window, end, sampleEvery)
			sent.Add(s)
			recv.Add(r)
			mu.Lock()
			lat = append(lat, l...)
			mu.Unlock()
		}(f)
	}
	wg.Wait()
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	return Result{Sent: sent.Load(), Recv: recv.Load(), Duration: d, Latency: lat}
}

func runFlow(f Flow, window int, end time.Time, sampleEvery int) (sent, recv uint64, lat []time.Duration) {
	pc := ipv4.NewPacketConn(f.Conn)
	in := make([]ipv4.Message, batch)
	out := make([]ipv4.Message, batch)
	for i := range in {
		in[i].Buffers = [][]byte{make([]byte, bufSize)}
		b := make([]byte, len(f.Packet.Template))
		copy(b, f.Packet.Template)
		out[i].Buffers = [][]byte{b}
	}
	lat = make([]time.Duration, 0, 1024)
	var seq uint32
	inflight := 0
	send := func(k int) {
		if k <= 0 {
			return
		}
		ts := nowNanos()
		for i := 0; i < k; i++ {
			b := out[i].Buffers[0]
			binary.BigEndian.PutUint64(b[f.Packet.TSOffset:], uint64(ts))
			if f.Packet.SeqOffset >= 0 {
				seq++
				binary.BigEndian.PutUint32(b[f.Packet.SeqOffset:], seq)
			}
		}
		for off := 0; off < k; {
			n, err := pc.WriteBatch(out[off:k], 0)
			if err != nil || n <= 0 {
				break // ECONNREFUSED (server gone) or a full buffer: counted as loss
			}
			off += n
		}
		sent += uint64(k)
		inflight += k
	}
	lastReply := time.Now()
	send(window)
	var nrecv int
	for {
		now := time.Now()
		if !now.Before(end) {
			break
		}
		_ = f.Conn.SetReadDeadline(now.Add(stallTimeout / 5))
		n, err := pc.ReadBatch(in, 0)
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				if time.Since(lastReply) > stallTimeout && inflight > 0 {
					inflight = 0 // presumed lost
					send(window)
					lastReply = time.Now()
				}
				continue
			}
			if isRefused(err) {
				time.Sleep(time.Millisecond)
				continue
			}
			break
		}
		got := 0
		tnow := nowNanos()
		for i := 0; i < n; i++ {
			ts, ok := f.Packet.Reply(in[i].Buffers[0][:in[i].N])
			if !ok {
				continue
			}
			got++
			nrecv++
			if nrecv%sampleEvery == 0 && len(lat) < maxSamples {
				lat = append(lat, time.Duration(tnow-ts))
			}
		}
		if got > 0 {
			lastReply = time.Now()
			recv += uint64(got)
			inflight -= got
			if inflight < 0 {
				inflight = 0
			}
			send(window - inflight)
		}
	}
	// Drain: late replies are replies, not losses.
	for {
		_ = f.Conn.SetReadDeadline(time.Now().Add(drainTimeout))
		n, err := pc.ReadBatch(in, 0)
		if err != nil {
			break
		}
		for i := 0; i < n; i++ {
			if _, ok := f.Packet.Reply(in[i].Buffers[0][:in[i].N]); ok {
				recv++
			}
		}
	}
	_ = f.Conn.SetReadDeadline(time.Time{})
	return sent, recv, lat
}

func isRefused(err error) bool { return errors.Is(err, syscall.ECONNREFUSED) }

// Dial opens a UDP socket on 127.0.0.1 connected to target.
func Dial(target netip.AddrPort) (*net.UDPConn, error) {
	c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(target))
	if err != nil {
		return nil, err
	}
	_ = c.SetReadBuffer(1 << 20)
	_ = c.SetWriteBuffer(1 << 20)
	return c, nil
}

// EchoServer reflects every datagram to its sender: the trivial server
// whose rate is the load generator's own ceiling. Peer is the same thing
// playing the TURN peer. Close stops it.
type EchoServer struct {
	conn *net.UDPConn
	done chan struct{}
}

// NewEcho starts an echo on 127.0.0.1 with workers goroutines reading
// the one socket.
func NewEcho(workers int) (*EchoServer, error) {
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	_ = c.SetReadBuffer(4 << 20)
	_ = c.SetWriteBuffer(4 << 20)
	e := &EchoServer{conn: c, done: make(chan struct{})}
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pc := ipv4.NewPacketConn(c)
			ms := make([]ipv4.Message, batch)
			for i := range ms {
				ms[i].Buffers = [][]byte{make([]byte, bufSize)}
			}
			for {
				n, err := pc.ReadBatch(ms, 0)
				if err != nil {
					if errors.Is(err, net.ErrClosed) {
						return
					}
					continue
				}
				for i := 0; i < n; i++ {
					ms[i].Buffers[0] = ms[i].Buffers[0][:ms[i].N]
				}
				for off := 0; off < n; {
					k, err := pc.WriteBatch(ms[off:n], 0)
					if err != nil || k <= 0 {
						break
					}
					off += k
				}
				for i := 0; i < n; i++ {
					ms[i].Buffers[0] = ms[i].Buffers[0][:bufSize]
				}
			}
		}()
	}
	go func() { wg.Wait(); close(e.done) }()
	return e, nil
}

// Addr is where the echo listens.
func (e *EchoServer) Addr() netip.AddrPort { return e.conn.LocalAddr().(*net.UDPAddr).AddrPort() }

// Close stops the echo and waits for its goroutines.
func (e *EchoServer) Close() {
	_ = e.conn.Close()
	<-e.done
}
