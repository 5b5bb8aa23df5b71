package server

import (
	"bufio"
	"crypto/hmac"
	"crypto/sha1" //nolint:gosec // the TURN REST API defines HMAC-SHA1
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/pion/turn/v5"
)

// Credentials are the long-term credentials (RFC 8489 §9.2) the server
// accepts under one realm: static users and TURN REST API shared secrets
// (draft-uberti-behave-turn-rest-00 §2.2).
//
// A value is read-only once handed to an Authenticator; reload by building a
// new one and calling Authenticator.Store.
type Credentials struct {
	Realm string
	// Users maps a user name to its password.
	Users map[string]string
	// Secrets are the REST API shared secrets. Any of them verifies a
	// request (rotation: add the new secret, let the old credentials
	// expire, drop the old secret). The TURN front checks MESSAGE-INTEGRITY
	// against each (Authenticator.Verify); pion, behind it, only ever sees
	// requests re-signed with the Secrets[0] key, which is what its
	// AuthHandler returns.
	Secrets []string
	// Now is the clock for REST expiry; nil means time.Now.
	Now func() time.Time
}

// maxSecrets bounds the REST secrets: a request signed with none of them
// costs one HMAC-SHA1 per secret; rotation needs two.
const maxSecrets = 4

// maxRESTExpiryDigits bounds the expiry field: unix seconds fit in 11 digits
// until the year 5138, and the bound keeps strconv from parsing junk.
const maxRESTExpiryDigits = 12

// Validate reports configuration errors, naming the field.
func (c *Credentials) Validate() error {
	if c.Realm == "" {
		return errors.New("realm: must not be empty")
	}
	if len(c.Users) == 0 && len(c.Secrets) == 0 {
		return errors.New("users/auth-secret: no credentials configured, every Allocate would fail")
	}
	if len(c.Secrets) > maxSecrets {
		return fmt.Errorf("auth-secret: %d secrets, at most %d (each is tried per request)", len(c.Secrets), maxSecrets)
	}
	for _, s := range c.Secrets {
		if s == "" {
			return errors.New("auth-secret: must not be empty")
		}
	}
	for name := range c.Users {
		if err := checkUserName(name); err != nil {
			return fmt.Errorf("user %q: %w", name, err)
		}
	}

	return nil
}

func checkUserName(name string) error {
	switch {
	case name == "":
		return errors.New("empty user name")
	case len(name) > 508:
		// RFC 8489 §14.3: USERNAME is less than 509 bytes.
		return errors.New("user name longer than 508 bytes (RFC 8489 §14.3)")
	case strings.ContainsAny(name, "\r\n"):
		return errors.New("user name contains a line break")
	}

	return nil
}

// lookup returns the user ID and the password for a USERNAME, or ok=false.
// Static users come first; then the REST form expiry:user, whose password
// is the one under Secrets[0] (restUser gives the others).
func (c *Credentials) lookup(username string) (userID, password string, ok bool) {
	if pw, found := c.Users[username]; found {
		return "user:" + username, pw, true
	}
	userID, ok = c.restUser(username)
	if !ok {
		return "", "", false
	}
	return userID, RESTPassword(c.Secrets[0], username), true
}

// restUser returns the user ID of a valid, unexpired REST username
// expiry:user, when REST secrets are configured.
func (c *Credentials) restUser(username string) (userID string, ok bool) {
	// User IDs carry their kind ("user:", "rest:") so that the two
	// namespaces never meet: a REST user never shares a quota or an
	// allocation with a static user, whatever the names.
	if len(c.Secrets) == 0 {
		return "", false
	}
	expiry, user, found := strings.Cut(username, ":")
	if !found || user == "" || expiry == "" || len(expiry) > maxRESTExpiryDigits {
		return "", false
	}
	for _, r := range expiry {
		if r < '0' || r > '9' {
			return "", false
		}
	}
	exp, err := strconv.ParseInt(expiry, 10, 64)
	if err != nil {
		return "", false
	}
	now := time.Now
	if c.Now != nil {
		now = c.Now
	}
	// draft-uberti-behave-turn-rest-00 §2.2: the timestamp is the expiry.
	if now().Unix() >= exp {
		return "", false
	}

	// The user part is the identity quotas count, so one user cannot
	// multiply its quota by minting credentials with different expiries.
	return "rest:" + user, true
}

// RESTPassword is the TURN REST API password for a username:
// base64(HMAC-SHA1(secret, username)).
func RESTPassword(secret, username string) string {
	mac := hmac.New(sha1.New, []byte(secret))
	mac.Write([]byte(username)) //nolint:errcheck // hash.Hash never fails

	return base64.StdEncoding.EncodeToString(mac.Sum(nil))
}

