package server

import (
	"encoding/binary"
	"errors"
	"github.com/stund/stund/server/binding"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/pion/stun/v4"

	"github.com/stund/stund/internal/stunwire"
)

// Fuzz targets for the bytes stund reads from the network: the UDP
// demultiplexer (and, behind it, pion's TURN parser over a real socket)
// and the TCP/TLS framing. Each asserts no panic plus what the demux
// promises: only STUN and ChannelData reach pion, whole frames only.

// fakePacketConn hands out one datagram, then io.EOF; writes are
// recorded.
type fakePacketConn struct {
	in     []byte
	from   net.Addr
	done   bool
	writes int
}

func (c *fakePacketConn) ReadFrom(p []byte) (int, net.Addr, error) {
	if c.done {
		return 0, nil, io.EOF
	}
	c.done = true
	return copy(p, c.in), c.from, nil
}
func (c *fakePacketConn) WriteTo(p []byte, _ net.Addr) (int, error) { c.writes++; return len(p), nil }
func (c *fakePacketConn) Close() error                              { return nil }
func (c *fakePacketConn) LocalAddr() net.Addr {
	return &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 3478}
}
func (c *fakePacketConn) SetDeadline(time.Time) error      { return nil }
func (c *fakePacketConn) SetReadDeadline(time.Time) error  { return nil }
func (c *fakePacketConn) SetWriteDeadline(time.Time) error { return nil }

// fuzzSeeds are inputs that crashed STUN/TURN servers before, plus the
// ordinary messages, so every run starts from them.
func fuzzSeeds() [][]byte {
	bind := stun.MustBuild(stun.TransactionID, stun.BindingRequest)
	alloc := stun.MustBuild(stun.TransactionID, stun.NewType(stun.MethodAllocate, stun.ClassRequest),
		stun.RawAttribute{Type: stun.AttrRequestedTransport, Value: []byte{17, 0, 0, 0}})
	return [][]byte{
		bind.Raw,
		alloc.Raw,
		zeroLengthPeerSend(),     // GHSA-34rh-wp3j-6cxc
		make([]byte, 32),         // 32 zero bytes: crashed turn/v3 + stun/v2
		{0x40, 0x00, 0xff, 0xff}, // ChannelData claiming 64 KiB
		{0x40, 0x00, 0x00, 0x00}, // empty ChannelData
		{0x00, 0x01, 0x00, 0x04, 0x21, 0x12, 0xa4, 0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x20, 0x00, 0x00}, // XOR-MAPPED-ADDRESS of length 0
		[]byte("GET / HTTP/1.1\r\n\r\n"),
	}
}

// streamBoundarySeeds are streams of frames at the 16-bit length
// boundaries (a frame of 65535, 65536 and 65552 bytes, where a 16-bit
// frame size wraps), STUN lengths that are not a multiple of 4, ChannelData
// of 0 to 5 bytes (whose padded frames are shorter than a STUN header), and
// RFC 6062 control flows (Connect, ConnectionBind) between them.
func streamBoundarySeeds() [][]byte {
	stunLen := func(length int) []byte { // a Send indication announcing length, whole
		m := make([]byte, 20+length)
		binary.BigEndian.PutUint16(m[0:], 0x0016)
		binary.BigEndian.PutUint16(m[2:], uint16(length))
		binary.BigEndian.PutUint32(m[4:], 0x2112A442)
		return m
	}
	chanData := func(n int) []byte {
		m := make([]byte, 4+(n+3)&^3)
		binary.BigEndian.PutUint16(m[0:], 0x4001)
		binary.BigEndian.PutUint16(m[2:], uint16(n))
		return m
	}
	connect := stun.MustBuild(stun.TransactionID, stun.NewType(stun.MethodConnect, stun.ClassRequest),
		stun.RawAttribute{Type: stun.AttrXORPeerAddress, Value: []byte{0, 1, 0x21, 0x12, 0x5e, 0x12, 0xa4, 0x43}}).Raw
	bindConn := stun.MustBuild(stun.TransactionID, stun.NewType(stun.MethodConnectionBind, stun.ClassRequest),
		stun.RawAttribute{Type: stun.AttrConnectionID, Value: []byte{0, 0, 0, 1}}).Raw
	bind := stun.MustBuild(stun.TransactionID, stun.BindingRequest).Raw
	join := func(parts ...[]byte) []byte {
		var out []byte
		for _, p := range parts {
			out = append(out, p...)
		}
		return out
	}
	var seeds [][]byte
	for _, n := range []int{65515, 65516, 65532, maxStreamSTUN - 20, maxStreamSTUN - 19} {
		seeds = append(seeds, join(stunLen(n), bind))
	}
	for _, n := range []int{65531, 65532, 65535} {
		seeds = append(seeds, join(chanData(n), bind))
	}
	bad := stunLen(8)
	binary.BigEndian.PutUint16(bad[2:], 10) // not a multiple of 4
	seeds = append(seeds, join(bind, bad, bind))
	seeds = append(seeds, join(chanData(0), chanData(1), chanData(2), chanData(3), chanData(4), chanData(5), bind))
	seeds = append(seeds, join(connect, chanData(4), bindConn, []byte("raw peer bytes after ConnectionBind")))
	return seeds
}

