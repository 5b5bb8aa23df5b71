package server

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pion/turn/v5"
)

const testRealm = "stund.test"

func fixedNow(unix int64) func() time.Time {
	return func() time.Time { return time.Unix(unix, 0) }
}

func TestAuthStaticUsers(t *testing.T) {
	c := &Credentials{Realm: testRealm, Users: map[string]string{"alice": "s3cret", "bob": "hunter2"}}
	h := NewAuthenticator(*c).AuthHandler()

	id, key, ok := h(&turn.RequestAttributes{Username: "alice", Realm: testRealm})
	if !ok {
		t.Fatal("known user refused")
	}
	if id != "user:alice" {
		t.Errorf("userID = %q", id)
	}
	if want := turn.GenerateAuthKey("alice", testRealm, "s3cret"); !bytes.Equal(key, want) {
		t.Errorf("key = %x, want MD5(alice:realm:s3cret) %x", key, want)
	}
	if _, _, ok := h(&turn.RequestAttributes{Username: "mallory", Realm: testRealm}); ok {
		t.Error("unknown user accepted")
	}
	if _, _, ok := h(&turn.RequestAttributes{Username: "alice", Realm: "other.realm"}); ok {
		t.Error("foreign realm accepted")
	}
	if _, _, ok := h(&turn.RequestAttributes{Username: "", Realm: testRealm}); ok {
		t.Error("empty username accepted")
	}
}

func TestAuthREST(t *testing.T) {
	const secret = "north-wind"
	const now = 1_800_000_000
	c := &Credentials{Realm: testRealm, Secrets: []string{secret}, Now: fixedNow(now)}
	h := NewAuthenticator(*c).AuthHandler()

	valid := strconv.Itoa(now+3600) + ":carol"
	id, key, ok := h(&turn.RequestAttributes{Username: valid, Realm: testRealm})
	if !ok {
		t.Fatal("valid REST credential refused")
	}
	if id != "rest:carol" {
		t.Errorf("userID = %q, want rest:carol", id)
	}
	// The password a REST API server hands out for this username.
	pw := RESTPassword(secret, valid)
	if want := turn.GenerateAuthKey(valid, testRealm, pw); !bytes.Equal(key, want) {
		t.Error("key is not MD5(username:realm:base64(HMAC-SHA1(secret, username)))")
	}
	// A password made with another secret gives another key: MESSAGE-INTEGRITY
	// would fail in pion.
	if wrong := turn.GenerateAuthKey(valid, testRealm, RESTPassword("other", valid)); bytes.Equal(key, wrong) {
		t.Error("a password from the wrong secret yields the same key")
	}
	// Cross-check RESTPassword against pion's own generator.
	pionUser, pionPW, err := turn.GenerateLongTermTURNRESTCredentials(secret, "dave", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if RESTPassword(secret, pionUser) != pionPW {
		t.Error("RESTPassword disagrees with pion's GenerateLongTermTURNRESTCredentials")
	}

	for _, bad := range []string{
		strconv.Itoa(now) + ":carol",      // expires now: expired
		strconv.Itoa(now-1) + ":carol",    // expired
		"carol",                           // no expiry
		":carol",                          // empty expiry
		strconv.Itoa(now+60) + ":",        // empty user
		"+" + strconv.Itoa(now+60) + ":c", // sign is not a digit
		"-1:carol",
		"1e12:carol",
		"99999999999999999999:carol", // too long
		"abc:carol",
	} {
		if _, _, ok := h(&turn.RequestAttributes{Username: bad, Realm: testRealm}); ok {
			t.Errorf("username %q accepted", bad)
		}
	}
}

func TestAuthStaticAndRESTNamespaces(t *testing.T) {
	const now = 1_800_000_000
	c := &Credentials{Realm: testRealm, Users: map[string]string{"rest:erin": "x"}, Secrets: []string{"k"}, Now: fixedNow(now)}
	h := NewAuthenticator(*c).AuthHandler()
	a, _, _ := h(&turn.RequestAttributes{Username: "rest:erin", Realm: testRealm})
	b, _, _ := h(&turn.RequestAttributes{Username: strconv.Itoa(now+10) + ":erin", Realm: testRealm})
	if a == b {
		t.Errorf("static user and REST user share the user ID %q", a)
	}
}

func TestAuthenticatorSwap(t *testing.T) {
	a := NewAuthenticator(Credentials{Realm: testRealm, Users: map[string]string{"old": "pw"}})
	h := a.AuthHandler()
	var wg sync.WaitGroup
	for range 4 { // readers racing the swap (run with -race)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 200 {
				h(&turn.RequestAttributes{Username: "old", Realm: testRealm})
			}
		}()
	}
	if err := a.Store(Credentials{Realm: testRealm, Users: map[string]string{"new": "pw"}}); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if _, _, ok := h(&turn.RequestAttributes{Username: "new", Realm: testRealm}); !ok {
		t.Error("swapped-in user refused")
	}
	if _, _, ok := h(&turn.RequestAttributes{Username: "old", Realm: testRealm}); ok {
		t.Error("swapped-out user still accepted")
	}
	if err := a.Store(Credentials{Realm: ""}); err == nil {
		t.Error("invalid credentials stored")
	}
	if _, _, ok := h(&turn.RequestAttributes{Username: "new", Realm: testRealm}); !ok {
		t.Error("a refused Store replaced the current credentials")
	}
}

func TestCredentialsValidate(t *testing.T) {
	for _, c := range []struct {
		cred Credentials
		key  string
	}{
		{Credentials{Users: map[string]string{"a": "b"}}, "realm"},
		{Credentials{Realm: "r"}, "users"},
		{Credentials{Realm: "r", Secrets: []string{"a", "b", "c", "d", "e"}}, "auth-secret"}, // over maxSecrets
		{Credentials{Realm: "r", Secrets: []string{""}}, "auth-secret"},
		{Credentials{Realm: "r", Users: map[string]string{"": "b"}}, "user"},
	} {
		err := c.cred.Validate()
		if err == nil || !strings.Contains(err.Error(), c.key) {
			t.Errorf("Validate(%+v) = %v, want an error naming %q", c.cred, err, c.key)
		}
	}
}

func writeFile(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "users")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}

	return p
}

func TestLoadUsersFile(t *testing.T) {
	p := writeFile(t, "# demo users\n\nalice:s3cret\n  bob:pa:ss:word  \n#carol:nope\n")
	users, err := LoadUsersFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(users) != 2 || users["alice"] != "s3cret" || users["bob"] != "pa:ss:word" {
		t.Errorf("users = %v", users)
	}

	for _, c := range []struct {
		body string
		line string
	}{
		{"alice:x\nnocolon\n", ":2:"},
		{"# c\n\n\nbob:\n", ":4:"},
		{"a:1\nb:2\na:3\n", ":3:"},
		{":pw\n", ":1:"},
		{"ok:1\n" + "big:" + strings.Repeat("x", maxUsersFileLine+10) + "\n", ":2:"},
	} {
		path := writeFile(t, c.body)
		_, err := LoadUsersFile(path)
		if err == nil {
			t.Errorf("%q: no error", c.body[:min(len(c.body), 20)])

			continue
		}
		if !strings.Contains(err.Error(), path+c.line) {
			t.Errorf("error %q does not name %s%s", err, path, c.line)
		}
	}
	if _, err := LoadUsersFile(filepath.Join(t.TempDir(), "missing")); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("missing file: %v", err)
	}
}
