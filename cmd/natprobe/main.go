// Command natprobe classifies the NAT between this host and a stund server
// (RFC 4787 behaviours, measured as in RFC 5780), says what that means for
// SIP and RTP, and, when the NAT needs one, proves that a TURN relay works.
//
// Usage: natprobe [flags] HOST[:PORT]
//
// Exit status: 0 classified, 1 some field inconclusive (also: no UDP reply
// while the server answers over TCP/TLS, udp-blocked with mapping and
// filtering inconclusive), 2 usage error, 3 server unreachable (or the name
// does not resolve) or not RFC 5780 capable. The JSON output and the exit
// statuses are documented in docs/natprobe-json.md.
package main

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/pion/transport/v5"
	"github.com/urfave/cli/v2"

	"github.com/stund/stund/classifier"
	"github.com/stund/stund/internal/clicomplete"
	"github.com/stund/stund/relay"
)

// Exit statuses: a contract with scripts (docs/natprobe-json.md).
const (
	exitClassified   = 0 // every measured field settled
	exitInconclusive = 1 // a report, but some field is inconclusive
	exitUsage        = 2 // bad command line; usage printed
	exitServer       = 3 // nothing answered / not RFC 5780 capable / probe could not run
)

const (
	// defaultPort is the STUN/TURN port (RFC 8489 §18.6, RFC 8656 §4).
	defaultPort = 3478
	// defaultTimeout bounds a run without --lifetime: the probe itself
	// takes about a second and a relay proof at most a few seconds per
	// transport (relay.DefaultAttemptTimeout), so 20 s only stops a hang.
	defaultTimeout = 20 * time.Second
	// defaultLifetimeMax is the longest idle time the --lifetime search
	// tries: 300 s covers the common NAT UDP timeouts (30 s to 5 min;
	// RFC 4787 REQ-5 asks for at least 2 min).
	defaultLifetimeMax = 300 * time.Second
	// minWatch is the shortest --watch interval: a probe takes about a
	// second on a clean path (longer under loss), and a public server
	// should not see more than one run per second from one customer.
	minWatch = time.Second
)

// version is set at build time with -ldflags "-X main.version=…"; otherwise
// it comes from the module's build info.
var version = ""

