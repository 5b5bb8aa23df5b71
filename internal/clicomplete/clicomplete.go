// Package clicomplete answers urfave/cli's shell-completion protocol for
// both commands, from the arguments they were run with.
package clicomplete

import (
	"fmt"
	"io"
	"strings"

	"github.com/urfave/cli/v2"
)

// Func answers --generate-bash-completion (urfave/cli's protocol, used by
// its bash_autocomplete script): after a flag listed in values, that flag's
// values (those starting with the word being completed); otherwise the
// flags of the command being completed that start with the word, and all
// of them followed by its subcommands when the word is not a flag
// ("stund <TAB>", "stund ctl <TAB>"). It reads args (as given to the command, args[0] the
// program) rather than os.Args as urfave's default does, which prints
// nothing without a "-" prefix, so tests drive it as the shell does.
func Func(args []string, w io.Writer, values map[string][]string) cli.BashCompleteFunc {
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
		if v, ok := values[cur]; ok {
			// "cmd --flag <TAB>": the word is the flag itself.
			fmt.Fprintln(w, strings.Join(v, "\n"))
			return
		}
		if v, ok := values[prev]; ok && !strings.HasPrefix(cur, "-") {
			for _, x := range v {
				if strings.HasPrefix(x, cur) {
					fmt.Fprintln(w, x)
				}
			}
			return
		}
		flags, cmds := c.App.Flags, c.App.Commands
		if c.Command != nil { // the command being completed, or the root
			flags, cmds = c.Command.Flags, c.Command.Subcommands
		}
		if !strings.HasPrefix(cur, "-") {
			// The shell filters the word itself; a command word
			// ("stund ctl <TAB>") is complete, so offer what follows.
			cur = "--"
			defer func() {
				for _, sub := range cmds {
					if !sub.Hidden {
						fmt.Fprintln(w, sub.Name)
					}
				}
			}()
		}
		for _, f := range flags {
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
