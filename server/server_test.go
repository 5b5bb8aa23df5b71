package server

import (
	"bufio"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pion/stun/v4"

	"github.com/stund/stund/internal/testutil"
)

// ioTimeout is a safety net for reads in tests (never an assertion about
// speed): loopback answers in microseconds.
const ioTimeout = 3 * time.Second

func startServer(t *testing.T, cfg Config) *Server {
	t.Helper()
	if !cfg.PrimaryIP.IsValid() {
		cfg.PrimaryIP = netip.MustParseAddr("127.0.0.1")
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func twoIPConfig() Config {
	return Config{
		PrimaryIP:   netip.MustParseAddr("127.0.0.1"),
		AlternateIP: netip.MustParseAddr("127.0.0.2"),
	}
}

func udpSocket(t *testing.T) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return c
}

// exchange sends req to dst from c and returns the reply and its real
// source address.
func exchange(t *testing.T, c *net.UDPConn, dst netip.AddrPort, setters ...stun.Setter) (*stun.Message, netip.AddrPort) {
	t.Helper()
	req := stun.MustBuild(append([]stun.Setter{stun.TransactionID, stun.BindingRequest}, setters...)...)
	if _, err := c.WriteToUDPAddrPort(req.Raw, dst); err != nil {
		t.Fatal(err)
	}
	return readReply(t, c, req.TransactionID)
}

func readReply(t *testing.T, c *net.UDPConn, id [stun.TransactionIDSize]byte) (*stun.Message, netip.AddrPort) {
	t.Helper()
	buf := make([]byte, 1500)
	_ = c.SetReadDeadline(time.Now().Add(ioTimeout))
	for i := 0; i < 10; i++ {
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			t.Fatalf("no reply: %v", err)
		}
		m := &stun.Message{Raw: append([]byte(nil), buf[:n]...)}
		if err := m.Decode(); err != nil {
			t.Fatalf("undecodable reply: %v", err)
		}
		if m.TransactionID == id {
			return m, netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		}
	}
	t.Fatal("no reply with our transaction ID")
	return nil, netip.AddrPort{}
}

func xorMapped(t *testing.T, m *stun.Message) netip.AddrPort {
	t.Helper()
	var x stun.XORMappedAddress
	if err := x.GetFrom(m); err != nil {
		t.Fatalf("XOR-MAPPED-ADDRESS: %v", err)
	}
	a, _ := netip.AddrFromSlice(x.IP)
	return netip.AddrPortFrom(a.Unmap(), uint16(x.Port))
}

func addrAttr(t *testing.T, m *stun.Message, typ stun.AttrType) (netip.AddrPort, bool) {
	t.Helper()
	var a stun.MappedAddress
	if err := a.GetFromAs(m, typ); err != nil {
		return netip.AddrPort{}, false
	}
	ip, _ := netip.AddrFromSlice(a.IP)
	return netip.AddrPortFrom(ip.Unmap(), uint16(a.Port)), true
}

// TestRFC5780SocketTable checks, over real sockets, that each
// CHANGE-REQUEST value is answered from the socket it names: the reply's
// real source, RESPONSE-ORIGIN and OTHER-ADDRESS (RFC 5780 §6.1, §7.2-7.4).
func TestRFC5780SocketTable(t *testing.T) {
	s := startServer(t, twoIPConfig())
	g := s.Grid()
	for _, tc := range []struct {
		name       string
		ip, port   bool
		wantSource netip.AddrPort
	}{
		{"no change", false, false, g[0][0]},
		{"change port", false, true, g[0][1]},
		{"change ip", true, false, g[1][0]},
		{"change both", true, true, g[1][1]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := udpSocket(t)
			local := c.LocalAddr().(*net.UDPAddr).AddrPort()
			m, from := exchange(t, c, g[0][0], changeReq(changeFlags(tc.ip, tc.port)))
			if m.Type != stun.BindingSuccess {
				t.Fatalf("reply type %v, error %d", m.Type, errorCode(m))
			}
			if from != tc.wantSource {
				t.Errorf("reply came from %v, want %v", from, tc.wantSource)
			}
			if ro, ok := addrAttr(t, m, stun.AttrResponseOrigin); !ok || ro != from {
				t.Errorf("RESPONSE-ORIGIN %v (present %v), want the real source %v", ro, ok, from)
			}
			if oa, ok := addrAttr(t, m, stun.AttrOtherAddress); !ok || oa != g[1][1] {
				t.Errorf("OTHER-ADDRESS %v (present %v), want %v", oa, ok, g[1][1])
			}
			if got := xorMapped(t, m); got != netip.AddrPortFrom(local.Addr().Unmap(), local.Port()) {
				t.Errorf("XOR-MAPPED-ADDRESS %v, want %v", got, local)
			}
		})
	}
}

