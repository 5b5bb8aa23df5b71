package main

// The SIP mirror's flags and its start beside the server (server/sipmirror).

import (
	"fmt"
	"io"
	"net/netip"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/urfave/cli/v2"
	"github.com/urfave/cli/v2/altsrc"

	"github.com/stund/stund/server"
	"github.com/stund/stund/server/sipmirror"
)

const (
	fSIPMirror      = "sip-mirror"
	fSIPPort        = "sip-port"
	fSIPTLSPort     = "sip-tls-port"
	fSIPControlPort = "sip-control-port"
	fSIPMediaPort   = "sip-media-port"
)

func sipFlags() []cli.Flag {
	return []cli.Flag{
		altsrc.NewBoolFlag(&cli.BoolFlag{Name: fSIPMirror, EnvVars: envName(fSIPMirror), Usage: "answer SIP requests with what arrived, on the SIP and control ports of each IP, for natprobe's SIP ALG test (off by default: a SIP proxy may own 5060)"}),
		altsrc.NewIntFlag(&cli.IntFlag{Name: fSIPPort, EnvVars: envName(fSIPPort), Value: sipmirror.DefaultSIPPort, Usage: "SIP mirror `PORT`, UDP and TCP, where SIP ALGs look (0: a free port)"}),
		altsrc.NewIntFlag(&cli.IntFlag{Name: fSIPTLSPort, EnvVars: envName(fSIPTLSPort), Value: sipmirror.DefaultTLSPort, Usage: "SIP mirror TLS `PORT` (with --cert and --key; 0: a free port)"}),
		altsrc.NewIntFlag(&cli.IntFlag{Name: fSIPControlPort, EnvVars: envName(fSIPControlPort), Value: sipmirror.DefaultControlPort, Usage: "SIP mirror control `PORT`, UDP and TCP, where no ALG looks; natprobe finds the mirror here (0: a free port)"}),
		altsrc.NewIntFlag(&cli.IntFlag{Name: fSIPMediaPort, EnvVars: envName(fSIPMediaPort), Value: sipmirror.DefaultMediaPort, Usage: "even UDP `PORT` of the media echo for natprobe's call test, RTCP on the next (0: a free pair)"}),
	}
}

// sipConfig builds the mirror's configuration from the flags, or ok=false
// when --sip-mirror is off.
func sipConfig(c *cli.Context, keys *yamlKeys, cfg server.Config) (mc sipmirror.Config, ok bool, err error) {
	if !c.Bool(fSIPMirror) {
		return mc, false, nil
	}
	ports := []struct {
		flag string
		dst  *int
	}{{fSIPPort, &mc.SIPPort}, {fSIPControlPort, &mc.ControlPort}, {fSIPTLSPort, &mc.TLSPort}, {fSIPMediaPort, &mc.MediaPort}}
	seen := map[int]string{}
	for _, p := range ports {
		v := c.Int(p.flag)
		if v < 0 || v > 65535 {
			return mc, false, fmt.Errorf("%s: %d is not a port (0-65535)%s", p.flag, v, keys.where(p.flag))
		}
		if other, dup := seen[v]; dup && v != 0 {
			return mc, false, fmt.Errorf("%s: port %d is also --%s%s", p.flag, v, other, keys.where(p.flag))
		}
		seen[v] = p.flag
		*p.dst = v
	}
	if mc.MediaPort%2 != 0 || mc.MediaPort == 65535 {
		return mc, false, fmt.Errorf("%s: %d: RTP takes an even port and RTCP the next (RFC 3550 §11)%s", fSIPMediaPort, mc.MediaPort, keys.where(fSIPMediaPort))
	}
	if seen[mc.MediaPort+1] != "" && mc.MediaPort != 0 {
		return mc, false, fmt.Errorf("%s: its RTCP port %d is --%s%s", fSIPMediaPort, mc.MediaPort+1, seen[mc.MediaPort+1], keys.where(fSIPMediaPort))
	}
	mc.IPs = []netip.Addr{cfg.PrimaryIP}
	if cfg.AlternateIP.IsValid() {
		mc.IPs = append(mc.IPs, cfg.AlternateIP)
	}
	mc.Advertise, mc.TLSConfig, mc.Logger = cfg.Advertise, cfg.TLSConfig, cfg.Logger
	return mc, true, nil
}

// startSIP starts the mirror beside srv when configured: it shares srv's
// per-IP budget of unauthenticated answers and its metrics registry. nil
// when --sip-mirror is off.
func startSIP(mc sipmirror.Config, srv *server.Server, stdout io.Writer) (*sipmirror.Mirror, error) {
	mc.Allow = srv.AllowUnauth
	m, err := sipmirror.New(mc)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", fSIPMirror, err)
	}
	if err := srv.Registry().Register(sipCollector{m}); err != nil {
		_ = m.Close()
		return nil, fmt.Errorf("%s: metrics: %w", fSIPMirror, err)
	}
	p := m.Ports()
	var ips []string
	for _, ip := range mc.IPs {
		ips = append(ips, ip.String())
	}
	tls := ""
	if p.TLS != 0 {
		tls = fmt.Sprintf(", tls %d", p.TLS)
	}
	fmt.Fprintf(stdout, "stund: SIP mirror on %s: sip %d, control %d (udp+tcp)%s, media echo udp %d-%d\n",
		strings.Join(ips, " "), p.SIP, p.Control, tls, p.Media, p.Media+1)
	return m, nil
}

// sipCollector exports the mirror's counters as stund_sip_* metrics.
type sipCollector struct{ m *sipmirror.Mirror }

var (
	sipRequestsDesc = prometheus.NewDesc("stund_sip_requests_total", "Messages the SIP mirror received, by transport.", []string{"transport"}, nil)
	sipAnswersDesc  = prometheus.NewDesc("stund_sip_answers_total", "SIP mirror answers sent, by transport.", []string{"transport"}, nil)
	sipDropsDesc    = prometheus.NewDesc("stund_sip_drops_total", "Messages, connections and media packets the SIP mirror dropped, by reason.", []string{"reason"}, nil)
	sipEchoesDesc   = prometheus.NewDesc("stund_sip_media_echoes_total", "Media packets the SIP mirror's echo returned.", nil, nil)
)

func (sipCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{sipRequestsDesc, sipAnswersDesc, sipDropsDesc, sipEchoesDesc} {
		ch <- d
	}
}

func (s sipCollector) Collect(ch chan<- prometheus.Metric) {
	st := s.m.Stats()
	for _, set := range []struct {
		d *prometheus.Desc
		m map[string]uint64
	}{{sipRequestsDesc, st.Requests}, {sipAnswersDesc, st.Answers}, {sipDropsDesc, st.Drops}} {
		for k, v := range set.m {
			ch <- prometheus.MustNewConstMetric(set.d, prometheus.CounterValue, float64(v), k)
		}
	}
	ch <- prometheus.MustNewConstMetric(sipEchoesDesc, prometheus.CounterValue, float64(st.Echoes))
}