// zeroLengthPeerSend is a Send indication whose XOR-PEER-ADDRESS has
// length 0: pion/stun before v0.x panicked decoding it
// (GHSA-34rh-wp3j-6cxc).
func zeroLengthPeerSend() []byte {
	m := stun.MustBuild(stun.TransactionID, stun.NewType(stun.MethodSend, stun.ClassIndication),
		stun.RawAttribute{Type: stun.AttrXORPeerAddress, Value: nil},
		stun.RawAttribute{Type: stun.AttrData, Value: []byte("x")})
	return m.Raw
}

var (
	fuzzSrvOnce sync.Once
	fuzzSrv     *Server
	fuzzSrvErr  error
)

// fuzzServer is one real server shared by the fuzz iterations of this
// process, with the rate limits off so that liveness checks are answered.
func fuzzServer(t testing.TB) *Server {
	fuzzSrvOnce.Do(func() {
		fuzzSrv, fuzzSrvErr = New(Config{
			PrimaryIP:   netip.MustParseAddr("127.0.0.1"),
			AlternateIP: netip.MustParseAddr("127.0.0.2"),
			Users:       map[string]string{"alice": "alice-pw"},
			AllowPeers:  []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
			UnauthRate:  -1, AllocRate: -1,
		})
	})
	if fuzzSrvErr != nil {
		t.Fatal(fuzzSrvErr)
	}
	return fuzzSrv
}

// FuzzDemuxUDP: stunPacketConn.ReadFrom on any datagram answers it,
// drops it, or hands pion a STUN or ChannelData message, never anything
// else; and the same bytes sent to the real server over UDP leave it
// answering the next Binding request (a panic in pion's read loop would
// kill the process).
func FuzzDemuxUDP(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add(s)
	}
	s := fuzzServer(f)
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { c.Close() })
	dst := s.Grid()[0][0]
	buf := make([]byte, 1600)
	f.Fuzz(func(t *testing.T, pkt []byte) {
		if len(pkt) > 1500 {
			pkt = pkt[:1500]
		}
		fake := &fakePacketConn{in: pkt, from: &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 9}}
		pc := &stunPacketConn{PacketConn: fake, deps: s.udp, at: endpoint{}, local: dst}
		n, _, err := pc.ReadFrom(buf)
		if err == nil {
			got := buf[:n]
			if k := stunwire.Classify(got); k != stunwire.KindSTUN && k != stunwire.KindChannelData {
				t.Fatalf("demux passed a %v datagram to pion: % x", k, got)
			}
			if binding.IsBinding(got) {
				t.Fatal("demux passed a Binding message to pion")
			}
		} else if !errors.Is(err, io.EOF) {
			t.Fatal(err)
		}
		if fake.writes > 1 {
			t.Fatalf("%d replies to one datagram", fake.writes)
		}

		// The real path, pion included.
		if _, err := c.WriteToUDPAddrPort(pkt, dst); err != nil {
			t.Fatal(err)
		}
		req := stun.MustBuild(stun.TransactionID, stun.BindingRequest)
		if _, err := c.WriteToUDPAddrPort(req.Raw, dst); err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(ioTimeout))
		for i := 0; ; i++ {
			n, _, err := c.ReadFromUDPAddrPort(buf)
			if err != nil || i > 20 {
				t.Fatalf("no Binding answer after a fuzzed datagram: %v", err)
			}
			if h, err := stunwire.ParseHeader(buf[:n]); err == nil && [12]byte(h.ID[4:]) == [12]byte(req.TransactionID) {
				break
			}
		}
	})
}