func appVersion() string {
	if version != "" {
		return version
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}

	return "dev"
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// usageError is a command-line mistake: print usage, exit 2.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

// serverError is exit 3; the message says which of the cases it is.
type serverError struct{ msg string }

func (e serverError) Error() string { return e.msg }

// options is the parsed command line.
type options struct {
	server      string // host:port
	format      string // text, json or markdown
	hairpin     bool
	lifetime    bool
	lifetimeMax time.Duration
	relay       bool
	turnUser    string
	turnPass    string
	turnSecret  string
	transports  []string
	turnTLSPort int         // TLS port of the TURN server (its host is the server's)
	turnTLS     *tls.Config // nil: verify against the system roots
	timeout     time.Duration
	watch       time.Duration // 0: one run; else repeat every watch and print changes
	watchCount  int           // with watch: stop after this many runs; 0 = until Ctrl-C
	sip         classifier.SIPConfig
	net         transport.Net // nil = the host's network; tests pass a vnet
	// probeFn runs one classification; nil means classifier.Probe. Tests
	// inject a fake to drive --watch.
	probeFn func(context.Context, classifier.Config) (*classifier.Report, error)
}

// exitStatusHelp is the exit-status part of --help, one line per status,
// written from the constants so that it cannot drift from them
// (docs/natprobe-json.md#exit-status has the details).
var exitStatusHelp = fmt.Sprintf("Exit status:\n"+
	"  %d  classified: every measured field settled\n"+
	"  %d  some field inconclusive; also UDP blocked while the server answers\n"+
	"     over TCP/TLS (udp-blocked: mapping and filtering inconclusive)\n"+
	"  %d  usage error (bad flag or value, bad HOST[:PORT])\n"+
	"  %d  server unreachable (no reply over UDP, TCP or TLS; the name does not\n"+
	"     resolve), or not RFC 5780 capable",
	exitClassified, exitInconclusive, exitUsage, exitServer)

// formats natprobe can print.
var formats = []string{"text", "json", "markdown"}

func newApp(stdout, stderr io.Writer, code *int) *cli.App {
	app := &cli.App{
		Name:                 "natprobe",
		Usage:                "classify the NAT in front of this host (RFC 4787) and tell what it means for SIP/RTP",
		UsageText:            "natprobe [flags] HOST[:PORT]",
		ArgsUsage:            "HOST[:PORT]",
		Description:          "Probes a stund (RFC 5780) server, default port " + strconv.Itoa(defaultPort) + ".\n" + exitStatusHelp,
		Version:              appVersion(),
		Writer:               stdout,
		ErrWriter:            stderr,
		EnableBashCompletion: true,
		HideHelpCommand:      true,
		Suggest:              true,
		Flags: append([]cli.Flag{
			&cli.BoolFlag{Name: "json", Usage: "print one JSON object (schema natprobe/1); same as --format json"},
			&cli.StringFlag{Name: "format", Value: "text", Usage: "output format: " + strings.Join(formats, ", ")},
			&cli.BoolFlag{Name: "no-hairpin", Usage: "skip the hairpinning test (RFC 4787 §6)"},
			&cli.BoolFlag{Name: "lifetime", Usage: "measure the mapping lifetime (RFC 4787 §4.3); takes up to --lifetime-max"},
			&cli.DurationFlag{Name: "lifetime-max", Value: defaultLifetimeMax, Usage: "longest idle time the lifetime search tries"},
			&cli.BoolFlag{Name: "relay", Usage: "prove the TURN relay even when the NAT does not need one"},
			&cli.StringFlag{Name: "turn-user", EnvVars: []string{"NATPROBE_TURN_USER"}, Usage: "TURN username (long-term credentials)"},
			&cli.StringFlag{Name: "turn-pass", EnvVars: []string{"NATPROBE_TURN_PASS"}, Usage: "TURN password"},
			&cli.StringFlag{Name: "turn-secret", EnvVars: []string{"NATPROBE_TURN_SECRET"}, Usage: "TURN REST shared secret (derives a short-lived username and password)"},
			&cli.StringFlag{Name: "turn-transport", Usage: "TURN transport: udp, tcp or tls (default: udp, then tcp, then tls if UDP is blocked)"},
			&cli.IntFlag{Name: "turn-tls-port", Value: relay.DefaultTLSPort, EnvVars: []string{"NATPROBE_TURN_TLS_PORT"}, Usage: "`PORT` of TURN over TLS on the server's host (RFC 8656 §4: 5349)"},
			&cli.StringFlag{Name: "turn-ca", EnvVars: []string{"NATPROBE_TURN_CA"}, Usage: "verify the TURN server's TLS certificate against the PEM certificates in `FILE` instead of the system roots (a private or self-signed CA)"},
			&cli.DurationFlag{Name: "timeout", Usage: "bound on the whole run (on each run with --watch)", DefaultText: defaultTimeout.String() + ", plus --lifetime-max with --lifetime"},
			&cli.DurationFlag{Name: "watch", Usage: "repeat the probe every `DURATION` (at least " + minWatch.String() + ") and print only what changes; Ctrl-C stops"},
			&cli.IntFlag{Name: "watch-count", Usage: "with --watch: stop after `N` runs (default: until Ctrl-C)"},
		}, sipFlags()...),
		OnUsageError: func(c *cli.Context, err error, _ bool) error {
			return usageError{msg: err.Error()}
		},
		// Exit codes are ours (run maps errors); never let urfave exit.
		ExitErrHandler: func(*cli.Context, error) {},
		Action: func(c *cli.Context) error {
			opts, err := parseOptions(c)
			if err != nil {
				return err
			}
			*code, err = probe(c.Context, opts, stdout, stderr)

			return err
		},
	}

	return app
}

// run is main without os.Exit, so tests can call it.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	code := exitClassified
	app := newApp(stdout, stderr, &code)
	app.BashComplete = completer(args, stdout)
	err := app.RunContext(ctx, args)
	var ue usageError
	var se serverError
	switch {
	case err == nil:
		return code
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "natprobe: %s\n\n", ue.msg)
		app.Writer = stderr
		_ = cli.ShowAppHelp(cli.NewContext(app, nil, nil))

		return exitUsage
	case errors.As(err, &se):
		fmt.Fprintf(stderr, "natprobe: %s\n", se.msg)

		return exitServer
	default:
		fmt.Fprintf(stderr, "natprobe: %v\n", err)

		return exitServer
	}
}

// completer answers --generate-bash-completion (docs/natprobe.md): the
// values of --format and --turn-transport after those flags, otherwise the
// matching flags.
func completer(args []string, w io.Writer) cli.BashCompleteFunc {
	return clicomplete.Func(args, w, map[string][]string{
		"--format":         formats,
		"--turn-transport": {relay.UDP, relay.TCP, relay.TLS},
	})
}

