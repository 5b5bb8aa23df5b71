package server

import (
	"github.com/stund/stund/internal/stunwire"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/pion/stun/v4"

	"github.com/stund/stund/internal/testutil"
)

// TestProbeIDLoggedOnce: twenty Binding requests of one natprobe run give
// one log line naming the probe ID and the client; other SOFTWARE values and
// bare requests give none.
func TestProbeIDLoggedOnce(t *testing.T) {
	var logs testutil.SyncBuffer
	s := startTURNServer(t, func(c *Config) {
		c.Logger = slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	})
	client, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	send := func(software string, changePort bool) {
		setters := []stun.Setter{stun.TransactionID, stun.BindingRequest}
		if software != "" {
			setters = append(setters, stun.NewSoftware(software))
		}
		if changePort {
			setters = append(setters, stun.RawAttribute{Type: stun.AttrChangeRequest, Value: []byte{0, 0, 0, byte(stunwire.ChangePort)}})
		}
		setters = append(setters, stun.Fingerprint)
		m := stun.MustBuild(setters...)
		if _, err := client.WriteTo(m.Raw, serverAddr(s)); err != nil {
			t.Fatal(err)
		}
		_ = client.SetReadDeadline(time.Now().Add(e2eTimeout))
		buf := make([]byte, 1500)
		if _, _, err := client.ReadFrom(buf); err != nil {
			t.Fatalf("no reply: %v", err)
		}
	}
	for i := 0; i < 20; i++ {
		send("natprobe/1.2.3 probe=a1b2c3d4", i%2 == 0)
	}
	send("natprobe/1.2.3 probe-id=feedbeef", false) // natprobe's current spelling
	send("natprobe/1.2.3 probe=bad\"id", false)     // not an ID: ignored
	send("Chrome/120", false)
	send("", false)

	out := logs.String()
	if n := strings.Count(out, "probe_id=a1b2c3d4"); n != 1 {
		t.Errorf("probe a1b2c3d4 logged %d times, want once:\n%s", n, out)
	}
	if !strings.Contains(out, "client="+client.LocalAddr().String()) {
		t.Errorf("log line lacks the client address %s:\n%s", client.LocalAddr(), out)
	}
	if !strings.Contains(out, "natprobe=1.2.3") {
		t.Errorf("log line lacks the natprobe version:\n%s", out)
	}
	if n := strings.Count(out, "probe_id=feedbeef"); n != 1 {
		t.Errorf("probe-id= form logged %d times, want once", n)
	}
	if n := strings.Count(out, "natprobe probe"); n != 2 {
		t.Errorf("%d probe lines, want 2:\n%s", n, out)
	}
	if v := metricValue(t, s, "stund_natprobe_probes_total"); v != 2 {
		t.Errorf("stund_natprobe_probes_total = %v, want 2", v)
	}
}

// TestProbeLogBounded: the set never grows past probeSeenMax, forgets an ID
// after probeSeenTTL, and rate-limits new lines.
func TestProbeLogBounded(t *testing.T) {
	var p probeLog
	now := time.Unix(1_700_000_000, 0)
	id := func(i int) []byte { return []byte("id" + strings.Repeat("x", i%7) + string(rune('a'+i%26)) + itoa(i)) }
	logged, limited := 0, 0
	for i := 0; i < 3*probeSeenMax; i++ {
		now = now.Add(time.Second) // 1 new ID per second: under the rate
		switch p.admit(id(i), now) {
		case probeNew:
			logged++
		case probeLimited:
			limited++
		}
		if p.len() > probeSeenMax {
			t.Fatalf("set holds %d IDs, bound %d", p.len(), probeSeenMax)
		}
	}
	if logged != 3*probeSeenMax || limited != 0 {
		t.Errorf("logged %d limited %d, want %d 0", logged, limited, 3*probeSeenMax)
	}

	// Seen again within the TTL: known; after it: new again.
	last := id(3*probeSeenMax - 1)
	if v := p.admit(last, now.Add(time.Minute)); v != probeKnown {
		t.Errorf("within TTL: %v, want known", v)
	}
	if v := p.admit(last, now.Add(probeSeenTTL+time.Second)); v != probeNew {
		t.Errorf("after TTL: %v, want new", v)
	}

	// A burst of fresh IDs at one instant: only the burst is logged.
	var q probeLog
	at := time.Unix(1_700_000_000, 0)
	n := 0
	for i := 0; i < 1000; i++ {
		if q.admit(id(i), at) == probeNew {
			n++
		}
	}
	if n != probeLogBurst {
		t.Errorf("burst logged %d, want %d", n, probeLogBurst)
	}
}

func itoa(i int) string {
	if i == 0 {
		return "0"
	}
	var b []byte
	for ; i > 0; i /= 10 {
		b = append([]byte{byte('0' + i%10)}, b...)
	}
	return string(b)
}

// TestParseProbeSoftware covers the accepted forms.
func TestParseProbeSoftware(t *testing.T) {
	for in, want := range map[string]string{
		"natprobe/1.0 probe=abc":                        "abc",
		"natprobe/dev probe-id=0f0f":                    "0f0f",
		"natprobe/1.0 x probe=Z_9-":                     "Z_9-",
		"natprobe/1.0 probe=":                           "",
		"natprobe/1.0 probe=a b":                        "a",
		"natprobe/1.0 noprobe=abc":                      "",
		"natprobe/1.0 probe=" + strings.Repeat("a", 65): "",
		"natprobe/1.0 probe=é":                          "",
	} {
		_, id, ok := parseProbeSoftware([]byte(in))
		if string(id) != want || ok != (want != "") {
			t.Errorf("%q: id %q ok %v, want %q", in, id, ok, want)
		}
	}
}
