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

	"github.com/stund/stund/server"
)

// adminShutdownTimeout bounds the admin listener's graceful stop: a scrape
// takes milliseconds, so a stuck one is cut.
const adminShutdownTimeout = 2 * time.Second

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

// serve is stund's main action: build the configuration, start the admin
// listener and the server, reload on SIGHUP, stop when ctx ends (SIGINT,
// SIGTERM).
func serve(c *cli.Context, stdout io.Writer) error {
	keys := keysOf(c)
	cfg, demoPass, err := buildConfig(c, keys)
	if err != nil {
		return configError{err}
	}
	admAddr, err := metricsAddr(c, keys)
	if err != nil {
		return configError{err}
	}
	sipCfg, sipOn, err := sipConfig(c, keys, cfg)
	if err != nil {
		return configError{err}
	}
	logger := cfg.Logger

	// Registered before anything is bound, so that a SIGHUP arriving
	// during start-up is a reload, never the default action (exit).
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)

	if c.Bool(fPprof) && admAddr == "" {
		return configError{fmt.Errorf("%s needs --%s: the profiler is served on the admin listener%s", fPprof, fMetrics, keys.where(fPprof))}
	}
	admin := server.Admin{Pprof: c.Bool(fPprof)}
	if admAddr != "" {
		ln, err := net.Listen("tcp", admAddr)
		if err != nil {
			return fmt.Errorf("%s: %w", fMetrics, err)
		}
		hs := &http.Server{Handler: &admin, ReadHeaderTimeout: 5 * time.Second}
		go func() { _ = hs.Serve(ln) }()
		defer func() {
			ctx, cancel := context.WithTimeout(context.Background(), adminShutdownTimeout)
			defer cancel()
			_ = hs.Shutdown(ctx)
		}()
		paths := "/metrics /healthz /readyz"
		if admin.Pprof {
			paths += " /debug/pprof/"
		}
		fmt.Fprintf(stdout, "stund: admin on http://%s (%s)\n", ln.Addr(), paths)
	}

	srv, err := server.New(cfg)
	if err != nil {
		return err
	}
	srv.Registry().MustRegister(buildInfo())
	if sipOn {
		mirror, err := startSIP(sipCfg, srv, stdout)
		if err != nil {
			_ = srv.Close()
			return err
		}
		defer mirror.Close()
	}
	admin.SetServer(srv)
	if demoPass != "" {
		fmt.Fprintf(stdout, "stund: demo TURN user %q password %q realm %q\n", demoUser, demoPass, cfg.Realm)
	}
	var bound []string
	for _, row := range srv.Grid() {
		for _, a := range row {
			if a.IsValid() { // single-IP mode has no alternate row
				bound = append(bound, a.String())
			}
		}
	}
	fmt.Fprintf(stdout, "stund: listening on udp %s\n", strings.Join(bound, " "))

	args, _ := c.App.Metadata["args"].([]string)
	for {
		select {
		case <-c.Context.Done():
			logger.Info("shutting down", "allocations", srv.AllocationCount())
			return srv.Close()
		case <-hup:
			demoPass = reload(srv, args, demoPass, logger, stdout, c.App.ErrWriter)
		}
	}
}

// reload re-reads the command line, the environment and the YAML file, as
// at start, and applies what can change on a running server. A bad
// configuration is logged and the running settings stay. It returns the
// demo password in force.
func reload(srv *server.Server, args []string, demoPass string, logger *slog.Logger, stdout, stderr io.Writer) string {
	logger.Info("SIGHUP: reloading configuration")
	if args == nil {
		logger.Error("reload failed: the command line is unknown; keeping the running settings")
		return demoPass
	}
	cfg, newDemo, err := loadConfig(args, stderr)
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
	return newDemo
}

// loadConfig parses args with the environment and the YAML file exactly as
// the start did, without starting anything.
func loadConfig(args []string, stderr io.Writer) (cfg server.Config, demoPass string, err error) {
	app := newApp(io.Discard, stderr)
	app.Action = func(c *cli.Context) error {
		var e error
		cfg, demoPass, e = buildConfig(c, keysOf(c))
		if e != nil {
			return configError{e}
		}
		if _, e = metricsAddr(c, keysOf(c)); e != nil {
			return configError{e}
		}
		return nil
	}
	if err = app.Run(args); err != nil {
		return cfg, "", err
	}
	if cfg.Users == nil && cfg.AuthSecrets == nil {
		return cfg, "", errors.New("no configuration parsed")
	}
	return cfg, demoPass, nil
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
