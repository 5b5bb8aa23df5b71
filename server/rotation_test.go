package server

import (
	"testing"
	"time"

	"github.com/pion/stun/v4"
	"github.com/pion/turn/v5"
)

// restCreds returns TURN REST credentials for user under secret.
func restCreds(t *testing.T, secret, user string) (string, string) {
	t.Helper()
	u, p, err := turn.GenerateLongTermTURNRESTCredentials(secret, user, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return u, p
}

// TestRESTSecretRotation: with two --auth-secret values, credentials made
// with either are accepted, the answers signed under the client's own key;
// after a reload that drops the old secret, its credentials get 401 (a new
// client, and the next Refresh of an allocation made with them), while the
// new secret's still work.
func TestRESTSecretRotation(t *testing.T) {
	const oldSecret, newSecret = "old-secret", "new-secret"
	for _, order := range [][]string{{oldSecret, newSecret}, {newSecret, oldSecret}} {
		t.Run(order[0]+"-first", func(t *testing.T) {
			s := startTURNServer(t, func(c *Config) { c.AuthSecrets = order })
			clients := map[string]*frontClient{}
			for _, secret := range []string{oldSecret, newSecret} {
				u, p := restCreds(t, secret, "dave-"+secret)
				c := dialFront(t, s, false, u, p)
				r := c.allocate()
				if err := c.key().Check(r); err != nil {
					t.Fatalf("%s: Allocate success not signed under the client's key: %v", secret, err)
				}
				if r := c.signed(stun.MethodRefresh, lifetime(600)); r.Type.Class != stun.ClassSuccessResponse {
					t.Fatalf("%s: Refresh: %v code %d", secret, r.Type, errorCode(r))
				} else if err := c.key().Check(r); err != nil {
					t.Fatalf("%s: Refresh success not signed under the client's key: %v", secret, err)
				}
				clients[secret] = c
			}
			// pion's own client, end to end, on the secret pion does not see.
			u, p := restCreds(t, oldSecret, "erin")
			pc, _ := newTURNClient(t, s, u, p)
			relay, err := pc.Allocate()
			if err != nil {
				t.Fatalf("pion client with the old secret: %v", err)
			}
			relay.Close()

			cfg := s.cfg
			cfg.AuthSecrets = []string{newSecret}
			if err := s.Reload(cfg); err != nil {
				t.Fatalf("Reload: %v", err)
			}
			r := clients[oldSecret].signed(stun.MethodRefresh, lifetime(600))
			if errorCode(r) != 401 {
				t.Errorf("Refresh under the dropped secret: %v code %d, want 401", r.Type, errorCode(r))
			}
			u, p = restCreds(t, oldSecret, "frank")
			if _, err := newRawTURNAllocate(t, s, u, p); turnErrorCode(err) != 401 {
				t.Errorf("new client under the dropped secret: %v, want 401", err)
			}
			if r := clients[newSecret].signed(stun.MethodRefresh, lifetime(600)); r.Type.Class != stun.ClassSuccessResponse {
				t.Errorf("Refresh under the kept secret: %v code %d", r.Type, errorCode(r))
			}
			u, p = restCreds(t, newSecret, "frank")
			if _, err := newRawTURNAllocate(t, s, u, p); err != nil {
				t.Errorf("new client under the kept secret: %v", err)
			}
		})
	}
}

// newRawTURNAllocate allocates with pion's client and returns its error.
func newRawTURNAllocate(t *testing.T, s *Server, user, pass string) (struct{}, error) {
	t.Helper()
	c, _ := newTURNClient(t, s, user, pass)
	r, err := c.Allocate()
	if err == nil {
		r.Close()
	}
	return struct{}{}, err
}

// TestPionErrorsSigned: pion's own error answers to authenticated requests
// carry MESSAGE-INTEGRITY under the client's key (RFC 8489 §9.2.4) and
// FINGERPRINT when the request had one: 486 (quota), 400 (no
// REQUESTED-TRANSPORT), 442 (a transport other than UDP/TCP), also for a
// REST user on a secret pion does not see.
func TestPionErrorsSigned(t *testing.T) {
	forBoth(t, func(c *Config) {
		c.UserQuota = 1
		c.AuthSecrets = []string{"current", "previous"}
	}, func(t *testing.T, s *Server, tcp bool) {
		u, p := restCreds(t, "previous", "gina")
		for _, creds := range [][2]string{{"alice", "alice-pw"}, {u, p}} {
			first := dialFront(t, s, tcp, creds[0], creds[1])
			first.allocate()

			c := dialFront(t, s, tcp, creds[0], creds[1])
			c.wantSignedError(c.signed(stun.MethodAllocate, requestedTransportUDP), 486)
			c.wantSignedError(c.signed(stun.MethodAllocate), 400)
			c.wantSignedError(c.signed(stun.MethodAllocate, stun.RawAttribute{Type: stun.AttrRequestedTransport, Value: []byte{99, 0, 0, 0}}), 442)
			r := c.signed(stun.MethodAllocate, requestedTransportUDP)
			if err := stun.Fingerprint.Check(r); err != nil {
				t.Errorf("%s: 486 FINGERPRINT: %v", creds[0], err)
			}
		}
	})
}