// fakeStreamConn reads the input in chunks whose sizes come from the
// input's first bytes, and discards writes.
type fakeStreamConn struct {
	in     []byte
	chunks []byte
	writes int
}

func (c *fakeStreamConn) Read(p []byte) (int, error) {
	if len(c.in) == 0 {
		return 0, io.EOF
	}
	n := len(c.in)
	if len(c.chunks) > 0 {
		n = int(c.chunks[0]) + 1
		c.chunks = c.chunks[1:]
	}
	n = min(n, len(p), len(c.in))
	copy(p, c.in[:n])
	c.in = c.in[n:]
	return n, nil
}
func (c *fakeStreamConn) Write(p []byte) (int, error) { c.writes++; return len(p), nil }
func (c *fakeStreamConn) Close() error                { return nil }
func (c *fakeStreamConn) LocalAddr() net.Addr {
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 3478}
}
func (c *fakeStreamConn) RemoteAddr() net.Addr {
	return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 9}
}
func (c *fakeStreamConn) SetDeadline(time.Time) error      { return nil }
func (c *fakeStreamConn) SetReadDeadline(time.Time) error  { return nil }
func (c *fakeStreamConn) SetWriteDeadline(time.Time) error { return nil }

// FuzzDemuxStream: streamConn.Read, over any byte stream cut into any
// reads, passes pion only whole STUN frames no larger than maxStreamSTUN,
// never Binding and never ChannelData (the data plane's), each in one Read,
// and stops at the first unframeable byte or the end.
func FuzzDemuxStream(f *testing.F) {
	for _, s := range fuzzSeeds() {
		f.Add([]byte{3, 200, 0}, append(append([]byte{}, s...), s...))
	}
	for _, s := range streamBoundarySeeds() {
		f.Add([]byte{1, 7, 255}, s)
	}
	s := fuzzServer(f)
	f.Fuzz(func(t *testing.T, chunks, stream []byte) {
		if len(stream) > 1<<17 {
			stream = stream[:1<<17]
		}
		fake := &fakeStreamConn{in: stream, chunks: chunks}
		sc := newStreamConn(fake, netip.MustParseAddrPort("127.0.0.1:3478"), s.stream, endpoint{}, trTCP)
		defer sc.Close()
		p := make([]byte, pionInboundMTU) // pion's read buffer size
		for i := 0; i <= len(stream)+1; i++ {
			n, err := sc.Read(p)
			if err != nil {
				break
			}
			// Each Read is exactly one whole frame, none of them Binding
			// or ChannelData.
			got := p[:n]
			fl, kind, ferr := stunwire.FrameLen(got)
			if ferr != nil || fl != n || n > maxStreamSTUN {
				t.Fatalf("pion got a partial, oversized or unframeable frame: %v len %d/%d (% x)", ferr, fl, n, got[:min(n, 32)])
			}
			if kind == stunwire.KindChannelData || binding.IsBinding(got) {
				t.Fatalf("pion got a %v frame", kind)
			}
		}
	})
}