// TestResponsePortOverSockets: RFC 5780 §7.5, the reply goes to the
// request's source IP on the named port, here another socket of ours.
func TestResponsePortOverSockets(t *testing.T) {
	s := startServer(t, twoIPConfig())
	a, b := udpSocket(t), udpSocket(t)
	bp := b.LocalAddr().(*net.UDPAddr).AddrPort().Port()
	req := stun.MustBuild(stun.TransactionID, stun.BindingRequest, respPort(bp))
	if _, err := a.WriteToUDPAddrPort(req.Raw, s.Grid()[0][0]); err != nil {
		t.Fatal(err)
	}
	m, from := readReply(t, b, req.TransactionID)
	if from != s.Grid()[0][0] {
		t.Errorf("reply from %v, want %v", from, s.Grid()[0][0])
	}
	if got, want := xorMapped(t, m), a.LocalAddr().(*net.UDPAddr).AddrPort(); got.Port() != want.Port() {
		t.Errorf("XOR-MAPPED-ADDRESS %v names the requesting socket %v", got, want)
	}
}

// TestSingleIPMode: RFC 5780 §6, no OTHER-ADDRESS and 420 for a change of IP.
func TestSingleIPMode(t *testing.T) {
	for _, ip := range []string{"127.0.0.1", "::1"} {
		t.Run(ip, func(t *testing.T) {
			s := startServer(t, Config{PrimaryIP: netip.MustParseAddr(ip)})
			network := "udp4"
			if netip.MustParseAddr(ip).Is6() {
				network = "udp6"
			}
			c, err := net.ListenUDP(network, &net.UDPAddr{IP: net.ParseIP(ip)})
			if err != nil {
				testutil.SkipUnlessRequired(t, "no %s here: %v", ip, err)
			}
			defer c.Close()
			m, _ := exchange(t, c, s.Grid()[0][0])
			if _, ok := addrAttr(t, m, stun.AttrOtherAddress); ok {
				t.Error("single-IP reply carries OTHER-ADDRESS")
			}
			if got := xorMapped(t, m); got != c.LocalAddr().(*net.UDPAddr).AddrPort() {
				t.Errorf("XOR-MAPPED-ADDRESS %v, want %v", got, c.LocalAddr())
			}
			m, _ = exchange(t, c, s.Grid()[0][0], changeReq(changeFlags(true, false)))
			if m.Type.Class != stun.ClassErrorResponse || errorCode(m) != 420 {
				t.Errorf("change-IP in single-IP mode: %v code %d, want error 420", m.Type, errorCode(m))
			}
		})
	}
}

