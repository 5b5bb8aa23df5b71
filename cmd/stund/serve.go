package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/urfave/cli/v2"

	"github.com/stund/stund/internal/certreload"
	"github.com/stund/stund/internal/logfile"
	"github.com/stund/stund/server"
	"github.com/stund/stund/server/admin"
	"github.com/stund/stund/server/sipmirror"
)

// adminShutdownTimeout bounds the admin listener's graceful stop: a scrape
// takes milliseconds, so a stuck one is cut.
const adminShutdownTimeout = 2 * time.Second

// defaultDrainTimeout bounds a drain: TURN allocations last 10 minutes
// unless refreshed, and a call rarely lasts an hour; past it the calls
// still running are cut (their usage records say drained).
const defaultDrainTimeout = time.Hour

// keysOf returns the YAML key positions Before recorded, or nil.
func keysOf(c *cli.Context) *yamlKeys {
	if k, ok := c.App.Metadata["yaml"].(*yamlKeys); ok {
		return k
	}
	return nil
}

// metricsAddr validates --metrics: empty (off) or host:port.
func metricsAddr(c *cli.Context, keys *yamlKeys) (string, error) {
	a := c.String(fMetrics)
	if a == "" {
		return "", nil
	}
	_, port, err := net.SplitHostPort(a)
	if err == nil {
		var p int
		p, err = strconv.Atoi(port)
		if err == nil && (p < 0 || p > 65535) {
			err = fmt.Errorf("port %d out of range", p)
		}
	}
	if err != nil {
		return "", fmt.Errorf("%s: %q is not host:port (%v)%s", fMetrics, a, err, keys.where(fMetrics))
	}
	return a, nil
}

// minTokenLen is the shortest --admin-token accepted: the API can end
// every call on the node, so the token must not be guessable (16
// characters of `openssl rand -hex 32` are 64 bits).
const minTokenLen = 16

// adminToken is the API's bearer token from --admin-token or
// --admin-token-file ("" when neither: the API is off). The API is served
// on the admin listener, so a token without --metrics is an error rather
// than a silently closed API.
func adminToken(c *cli.Context, keys *yamlKeys, admAddr string) (string, error) {
	tok, file := c.String(fAdminToken), c.String(fAdminTokenF)
	flag := fAdminToken
	switch {
	case tok != "" && file != "":
		return "", fmt.Errorf("%s and --%s: give one%s", fAdminToken, fAdminTokenF, keys.where(fAdminTokenF))
	case file != "":
		flag = fAdminTokenF
		b, err := os.ReadFile(file)
		if err != nil {
			return "", fmt.Errorf("%s: %v%s", flag, err, keys.where(flag))
		}
		if tok = strings.TrimSpace(string(b)); tok == "" {
			return "", fmt.Errorf("%s: %s is empty%s", flag, file, keys.where(flag))
		}
	case tok == "":
		return "", nil
	}
	if len(tok) < minTokenLen {
		return "", fmt.Errorf("%s: the token has %d characters, at least %d are needed (e.g. openssl rand -hex 32)%s", flag, len(tok), minTokenLen, keys.where(flag))
	}
	if strings.ContainsAny(tok, " \t\r\n") {
		return "", fmt.Errorf("%s: the token contains white space, which an Authorization header cannot carry%s", flag, keys.where(flag))
	}
	if admAddr == "" {
		return "", fmt.Errorf("%s needs --%s: the API is served on the admin listener%s", flag, fMetrics, keys.where(flag))
	}
	return tok, nil
}

