package server

import (
	"github.com/stund/stund/internal/stunwire"
	"log/slog"
	"net/netip"
	"sync"
	"time"
	"unicode/utf8"
)

// Failed authentications: counted for metrics and logged one line each, in
// a fixed form that fail2ban (configs/fail2ban/) matches on client_ip, so an
// operator can ban a source that guesses passwords. A flood must not fill
// the disk: lines are rate-limited server-wide and what was held back is
// reported as a count on the next line that is written.

const (
	// authLogRate is the sustained rate of failure lines: enough for
	// fail2ban to see every guessing source on a busy server (a guesser
	// must fail maxretry times, a handful, to be banned), while a flood of
	// spoofed requests writes at most ~100 short lines a second.
	authLogRate = 100
	// authLogBurst lets a short burst through whole.
	authLogBurst = 200
	// maxLoggedUsername bounds the username in a line: a USERNAME may be
	// up to 509 bytes (RFC 8489 §14.3); the first 64 identify it.
	maxLoggedUsername = 64
)

// authFailure is one failed authentication as the front saw it.
type authFailure struct {
	src             netip.AddrPort
	tcp             bool
	method          uint16
	username, realm []byte
	// knownUser: the username (and realm) were known, so the
	// MESSAGE-INTEGRITY was wrong; otherwise the user was unknown,
	// expired (REST) or of another realm.
	knownUser bool
}

// authLog counts and logs failures.
type authLog struct {
	log *slog.Logger
	ops *opsStats

	mu         sync.Mutex
	tokens     float64
	last       time.Time
	suppressed uint64
}

func newAuthLog(log *slog.Logger, ops *opsStats) *authLog {
	return &authLog{log: log, ops: ops, tokens: authLogBurst}
}

// failed records one failure.
func (l *authLog) failed(f authFailure) {
	reason := "unknown-user"
	if f.knownUser {
		reason = "bad-integrity"
		l.ops.authIntegrity.Add(1)
		if f.method == stunwire.MethodAllocate {
			l.ops.allocAuthIntegrity.Add(1)
		}
	} else {
		l.ops.authUnknown.Add(1)
		if f.method == stunwire.MethodAllocate {
			l.ops.allocAuthUnknown.Add(1)
		}
	}
	held, ok := l.take(time.Now())
	if !ok {
		return
	}
	transport := "udp"
	if f.tcp {
		transport = "tcp"
	}
	attrs := []any{
		"client_ip", f.src.Addr().String(), "client_port", f.src.Port(), "transport", transport,
		"method", methodName(f.method), "user", truncUser(f.username), "realm", truncUser(f.realm), "reason", reason,
	}
	if held > 0 {
		attrs = append(attrs, "suppressed", held)
	}
	l.log.Warn("authentication failed", attrs...)
}

// take spends a token; it returns how many lines were held back since the
// last one written.
func (l *authLog) take(now time.Time) (uint64, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.last.IsZero() {
		l.tokens = min(authLogBurst, l.tokens+now.Sub(l.last).Seconds()*authLogRate)
	}
	l.last = now
	if l.tokens < 1 {
		l.suppressed++
		return 0, false
	}
	l.tokens--
	held := l.suppressed
	l.suppressed = 0
	return held, true
}

// truncUser cuts a username or realm as received to maxLoggedUsername
// bytes for a log line. slog's text and JSON handlers quote and escape
// control bytes and invalid UTF-8, so a crafted name cannot forge a line
// or a field.
func truncUser(b []byte) string {
	if len(b) > maxLoggedUsername {
		b = b[:maxLoggedUsername]
		for len(b) > 0 && !utf8.Valid(b) {
			b = b[:len(b)-1]
		}
	}
	return string(b)
}
