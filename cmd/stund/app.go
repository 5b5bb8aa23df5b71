package main

import (
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"io"
	"log/slog"
	"strings"

	"github.com/urfave/cli/v2"
	"github.com/urfave/cli/v2/altsrc"

	"github.com/stund/stund/server"
)

// usageError is a misuse of the command line: stund prints usage and
// exits 2.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// configError is a bad value (from a flag, the environment or the YAML
// file): stund names where it came from and exits 2 before binding.
type configError struct{ err error }

func (e configError) Error() string { return e.err.Error() }
func (e configError) Unwrap() error { return e.err }

func isFlagError(err error) bool {
	s := err.Error()
	return strings.Contains(s, "flag provided but not defined") ||
		strings.Contains(s, "flag needs an argument") ||
		strings.Contains(s, "invalid value")
}

// envName is the environment variable of a flag: STUND_<FLAG>.
func envName(flag string) []string {
	return []string{"STUND_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))}
}

// Flag names, used by the flags, the YAML keys and the error messages.
const (
	fConfig      = "config"
	fPrimaryIP   = "primary-ip"
	fAlternateIP = "alternate-ip"
	fSingleIP    = "single-ip"
	fPort        = "port"
	fAltPort     = "alt-port"
	fTLSPort     = "tls-port"
	fCert        = "cert"
	fKey         = "key"
	fNoTCP       = "no-tcp"
	fAdvertise   = "advertise"
	fRealm       = "realm"
	fUser        = "user"
	fUsersFile   = "users-file"
	fAuthSecret  = "auth-secret"
	fRelayPorts  = "relay-ports"
	fAllowPeer   = "allow-peer"
	fDenyPeer    = "deny-peer"
	fUserQuota   = "user-quota"
	fTotalQuota  = "total-quota"
	fUnauthRate  = "unauth-rate"
	fAllocRate   = "alloc-rate"
	fMaxBPS      = "max-bps"
	fMaxConnsIP  = "max-conns-per-ip"
	fSoftware    = "software"
	fRFC5780Lean = "rfc5780-lean"
	// fRFC5780All is deprecated and has no effect (the RFC 5780 answer is
	// the default); still accepted so that old configurations start.
	fRFC5780All  = "rfc5780-always"
	fLogLevel    = "log-level"
	fLogFormat   = "log-format"
	fMetrics     = "metrics"
	fPprof       = "pprof"
	fAdminToken  = "admin-token"
	fAdminTokenF = "admin-token-file"
	fAltServer   = "alternate-server"
	fDrainTime   = "drain-timeout"
	fUsageLog    = "usage-log"
	fProxyFrom   = "proxy-protocol-from"
	fOffload     = "offload"
	fIOURing     = "io-uring"
)

// Embedded defaults: stund with no flags runs on any Linux box, where the
// whole of 127.0.0.0/8 is on the loopback interface.
const (
	defaultPrimaryIP   = "127.0.0.1"
	defaultAlternateIP = "127.0.0.2"
	// demoUser is created, with a random password printed at start, only
	// when no credentials are configured at all.
	demoUser = "demo"
)

func flags() []cli.Flag {
	return append([]cli.Flag{
		&cli.StringFlag{Name: fConfig, EnvVars: envName(fConfig), Usage: "YAML configuration `FILE` (keys are the flag names; see configs/stund.yaml)"},
		altsrc.NewStringFlag(&cli.StringFlag{Name: fPrimaryIP, EnvVars: envName(fPrimaryIP), Value: defaultPrimaryIP, Usage: "primary `IP` to bind (never the wildcard: replies must leave from it)"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: fAlternateIP, EnvVars: envName(fAlternateIP), Value: defaultAlternateIP, Usage: "alternate `IP` for RFC 5780 CHANGE-REQUEST and OTHER-ADDRESS (empty or --single-ip: none)"}),
		altsrc.NewBoolFlag(&cli.BoolFlag{Name: fSingleIP, EnvVars: envName(fSingleIP), Usage: "run on the primary IP only: no OTHER-ADDRESS, CHANGE-REQUEST of the IP gets 420 (RFC 5780 §6)"}),
		altsrc.NewIntFlag(&cli.IntFlag{Name: fPort, EnvVars: envName(fPort), Value: server.DefaultPort, Usage: "primary `PORT` (UDP and TCP)"}),
		altsrc.NewIntFlag(&cli.IntFlag{Name: fAltPort, EnvVars: envName(fAltPort), Value: server.DefaultAltPort, Usage: "alternate UDP `PORT` for RFC 5780"}),
		altsrc.NewIntFlag(&cli.IntFlag{Name: fTLSPort, EnvVars: envName(fTLSPort), Value: server.DefaultTLSPort, Usage: "TLS `PORT` (used when --cert and --key are given)"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: fCert, EnvVars: envName(fCert), Usage: "TLS certificate chain `FILE` (PEM)"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: fKey, EnvVars: envName(fKey), Usage: "TLS private key `FILE` (PEM)"}),
		altsrc.NewBoolFlag(&cli.BoolFlag{Name: fNoTCP, EnvVars: envName(fNoTCP), Usage: "do not listen on TCP"}),
		altsrc.NewStringSliceFlag(&cli.StringSliceFlag{Name: fAdvertise, EnvVars: envName(fAdvertise), Usage: "`PRIVATE=PUBLIC` address behind a cloud 1:1 NAT (repeatable, one per IP)"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: fRealm, EnvVars: envName(fRealm), Value: server.DefaultRealm, Usage: "TURN `REALM` (RFC 8489 §9.2)"}),
		altsrc.NewStringSliceFlag(&cli.StringSliceFlag{Name: fUser, EnvVars: envName(fUser), Usage: "static TURN user `NAME:PASSWORD` (repeatable)"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: fUsersFile, EnvVars: envName(fUsersFile), Usage: "`FILE` of name:password lines (# comments)"}),
		altsrc.NewStringSliceFlag(&cli.StringSliceFlag{Name: fAuthSecret, EnvVars: envName(fAuthSecret), Usage: "TURN REST API shared `SECRET` (repeatable for rotation)"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: fRelayPorts, EnvVars: envName(fRelayPorts), Value: fmt.Sprintf("%d-%d", server.DefaultRelayPortMin, server.DefaultRelayPortMax), Usage: "relay port `RANGE` MIN-MAX"}),
		altsrc.NewStringSliceFlag(&cli.StringSliceFlag{Name: fAllowPeer, EnvVars: envName(fAllowPeer), Usage: "open a peer `CIDR` the default policy refuses (repeatable)"}),
		altsrc.NewStringSliceFlag(&cli.StringSliceFlag{Name: fDenyPeer, EnvVars: envName(fDenyPeer), Usage: "refuse a further peer `CIDR` (repeatable)"}),
		altsrc.NewIntFlag(&cli.IntFlag{Name: fUserQuota, EnvVars: envName(fUserQuota), Value: server.DefaultUserQuota, Usage: "allocations per user (486 beyond; -1 unlimited)"}),
		altsrc.NewIntFlag(&cli.IntFlag{Name: fTotalQuota, EnvVars: envName(fTotalQuota), Value: server.DefaultTotalQuota, Usage: "allocations in total (486 beyond; -1 unlimited)"}),
		altsrc.NewFloat64Flag(&cli.Float64Flag{Name: fUnauthRate, EnvVars: envName(fUnauthRate), Value: server.DefaultUnauthRate, Usage: "unauthenticated responses (UDP Binding replies, 401s) per second per source IP or IPv6 /64, burst 4 s' worth; beyond it requests are dropped and counted (-1 unlimited)"}),
		altsrc.NewFloat64Flag(&cli.Float64Flag{Name: fAllocRate, EnvVars: envName(fAllocRate), Value: server.DefaultAllocRate, Usage: "Allocates per second per user, burst 4 s' worth (486 beyond; -1 unlimited)"}),
		altsrc.NewInt64Flag(&cli.Int64Flag{Name: fMaxBPS, EnvVars: envName(fMaxBPS), Usage: "cap on each user's relayed UDP traffic in `BITS` per second, each direction, over all the user's allocations; datagrams over it are dropped and counted (0: no cap)"}),
		altsrc.NewIntFlag(&cli.IntFlag{Name: fMaxConnsIP, EnvVars: envName(fMaxConnsIP), Value: server.DefaultMaxConnsPerIP, Usage: "concurrent TCP/TLS connections per source IP or IPv6 /64; more are closed at accept (-1 unlimited)"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: fIOURing, EnvVars: envName(fIOURing), Value: "auto", Usage: "send a batch of relayed datagrams that leaves many relay sockets with one io_uring submission: `MODE` auto (when the kernel and its sandbox allow it; logs why not) or off (a system call per relay socket)"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: fOffload, EnvVars: envName(fOffload), Value: "auto", Usage: "relay bound UDP channels in the kernel (eBPF): `MODE` auto (when the kernel and privileges allow; logs why not), ebpf (fail to start without it) or off"}),
		altsrc.NewStringSliceFlag(&cli.StringSliceFlag{Name: fProxyFrom, EnvVars: envName(fProxyFrom), Usage: "load balancer `CIDR` whose TCP/TLS connections must start with a PROXY protocol v1/v2 header naming the client (repeatable); from other sources a header is never honoured"}),
		altsrc.NewStringSliceFlag(&cli.StringSliceFlag{Name: fAltServer, EnvVars: envName(fAltServer), Usage: "`IP:PORT` named (round robin) in 300 Try Alternate answers to new Allocates while draining or full (repeatable; without it: 508 while draining)"}),
		altsrc.NewDurationFlag(&cli.DurationFlag{Name: fDrainTime, EnvVars: envName(fDrainTime), Value: defaultDrainTimeout, Usage: "after SIGTERM or POST /drain, how long existing allocations may run before stund exits anyway (a second SIGTERM, or SIGINT, exits at once)"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: fUsageLog, EnvVars: envName(fUsageLog), Usage: "append one JSON usage record per ended allocation to `FILE` (reopened on SIGHUP, for logrotate)"}),
		altsrc.NewBoolFlag(&cli.BoolFlag{Name: fRFC5780Lean, EnvVars: envName(fRFC5780Lean), Usage: "OTHER-ADDRESS and RESPONSE-ORIGIN only for Binding requests that use an RFC 5780 feature, within 2x the request (off: every request gets them, as NAT-discovery clients need; 2.8x for a bare request over IPv4, 4.6x over IPv6)"}),
		altsrc.NewBoolFlag(&cli.BoolFlag{Name: fRFC5780All, EnvVars: envName(fRFC5780All), Hidden: true, Usage: "deprecated, no effect: every Binding request gets the RFC 5780 answer unless --rfc5780-lean"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: fSoftware, EnvVars: envName(fSoftware), Usage: "SOFTWARE attribute `TEXT` (default: none, it only helps attackers)"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: fLogLevel, EnvVars: envName(fLogLevel), Value: "info", Usage: "`LEVEL`: debug, info, warn or error"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: fLogFormat, EnvVars: envName(fLogFormat), Value: "text", Usage: "log `FORMAT`: text or json"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: fMetrics, EnvVars: envName(fMetrics), Usage: "admin listener `ADDR` (host:port, e.g. 127.0.0.1:9641) serving /metrics (Prometheus), /healthz and /readyz; off when empty"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: fAdminToken, EnvVars: envName(fAdminToken), Usage: "bearer `TOKEN` that turns on the operator API on the --metrics listener (allocations, kill, drain; stund ctl); at least 16 characters; prefer the environment or --admin-token-file to the command line, which other local users can read"}),
		altsrc.NewStringFlag(&cli.StringFlag{Name: fAdminTokenF, EnvVars: envName(fAdminTokenF), Usage: "read the --admin-token from `FILE` (surrounding white space ignored; re-read on SIGHUP)"}),
		altsrc.NewBoolFlag(&cli.BoolFlag{Name: fPprof, EnvVars: envName(fPprof), Usage: "also serve Go's profiler under /debug/pprof/ on the --metrics listener (keep that listener private: profiles show internals and cost CPU while taken)"}),
	}, sipFlags()...)
}

func newApp(stdout, stderr io.Writer) *cli.App {
	fl := flags()
	app := &cli.App{
		Name:                 "stund",
		Usage:                "STUN (RFC 8489, RFC 5780) and TURN (RFC 8656) server",
		UsageText:            "stund [flags]    (no flags: 127.0.0.1 + 127.0.0.2, ports 3478/3479, a demo user)\n   stund ctl list|kill|drain    (the admin API's client)",
		Version:              version,
		Flags:                fl,
		Writer:               stdout,
		ErrWriter:            stderr,
		EnableBashCompletion: true,
		HideHelpCommand:      true,
		Before: func(c *cli.Context) error {
			if c.NArg() > 0 {
				if c.App.Command(c.Args().First()) != nil {
					return nil // a client command: no server configuration to read
				}
				return usageError{fmt.Errorf("unexpected argument %q (stund takes only flags, or the command ctl)", c.Args().First())}
			}
			path := c.String(fConfig)
			if path == "" {
				return nil
			}
			keys, err := checkYAMLKeys(path, fl)
			if err != nil {
				return configError{err}
			}
			src, err := altsrc.NewYamlSourceFromFile(path)
			if err != nil {
				return configError{fmt.Errorf("%s: %w", path, err)}
			}
			if err := altsrc.ApplyInputSourceValues(c, src, fl); err != nil {
				return configError{keys.explain(err)}
			}
			if c.App.Metadata == nil {
				c.App.Metadata = map[string]any{}
			}
			c.App.Metadata["yaml"] = keys
			return nil
		},
		OnUsageError: func(_ *cli.Context, err error, _ bool) error {
			return usageError{err}
		},
		Action: func(c *cli.Context) error {
			return serve(c, stdout)
		},
		Commands: []*cli.Command{ctlCommand(stdout)},
	}
	return app
}

// randomPassword makes the demo user's password: 12 random bytes, enough
// that nobody guesses it during a demo.
func randomPassword() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return base64.RawURLEncoding.EncodeToString(b)
}

// newLogger builds stund's slog logger from --log-level and --log-format.
func newLogger(w io.Writer, level, format string) (*slog.Logger, slog.Level, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, 0, fmt.Errorf("%s: %q is not one of debug, info, warn, error", fLogLevel, level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), lv, nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), lv, nil
	}
	return nil, 0, fmt.Errorf("%s: %q is not text or json", fLogFormat, format)
}