// parseOptions reads the command line into options; every misuse is a
// usageError naming the flag.
func parseOptions(c *cli.Context) (*options, error) {
	server, err := serverArg(c)
	if err != nil {
		return nil, err
	}
	o := &options{
		server:      server,
		format:      c.String("format"),
		hairpin:     !c.Bool("no-hairpin"),
		lifetime:    c.Bool("lifetime"),
		lifetimeMax: c.Duration("lifetime-max"),
		relay:       c.Bool("relay"),
		turnUser:    c.String("turn-user"),
		turnPass:    c.String("turn-pass"),
		turnSecret:  c.String("turn-secret"),
		timeout:     c.Duration("timeout"),
	}
	for _, step := range []func(*cli.Context) error{o.parseFormat, o.parseSIP, o.parseTiming, o.parseTURN} {
		if err := step(c); err != nil {
			return nil, err
		}
	}

	return o, nil
}

// serverArg is the one HOST[:PORT] argument, validated.
func serverArg(c *cli.Context) (string, error) {
	if c.NArg() == 0 {
		return "", usageError{"missing HOST: the stund server to probe"}
	}
	if c.NArg() > 1 {
		msg := fmt.Sprintf("one HOST expected, got %d arguments: %s", c.NArg(), strings.Join(c.Args().Slice(), " "))
		for _, a := range c.Args().Tail() {
			if strings.HasPrefix(a, "-") {
				msg += " (flags go before HOST)"

				break
			}
		}

		return "", usageError{msg}
	}
	server, err := hostPort(c.Args().First())
	if err != nil {
		return "", usageError{err.Error()}
	}

	return server, nil
}

// parseFormat checks --format and folds --json into it.
func (o *options) parseFormat(c *cli.Context) error {
	if !contains(formats, o.format) {
		return usageError{fmt.Sprintf("--format %q: want one of %s", o.format, strings.Join(formats, ", "))}
	}
	if c.Bool("json") {
		if c.IsSet("format") && o.format != "json" {
			return usageError{fmt.Sprintf("--json and --format %s contradict each other", o.format)}
		}
		o.format = "json"
	}

	return nil
}

// parseSIP reads the SIP test's flags (sip.go).
func (o *options) parseSIP(c *cli.Context) (err error) {
	o.sip, err = sipOptions(c)
	return err
}

// parseTiming checks --lifetime-max, --timeout (defaulting it to cover the
// lifetime search) and --watch/--watch-count.
func (o *options) parseTiming(c *cli.Context) error {
	if o.lifetimeMax <= 0 {
		return usageError{fmt.Sprintf("--lifetime-max %v: must be positive", o.lifetimeMax)}
	}
	if c.IsSet("timeout") && o.timeout <= 0 {
		return usageError{fmt.Sprintf("--timeout %v: must be positive", o.timeout)}
	}
	if o.timeout == 0 {
		o.timeout = defaultTimeout + 2*o.sip.Call // the call runs directly and maybe through the relay
		if o.lifetime {
			o.timeout += o.lifetimeMax
		}
	}
	o.watch, o.watchCount = c.Duration("watch"), c.Int("watch-count")
	if c.IsSet("watch") && o.watch < minWatch {
		return usageError{fmt.Sprintf("--watch %v: at least %v (a probe takes about a second, and the server is shared)", o.watch, minWatch)}
	}
	if c.IsSet("watch-count") && (o.watch == 0 || o.watchCount < 1) {
		return usageError{"--watch-count N needs --watch and N ≥ 1"}
	}

	return nil
}

// parseTURN checks the TURN flags: transport, TLS port and CA, and
// credentials that go together.
func (o *options) parseTURN(c *cli.Context) error {
	if t := c.String("turn-transport"); t != "" {
		if t != relay.UDP && t != relay.TCP && t != relay.TLS {
			return usageError{fmt.Sprintf("--turn-transport %q: want udp, tcp or tls", t)}
		}
		o.transports = []string{t}
	}
	o.turnTLSPort = c.Int("turn-tls-port")
	if o.turnTLSPort < 1 || o.turnTLSPort > 65535 {
		return usageError{fmt.Sprintf("--turn-tls-port %d: want 1 to 65535", o.turnTLSPort)}
	}
	if f := c.String("turn-ca"); f != "" {
		pool, err := loadCA(f)
		if err != nil {
			return usageError{"--turn-ca: " + err.Error()}
		}
		o.turnTLS = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	}
	if (o.turnUser == "") != (o.turnPass == "") && o.turnSecret == "" {
		return usageError{"--turn-user and --turn-pass go together"}
	}
	if o.relay && !o.haveTURNCredentials() {
		return usageError{"--relay needs TURN credentials: --turn-user and --turn-pass, or --turn-secret (or NATPROBE_TURN_* in the environment)"}
	}

	return nil
}

