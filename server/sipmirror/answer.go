package sipmirror

import (
	"bytes"
	"errors"
	"fmt"
	"hash/fnv"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/stund/stund/internal/sipmsg"
)

// Drop reasons, the label values of the drop counter.
const (
	DropNotSIP      = "not-sip"
	DropMalformed   = "malformed"
	DropTooLarge    = "too-large"        // over the sipmsg size limits
	DropResponse    = "response"         // a SIP response: nothing to answer
	DropACK         = "ack"              // RFC 3261 §17.2.1: ACK gets no response
	DropAmplify     = "answer-too-big"   // the UDP answer would exceed the request
	DropRateLimited = "rate-limited"     // the source IP's budget (Config.Allow) is spent
	DropConnLimit   = "conn-limit"       // too many connections from the IP, or in total
	DropTimeout     = "timeout"          // a stream message did not arrive in msgTimeout
	DropConnMsgs    = "conn-msg-limit"   // a stream asked more than maxMsgsPerConn
	DropMediaNoSIP  = "media-no-sip"     // media from an IP without a recent SIP exchange
	DropMediaRate   = "media-rate"       // over the per-flow packet rate
	DropMediaAge    = "media-flow-age"   // the flow is older than mediaFlowMax
	DropMediaShort  = "media-short"      // too short to carry the stamp
	DropMediaTable  = "media-table-full" // too many flows or SIP sources at once
)

// Stats is a snapshot of the mirror's counters.
type Stats struct {
	Requests map[string]uint64 // by transport: udp, tcp, tls
	Answers  map[string]uint64 // by transport
	Drops    map[string]uint64 // by reason (Drop* constants)
	Echoes   uint64            // media packets echoed
}

type counters struct {
	mu                       sync.Mutex
	requests, answers, drops map[string]uint64
	echoes                   uint64
}

func (c *counters) init() {
	c.requests, c.answers, c.drops = map[string]uint64{}, map[string]uint64{}, map[string]uint64{}
}

func (c *counters) inc(m map[string]uint64, k string) {
	c.mu.Lock()
	m[k]++
	c.mu.Unlock()
}

// Stats returns a snapshot of the counters.
func (m *Mirror) Stats() Stats {
	c := &m.stats
	c.mu.Lock()
	defer c.mu.Unlock()
	cp := func(in map[string]uint64) map[string]uint64 {
		out := make(map[string]uint64, len(in))
		for k, v := range in {
			out[k] = v
		}
		return out
	}
	return Stats{Requests: cp(c.requests), Answers: cp(c.answers), Drops: cp(c.drops), Echoes: c.echoes}
}

func (c *counters) drop(reason string) { c.inc(c.drops, reason) }

// handle parses one request and appends its answer to out. ok is false
// when nothing is to be sent; the reason is counted. stream is false for
// UDP, where the answer must not exceed the request.
func (m *Mirror) handle(out, req []byte, src netip.AddrPort, local netip.Addr, transport, port string) ([]byte, bool) {
	m.stats.inc(m.stats.requests, transport)
	msg, err := sipmsg.Parse(req, transport != "udp")
	if err != nil {
		m.stats.drop(dropReason(err))
		return nil, false
	}
	// RFC 3261 §18.3: bytes past Content-Length are not part of the
	// message (a datagram's are discarded, a stream's are the next
	// message); the report and the size rule count only the message.
	req = req[:msg.Len]
	ans, reason := m.answer(out, msg, req, src, local, transport, port)
	if reason != "" {
		m.stats.drop(reason)
		return nil, false
	}
	if transport == "udp" && len(ans) > len(req) {
		m.stats.drop(DropAmplify)
		return nil, false
	}
	if !m.allow(src.Addr()) {
		m.stats.drop(DropRateLimited)
		return nil, false
	}
	m.stats.inc(m.stats.answers, transport)
	if m.media != nil {
		m.media.sawSIP(src.Addr(), time.Now())
	}
	return ans, true
}

func dropReason(err error) string {
	switch {
	case errors.Is(err, sipmsg.ErrNotSIP):
		return DropNotSIP
	case errors.Is(err, sipmsg.ErrTooLarge):
		return DropTooLarge
	}
	return DropMalformed
}

// answer builds the 200 OK of RFC 3261 §8.2.6 for msg, or names why not.
func (m *Mirror) answer(out []byte, msg *sipmsg.Message, raw []byte, src netip.AddrPort, local netip.Addr, transport, port string) ([]byte, string) {
	if msg.Method == "" {
		return nil, DropResponse
	}
	if err := msg.ValidRequest(); err != nil {
		return nil, DropMalformed
	}
	if msg.Method == "ACK" {
		return nil, DropACK
	}
	rep := sipmsg.Report{Source: src, Transport: transport, Port: port, Request: raw}
	if m.media != nil {
		rep.MediaPort = uint16(m.media.port)
	}
	body, err := rep.SDP(m.advertised(local))
	if err != nil {
		return nil, DropMalformed
	}
	b := bytes.NewBuffer(out)
	b.WriteString("SIP/2.0 200 OK\r\n")
	// §8.2.6.2: the Via headers, in order; RFC 3581 §4 and RFC 3261
	// §18.2.1: received= and rport= of the real source on the top one.
	for i, v := range msg.All("via") {
		if i == 0 {
			v = stampVia(v, src)
		}
		b.WriteString("Via: " + v + "\r\n")
	}
	from, _ := msg.Get("from")
	to, _ := msg.Get("to")
	callID, _ := msg.Get("call-id")
	cseq, _ := msg.Get("cseq")
	if !hasParam(to, "tag") {
		// §8.2.6.2: a To tag on every response outside a dialog; from the
		// Call-ID so that a retransmission gets the same one.
		h := fnv.New32a()
		h.Write([]byte(callID))
		to += ";tag=" + strconv.FormatUint(uint64(h.Sum32()), 16)
	}
	fmt.Fprintf(b, "From: %s\r\nTo: %s\r\nCall-ID: %s\r\nCSeq: %s\r\n", from, to, callID, cseq)
	fmt.Fprintf(b, "Content-Type: application/sdp\r\nContent-Length: %d\r\n\r\n", len(body))
	b.Write(body)
	return b.Bytes(), ""
}

// stampVia adds received= and rport= (RFC 3581 §4) to the first via-parm of
// a Via header value, replacing any the client put there.
func stampVia(v string, src netip.AddrPort) string {
	first, rest, multi := strings.Cut(v, ",")
	parts := strings.Split(first, ";")
	kept := parts[:1]
	for _, p := range parts[1:] {
		name, _, _ := strings.Cut(strings.TrimSpace(p), "=")
		switch strings.ToLower(name) {
		case "received", "rport":
			continue
		}
		kept = append(kept, p)
	}
	first = strings.Join(kept, ";") + ";received=" + src.Addr().String() + ";rport=" + strconv.Itoa(int(src.Port()))
	if multi {
		return first + "," + rest
	}
	return first
}

// hasParam reports whether a name-addr header value has a ;name= parameter
// outside its <...> URI.
func hasParam(v, name string) bool {
	if i := strings.LastIndexByte(v, '>'); i >= 0 {
		v = v[i+1:]
	}
	for _, p := range strings.Split(v, ";")[1:] {
		n, _, _ := strings.Cut(strings.TrimSpace(p), "=")
		if strings.EqualFold(n, name) {
			return true
		}
	}
	return false
}
