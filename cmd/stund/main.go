// Command stund is a public STUN/TURN service: RFC 8489 Binding with
// RFC 5780 NAT-behaviour discovery on two IPs and two ports, and an RFC 8656
// relay behind authentication, a peer policy and quotas.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"

	"github.com/urfave/cli/v2"
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

// exitUsage is the exit status of a command-line or configuration error,
// the same as natprobe's so scripts can treat both alike.
const exitUsage = 2

func main() {
	os.Exit(run(context.Background(), os.Args, os.Stdout, os.Stderr))
}

// run is main without the process: tests call it with their own args and
// writers, and cancel ctx to stop the server as a signal would.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	// SIGINT stops at once; SIGTERM starts a drain (serve), and a second
	// one stops at once.
	ctx, stop := signal.NotifyContext(ctx, os.Interrupt)
	defer stop()

	app := newApp(stdout, stderr)
	app.Metadata = map[string]any{"args": args} // SIGHUP parses them again
	setCompletion(app, args, stdout)
	err := app.RunContext(ctx, args)
	if err == nil {
		return 0
	}
	var cue ctlUsageError
	if errors.As(err, &cue) { // ctl printed its own help
		fmt.Fprintf(stderr, "stund ctl: %v\n", err)
		return exitUsage
	}
	var ue usageError
	if errors.As(err, &ue) || isFlagError(err) {
		fmt.Fprintf(stderr, "stund: %v\n\n", err)
		_ = cli.ShowAppHelp(cli.NewContext(app, nil, nil))
		return exitUsage
	}
	var ce configError
	if errors.As(err, &ce) {
		fmt.Fprintf(stderr, "stund: %v\n", err)
		return exitUsage
	}
	fmt.Fprintf(stderr, "stund: %v\n", err)
	return 1
}