// serve is stund's main action: build the configuration, start the admin
// listener and the server, reload on SIGHUP, stop when ctx ends (SIGINT,
// SIGTERM).
func serve(c *cli.Context, stdout io.Writer) error {
	n := &node{c: c, stdout: stdout, keys: keysOf(c)}
	defer n.cleanup()
	// Registered before anything is bound, so that a SIGHUP arriving
	// during start-up is a reload, never the default action (exit), and a
	// SIGTERM is a drain.
	n.hup = make(chan os.Signal, 1)
	signal.Notify(n.hup, syscall.SIGHUP)
	n.term = make(chan os.Signal, 2)
	signal.Notify(n.term, syscall.SIGTERM)
	n.later(func() { signal.Stop(n.hup); signal.Stop(n.term) })
	for _, step := range []func() error{n.configure, n.certificates, n.usageLog, n.startAdmin, n.startServer} {
		if err := step(); err != nil {
			return err
		}
	}
	return n.run()
}

// node is one run of stund: what serve's steps set up, and what is undone
// when it ends (in reverse).
type node struct {
	c        *cli.Context
	stdout   io.Writer
	keys     *yamlKeys
	cfg      server.Config
	demoPass string
	admAddr  string
	sipCfg   sipmirror.Config
	sipOn    bool
	logger   *slog.Logger
	certs    *certreload.Reloader
	adm      *admin.Handler
	srv      *server.Server
	hup      chan os.Signal
	term     chan os.Signal
	onHUP    []func() // what else a SIGHUP reopens
	undo     []func()
}

func (n *node) later(f func()) { n.undo = append(n.undo, f) }

func (n *node) cleanup() {
	for i := len(n.undo) - 1; i >= 0; i-- {
		n.undo[i]()
	}
}

// configure builds the server's configuration from flags, environment and
// the YAML file.
func (n *node) configure() (err error) {
	if n.cfg, n.demoPass, err = buildConfig(n.c, n.keys); err != nil {
		return configError{err}
	}
	if n.admAddr, err = metricsAddr(n.c, n.keys); err != nil {
		return configError{err}
	}
	n.logger = n.cfg.Logger
	if n.sipCfg, n.sipOn, err = sipConfig(n.c, n.keys, n.cfg); err != nil {
		return configError{err}
	}
	return nil
}

// certificates serves the TLS certificate through a reloader that follows
// the files (SIGHUP, or a change on disk).
func (n *node) certificates() (err error) {
	if n.cfg.TLSConfig == nil {
		return nil
	}
	if n.certs, err = certreload.New(n.c.String(fCert), n.c.String(fKey), n.logger); err != nil {
		return configError{fmt.Errorf("%s: %v%s", fCert, err, n.keys.where(fCert))}
	}
	n.cfg.TLSConfig.GetCertificate = n.certs.GetCertificate
	ctx, cancel := context.WithCancel(n.c.Context)
	watched := make(chan struct{})
	go func() { n.certs.Watch(ctx, certreload.PollInterval); close(watched) }()
	n.later(func() { cancel(); <-watched })
	n.onHUP = append(n.onHUP, func() { _ = n.certs.Reload() }) // a failure is logged and keeps the old certificate
	return nil
}

// usageLog opens --usage-log, reopened on SIGHUP for logrotate.
func (n *node) usageLog() error {
	path := n.c.String(fUsageLog)
	if path == "" {
		return nil
	}
	usage, err := logfile.Open(path)
	if err != nil {
		return configError{fmt.Errorf("%s: %v%s", fUsageLog, err, n.keys.where(fUsageLog))}
	}
	n.later(func() { _ = usage.Close() })
	n.cfg.UsageLog = usage
	n.onHUP = append(n.onHUP, func() {
		if err := usage.Reopen(); err != nil {
			n.logger.Error("usage log not reopened; still writing to the old file", "file", path, "error", err)
		}
	})
	return nil
}

