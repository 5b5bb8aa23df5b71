package main

import (
	"io"

	"github.com/urfave/cli/v2"

	"github.com/stund/stund/internal/clicomplete"
)

// completionValues are the fixed values of the flags that have them,
// offered after the flag (newLogger checks the same sets).
var completionValues = map[string][]string{
	"--" + fLogLevel:  {"debug", "info", "warn", "error"},
	"--" + fLogFormat: {"text", "json"},
}

// setCompletion answers --generate-bash-completion for stund and each of
// its commands: the values of --log-level and --log-format after those
// flags, otherwise the matching flags and commands (docs/operator.md).
func setCompletion(app *cli.App, args []string, w io.Writer) {
	f := clicomplete.Func(args, w, completionValues)
	app.BashComplete = f
	var walk func([]*cli.Command)
	walk = func(cmds []*cli.Command) {
		for _, c := range cmds {
			c.BashComplete = f
			walk(c.Subcommands)
		}
	}
	walk(app.Commands)
}
