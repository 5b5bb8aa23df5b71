package server

// probeid.go lets an operator find a customer's natprobe run in stund's log:
// natprobe puts "natprobe/<version> probe=<id>" in the SOFTWARE attribute
// (RFC 8489 §14.14) of its Binding requests, and stund logs each probe ID
// once, at info, with the client address. A run sends dozens of requests
// with one ID; the log gets one line.

import (
	"bytes"
	"net/netip"
	"sync"
	"time"

	"github.com/stund/stund/internal/stunwire"
)

const (
	// probeSeenMax bounds the set of remembered IDs (at most ~100 bytes
	// each): a natprobe run lasts seconds to minutes, so 4096 covers
	// thousands of concurrent customers, and a flood of made-up IDs only
	// evicts the oldest.
	probeSeenMax = 4096
	// probeSeenTTL is how long an ID stays remembered: longer than one
	// natprobe run (its mapping-lifetime test waits up to a few minutes),
	// and a --watch session that lasts hours gets one line per TTL, which
	// tells the operator it is still running.
	probeSeenTTL = 10 * time.Minute
	// probeIDMaxLen bounds the ID we accept (natprobe sends 8 hex digits).
	probeIDMaxLen = 64
	// probeLogBurst and probeLogPerSec rate-limit the log lines: a
	// client spraying fresh IDs gets a counter (stund_natprobe_probes_suppressed_total),
	// not a log flood.
	probeLogBurst  = 20
	probeLogPerSec = 5
)

var (
	softwarePrefix = []byte("natprobe/")
	probeKeys      = [][]byte{[]byte("probe="), []byte("probe-id=")}
)

type probeSeen struct {
	id string
	at time.Time
}

// probeLog is the bounded, time-expiring set of probe IDs already logged.
type probeLog struct {
	mu     sync.Mutex
	seen   map[string]time.Time
	order  []probeSeen // ring of insertions, oldest at head once full
	head   int
	tokens float64
	last   time.Time
}

// noteProbe looks for a natprobe SOFTWARE attribute in a Binding request
// that arrived from src. It is on the Binding fast path: a request without
// attributes returns at once, others cost one walk over the attribute
// headers, and only a SOFTWARE value starting with "natprobe/" goes further.
func (s *Server) noteProbe(pkt []byte, src netip.AddrPort, transport string) {
	if len(pkt) <= stunwire.HeaderSize {
		return
	}
	it := stunwire.NewAttrs(pkt)
	for {
		typ, val, _, ok := it.Next()
		if !ok {
			return
		}
		if typ == stunwire.AttrSoftware {
			if bytes.HasPrefix(val, softwarePrefix) {
				s.logProbe(val, src, transport)
			}
			return
		}
	}
}

// parseProbeSoftware splits "natprobe/<version> probe=<id>" (or
// "probe-id=<id>"). ok is false when there is no well-formed ID: only
// [0-9A-Za-z_-], 1 to probeIDMaxLen characters, so a log line never
// carries arbitrary bytes.
func parseProbeSoftware(val []byte) (version, id []byte, ok bool) {
	rest := val[len(softwarePrefix):]
	version = rest
	if i := bytes.IndexByte(rest, ' '); i >= 0 {
		version = rest[:i]
	}
	for _, k := range probeKeys {
		i := bytes.Index(rest, k)
		if i < 0 || (i > 0 && rest[i-1] != ' ') {
			continue
		}
		id = rest[i+len(k):]
		if j := bytes.IndexByte(id, ' '); j >= 0 {
			id = id[:j]
		}
		if len(id) == 0 || len(id) > probeIDMaxLen {
			return nil, nil, false
		}
		for _, c := range id {
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '-' || c == '_') {
				return nil, nil, false
			}
		}
		if len(version) > probeIDMaxLen {
			version = version[:probeIDMaxLen]
		}
		return version, id, true
	}
	return nil, nil, false
}

func (s *Server) logProbe(val []byte, src netip.AddrPort, transport string) {
	version, id, ok := parseProbeSoftware(val)
	if !ok {
		return
	}
	switch s.probes.admit(id, time.Now()) {
	case probeKnown:
	case probeLimited:
		s.ops.probesSuppressed.Add(1)
	case probeNew:
		s.ops.probesLogged.Add(1)
		s.log.Info("natprobe probe", "probe_id", string(id), "client", src.String(),
			"transport", transport, "natprobe", string(version))
	}
}

type probeVerdict int

const (
	probeKnown   probeVerdict = iota // logged within the TTL: nothing to do
	probeNew                         // log it
	probeLimited                     // new, but over the log rate: count it
)

// admit decides about one ID and records it when it is to be logged.
func (p *probeLog) admit(id []byte, now time.Time) probeVerdict {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.seen == nil {
		p.seen = make(map[string]time.Time)
		p.tokens = probeLogBurst
		p.last = now
	}
	if at, ok := p.seen[string(id)]; ok && now.Sub(at) < probeSeenTTL {
		return probeKnown
	}
	p.tokens += now.Sub(p.last).Seconds() * probeLogPerSec
	p.last = now
	if p.tokens > probeLogBurst {
		p.tokens = probeLogBurst
	}
	if p.tokens < 1 {
		return probeLimited
	}
	p.tokens--

	key := string(id)
	if len(p.order) < probeSeenMax {
		p.order = append(p.order, probeSeen{key, now})
	} else {
		old := p.order[p.head]
		if at, ok := p.seen[old.id]; ok && at.Equal(old.at) {
			delete(p.seen, old.id)
		}
		p.order[p.head] = probeSeen{key, now}
		p.head = (p.head + 1) % probeSeenMax
	}
	p.seen[key] = now
	return probeNew
}

// len is the number of remembered IDs (tests).
func (p *probeLog) len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.seen)
}
