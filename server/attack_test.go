package server

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/pion/stun/v4"
	"github.com/pion/turn/v5"
	"github.com/stund/stund/internal/stunwire"
	"github.com/stund/stund/internal/testutil"
)

// The attacks a single client won against stund, each against the real
// server over real sockets: stream framing (TCP and TLS), TURN over UDP,
// the relay data path and the authentication log.

var loopback = netip.MustParseAddr("127.0.0.1")

// streamServer is a server with TCP and TLS listeners and a way to dial
// each; peers on loopback are allowed.
type streamServer struct {
	*Server
	tlsCfg *tls.Config
}

func startStreamServer(t *testing.T, mod func(*Config)) *streamServer {
	t.Helper()
	cert, pool := testutil.SelfSigned(t)
	s := startTURNServer(t, func(c *Config) {
		c.DisableTCP = false
		c.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
		c.AllowPeers = mustPrefixes(t, "127.0.0.0/8")
		if mod != nil {
			mod(c)
		}
	})
	return &streamServer{Server: s, tlsCfg: &tls.Config{RootCAs: pool, ServerName: testutil.CertName, MinVersion: tls.VersionTLS12}}
}

// eachStream runs f over a TCP and over a TLS connection to s.
func (s *streamServer) eachStream(t *testing.T, f func(t *testing.T, dial func() net.Conn)) {
	t.Run("tcp", func(t *testing.T) {
		f(t, func() net.Conn {
			c, err := net.DialTimeout("tcp4", s.TCPAddrs()[0].String(), e2eTimeout)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			return c
		})
	})
	t.Run("tls", func(t *testing.T) {
		f(t, func() net.Conn { return dialTLS(t, s.TLSAddrs()[0], s.tlsCfg) })
	})
}

// streamFront is a frontClient on an open stream.
func streamFront(t *testing.T, conn net.Conn, user, pass string) *frontClient {
	return &frontClient{t: t, tcp: true, conn: conn, rd: bufio.NewReader(conn), user: user, pass: pass}
}

// waitClosedByServer reads until the server closes the connection; it
// fails when the connection is still open after e2eTimeout.
func waitClosedByServer(t *testing.T, c net.Conn) []byte {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(e2eTimeout))
	var got []byte
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		got = append(got, buf[:n]...)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatal("the server kept the connection open")
			}
			return got
		}
	}
}

// waitReleased waits until no stream connection from loopback is open on
// the server: every descriptor and goroutine of those connections is gone.
func waitReleased(t *testing.T, s *Server) {
	t.Helper()
	for i := 0; i < 500 && s.limits.conns.openFrom(loopback) > 0; i++ {
		time.Sleep(10 * time.Millisecond)
	}
	if n := s.limits.conns.openFrom(loopback); n != 0 {
		t.Fatalf("%d connections still open on the server after the client closed", n)
	}
}

// indication is a Send indication header announcing length, followed by
// body bytes (fewer than length for a frame that is never whole).
func indication(length, body int) []byte {
	msg := make([]byte, stunwire.HeaderSize+body)
	binary.BigEndian.PutUint16(msg[0:], stunwire.MessageType(stunwire.MethodSend, stunwire.ClassIndication))
	binary.BigEndian.PutUint16(msg[2:], uint16(length))
	binary.BigEndian.PutUint32(msg[4:], stunwire.MagicCookie)
	return msg
}

// TestAttackHugeFrames: frames at and past the 16-bit length boundaries
// never make the server spin, smuggle nothing past the front, and leave
// nothing behind when the client goes (RFC 8489 §6.2.2, RFC 8656 §12.5).
func TestAttackHugeFrames(t *testing.T) {
	s := startStreamServer(t, nil)
	// A request pion would have found at offset 16 if it framed the
	// 65552-byte indication in 16 bits (65532+20 wraps to 16).
	smuggle := indication(65532, 65532)
	copy(smuggle[16:], stun.MustBuild(stun.TransactionID, stun.NewType(stun.MethodAllocate, stun.ClassRequest), requestedTransportUDP).Raw)
	channelData := make([]byte, 4+65532)
	binary.BigEndian.PutUint16(channelData[0:], 0x4000)
	binary.BigEndian.PutUint16(channelData[2:], 65532)
	for _, tc := range []struct {
		name   string
		frame  []byte
		closes bool // the server closes at once: no such frame can be valid
	}{
		{"stun-65536", indication(65516, 65516), true},
		{"stun-65552-smuggle", smuggle, true},
		{"stun-length-not-4", indication(10, 0), true},
		{"stun-over-pion-buffer", indication(maxStreamSTUN+1, maxStreamSTUN+1), true},
		{"channeldata-65532", channelData, false},
	} {
		s.eachStream(t, func(t *testing.T, dial func() net.Conn) {
			t.Run(tc.name, func(t *testing.T) {
				c := dial()
				go func() { _, _ = c.Write(tc.frame) }()
				if tc.closes {
					if got := waitClosedByServer(t, c); len(got) != 0 {
						t.Fatalf("the server answered %d bytes (% x) to a frame it cannot accept", len(got), got[:min(len(got), 32)])
					}
				} else {
					// A valid frame for no channel: dropped, the
					// connection lives; a Binding after it is answered.
					fc := streamFront(t, c, "", "")
					r := fc.rt(stun.TransactionID, stun.BindingRequest)
					if r.Type != stun.BindingSuccess {
						t.Fatalf("Binding after the frame: %v", r.Type)
					}
				}
				c.Close()
				waitReleased(t, s.Server)
			})
		})
	}
	if s.Front().Passed != 0 {
		t.Fatalf("the front passed %d requests to pion; nothing here was authenticated", s.Front().Passed)
	}
}

