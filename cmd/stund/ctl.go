package main

// ctl.go is `stund ctl`: the operator's client for the admin API that
// server/admin serves behind --admin-token.

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/stund/stund/server/admin"
)

const (
	fAdmin   = "admin"
	fCtlUser = "user"
	fCtlJSON = "json"
	// defaultAdminURL is the admin listener the documentation and
	// configs/stund.yaml use (--metrics 127.0.0.1:9641; --metrics has no
	// default, the listener is off unless configured).
	defaultAdminURL = "http://127.0.0.1:9641"
	// ctlTimeout bounds one API call: the server answers from memory, so
	// a call that takes longer is a network problem, not a slow answer.
	ctlTimeout = 10 * time.Second
)

// ctlUsageError is a misuse of stund ctl: the command's help is already
// printed, run only reports it and exits 2.
type ctlUsageError struct{ err error }

func (e ctlUsageError) Error() string { return e.err.Error() }
func (e ctlUsageError) Unwrap() error { return e.err }

// ctlMisuse prints the command's help and returns the error run exits 2 on.
func ctlMisuse(c *cli.Context, format string, a ...any) error {
	_ = cli.ShowSubcommandHelp(c)
	return ctlUsageError{fmt.Errorf(format, a...)}
}

func ctlCommand(stdout io.Writer) *cli.Command {
	onUsage := func(c *cli.Context, err error, _ bool) error {
		_ = cli.ShowSubcommandHelp(c)
		return ctlUsageError{err}
	}
	noArgs := func(c *cli.Context) error {
		if c.NArg() > 0 {
			return ctlMisuse(c, "unexpected argument %q", c.Args().First())
		}
		return nil
	}
	// sub is one ctl command, with the connection flags and ctl's
	// handling of misuse.
	sub := func(name, usage, usageText string, action cli.ActionFunc, fl ...cli.Flag) *cli.Command {
		return &cli.Command{
			Name: name, Usage: usage, UsageText: usageText,
			HideHelpCommand: true, OnUsageError: onUsage,
			Flags: append(connFlags(), fl...), Action: action,
		}
	}

	list := func(c *cli.Context) error {
		if err := noArgs(c); err != nil {
			return err
		}
		path := "/allocations"
		if u := c.String(fCtlUser); u != "" {
			path += "?user=" + url.QueryEscape(u)
		}
		var list []admin.Allocation
		if err := newAPIClient(c).call(http.MethodGet, path, http.StatusOK, &list); err != nil {
			return err
		}
		if c.Bool(fCtlJSON) {
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			return enc.Encode(list)
		}
		return printAllocations(stdout, list, time.Now())
	}
	kill := func(c *cli.Context) error {
		user := c.String(fCtlUser)
		switch {
		case user != "" && c.NArg() > 0, user == "" && c.NArg() != 1:
			return ctlMisuse(c, "give one allocation ID or --user NAME")
		case user != "":
			var k admin.Killed
			if err := newAPIClient(c).call(http.MethodDelete, "/users/"+url.PathEscape(user)+"/allocations", http.StatusOK, &k); err != nil {
				return err
			}
			fmt.Fprintf(stdout, "killed %d allocation(s) of %s\n", k.Killed, user)
		default:
			id := c.Args().First()
			if err := newAPIClient(c).call(http.MethodDelete, "/allocations/"+url.PathEscape(id), http.StatusOK, nil); err != nil {
				return err
			}
			fmt.Fprintf(stdout, "killed %s\n", id)
		}
		return nil
	}
	drain := func(c *cli.Context) error {
		if err := noArgs(c); err != nil {
			return err
		}
		var r admin.Readiness
		if err := newAPIClient(c).call(http.MethodPost, "/drain", http.StatusAccepted, &r); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "%s: %d allocation(s) left\n", r.State, r.Allocations)
		return nil
	}

	return &cli.Command{
		Name:      "ctl",
		Usage:     "talk to a running stund's admin API (needs --admin-token on both sides)",
		UsageText: "stund ctl [--admin URL] [--admin-token TOKEN] list|kill|drain",
		Description: "The API is served on stund's --metrics listener only when stund has an --admin-token.\n" +
			"STUND_ADMIN_TOKEN serves both: set it once for the server and for ctl.",
		HideHelpCommand: true,
		OnUsageError:    onUsage,
		Flags:           connFlags(),
		Before: func(c *cli.Context) error {
			if c.Args().Present() && c.Command.Command(c.Args().First()) == nil {
				return ctlMisuse(c, "unknown command %q (list, kill or drain)", c.Args().First())
			}
			return nil
		},
		Action: func(c *cli.Context) error {
			return ctlMisuse(c, "say what to do: list, kill or drain")
		},
		Subcommands: []*cli.Command{
			sub("list", "list live allocations", "stund ctl list [--user NAME] [--json]", list,
				&cli.StringFlag{Name: fCtlUser, Usage: "only `NAME`'s allocations (a REST username includes its expiry)"},
				&cli.BoolFlag{Name: fCtlJSON, Usage: "print the API's JSON instead of a table"}),
			sub("kill", "end one allocation at once (its client gets 437), or every allocation of a user", "stund ctl kill ID | stund ctl kill --user NAME", kill,
				&cli.StringFlag{Name: fCtlUser, Usage: "end every allocation of `NAME`"}),
			sub("drain", "start a drain: /readyz turns 503, new allocations go elsewhere, live ones run to their end", "stund ctl drain", drain),
		},
	}
}

