package main

import (
	"fmt"
	"io"
	"strings"

	"github.com/urfave/cli/v2"
)

// completionValues are the fixed values of the flags that have them,
// offered after the flag (newLogger checks the same sets).
var completionValues = map[string][]string{
	"--" + fLogLevel:  {"debug", "info", "warn", "error"},
	"--" + fLogFormat: {"text", "json"},
}

// completer answers --generate-bash-completion (urfave/cli's protocol, used
// by its bash_autocomplete script; docs/operator.md): the values of
// --log-level and --log-format after those flags, otherwise the flags that
// start with the word being completed, all of them when that word is not a
// flag ("stund <TAB>"). It reads the args given to run, not os.Args as
// urfave's default does (which prints nothing without a "-" prefix), so
// tests drive it as the shell does. natprobe's completer works the same way.
func completer(args []string, w io.Writer) cli.BashCompleteFunc {
	return func(c *cli.Context) {
		var words []string
		if len(args) > 0 {
			for _, a := range args[1:] {
				if a != "--generate-bash-completion" {
					words = append(words, a)
				}
			}
		}
		cur, prev := "", ""
		if n := len(words); n > 0 {
			cur = words[n-1]
			if n > 1 {
				prev = words[n-2]
			}
		}
		if v, ok := completionValues[cur]; ok {
			// "stund --log-level <TAB>": the word is the flag itself.
			fmt.Fprintln(w, strings.Join(v, "\n"))
			return
		}
		if v, ok := completionValues[prev]; ok && !strings.HasPrefix(cur, "-") {
			for _, x := range v {
				if strings.HasPrefix(x, cur) {
					fmt.Fprintln(w, x)
				}
			}
			return
		}
		if !strings.HasPrefix(cur, "-") {
			cur = "--"
		}
		for _, f := range c.App.Flags {
			for _, name := range f.Names() {
				opt := "--" + name
				if len(name) == 1 {
					opt = "-" + name
				}
				if strings.HasPrefix(opt, cur) {
					fmt.Fprintln(w, opt)
				}
			}
		}
	}
}
