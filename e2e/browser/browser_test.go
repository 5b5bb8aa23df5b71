// Package browser proves stund with the WebRTC stack people actually use:
// headless Chromium (Debian's chromium package) relays a data channel
// through stund's TURN server on loopback.
package browser

import (
	"context"
	_ "embed"
	"encoding/json"
	"html/template"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/stund/stund/server"

	"github.com/stund/stund/internal/testutil"
)

//go:embed testdata/page.html
var pageHTML string

const (
	// pageTimeout is how long the page waits for the message before it
	// reports failure: ICE over loopback relays completes in well under a
	// second, Chromium's start on a loaded 2-core CI machine takes a few.
	pageTimeout = 30 * time.Second
	// testTimeout bounds the whole test, Chromium's start included.
	testTimeout = 90 * time.Second
	turnUser    = "webrtc"
	turnPass    = "browser-test-password"
)

// chromium finds Debian's chromium (or another Chromium-based build on the
// PATH); "" when there is none.
func chromium() string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome-stable", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	return ""
}

// result is what the page POSTs back.
type result struct {
	OK         bool     `json:"ok"`
	Error      string   `json:"error"`
	Received   string   `json:"received"`
	Echoed     string   `json:"echoed"`
	Candidates []string `json:"candidates"`
	PairA      *pair    `json:"pairA"`
	PairB      *pair    `json:"pairB"`
	Log        []string `json:"log"`
}

type pair struct {
	Local         string `json:"local"`
	Remote        string `json:"remote"`
	LocalAddress  string `json:"localAddress"`
	RelayProtocol string `json:"relayProtocol"`
}

// TestChromiumDataChannelThroughRelay: two RTCPeerConnections in one page,
// stund as their only ICE server and iceTransportPolicy "relay", exchange a
// message and its echo over a data channel; the selected pairs are relay to
// relay and stund counted the relayed packets.
func TestChromiumDataChannelThroughRelay(t *testing.T) {
	bin := chromium()
	if bin == "" {
		testutil.SkipUnlessRequired(t, "chromium not installed (apt-get install chromium)")
	}
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()

	// stund on loopback. The relay-to-relay path is 127.0.0.1 -> 127.0.0.1,
	// which the default peer policy refuses: open loopback as a test rig.
	srv, err := server.New(server.Config{
		PrimaryIP:   netip.MustParseAddr("127.0.0.1"),
		AlternateIP: netip.MustParseAddr("127.0.0.2"),
		Realm:       "stund.test",
		Users:       map[string]string{turnUser: turnPass},
		AllowPeers:  []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
		DisableTCP:  true,
		Logger:      slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo})),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	turnURL := "turn:" + srv.Grid()[0][0].String() + "?transport=udp"

	// The page and the result endpoint, on loopback.
	page := template.Must(template.New("page").Parse(pageHTML))
	results := make(chan result, 1)
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/" {
			http.NotFound(w, r) // favicon and the like
			return
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		_ = page.Execute(w, map[string]any{
			"TURN": turnURL, "User": turnUser, "Pass": turnPass,
			"PageTimeoutMS": pageTimeout.Milliseconds(),
		})
	})
	mux.HandleFunc("/result", func(w http.ResponseWriter, r *http.Request) {
		var res result
		body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
		if err := json.Unmarshal(body, &res); err != nil {
			res = result{Error: "bad result: " + err.Error()}
		}
		select {
		case results <- res:
		default:
		}
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = hs.Serve(ln) }()
	defer hs.Close()

	// Chromium, headless, in its own process group so that every child
	// (zygote, renderer, network service) is killed with it.
	profile := t.TempDir()
	cmd := exec.Command(bin,
		"--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
		"--disable-background-networking", "--disable-component-update",
		"--disable-sync", "--disable-quic", "--disable-extensions",
		"--disable-default-apps", "--mute-audio",
		"--user-data-dir="+profile,
		// WebRTC leaves the loopback interface out of ICE by default;
		// stund and the page are both on loopback here.
		"--allow-loopback-in-peer-connection",
		"http://"+ln.Addr().String()+"/")
	var chromeOut strings.Builder
	out := &limitedWriter{w: &chromeOut, n: 64 << 10} // one writer: exec serialises its writes
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s: %v", bin, err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) // the group we created
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			t.Error("chromium did not exit after SIGKILL")
		}
	}()

	var res result
	select {
	case res = <-results:
	case err := <-exited:
		t.Fatalf("chromium exited early (%v):\n%s", err, chromeOut.String())
	case <-ctx.Done():
		t.Fatalf("no result from the page within %v; chromium output:\n%s", testTimeout, chromeOut.String())
	}
	t.Logf("page result: %+v", res)
	if !res.OK {
		t.Fatalf("page failed: %s\nlog: %v\nchromium output:\n%s", res.Error, res.Log, chromeOut.String())
	}
	if res.Received != "hello through stund" || res.Echoed != "echo:hello through stund" {
		t.Errorf("messages: received %q, echoed %q", res.Received, res.Echoed)
	}
	for _, c := range res.Candidates {
		if !strings.HasSuffix(c, ":relay") {
			t.Errorf("candidate %q is not a relay candidate (iceTransportPolicy relay)", c)
		}
	}
	for name, p := range map[string]*pair{"a": res.PairA, "b": res.PairB} {
		if p == nil {
			t.Errorf("peer %s: no selected candidate pair in getStats", name)
			continue
		}
		if p.Local != "relay" || p.Remote != "relay" {
			t.Errorf("peer %s: selected pair %s -> %s, want relay -> relay", name, p.Local, p.Remote)
		}
	}

	// stund relayed the packets: both directions of the UDP relays
	// carried data (DTLS, SCTP and the message).
	reg, err := srv.Registry().Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{"to_peer", "from_peer"} {
		if v := counter(reg, "stund_relay_packets_total", "direction", dir); v < 4 {
			t.Errorf("stund_relay_packets_total{direction=%q} = %v: the data did not go through stund", dir, v)
		}
	}
	if v := counter(reg, "stund_allocations_created_total", "transport", "udp"); v < 2 {
		t.Errorf("stund_allocations_created_total = %v, want at least one per peer connection", v)
	}
}

func counter(mfs []*dto.MetricFamily, name, k, v string) float64 {
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			match := k == ""
			for _, lp := range m.GetLabel() {
				if lp.GetName() == k && lp.GetValue() == v {
					match = true
				}
			}
			if match && m.Counter != nil {
				return m.Counter.GetValue()
			}
		}
	}
	return -1
}

// testWriter sends stund's log lines to the test log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// limitedWriter keeps at most n bytes of Chromium's chatter.
type limitedWriter struct {
	w io.Writer
	n int
}

func (l *limitedWriter) Write(p []byte) (int, error) {
	if l.n <= 0 {
		return len(p), nil
	}
	q := p
	if len(q) > l.n {
		q = q[:l.n]
	}
	l.n -= len(q)
	_, _ = l.w.Write(q)
	return len(p), nil
}
