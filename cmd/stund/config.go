package main

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"sort"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/pion/logging"
	"github.com/urfave/cli/v2"
	"gopkg.in/yaml.v3"

	"github.com/stund/stund/server"
	"github.com/stund/stund/server/offload"
)

// yamlKeys remembers where each key of the configuration file stands, so
// an error about a value can point at its line.
type yamlKeys struct {
	path  string
	lines map[string]int
}

// where returns " (FILE line N)" when the YAML file sets flag, else "".
func (k *yamlKeys) where(flag string) string {
	if k == nil {
		return ""
	}
	if l, ok := k.lines[flag]; ok {
		return fmt.Sprintf(" (%s line %d)", k.path, l)
	}
	return ""
}

// explain adds the file and line to an error from altsrc, which names the
// flag but not where its value stands.
func (k *yamlKeys) explain(err error) error {
	for name := range k.lines {
		if strings.Contains(err.Error(), "'"+name+"'") || strings.Contains(err.Error(), " "+name+" ") {
			return fmt.Errorf("%s line %d: key %q: %w", k.path, k.lines[name], name, err)
		}
	}
	return fmt.Errorf("%s: %w", k.path, err)
}

// checkYAMLKeys parses the file and refuses keys that are not flags: a
// misspelt key would otherwise be ignored and the default used silently.
func checkYAMLKeys(path string, fl []cli.Flag) (*yamlKeys, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	var doc yaml.Node
	if err := yaml.Unmarshal(b, &doc); err != nil {
		// yaml.v3 says "yaml: line N: …", except for bytes its reader
		// refuses (control characters, bad UTF-8: find that line) and
		// on line 1 (its marks count from 0 and it omits line 0).
		if !strings.Contains(err.Error(), "line ") {
			l := badByteLine(b)
			if l == 0 {
				l = 1
			}
			return nil, fmt.Errorf("%s line %d: %w", path, l, err)
		}
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	keys := &yamlKeys{path: path, lines: map[string]int{}}
	if len(doc.Content) == 0 {
		return keys, nil // an empty file configures nothing
	}
	root := doc.Content[0]
	if root.Kind != yaml.MappingNode {
		return nil, fmt.Errorf("%s line %d: the file must be a mapping of flag names to values", path, root.Line)
	}
	known := map[string]bool{}
	for _, f := range fl {
		for _, n := range f.Names() {
			known[n] = true
		}
	}
	var names []string
	for n := range known {
		if n != fConfig {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	for i := 0; i+1 < len(root.Content); i += 2 {
		k := root.Content[i]
		if !known[k.Value] || k.Value == fConfig {
			return nil, fmt.Errorf("%s line %d: unknown key %q (known keys: %s)", path, k.Line, k.Value, strings.Join(names, ", "))
		}
		if _, dup := keys.lines[k.Value]; dup {
			return nil, fmt.Errorf("%s line %d: key %q given twice", path, k.Line, k.Value)
		}
		keys.lines[k.Value] = k.Line
	}
	return keys, nil
}

// badByteLine returns the 1-based line of the first byte a YAML reader
// refuses (YAML 1.2 §5.1: control characters other than tab and line
// breaks, invalid UTF-8), or 0.
func badByteLine(b []byte) int {
	line := 1
	for i := 0; i < len(b); {
		r, size := utf8.DecodeRune(b[i:])
		switch {
		case r == utf8.RuneError && size <= 1:
			return line
		case r == '\n':
			line++
		case r == '\t' || r == '\r' || r == 0xFEFF:
		case r < 0x20 || (r >= 0x7f && r <= 0x9f && r != 0x85) || r == 0xFFFE || r == 0xFFFF:
			return line
		}
		i += size
	}
	return 0
}

// buildConfig turns flags (already merged with the environment and the
// YAML file) into a server.Config. Every error names the flag (which is
// also the YAML key and, upper-cased, the environment variable). The steps
// run in the order of the flags' groups, so the first bad flag is the one
// reported.
func buildConfig(c *cli.Context, keys *yamlKeys) (cfg server.Config, demoPass string, err error) {
	fr := flagReader{c: c, keys: keys}
	auth := func(cfg *server.Config) (err error) {
		demoPass, err = fr.auth(cfg)
		return err
	}
	for _, step := range []func(*server.Config) error{
		fr.addresses, fr.tlsCert, fr.advertise, auth, fr.relay, fr.limits, fr.fleet, fr.loggers,
	} {
		if err := step(&cfg); err != nil {
			return cfg, "", err
		}
	}
	if err := cfg.Validate(); err != nil {
		name := strings.SplitN(err.Error(), ":", 2)[0]
		return cfg, "", fmt.Errorf("%v%s", err, keys.where(name))
	}
	return cfg, demoPass, nil
}

// flagReader reads one group of flags into a server.Config per method.
type flagReader struct {
	c    *cli.Context
	keys *yamlKeys
}

// bad is an error that names the flag and, when it came from the YAML
// file, the line.
func (fr flagReader) bad(flag, format string, a ...any) error {
	return fmt.Errorf("%s: %s%s", flag, fmt.Sprintf(format, a...), fr.keys.where(flag))
}

// addresses reads the RFC 5780 grid: the two IPs, the ports and whether
// TCP is served.
func (fr flagReader) addresses(cfg *server.Config) (err error) {
	c := fr.c
	if cfg.PrimaryIP, err = parseIP(c.String(fPrimaryIP)); err != nil {
		return fr.bad(fPrimaryIP, "%v", err)
	}
	if alt := c.String(fAlternateIP); alt != "" && !c.Bool(fSingleIP) {
		if cfg.AlternateIP, err = parseIP(alt); err != nil {
			return fr.bad(fAlternateIP, "%v", err)
		}
	}
	cfg.Port, cfg.AltPort, cfg.TLSPort = c.Int(fPort), c.Int(fAltPort), c.Int(fTLSPort)
	for _, p := range []struct {
		flag string
		v    int
	}{{fPort, cfg.Port}, {fAltPort, cfg.AltPort}, {fTLSPort, cfg.TLSPort}} {
		if p.v < 1 || p.v > 65535 {
			return fr.bad(p.flag, "%d is not a port (1-65535)", p.v)
		}
	}
	cfg.DisableTCP = c.Bool(fNoTCP)
	return nil
}

// tlsCert loads the certificate for TURN over TLS, when one is configured.
func (fr flagReader) tlsCert(cfg *server.Config) error {
	cert, key := fr.c.String(fCert), fr.c.String(fKey)
	switch {
	case cert != "" && key != "":
		// The certificate itself comes from serve's certreload.Reloader
		// (GetCertificate), which loads the files at start and again
		// on SIGHUP or when they change: a reload of the rest of the
		// configuration must not fail on a certificate being renewed.
		cfg.TLSConfig = &tls.Config{
			// TLS 1.2 is the floor RFC 8489 §6.2.3 and RFC 9325 set.
			MinVersion: tls.VersionTLS12,
		}
	case cert != "" || key != "":
		return fr.bad(fCert, "--cert and --key go together")
	}
	return nil
}

// advertise reads the PRIVATE=PUBLIC address pairs of a 1:1 NAT in front
// of the server.
func (fr flagReader) advertise(cfg *server.Config) error {
	for _, a := range fr.c.StringSlice(fAdvertise) {
		priv, pub, ok := strings.Cut(a, "=")
		if !ok {
			return fr.bad(fAdvertise, "%q is not PRIVATE=PUBLIC", a)
		}
		pa, err1 := parseIP(priv)
		pb, err2 := parseIP(pub)
		if err := errors.Join(err1, err2); err != nil {
			return fr.bad(fAdvertise, "%q: %v", a, err)
		}
		if cfg.Advertise == nil {
			cfg.Advertise = map[netip.Addr]netip.Addr{}
		}
		cfg.Advertise[pa] = pb
	}
	return nil
}

// auth reads the realm, the users and the REST secrets; with neither users
// nor secrets it makes a demo user and returns its password.
func (fr flagReader) auth(cfg *server.Config) (demoPass string, err error) {
	c := fr.c
	cfg.Realm = c.String(fRealm)
	if cfg.Realm == "" {
		return "", fr.bad(fRealm, "must not be empty")
	}
	users := map[string]string{}
	if f := c.String(fUsersFile); f != "" {
		if users, err = server.LoadUsersFile(f); err != nil {
			return "", fr.bad(fUsersFile, "%v", err)
		}
	}
	for _, u := range c.StringSlice(fUser) {
		name, pass, ok := strings.Cut(u, ":")
		if !ok || name == "" || pass == "" {
			return "", fr.bad(fUser, "%q is not NAME:PASSWORD", u)
		}
		users[name] = pass
	}
	cfg.AuthSecrets = c.StringSlice(fAuthSecret)
	if len(users) == 0 && len(cfg.AuthSecrets) == 0 {
		demoPass = randomPassword()
		users[demoUser] = demoPass
	}
	cfg.Users = users
	return demoPass, nil
}

// relay reads the relay port range, the peer policy and the allocation
// quotas.
func (fr flagReader) relay(cfg *server.Config) (err error) {
	c := fr.c
	lo, hi, ok := strings.Cut(c.String(fRelayPorts), "-")
	min, err1 := strconv.ParseUint(strings.TrimSpace(lo), 10, 16)
	max, err2 := strconv.ParseUint(strings.TrimSpace(hi), 10, 16)
	if !ok || err1 != nil || err2 != nil || min == 0 || min > max {
		return fr.bad(fRelayPorts, "%q is not a range MIN-MAX of ports", c.String(fRelayPorts))
	}
	cfg.RelayPortMin, cfg.RelayPortMax = uint16(min), uint16(max)

	if cfg.AllowPeers, err = parsePrefixes(c.StringSlice(fAllowPeer)); err != nil {
		return fr.bad(fAllowPeer, "%v", err)
	}
	if cfg.DenyPeers, err = parsePrefixes(c.StringSlice(fDenyPeer)); err != nil {
		return fr.bad(fDenyPeer, "%v", err)
	}
	cfg.UserQuota, cfg.TotalQuota = c.Int(fUserQuota), c.Int(fTotalQuota)
	if cfg.UserQuota == 0 || cfg.UserQuota < -1 {
		return fr.bad(fUserQuota, "%d: give a positive number, or -1 for unlimited", cfg.UserQuota)
	}
	if cfg.TotalQuota == 0 || cfg.TotalQuota < -1 {
		return fr.bad(fTotalQuota, "%d: give a positive number, or -1 for unlimited", cfg.TotalQuota)
	}
	return nil
}

// limits reads what replies carry and the rate, bandwidth and connection
// limits.
func (fr flagReader) limits(cfg *server.Config) (err error) {
	c := fr.c
	cfg.Software = c.String(fSoftware)
	cfg.RFC5780Lean = c.Bool(fRFC5780Lean)
	if cfg.RFC5780Lean && c.Bool(fRFC5780All) {
		return fr.bad(fRFC5780All, "contradicts %s (%s is deprecated: the RFC 5780 answer is the default; drop it)", fRFC5780Lean, fRFC5780All)
	}
	if cfg.UnauthRate, err = fr.rate(fUnauthRate); err != nil {
		return err
	}
	if cfg.AllocRate, err = fr.rate(fAllocRate); err != nil {
		return err
	}
	if cfg.MaxBPS = c.Int64(fMaxBPS); cfg.MaxBPS < 0 {
		return fr.bad(fMaxBPS, "%d: give bits per second, or 0 for no cap", cfg.MaxBPS)
	}
	if cfg.MaxConnsPerIP = c.Int(fMaxConnsIP); cfg.MaxConnsPerIP == 0 || cfg.MaxConnsPerIP < -1 {
		return fr.bad(fMaxConnsIP, "%d: give a positive number, or -1 for unlimited", cfg.MaxConnsPerIP)
	}
	return nil
}

// fleet reads how the node works in a fleet: its alternates and the load
// balancers allowed to send PROXY protocol headers.
func (fr flagReader) fleet(cfg *server.Config) (err error) {
	for _, a := range fr.c.StringSlice(fAltServer) {
		ap, err := netip.ParseAddrPort(a)
		if err != nil || ap.Port() == 0 {
			return fr.bad(fAltServer, "%q: give IP:PORT (ALTERNATE-SERVER carries an address, RFC 8489 §14.15)", a)
		}
		cfg.AlternateServers = append(cfg.AlternateServers, netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()))
	}
	if cfg.ProxyProtocolFrom, err = parsePrefixes(fr.c.StringSlice(fProxyFrom)); err != nil {
		return fr.bad(fProxyFrom, "%v", err)
	}
	if cfg.Offload, err = offload.ParseMode(fr.c.String(fOffload)); err != nil {
		return fr.bad(fOffload, "%q: give auto, ebpf or off", fr.c.String(fOffload))
	}
	switch v := fr.c.String(fIOURing); v {
	case "auto":
	case "off":
		cfg.DisableIOURing = true
	default:
		return fr.bad(fIOURing, "%q: give auto or off", v)
	}
	if d := fr.c.Duration(fDrainTime); d <= 0 {
		return fr.bad(fDrainTime, "%v: give a positive duration, e.g. 1h", d)
	}
	return nil
}

// rate reads a per-second rate: positive, or -1 for unlimited.
func (fr flagReader) rate(flag string) (float64, error) {
	r := fr.c.Float64(flag)
	if r == 0 || (r < 0 && r != -1) || r != r {
		return 0, fr.bad(flag, "%v: give a positive number per second, or -1 for unlimited", r)
	}
	return r, nil
}

// loggers builds stund's logger and pion's logger factory from the log
// level and format.
func (fr flagReader) loggers(cfg *server.Config) error {
	c := fr.c
	logger, lv, err := newLogger(c.App.ErrWriter, c.String(fLogLevel), c.String(fLogFormat))
	if err != nil {
		return fmt.Errorf("%v%s", err, fr.keys.where(strings.SplitN(err.Error(), ":", 2)[0]))
	}
	cfg.Logger = logger
	if c.IsSet(fRFC5780All) {
		logger.Warn("deprecated setting has no effect: every Binding request gets the RFC 5780 answer unless "+fRFC5780Lean+" is set",
			"setting", fRFC5780All+fr.keys.where(fRFC5780All))
	}
	pf := logging.NewDefaultLoggerFactory()
	pf.Writer = c.App.ErrWriter
	pf.DefaultLogLevel = pionLevel(lv)
	cfg.LoggerFactory = pf
	return nil
}

func parseIP(s string) (netip.Addr, error) {
	a, err := netip.ParseAddr(strings.TrimSpace(s))
	if err != nil {
		return netip.Addr{}, fmt.Errorf("%q is not an IP address", s)
	}
	return a.Unmap(), nil
}

// parsePrefixes accepts CIDRs and bare addresses (a single host).
func parsePrefixes(in []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, s := range in {
		s = strings.TrimSpace(s)
		if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("%q is not a CIDR or an address", s)
		}
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	return out, nil
}

// pionLevel maps slog's level onto pion's; pion's debug is per packet, so
// it is only on at our debug level.
func pionLevel(l slog.Level) logging.LogLevel {
	switch {
	case l <= slog.LevelDebug:
		return logging.LogLevelDebug
	case l <= slog.LevelWarn:
		// pion's info level narrates every allocation step; ours
		// already logs the lifecycle once, so pion speaks from warn.
		return logging.LogLevelWarn
	}
	return logging.LogLevelError
}