// TestAttackSmallChannelData: ChannelData carrying 0 to 4 bytes over TCP
// and TLS reaches the peer at once, with nothing more sent after it (RFC
// 8656 §12.4 allows Length 0; §12.5 pads to 4 over streams).
func TestAttackSmallChannelData(t *testing.T) {
	s := startStreamServer(t, nil)
	s.eachStream(t, func(t *testing.T, dial func() net.Conn) {
		peer := udpSocket(t)
		peerAP := stunwire.AddrPortOf(peer.LocalAddr())
		fc := streamFront(t, dial(), "alice", "alice-pw")
		fc.allocate()
		const ch = 0x4001
		r := fc.signed(stun.MethodChannelBind, stun.RawAttribute{Type: stun.AttrChannelNumber, Value: []byte{0x40, 0x01, 0, 0}}, peerAddr(peerAP))
		if r.Type.Class != stun.ClassSuccessResponse {
			t.Fatalf("ChannelBind: %v code %d", r.Type, errorCode(r))
		}
		buf := make([]byte, 64)
		for n := 0; n <= 4; n++ {
			frame := make([]byte, 4+(n+3)&^3)
			binary.BigEndian.PutUint16(frame[0:], ch)
			binary.BigEndian.PutUint16(frame[2:], uint16(n))
			for i := 0; i < n; i++ {
				frame[4+i] = byte('a' + i)
			}
			if _, err := fc.conn.Write(frame); err != nil {
				t.Fatal(err)
			}
			_ = peer.SetReadDeadline(time.Now().Add(e2eTimeout))
			got, _, err := peer.ReadFrom(buf)
			if err != nil {
				t.Fatalf("%d-byte ChannelData not relayed: %v", n, err)
			}
			if want := frame[4 : 4+n]; !bytes.Equal(buf[:got], want) {
				t.Fatalf("%d-byte ChannelData relayed as %q, want %q", n, buf[:got], want)
			}
		}
	})
}

// TestAttackSlowlorisPerFrame: a frame dribbled one byte at a time must
// be whole within the frame bound, however often bytes arrive.
func TestAttackSlowlorisPerFrame(t *testing.T) {
	s := startStreamServer(t, func(c *Config) {
		c.abuse = &abuseHooks{firstTimeout: 400 * time.Millisecond, idleTimeout: time.Minute, authedTimeout: time.Minute}
	})
	s.eachStream(t, func(t *testing.T, dial func() net.Conn) {
		c := dial()
		before := s.Limits().StreamIdle
		// A 65528-byte ChannelData announced, then one byte at a time,
		// each well inside the frame bound.
		if _, err := c.Write([]byte{0x40, 0x00, 0xFF, 0xF8}); err != nil {
			t.Fatal(err)
		}
		closed := make(chan struct{})
		go func() {
			_, _ = io.Copy(io.Discard, c)
			close(closed)
		}()
		for i := 0; i < 200; i++ { // 20 s of dribbling at most
			select {
			case <-closed:
				if s.Limits().StreamIdle <= before {
					t.Fatal("closed, but not counted as a stalled stream")
				}
				return
			case <-time.After(100 * time.Millisecond):
			}
			_, _ = c.Write([]byte{0})
		}
		t.Fatal("a frame dribbled a byte every 100 ms kept the connection open for 20 s")
	})
}