// apiClient calls one stund's admin API.
type apiClient struct {
	base, token string
	http        *http.Client
}

// connFlags say which stund to talk to. ctl and each of its commands take
// them, so that both "stund ctl --admin URL list" and "stund ctl list
// --admin URL" work.
func connFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: fAdmin, EnvVars: envName("admin-url"), Value: defaultAdminURL, Usage: "stund's admin listener `URL` (its --metrics address)"},
		&cli.StringFlag{Name: fAdminToken, EnvVars: envName(fAdminToken), Usage: "the bearer `TOKEN` stund was started with"},
	}
}

// connFlag is the value of a connFlags flag where it was given: after the
// command, else after ctl, else its environment variable or default.
// (urfave/cli's own lookup stops at the innermost command that defines
// the flag, given or not.)
func connFlag(c *cli.Context, name string) string {
	for _, x := range c.Lineage() {
		if x.Command != nil && x.IsSet(name) {
			return x.String(name)
		}
	}
	return c.String(name)
}

func newAPIClient(c *cli.Context) *apiClient {
	return &apiClient{
		base:  strings.TrimRight(connFlag(c, fAdmin), "/"),
		token: connFlag(c, fAdminToken),
		http:  &http.Client{Timeout: ctlTimeout},
	}
}

// call sends method path and decodes a JSON answer with status want into
// out (when not nil). Its errors say what the operator should check.
func (a *apiClient) call(method, path string, want int, out any) error {
	u := a.base + path
	req, err := http.NewRequest(method, u, nil)
	if err != nil {
		return fmt.Errorf("--%s %q: %v", fAdmin, a.base, err)
	}
	if a.token != "" {
		req.Header.Set("Authorization", "Bearer "+a.token)
	}
	resp, err := a.http.Do(req)
	if err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) {
			return fmt.Errorf("nothing listens at %s: is stund running with --metrics on that address? (--%s)", a.base, fAdmin)
		}
		return fmt.Errorf("%s %s: %v", method, u, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("%s %s: %v", method, u, err)
	}
	msg := strings.TrimSpace(string(body))
	switch {
	case resp.StatusCode == want:
	case resp.StatusCode == http.StatusUnauthorized:
		return fmt.Errorf("%s: wrong or missing --%s (or STUND_ADMIN_TOKEN)", a.base, fAdminToken)
	case resp.StatusCode == http.StatusNotFound && string(body) == admin.APIOff:
		return fmt.Errorf("%s: %s", a.base, msg)
	default:
		return fmt.Errorf("%s %s: %s: %s", method, u, resp.Status, msg)
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(body, out); err != nil {
		return fmt.Errorf("%s %s: the answer is not the API's JSON (is %s stund's admin listener?): %v", method, u, a.base, err)
	}
	return nil
}

// printAllocations writes list as a table, oldest first as the API gave it.
func printAllocations(w io.Writer, list []admin.Allocation, now time.Time) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tUSER\tCLIENT\tTRANSPORT\tRELAYED\tAGE\tTO PEERS\tFROM PEERS")
	for _, a := range list {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", a.ID, a.User, a.Client, a.Transport, a.Relayed,
			now.Sub(a.Started).Round(time.Second), byteCount(a.BytesOut), byteCount(a.BytesIn))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	_, err := fmt.Fprintf(w, "%d allocation(s)\n", len(list))
	return err
}

// byteCount renders n in binary units, three significant figures at most.
func byteCount(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
