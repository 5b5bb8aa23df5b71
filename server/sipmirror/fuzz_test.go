package sipmirror

import (
	"net/netip"
	"testing"

	"github.com/stund/stund/internal/sipmsg"
)

// FuzzHandle feeds arbitrary bytes to the mirror's parser and answer as a
// UDP datagram and as a stream message: never a panic, a UDP answer never
// larger than the request, and every answer a parseable 200 whose report
// holds the request exactly.
func FuzzHandle(f *testing.F) {
	f.Add(invite(netip.MustParseAddrPort("10.0.0.2:5060"), "UDP", padTo))
	f.Add(invite(netip.MustParseAddrPort("[fd00::2]:5060"), "TCP", 0))
	f.Add([]byte("OPTIONS sip:a@b SIP/2.0\r\nv: SIP/2.0/UDP h;rport\r\nf: a\r\nt: b\r\ni: c\r\nCSeq: 1 OPTIONS\r\nl: 0\r\n\r\n"))
	f.Add([]byte("SIP/2.0 200 OK\r\n\r\n"))
	f.Add([]byte("\x00\x01\x00\x00"))
	m := &Mirror{cfg: Config{}}
	m.stats.init()
	src := netip.MustParseAddrPort("192.0.2.1:40000")
	f.Fuzz(func(t *testing.T, in []byte) {
		for _, tr := range []string{"udp", "tcp"} {
			req := append([]byte(nil), in...)
			ans, ok := m.handle(nil, req, src, netip.MustParseAddr("198.51.100.1"), tr, portSIP)
			if !ok {
				continue
			}
			if tr == "udp" && len(ans) > len(in) {
				t.Fatalf("udp answer %d bytes to a %d-byte request", len(ans), len(in))
			}
			msg, err := sipmsg.Parse(ans, tr != "udp")
			if err != nil || msg.Status != 200 {
				t.Fatalf("%s answer does not parse: %v\n%q", tr, err, ans)
			}
			rep, err := sipmsg.ParseReport(msg.Body)
			if err != nil {
				t.Fatalf("%s report: %v", tr, err)
			}
			parsed, _ := sipmsg.Parse(in, tr != "udp")
			if string(rep.Request) != string(in[:parsed.Len]) || rep.Source != src {
				t.Fatalf("%s report %+v does not hold the request", tr, rep)
			}
		}
	})
}