// startAdmin starts the admin listener, before the server, so that
// /healthz answers while stund starts.
func (n *node) startAdmin() error {
	c := n.c
	if c.Bool(fPprof) && n.admAddr == "" {
		return configError{fmt.Errorf("%s needs --%s: the profiler is served on the admin listener%s", fPprof, fMetrics, n.keys.where(fPprof))}
	}
	token, err := adminToken(c, n.keys, n.admAddr)
	if err != nil {
		return configError{err}
	}
	n.adm = &admin.Handler{Pprof: c.Bool(fPprof)}
	n.adm.SetToken(token)
	if n.admAddr == "" {
		return nil
	}
	ln, err := net.Listen("tcp", n.admAddr)
	if err != nil {
		return fmt.Errorf("%s: %w", fMetrics, err)
	}
	// The relay must never reach the admin listener (its pprof shows the
	// command line, secrets included): the server refuses its port on
	// every address of the host (RFC 8656 §17).
	if a, ok := ln.Addr().(*net.TCPAddr); ok {
		n.cfg.ProtectedListeners = append(n.cfg.ProtectedListeners, a.AddrPort())
	}
	hs := &http.Server{Handler: n.adm, ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = hs.Serve(ln) }()
	n.later(func() {
		ctx, cancel := context.WithTimeout(context.Background(), adminShutdownTimeout)
		defer cancel()
		_ = hs.Shutdown(ctx)
	})
	paths := "/metrics /healthz /readyz"
	if n.adm.Pprof {
		paths += " /debug/pprof/"
	}
	if token != "" {
		paths += " /allocations /users/ /drain"
	}
	fmt.Fprintf(n.stdout, "stund: admin on http://%s (%s)\n", ln.Addr(), paths)
	return nil
}

// startServer binds and starts the server and attaches it to the admin
// listener.
func (n *node) startServer() (err error) {
	if n.srv, err = server.New(n.cfg); err != nil {
		return err
	}
	n.srv.Registry().MustRegister(buildInfo())
	if n.sipOn {
		mirror, err := startSIP(n.sipCfg, n.srv, n.stdout)
		if err != nil {
			_ = n.srv.Close()
			return err
		}
		n.later(func() { _ = mirror.Close() })
	}
	if n.certs != nil {
		n.srv.Registry().MustRegister(certMetrics(n.certs)...)
	}
	n.adm.Attach(n.srv)
	if n.demoPass != "" {
		fmt.Fprintf(n.stdout, "stund: demo TURN user %q password %q realm %q\n", demoUser, n.demoPass, n.cfg.Realm)
	}
	var bound []string
	for _, row := range n.srv.Grid() {
		for _, a := range row {
			if a.IsValid() { // single-IP mode has no alternate row
				bound = append(bound, a.String())
			}
		}
	}
	fmt.Fprintf(n.stdout, "stund: listening on udp %s\n", strings.Join(bound, " "))
	return nil
}

// run serves until SIGINT (at once), a second SIGTERM (at once), or the
// end of a drain (SIGTERM or POST /drain: when the last allocation ends or
// --drain-timeout runs out); SIGHUP reloads.
func (n *node) run() error {
	c, srv, logger := n.c, n.srv, n.logger
	args, _ := c.App.Metadata["args"].([]string)
	var drained chan error
	started := srv.DrainStarted()
	for {
		select {
		case <-c.Context.Done():
			logger.Info("shutting down", "allocations", srv.AllocationCount())
			return srv.Close()
		case <-n.term:
			if srv.Draining() {
				logger.Info("second SIGTERM: stopping now", "allocations", srv.AllocationCount())
				return srv.Close()
			}
			srv.Drain()
		case <-started: // SIGTERM or POST /drain
			started = nil
			drained = make(chan error, 1)
			go func() {
				ctx, cancel := context.WithTimeout(c.Context, c.Duration(fDrainTime))
				defer cancel()
				drained <- srv.WaitDrained(ctx)
			}()
		case err := <-drained:
			if err != nil {
				logger.Warn("drain timeout: stopping with allocations left", "allocations", srv.AllocationCount(), "drain_timeout", c.Duration(fDrainTime))
			} else {
				logger.Info("drained: no allocation left")
			}
			return srv.Close()
		case <-n.hup:
			n.demoPass = reload(srv, n.adm, args, n.demoPass, logger, n.stdout, c.App.ErrWriter)
			for _, f := range n.onHUP {
				f()
			}
		}
	}
}

