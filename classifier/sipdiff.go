package classifier

// sipdiff.go compares the INVITE natprobe sent with the one the SIP mirror
// received, field by field, the way a SIP ALG tester must: header order,
// header-name case and compact forms (RFC 3261 §7.3.1, §7.3.3) are not
// changes, since any SIP element may alter them; the values an ALG rewrites
// are.

import (
	"strings"

	"github.com/stund/stund/internal/sipmsg"
)

// SIP fields the ALG test compares, named as in the JSON report.
const (
	fieldRequestURI    = "request-uri"
	fieldVia           = "via"
	fieldFrom          = "from"
	fieldTo            = "to"
	fieldContact       = "contact"
	fieldCallID        = "call-id"
	fieldContentLength = "content-length"
	fieldSDPO          = "sdp-o"
	fieldSDPC          = "sdp-c"
	fieldSDPM          = "sdp-m"
	// fieldMessage: the received request no longer parses as SIP.
	fieldMessage = "message"
)

// FieldChange is one field the ALG test found changed on the way.
type FieldChange struct {
	Field    string `json:"field"`
	Sent     string `json:"sent"`
	Received string `json:"received"`
}

// sipFields extracts the compared fields from a request; a field absent
// from the message is "".
func sipFields(m *sipmsg.Message) [][2]string {
	get := func(h string) string { v, _ := m.Get(h); return v }
	out := [][2]string{
		{fieldRequestURI, m.URI},
		{fieldVia, get("via")},
		{fieldFrom, get("from")},
		{fieldTo, get("to")},
		{fieldContact, get("contact")},
		{fieldCallID, get("call-id")},
		{fieldContentLength, get("content-length")},
	}
	var o, c, media string
	for _, l := range strings.Split(string(m.Body), "\n") {
		l = strings.TrimRight(l, "\r")
		switch {
		case strings.HasPrefix(l, "o=") && o == "":
			o = l[2:]
		case strings.HasPrefix(l, "c=") && c == "":
			c = l[2:]
		case strings.HasPrefix(l, "m=") && media == "":
			media = l[2:]
		}
	}
	return append(out, [2]string{fieldSDPO, o}, [2]string{fieldSDPC, c}, [2]string{fieldSDPM, media})
}

// diffSIP lists the fields that differ between the request sent and the
// one received, in the order of the JSON field list.
func diffSIP(sent, received []byte) []FieldChange {
	s, err := sipmsg.Parse(sent, false)
	if err != nil {
		// Our own request: cannot happen, but never a clean result.
		return []FieldChange{{Field: fieldMessage, Sent: err.Error()}}
	}
	r, err := sipmsg.Parse(received, false)
	if err != nil {
		return []FieldChange{{Field: fieldMessage, Sent: clip(string(sent)), Received: clip(string(received))}}
	}
	sf, rf := sipFields(s), sipFields(r)
	var out []FieldChange
	for i := range sf {
		if sf[i][1] != rf[i][1] {
			out = append(out, FieldChange{Field: sf[i][0], Sent: sf[i][1], Received: rf[i][1]})
		}
	}
	return out
}

// clip keeps a whole message out of the report.
func clip(s string) string {
	if len(s) > 200 {
		return s[:200] + "…"
	}
	return s
}