// TestAttackTCPOverUDP: TCP allocations, Connect and ConnectionBind exist
// only on TCP/TLS control connections (RFC 6062 §5.1, §5.2, §5.4); over
// UDP they are 400, and nothing on the UDP socket waits on a dial.
func TestAttackTCPOverUDP(t *testing.T) {
	s := startTURNServer(t, func(c *Config) { c.AllowPeers = mustPrefixes(t, "127.0.0.0/8") })
	c := dialFront(t, s, false, "alice", "alice-pw")
	requestedTCP := stun.RawAttribute{Type: stun.AttrRequestedTransport, Value: []byte{6, 0, 0, 0}}
	c.wantSignedError(c.signed(stun.MethodAllocate, requestedTCP), 400)
	c.allocate()
	// A peer that drops SYNs would hold a dial for minutes; the request
	// must not get that far.
	blackhole := peerAddr(netip.MustParseAddrPort("127.0.0.1:9"))
	c.wantSignedError(c.signed(stun.MethodConnect, blackhole), 400)
	c.wantSignedError(c.signed(stun.MethodConnectionBind, stun.RawAttribute{Type: stun.AttrConnectionID, Value: []byte{0, 0, 0, 1}}), 400)
	if r := c.rt(stun.TransactionID, stun.BindingRequest); r.Type != stun.BindingSuccess {
		t.Fatalf("Binding after Connect: %v", r.Type)
	}
}

// TestAttackStrangersDontDrainCap: datagrams from hosts without a
// permission are dropped before the user's --max-bps is charged, so a
// flood at the relayed address does not starve the permitted peer.
func TestAttackStrangersDontDrainCap(t *testing.T) {
	// 160 kbit/s: a bucket of 1 s = 20 kB; the stranger sends 10x that.
	s := startTURNServer(t, func(c *Config) {
		c.AllowPeers = mustPrefixes(t, "127.0.0.0/8")
		c.MaxBPS = 160_000
	})
	_, relay := allocRelay(t, s, "udp4", "alice")
	peer := udpPeer(t, "udp4")
	relayToPeer(t, relay, peer, "hello") // installs the permission
	// Permissions are per IP (RFC 8656 §9): the stranger is another host.
	stranger, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 9)})
	if err != nil {
		t.Fatal(err)
	}
	defer stranger.Close()
	junk := make([]byte, 1000)
	for i := 0; i < 200; i++ {
		if _, err := stranger.WriteTo(junk, relay.LocalAddr()); err != nil {
			t.Fatal(err)
		}
	}
	// Let the relay socket read (and drop) the flood before the peer
	// sends; the kernel may drop some of the burst, but 40 kB reaching the
	// relay is twice the user's whole bucket.
	waitFor(t, "the stranger's datagrams to reach the relay", func() bool { return s.relayStrangers() >= 40 })
	// and until the relay has read all it queued: while the socket's queue
	// is full the kernel would drop the peer's datagram too.
	last, same := s.relayStrangers(), 0
	waitFor(t, "the relay to drain the flood", func() bool {
		if n := s.relayStrangers(); n != last {
			last, same = n, 0
		} else {
			same++
		}
		return same >= 5 // 50 ms without a stranger read
	})
	got := 0
	buf := make([]byte, 1500)
	for i := 0; i < 60; i++ {
		if _, err := peer.WriteTo([]byte("media-200-bytes-"+strings.Repeat("x", 184)), relay.LocalAddr()); err != nil {
			t.Fatal(err)
		}
		_ = relay.SetReadDeadline(time.Now().Add(e2eTimeout))
		n, from, err := relay.ReadFrom(buf)
		if err != nil {
			break
		}
		if stunwire.AddrPortOf(from) == stunwire.AddrPortOf(peer.LocalAddr()) && n == 200 {
			got++
		}
	}
	if got != 60 {
		t.Fatalf("the permitted peer got %d/60 datagrams through under a stranger's flood", got)
	}
	if pk, _ := s.limits.bw.dropped(); pk != 0 {
		t.Fatalf("the cap dropped %d datagrams: strangers were charged", pk)
	}
}