// loadCA reads the PEM certificates natprobe trusts for TURN over TLS.
// Verification stays on: a private CA is trusted by naming it, never by
// skipping the check.
func loadCA(file string) (*x509.CertPool, error) {
	pemData, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemData) {
		return nil, fmt.Errorf("%s: no PEM certificate in it", file)
	}

	return pool, nil
}

func (o *options) haveTURNCredentials() bool {
	return o.turnSecret != "" || (o.turnUser != "" && o.turnPass != "")
}

// hostPort validates HOST[:PORT] and fills in the default port. HOST is a
// name, an IPv4 address, or an IPv6 address, bare ("2001:db8::1", no port
// then) or in brackets ("[2001:db8::1]:3479", RFC 3986 §3.2.2). Anything it
// cannot read as one of those is an error that says what is wrong, never a
// guess: "[::1" is not "[::1]". Whether a name resolves is not checked
// here: that is the probe's (exit 3, unreachable).
func hostPort(arg string) (string, error) {
	bad := func(why string) error { return fmt.Errorf("bad HOST[:PORT] %q: %s", arg, why) }
	if arg == "" {
		return "", errors.New("empty HOST")
	}
	host, port := arg, ""
	switch {
	case strings.HasPrefix(arg, "["):
		end := strings.Index(arg, "]")
		if end < 0 {
			return "", bad(`"[" without a closing "]"`)
		}
		host, port = arg[1:end], arg[end+1:]
		if port != "" {
			if port[0] != ':' {
				return "", bad(`after "]" only ":PORT" may follow`)
			}
			port = port[1:]
			if port == "" {
				return "", bad(`empty port after ":"`)
			}
		}
		if a, err := netip.ParseAddr(host); err != nil || !a.Is6() {
			return "", bad(fmt.Sprintf("%q in brackets is not an IPv6 address", host))
		}
	case strings.Count(arg, ":") > 1:
		// A bare IPv6 address; a port needs the brackets.
		if _, err := netip.ParseAddr(arg); err != nil {
			return "", bad("not an IPv6 address (write [ADDRESS]:PORT for a port)")
		}
	case strings.Contains(arg, ":"):
		host, port, _ = strings.Cut(arg, ":")
		if port == "" {
			return "", bad(`empty port after ":"`)
		}
	}
	if host == "" {
		return "", bad("empty host")
	}
	if i := strings.IndexFunc(host, func(r rune) bool {
		return r <= ' ' || r == 0x7f || strings.ContainsRune("/\\[]@?#,;\"'", r)
	}); i >= 0 {
		return "", bad(fmt.Sprintf("%q is not allowed in a host", host[i:i+1]))
	}
	if port == "" {
		port = strconv.Itoa(defaultPort)
	} else if n, err := strconv.Atoi(port); err != nil || strings.ContainsAny(port[:1], "+-") {
		return "", bad(fmt.Sprintf("port %q is not a number", port))
	} else if n < 1 || n > 65535 {
		return "", bad(fmt.Sprintf("port %d is out of range (1 to 65535)", n))
	}

	return net.JoinHostPort(host, port), nil
}

// newProbeID returns 8 random hex digits: short enough to read out over the
// phone, and 32 bits make a collision between two runs an operator greps
// for on the same day negligible.
func newProbeID() string {
	var b [4]byte
	_, _ = rand.Read(b[:])

	return hex.EncodeToString(b[:])
}

// runMeta is what a printed report says about the run itself.
type runMeta struct {
	time time.Time // when the run started
	// udpBlocked is set when no UDP request got a reply (the report is
	// udp-blocked): why, as the message says it.
	udpBlocked error
}

// probe runs the classifier, then the relay proof when it is needed, and
// prints the report; with --watch it repeats (watch.go). It returns the
// exit status.
func probe(parent context.Context, o *options, stdout, stderr io.Writer) (int, error) {
	id := newProbeID()
	if o.watch > 0 {
		return watch(parent, o, id, stdout, stderr)
	}
	rep, meta, code, err := measure(parent, o, id, stderr)
	if rep == nil {
		return code, err
	}
	if rerr := render(stdout, o.format, rep, meta, colorFor(stdout)); rerr != nil {
		return exitServer, rerr
	}

	return code, err
}