// TestBindingOverTCP: Binding on the TCP listener answers with the TCP
// source as XOR-MAPPED-ADDRESS, framed on the stream (RFC 8489 §6.2.2),
// also when two requests arrive in one segment.
func TestBindingOverTCP(t *testing.T) {
	s := startServer(t, twoIPConfig())
	conn, err := net.DialTimeout("tcp4", s.TCPAddrs()[0].String(), ioTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	r1 := stun.MustBuild(stun.TransactionID, stun.BindingRequest)
	r2 := stun.MustBuild(stun.TransactionID, stun.BindingRequest, stun.Fingerprint)
	if _, err := conn.Write(append(append([]byte{}, r1.Raw...), r2.Raw...)); err != nil {
		t.Fatal(err)
	}
	_ = conn.SetReadDeadline(time.Now().Add(ioTimeout))
	rd := bufio.NewReader(conn)
	for _, want := range []*stun.Message{r1, r2} {
		hdr := make([]byte, 20)
		if _, err := ioReadFull(rd, hdr); err != nil {
			t.Fatal(err)
		}
		body := make([]byte, binary.BigEndian.Uint16(hdr[2:4]))
		if _, err := ioReadFull(rd, body); err != nil {
			t.Fatal(err)
		}
		m := &stun.Message{Raw: append(hdr, body...)}
		if err := m.Decode(); err != nil {
			t.Fatal(err)
		}
		if m.TransactionID != want.TransactionID {
			t.Fatalf("replies out of order")
		}
		local := conn.LocalAddr().(*net.TCPAddr).AddrPort()
		if got := xorMapped(t, m); got != local {
			t.Errorf("XOR-MAPPED-ADDRESS %v, want %v", got, local)
		}
	}
}

func ioReadFull(r *bufio.Reader, b []byte) (int, error) {
	n := 0
	for n < len(b) {
		m, err := r.Read(b[n:])
		n += m
		if err != nil {
			return n, err
		}
	}
	return n, nil
}

// TestJunkIsDroppedAndCounted: what is neither STUN nor ChannelData never
// reaches pion, is counted, and the socket goes on answering.
func TestJunkIsDroppedAndCounted(t *testing.T) {
	s := startServer(t, twoIPConfig())
	c := udpSocket(t)
	junk := [][]byte{
		{},
		{0xff},
		[]byte("GET / HTTP/1.1\r\n\r\n"),
		make([]byte, 32),               // the packet that crashed turn/v3
		{0x80, 0, 0, 0, 1, 2, 3, 4},    // neither STUN nor ChannelData
		{0x40, 0x00, 0x00, 0x10, 1, 2}, // ChannelData shorter than it says
		{0x00, 0x01, 0x00, 0x08, 0x21, 0x12, 0xA4, 0x42}, // truncated header
	}
	for _, j := range junk {
		if _, err := c.WriteToUDPAddrPort(j, s.Grid()[0][0]); err != nil {
			t.Fatal(err)
		}
	}
	// A Binding after the junk is still answered: the read loop lived.
	m, _ := exchange(t, c, s.Grid()[0][0])
	if m.Type != stun.BindingSuccess {
		t.Fatalf("after junk: %v", m.Type)
	}
	st := s.Demux()
	bs := s.binder.Stats()
	if got := st.Junk + bs.Malformed; got != uint64(len(junk)) {
		t.Errorf("%d of %d junk datagrams counted: demux %+v binder %+v", got, len(junk), st, bs)
	}
}

// TestNewRefusesBadConfig: errors name the setting and nothing is bound.
func TestNewRefusesBadConfig(t *testing.T) {
	for _, tc := range []struct {
		cfg  Config
		want string
	}{
		{Config{}, "primary-ip"},
		{Config{PrimaryIP: netip.MustParseAddr("0.0.0.0")}, "primary-ip"},
		{Config{PrimaryIP: netip.MustParseAddr("127.0.0.1"), AlternateIP: netip.MustParseAddr("::1")}, "alternate-ip"},
		{Config{PrimaryIP: netip.MustParseAddr("127.0.0.1"), Port: 3478, AltPort: 3478}, "alt-port"},
		{Config{PrimaryIP: netip.MustParseAddr("127.0.0.1"), RelayPortMin: 5000, RelayPortMax: 4000}, "relay-ports"},
	} {
		_, err := New(tc.cfg)
		if err == nil || !contains(err.Error(), tc.want) {
			t.Errorf("New(%+v) = %v, want an error naming %s", tc.cfg, err, tc.want)
		}
	}
	// A port already taken: New fails and leaves nothing bound.
	s := startServer(t, twoIPConfig())
	p := int(s.Grid()[0][0].Port())
	_, err := New(Config{PrimaryIP: netip.MustParseAddr("127.0.0.1"), Port: p, AltPort: p + 1})
	if err == nil {
		t.Fatal("second server bound the same port")
	}
	var opErr *net.OpError
	if !errors.As(err, &opErr) && !contains(err.Error(), "bind") {
		t.Errorf("error %v does not say what failed to bind", err)
	}
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }

// changeFlags is the CHANGE-REQUEST value (RFC 5780 §7.2): 0x4 change IP,
// 0x2 change port.
func changeFlags(ip, port bool) uint32 {
	var v uint32
	if ip {
		v |= 0x4
	}
	if port {
		v |= 0x2
	}
	return v
}

// changeReq is CHANGE-REQUEST with flags (RFC 5780 §7.2).
func changeReq(flags uint32) stun.RawAttribute {
	return stun.RawAttribute{Type: stun.AttrChangeRequest, Value: binary.BigEndian.AppendUint32(nil, flags)}
}

// respPort is RESPONSE-PORT p (RFC 5780 §7.5).
func respPort(p uint16) stun.RawAttribute {
	return stun.RawAttribute{Type: stun.AttrResponsePort, Value: []byte{byte(p >> 8), byte(p), 0, 0}}
}

// TestFixedPortsAreExclusive: with fixed ports the grid binds several
// SO_REUSEPORT sockets per address; a second server of the same user must
// still fail to bind rather than join the group and split the traffic.
func TestFixedPortsAreExclusive(t *testing.T) {
	var first *Server
	for try := 0; try < 10 && first == nil; try++ {
		probe := udpSocket(t)
		p := int(probe.LocalAddr().(*net.UDPAddr).Port)
		_ = probe.Close()
		if p >= 65535 {
			continue
		}
		cfg := twoIPConfig()
		cfg.Port, cfg.AltPort, cfg.DisableTCP = p, p+1, true
		if s, err := New(cfg); err == nil {
			first = s
			t.Cleanup(func() { _ = s.Close() })
		}
	}
	if first == nil {
		t.Skip("no free fixed port pair found")
	}
	// UDP only, so that a TCP listener's own conflict cannot be what
	// refuses the second server.
	cfg := twoIPConfig()
	cfg.Port, cfg.AltPort, cfg.DisableTCP = int(first.Grid()[0][0].Port()), int(first.Grid()[0][1].Port()), true
	if s, err := New(cfg); err == nil {
		_ = s.Close()
		t.Fatal("a second server bound the same fixed ports")
	}
	// The first one still answers.
	c := udpSocket(t)
	if m, _ := exchange(t, c, first.Grid()[0][0]); m.Type != stun.BindingSuccess {
		t.Fatalf("first server: %v", m.Type)
	}
}