// relayStrangers sums the datagrams relay sockets dropped for want of a
// permission.
func (s *Server) relayStrangers() uint64 {
	s.led.mu.RLock()
	defer s.led.mu.RUnlock()
	var n uint64
	for _, rs := range s.led.sockets {
		n += rs.strangers.Load()
	}
	return n
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for i := 0; i < 500; i++ {
		if cond() {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

// TestAttackIndicationsNotAnswered: an indication is never answered (RFC
// 8489 §6.3.2), with or without unknown comprehension-required attributes,
// whatever its method, over UDP and TCP.
func TestAttackIndicationsNotAnswered(t *testing.T) {
	forBoth(t, nil, func(t *testing.T, s *Server, tcp bool) {
		c := dialFront(t, s, tcp, "", "")
		unknown := stun.RawAttribute{Type: 0x0030} // comprehension-required, unknown
		for _, m := range []stun.Method{stun.MethodSend, stun.MethodRefresh, stun.MethodAllocate, stun.MethodData} {
			msg := c.build(stun.TransactionID, stun.NewType(m, stun.ClassIndication), unknown)
			if r := c.exchange(msg.Raw, false); r != nil {
				t.Fatalf("%v indication (%d bytes) answered with %v (%d bytes)", m, len(msg.Raw), r.Type, len(r.Raw))
			}
		}
		// The connection or socket still serves.
		if r := c.rt(stun.TransactionID, stun.BindingRequest); r.Type != stun.BindingSuccess {
			t.Fatalf("Binding afterwards: %v", r.Type)
		}
	})
}

// TestAttackUnauthAnswersRateLimited: unauthenticated answers spend the
// source's per-IP budget over streams too, not only over UDP.
func TestAttackUnauthAnswersRateLimited(t *testing.T) {
	// A server per transport: each starts with a full bucket.
	for _, tr := range []string{"tcp", "tls"} {
		t.Run(tr, func(t *testing.T) { unauthRateLimited(t, tr) })
	}
}

func unauthRateLimited(t *testing.T, tr string) {
	s := startStreamServer(t, func(c *Config) { c.UnauthRate = 1 })
	dial := func() net.Conn { return dialTLS(t, s.TLSAddrs()[0], s.tlsCfg) }
	if tr == "tcp" {
		dial = func() net.Conn {
			c, err := net.DialTimeout("tcp4", s.TCPAddrs()[0].String(), e2eTimeout)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			return c
		}
	}
	{
		conn := dial()
		var burst []byte
		for i := 0; i < 30; i++ {
			burst = append(burst, stun.MustBuild(stun.TransactionID, stun.NewType(stun.MethodAllocate, stun.ClassRequest), requestedTransportUDP).Raw...)
		}
		if _, err := conn.Write(burst); err != nil {
			t.Fatal(err)
		}
		answered := 0
		rd := bufio.NewReader(conn)
		_ = conn.SetReadDeadline(time.Now().Add(time.Second))
		for {
			hdr, err := rd.Peek(4)
			if err != nil {
				break
			}
			n, _, _ := stunwire.FrameLen(hdr)
			if _, err := rd.Discard(n); err != nil {
				break
			}
			answered++
		}
		if b := burstFor(1); answered > b+2 || answered == 0 {
			t.Fatalf("%d of 30 unauthenticated Allocates answered, want 1 to %d (the per-IP budget)", answered, b+2)
		}
	}
}

// TestAttackAuthFailuresLogged: each failed authentication is one log
// line with the source address, the username as received (escaped) and
// the reason, in the form configs/fail2ban/stund.conf matches; a flood
// writes a bounded number of lines.
func TestAttackAuthFailuresLogged(t *testing.T) {
	var logs testutil.SyncBuffer
	s := startTURNServer(t, func(c *Config) { c.Logger = slog.New(slog.NewTextHandler(&logs, nil)) })

	bad := dialFront(t, s, false, "alice", "wrong-password")
	bad.wantUnauthorized(bad.signed(stun.MethodAllocate, requestedTransportUDP))
	forged := dialFront(t, s, false, "mallory\nlevel=INFO msg=ok", "x")
	forged.wantUnauthorized(forged.signed(stun.MethodAllocate, requestedTransportUDP))

	lines := authLines(logs.String())
	if len(lines) != 2 {
		t.Fatalf("%d failure lines, want 2:\n%s", len(lines), logs.String())
	}
	for i, want := range []string{`user=alice`, `reason=bad-integrity`, `user="mallory\nlevel=INFO msg=ok"`, `reason=unknown-user`} {
		if !strings.Contains(lines[i/2], want) {
			t.Errorf("line %q lacks %s", lines[i/2], want)
		}
	}
	re := fail2banRegexps(t)
	for _, l := range lines {
		if !matchesHost(re, l, "127.0.0.1") {
			t.Errorf("the fail2ban filter does not match %q", l)
		}
	}
	var js bytes.Buffer
	newAuthLog(slog.New(slog.NewJSONHandler(&js, nil)), &opsStats{}).failed(authFailure{src: netip.MustParseAddrPort("[2001:db8::7]:4000"), username: []byte("u")})
	if !matchesHost(re, strings.TrimSpace(js.String()), "2001:db8::7") {
		t.Errorf("the fail2ban filter does not match the JSON line %q", js.String())
	}

	// A flood: bounded lines, the rest counted as suppressed.
	var flood testutil.SyncBuffer
	l := newAuthLog(slog.New(slog.NewTextHandler(&flood, nil)), &opsStats{})
	for i := 0; i < 2000; i++ {
		l.failed(authFailure{src: netip.MustParseAddrPort("192.0.2.1:1"), username: []byte("x"), knownUser: true})
	}
	if n := len(authLines(flood.String())); n > authLogBurst+20 || n < authLogBurst {
		t.Fatalf("%d lines for 2000 failures, want about %d", n, authLogBurst)
	}
}

func authLines(log string) []string {
	var out []string
	for _, l := range strings.Split(log, "\n") {
		if strings.Contains(l, `msg="authentication failed"`) {
			out = append(out, l)
		}
	}
	return out
}

// fail2banRegexps reads the failregex lines of the shipped filter, with
// fail2ban's <ADDR> tag as a capture group.
func fail2banRegexps(t *testing.T) []*regexp.Regexp {
	t.Helper()
	conf, err := os.ReadFile("../configs/fail2ban/stund.conf")
	if err != nil {
		t.Fatal(err)
	}
	var res []*regexp.Regexp
	in := false
	for _, line := range strings.Split(string(conf), "\n") {
		switch {
		case strings.HasPrefix(line, "failregex"):
			in = true
			line = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(strings.TrimPrefix(line, "failregex")), "="))
		case in && strings.HasPrefix(line, " "):
			line = strings.TrimSpace(line)
		default:
			in = false
			continue
		}
		if line == "" {
			continue
		}
		pat := strings.ReplaceAll(regexp.QuoteMeta(line), regexp.QuoteMeta("<ADDR>"), `(?P<addr>[0-9A-Fa-f:.]+)`)
		pat = strings.ReplaceAll(pat, `\\d`, `\d`)
		res = append(res, regexp.MustCompile(pat))
	}
	if len(res) == 0 {
		t.Fatal("no failregex in the fail2ban filter")
	}
	return res
}

func matchesHost(res []*regexp.Regexp, line, host string) bool {
	for _, re := range res {
		if m := re.FindStringSubmatch(line); m != nil && m[re.SubexpIndex("addr")] == host {
			return true
		}
	}
	return false
}

func (c *frontClient) wantUnauthorized(r *stun.Message) {
	c.t.Helper()
	if errorCode(r) != 401 {
		c.t.Fatalf("%v code %d, want 401", r.Type, errorCode(r))
	}
}

// TestDataPlaneCarriesRelayedData: on an established allocation, Send
// indications, ChannelData and the peer's datagrams (as Data indications
// and as ChannelData) are relayed by stund's data plane, not by pion,
// over UDP and over TCP; a Data indication is well formed (pion's client
// decodes it) and ChannelData over a stream is padded to 4.
func TestDataPlaneCarriesRelayedData(t *testing.T) {
	s := startStreamServer(t, nil)
	for _, network := range []string{"udp", "tcp"} {
		t.Run(network, func(t *testing.T) {
			before := s.data.stats().Relayed
			var cl *turn.Client
			if network == "udp" {
				cl = allocClient(t, s.Server, "udp4", "alice")
			} else {
				cl = newTCPTURNClient(t, s.TCPAddrs()[0], "alice", "alice-pw")
			}
			relay, err := cl.Allocate()
			if err != nil {
				t.Fatal(err)
			}
			defer relay.Close()
			peer := udpPeer(t, "udp4")
			from := relayToPeer(t, relay, peer, "first, by Send") // Send indication before the channel
			peerToClient(t, peer, relay, from, "back, odd len")   // 13 bytes: padding over TCP
			for i := 0; i < 20; i++ {                             // pion's client binds a channel meanwhile
				relayToPeer(t, relay, peer, "later")
				peerToClient(t, peer, relay, from, "again")
			}
			// Counters move just after the write the far end saw.
			waitFor(t, "the data plane's count of client datagrams", func() bool { return s.data.stats().Relayed-before >= 21 })
			relayed := stunwire.AddrPortOf(relay.LocalAddr())
			waitFor(t, "the data plane's count of the peer's datagrams", func() bool { return s.relayToClient(relayed) >= 21 })
		})
	}
}

// relayToClient is how many peer datagrams the relay socket on the
// relayed address wrote to its client.
func (s *Server) relayToClient(relayed netip.AddrPort) uint64 {
	s.led.mu.RLock()
	defer s.led.mu.RUnlock()
	if rs := s.led.sockets[relayed]; rs != nil {
		return rs.toClient.Load()
	}
	return 0
}