// reload re-reads the command line, the environment and the YAML file, as
// at start, and applies what can change on a running server. A bad
// configuration is logged and the running settings stay. It returns the
// demo password in force. The admin token is re-read too, so that it
// rotates without a restart.
func reload(srv *server.Server, adm *admin.Handler, args []string, demoPass string, logger *slog.Logger, stdout, stderr io.Writer) string {
	logger.Info("SIGHUP: reloading configuration")
	if args == nil {
		logger.Error("reload failed: the command line is unknown; keeping the running settings")
		return demoPass
	}
	cfg, newDemo, token, err := loadConfig(args, stderr)
	if err != nil {
		logger.Error("reload failed; keeping the running settings", "error", err)
		srv.ReloadFailed() // stund_reloads_total{result="error"}
		return demoPass
	}
	if newDemo != "" && demoPass != "" {
		// Still no credentials configured: keep the demo password the
		// operator was shown rather than invent a new one.
		cfg.Users[demoUser] = demoPass
		newDemo = demoPass
	} else if newDemo != "" {
		fmt.Fprintf(stdout, "stund: demo TURN user %q password %q\n", demoUser, newDemo)
	}
	if err := srv.Reload(cfg); err != nil {
		logger.Error("reload failed; keeping the running settings", "error", err)
		return demoPass
	}
	adm.SetToken(token)
	return newDemo
}

// loadConfig parses args with the environment and the YAML file exactly as
// the start did, without starting anything.
func loadConfig(args []string, stderr io.Writer) (cfg server.Config, demoPass, token string, err error) {
	app := newApp(io.Discard, stderr)
	app.Action = func(c *cli.Context) error {
		var e error
		cfg, demoPass, e = buildConfig(c, keysOf(c))
		if e != nil {
			return configError{e}
		}
		addr, e := metricsAddr(c, keysOf(c))
		if e != nil {
			return configError{e}
		}
		if token, e = adminToken(c, keysOf(c), addr); e != nil {
			return configError{e}
		}
		return nil
	}
	if err = app.Run(args); err != nil {
		return cfg, "", "", err
	}
	if cfg.Users == nil && cfg.AuthSecrets == nil {
		return cfg, "", "", errors.New("no configuration parsed")
	}
	return cfg, demoPass, token, nil
}

// buildInfo is stund_build_info{version, goversion} = 1.
func buildInfo() prometheus.Collector {
	g := prometheus.NewGauge(prometheus.GaugeOpts{
		Name:        "stund_build_info",
		Help:        "stund's version and the Go version it was built with (always 1).",
		ConstLabels: prometheus.Labels{"version": version, "goversion": runtime.Version()},
	})
	g.Set(1)
	return g
}

// certMetrics exports the TLS certificate's expiry, the alert that catches
// a renewal that never reached stund, and the result of its reloads.
func certMetrics(r *certreload.Reloader) []prometheus.Collector {
	const help = "TLS certificate reloads (SIGHUP or the files changing), by result: ok, or error (the old certificate was kept)."
	loads := func(ok bool) func() float64 {
		return func() float64 {
			o, f := r.Loads()
			if ok {
				return float64(o)
			}
			return float64(f)
		}
	}
	return []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "stund_tls_certificate_expiry_timestamp_seconds",
			Help: "When the TLS certificate served to new handshakes expires (Unix time).",
		}, func() float64 { return float64(r.Current().Leaf.NotAfter.Unix()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "stund_tls_certificate_reloads_total", Help: help, ConstLabels: prometheus.Labels{"result": "ok"},
		}, loads(true)),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "stund_tls_certificate_reloads_total", Help: help, ConstLabels: prometheus.Labels{"result": "error"},
		}, loads(false)),
	}
}
