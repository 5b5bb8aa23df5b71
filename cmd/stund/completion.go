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

// completer answers --generate-bash-completion: the values of --log-level
// and --log-format after those flags, otherwise the matching flags
// (docs/operator.md).
func completer(args []string, w io.Writer) cli.BashCompleteFunc {
	return clicomplete.Func(args, w, completionValues)
}
