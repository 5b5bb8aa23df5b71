package main

// watch.go is --watch: the probe repeated every DURATION, printing a full
// report first and then only what changed. A NAT whose behaviour changes
// over time (a CGN that runs out of ports and turns symmetric, a failover to
// another public IP, a firewall rule pushed at noon) is a real support case
// that a single run misses.

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/stund/stund/classifier"
)

// changeSchema names the NDJSON change lines of --watch --json; bump it on
// any incompatible change (docs/natprobe-json.md).
const changeSchema = "natprobe-change/1"

// watchedField is one thing --watch compares between runs, with how to read
// it from a report as a JSON value. Fields that differ on every run by
// design (probe ID is constant; local port, mapped port, timings, packet
// counts) are not watched: a change must mean the network changed.
type watchedField struct {
	name string
	get  func(*classifier.Report) any
}

// boolOrNil keeps the three values apart: true, false, null (not measured).
func boolOrNil(b *bool) any {
	if b == nil {
		return nil
	}

	return *b
}

func strOrNil[T ~string](s T) any {
	if s == "" {
		return nil
	}

	return string(s)
}

// watchedFields are compared in this order, so changes print in a stable
// order (the order of the report).
var watchedFields = []watchedField{
	{"reachable", func(r *classifier.Report) any { return r != nil }},
	{"public_ip", func(r *classifier.Report) any {
		if !r.MappedAddress.IsValid() {
			return nil
		}

		return r.MappedAddress.Addr().String()
	}},
	{"nat_detected", func(r *classifier.Report) any { return boolOrNil(r.NATDetected) }},
	{"mapping", func(r *classifier.Report) any { return strOrNil(r.Mapping) }},
	{"filtering", func(r *classifier.Report) any { return strOrNil(r.Filtering) }},
	{"hairpinning", func(r *classifier.Report) any { return boolOrNil(r.Hairpinning) }},
	{"port_preservation", func(r *classifier.Report) any { return boolOrNil(r.PortPreservation) }},
	{"port_parity", func(r *classifier.Report) any { return boolOrNil(r.PortParity) }},
	{"port_contiguity", func(r *classifier.Report) any { return boolOrNil(r.PortContiguity) }},
	{"ip_pooling", func(r *classifier.Report) any {
		if r.IPPooling == nil {
			return nil
		}

		return string(*r.IPPooling)
	}},
	{"mapping_lifetime", func(r *classifier.Report) any {
		if r.MappingLifetime == nil {
			return nil
		}
		if r.MappingLifetime.MaxS == nil {
			return fmt.Sprintf("> %g s", r.MappingLifetime.MinS)
		}

		return fmt.Sprintf("%g-%g s", r.MappingLifetime.MinS, *r.MappingLifetime.MaxS)
	}},
	{"alg_detected", func(r *classifier.Report) any { return boolOrNil(r.ALGDetected) }},
	{"legacy_type", func(r *classifier.Report) any { return strOrNil(r.LegacyType) }},
	{"inconclusive_fields", func(r *classifier.Report) any {
		if len(r.InconclusiveFields) == 0 {
			return nil
		}

		return strings.Join(r.InconclusiveFields, ",")
	}},
	{"server_other_address", func(r *classifier.Report) any {
		if !r.ServerOtherAddress.IsValid() {
			return nil
		}

		return r.ServerOtherAddress.String()
	}},
	{"relay", func(r *classifier.Report) any {
		switch {
		case r.Relay == nil:
			return nil
		case r.Relay.OK:
			return "works over " + r.Relay.Transport
		default:
			return "failed over " + r.Relay.Transport
		}
	}},
	{"sip_rtp.keepalive_interval_s", func(r *classifier.Report) any { return r.SIPRTP.KeepaliveIntervalS }},
	{"sip_rtp.summary", func(r *classifier.Report) any { return strOrNil(r.SIPRTP.Summary) }},
}

// snapshot reads every watched field of one run; an unreachable server
// (rep nil) gives only "reachable": false, so the other fields keep their
// last known values and a recovery prints only what really changed.
func snapshot(rep *classifier.Report) map[string]any {
	if rep == nil {
		return map[string]any{"reachable": false}
	}
	s := make(map[string]any, len(watchedFields))
	for _, f := range watchedFields {
		s[f.name] = f.get(rep)
	}

	return s
}

// change is one line of --watch output after the first report.
type change struct {
	Schema  string `json:"schema"`
	Time    string `json:"time"`
	ProbeID string `json:"probe_id"`
	Run     int    `json:"run"`
	Field   string `json:"field"`
	Old     any    `json:"old"`
	New     any    `json:"new"`
	Error   string `json:"error,omitempty"` // why the server is unreachable
}