// Authenticator holds the current Credentials and swaps them atomically, so
// a reload (SIGHUP) never races a request in flight. Failures are counted
// and logged where they are decided, by the TURN front (authlog.go).
type Authenticator struct {
	cur atomic.Pointer[Credentials]
}

// NewAuthenticator returns an Authenticator serving c. c is not validated
// here (server.Config.Validate is the gate for the command line); call
// c.Validate first when c comes from elsewhere.
func NewAuthenticator(c Credentials) *Authenticator {
	a := &Authenticator{}
	a.cur.Store(&c)

	return a
}

// Store validates c and makes it current (the reload path). Requests already
// past the AuthHandler keep the key they got.
func (a *Authenticator) Store(c Credentials) error {
	if err := c.Validate(); err != nil {
		return err
	}
	a.cur.Store(&c)

	return nil
}

// AuthHandler returns the pion hook; it reads the current credentials on
// every call. pion sees only requests the front verified (front.go), so it
// answers with the key the front re-signed them with.
func (a *Authenticator) AuthHandler() turn.AuthHandler {
	return func(ra *turn.RequestAttributes) (string, []byte, bool) {
		return a.cur.Load().authenticate(ra)
	}
}

// Realm is the realm of the current credentials.
func (a *Authenticator) Realm() string { return a.cur.Load().Realm }

// Verify finds the long-term key that a request's MESSAGE-INTEGRITY was
// made with: the static user's, or for a REST username the one under each
// configured secret in turn (rotation). check reports whether a key
// verifies. known is false for an unknown or expired user or a foreign
// realm; key is nil when no key verified. pionKey is
// the key pion's AuthHandler gives for the same request (Secrets[0]'s for
// REST users): the front re-signs what it passes to pion with it.
func (a *Authenticator) Verify(username, realm string, check func(key []byte) bool) (userID string, key, pionKey []byte, known bool) {
	c := a.cur.Load()
	userID, pionKey, known = c.authenticate(&turn.RequestAttributes{Username: username, Realm: realm})
	if !known {
		return "", nil, nil, false
	}
	if check(pionKey) {
		return userID, pionKey, pionKey, true
	}
	if _, static := c.Users[username]; static {
		return userID, nil, pionKey, true
	}
	for _, secret := range c.Secrets[1:] {
		k := turn.GenerateAuthKey(username, c.Realm, RESTPassword(secret, username))
		if check(k) {
			return userID, k, pionKey, true
		}
	}
	return userID, nil, pionKey, true
}

// authenticate returns the long-term key MD5(username:realm:password)
// (RFC 8489 §9.2.2); pion then checks MESSAGE-INTEGRITY with it.
func (c *Credentials) authenticate(ra *turn.RequestAttributes) (string, []byte, bool) {
	if c == nil || ra == nil || ra.Realm != c.Realm {
		// RFC 8489 §9.2.4: the REALM must be the one the server sent.
		return "", nil, false
	}
	userID, pw, ok := c.lookup(ra.Username)
	if !ok {
		return "", nil, false
	}

	return userID, turn.GenerateAuthKey(ra.Username, c.Realm, pw), true
}

// maxUsersFileLine bounds one line of a users file; a longer line is an
// error rather than a silent truncation (bufio.Scanner's own limit).
const maxUsersFileLine = 64 * 1024

// LoadUsersFile reads name:password lines. Blank lines and lines starting
// with # are skipped; the password is everything after the first colon, so
// it may contain colons (user names may not). Errors name the file and line.
func LoadUsersFile(path string) (map[string]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()

	users := map[string]string{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 4096), maxUsersFileLine)
	line := 0
	for sc.Scan() {
		line++
		text := strings.TrimSpace(sc.Text())
		if text == "" || strings.HasPrefix(text, "#") {
			continue
		}
		name, pw, found := strings.Cut(text, ":")
		switch {
		case !found:
			return nil, fmt.Errorf("%s:%d: want name:password, found no colon", path, line)
		case pw == "":
			return nil, fmt.Errorf("%s:%d: user %q has an empty password", path, line, name)
		}
		if err := checkUserName(name); err != nil {
			return nil, fmt.Errorf("%s:%d: %w", path, line, err)
		}
		if _, dup := users[name]; dup {
			return nil, fmt.Errorf("%s:%d: user %q defined twice", path, line, name)
		}
		users[name] = pw
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s:%d: %w", path, line+1, err)
	}

	return users, nil
}