// measure is one run: the classifier, then the relay proof when it is
// needed. rep is nil when there is nothing to print (server unreachable,
// probe could not run); err is then the serverError to show. A report from
// a server that is not RFC 5780 capable comes with exitServer and its error.
func measure(parent context.Context, o *options, id string, stderr io.Writer) (rep *classifier.Report, meta runMeta, code int, err error) {
	start := time.Now()
	meta.time = start
	ctx, cancel := context.WithTimeout(parent, o.timeout)
	defer cancel()

	progress := newProgress(stderr)
	defer progress.done()
	cfg := classifier.Config{
		Server:      o.server,
		Hairpin:     o.hairpin,
		Lifetime:    o.lifetime,
		LifetimeMax: o.lifetimeMax,
		Software:    software(id),
		ProbeID:     id,
		Progress:    progress.update,
		Net:         o.net,
		SIP:         o.sip,
	}
	probeFn := o.probeFn
	if probeFn == nil {
		probeFn = classifier.Probe
	}
	rep, err = probeFn(ctx, cfg)
	var fail error
	switch {
	case err == nil:
	case errors.Is(err, classifier.ErrNotRFC5780):
		why := strings.TrimPrefix(strings.TrimPrefix(err.Error(), classifier.ErrNotRFC5780.Error()), ": ")
		if why == "" {
			why = "no usable OTHER-ADDRESS"
		}
		fail = serverError{fmt.Sprintf("%s answers STUN but is not RFC 5780 capable (%s): only the results one address can give are reported", o.server, why)}
	case errors.Is(err, classifier.ErrUnreachable) && rep != nil:
		// Requests went out and nothing came back: UDP is blocked or the
		// server is down. The report says so (legacy type udp-blocked),
		// and the relay over TCP/TLS below tells the two apart.
		fail = serverError{fmt.Sprintf("%s: no reply over UDP (blocked, or server down): %v", o.server, err)}
		meta.udpBlocked = fail
	case errors.Is(err, classifier.ErrUnreachable):
		// Nothing was sent (name does not resolve, no route).
		return nil, meta, exitServer, serverError{fmt.Sprintf("%s is unreachable: %v", o.server, err)}
	default:
		return nil, meta, exitServer, serverError{fmt.Sprintf("probing %s: %v", o.server, err)}
	}
	if rep == nil {
		return nil, meta, exitServer, serverError{fmt.Sprintf("probing %s: no report", o.server)}
	}
	switch {
	case !rep.NeedsRelay() && !o.relay:
	case !o.haveTURNCredentials():
		rep.SetRelayNotTried()
	default:
		progress.update("proving the TURN relay")
		if proveRelay(ctx, o, rep, cfg.Software) && meta.udpBlocked != nil {
			// The server is up: UDP, and only UDP, is blocked on this
			// path. That is a classification (udp-blocked), not a
			// failure to reach the server.
			fail = nil
		}
		relayCall(ctx, o, cfg.Software, rep, progress.update)
	}
	rep.DurationMS = time.Since(start).Milliseconds()

	switch {
	case fail != nil:
		return rep, meta, exitServer, fail
	case rep.Inconclusive():
		return rep, meta, exitInconclusive, nil
	default:
		return rep, meta, exitClassified, nil
	}
}

// proveRelay runs relay.Prove with the options' server and credentials and
// records the proof in rep; it says whether the server gave a STUN answer
// on the way (classifier.Report.SetRelay).
func proveRelay(ctx context.Context, o *options, rep *classifier.Report, software string) (answered bool) {
	transports := o.transports
	if rep.UDPBlocked() && len(transports) == 0 {
		// UDP just went unanswered for seconds: go straight to the
		// stream transports (RFC 8656 §3.1).
		transports = []string{relay.TCP, relay.TLS}
	}
	p, err := relay.Prove(ctx, relayConfig(o, software), transports...)
	return rep.SetRelay(p, err)
}

// relayConfig is the TURN client's configuration from the options.
func relayConfig(o *options, software string) relay.Config {
	return relay.Config{
		Server:    o.server,
		TLSServer: tlsServer(o),
		Username:  o.turnUser,
		Password:  o.turnPass,
		Secret:    o.turnSecret,
		TLSConfig: o.turnTLS,
		Software:  software,
		Net:       o.net,
	}
}

// software is the SOFTWARE attribute (RFC 8489 §14.14) of every request
// natprobe sends: stund logs the probe ID once per run (server/probeid.go),
// so an operator can find a customer's run in the server's log.
func software(id string) string {
	return "natprobe/" + appVersion() + " probe-id=" + id
}

// tlsServer is where TURN over TLS is: the server's host on --turn-tls-port
// (relay's default, 5349, when the options name none).
func tlsServer(o *options) string {
	host, _, err := net.SplitHostPort(o.server)
	if err != nil || o.turnTLSPort == 0 {
		return ""
	}

	return net.JoinHostPort(host, strconv.Itoa(o.turnTLSPort))
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}

	return false
}