// diff lists the watched fields of cur that differ from last, in the
// order of watchedFields, and folds cur into last.
func diff(last, cur map[string]any) []change {
	var cs []change
	for _, f := range watchedFields {
		nv, ok := cur[f.name]
		if !ok {
			continue
		}
		if ov, seen := last[f.name]; !seen || ov != nv {
			if seen {
				cs = append(cs, change{Field: f.name, Old: ov, New: nv})
			}
			last[f.name] = nv
		}
	}

	return cs
}

// showValue prints a watched value for people: null is "not measured".
func showValue(v any) string {
	switch v := v.(type) {
	case nil:
		return "not measured"
	case bool:
		if v {
			return "yes"
		}

		return "no"
	case int:
		return strconv.Itoa(v)
	default:
		return fmt.Sprint(v)
	}
}

// watch runs the probe every o.watch (start to start; at once when a run
// took longer), o.watchCount times or until ctx ends (Ctrl-C). The first
// completed run prints a full report, later ones one line per change. It
// returns the exit status of the last completed run; an interrupt is a
// clean end, not an error.
func watch(ctx context.Context, o *options, id string, stdout, stderr io.Writer) (int, error) {
	var (
		last     map[string]any // watched values so far; nil until the first report
		code     = exitServer
		runErr   error
		mdHeader bool
	)
	for run := 1; o.watchCount == 0 || run <= o.watchCount; run++ {
		started := time.Now()
		rep, meta, c, err := measure(ctx, o, id, stderr)
		if ctx.Err() != nil {
			// Interrupted mid-run: the run is abandoned, nothing half-printed.
			break
		}
		code, runErr = c, err
		if meta.udpBlocked != nil {
			// --watch follows the UDP path: a run without a UDP reply is
			// "reachable": false (even when a relay over TCP/TLS works), and
			// the other fields keep their last values.
			rep, err = nil, meta.udpBlocked
			if runErr == nil {
				runErr = err
			}
		}
		switch {
		case last == nil && rep == nil:
			// No first report yet: say so once per run on stderr and retry.
			fmt.Fprintf(stderr, "natprobe: %s: %v (retrying every %v)\n", rfc3339(meta.time), err, o.watch)
		case last == nil:
			if err := renderFirst(stdout, o, id, rep, meta); err != nil {
				return exitServer, err
			}
			last = snapshot(rep)
		default:
			for _, ch := range diff(last, snapshot(rep)) {
				ch.Schema, ch.Time, ch.ProbeID, ch.Run = changeSchema, rfc3339(meta.time), id, run
				if ch.Field == "reachable" && rep == nil && err != nil {
					ch.Error = err.Error()
				}
				if err := printChange(stdout, o.format, ch, &mdHeader); err != nil {
					return exitServer, err
				}
			}
		}
		if o.watchCount != 0 && run == o.watchCount {
			break
		}
		wait := time.NewTimer(time.Until(started.Add(o.watch)))
		select {
		case <-ctx.Done():
			wait.Stop()
		case <-wait.C:
		}
		if ctx.Err() != nil {
			break
		}
	}
	if last == nil {
		// Not one report: the last run's error says why.
		if runErr == nil {
			runErr = serverError{"interrupted before the first report"}
		}

		return exitServer, runErr
	}
	if code == exitServer {
		// The report was printed; the message stays on stderr.
		return code, runErr
	}

	return code, nil
}

// renderFirst prints the full report that opens a --watch session. In JSON
// it is one line (NDJSON: one object per line, the change lines follow).
func renderFirst(w io.Writer, o *options, id string, rep *classifier.Report, meta runMeta) error {
	if o.format == "json" {
		return json.NewEncoder(w).Encode(newJSONReport(rep, meta))
	}
	if err := render(w, o.format, rep, meta, colorFor(w)); err != nil {
		return err
	}
	_, err := fmt.Fprintf(w, "\nwatching every %v (probe id %s); changes follow\n", o.watch, id)

	return err
}

// printChange prints one change: a line for people, a markdown table row,
// or one JSON object per line (NDJSON).
func printChange(w io.Writer, format string, ch change, mdHeader *bool) error {
	switch format {
	case "json":
		b, err := json.Marshal(ch)
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(w, "%s\n", b)

		return err
	case "markdown":
		if !*mdHeader {
			fmt.Fprintf(w, "\n#### Changes\n\n| time | field | old | new |\n|---|---|---|---|\n")
			*mdHeader = true
		}
		_, err := fmt.Fprintf(w, "| %s | %s | %s | %s |\n", ch.Time, mdEscape(ch.Field), mdEscape(showValue(ch.Old)), mdEscape(showValue(ch.New)))

		return err
	default:
		line := fmt.Sprintf("%s  %s  %s → %s", ch.Time, ch.Field, showValue(ch.Old), showValue(ch.New))
		if ch.Error != "" {
			line += " (" + ch.Error + ")"
		}
		_, err := fmt.Fprintln(w, line)

		return err
	}
}
