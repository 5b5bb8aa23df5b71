// Package certreload serves a TLS certificate and key from their files and
// swaps in a new pair when asked or when the files change, keeping the last
// good pair when a new one does not load.
package certreload

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// PollInterval is how often Watch looks at the files. Renewals (certbot,
// cert-manager) replace a certificate days before it expires, so seconds
// of delay cost nothing, and two stat calls every few seconds are free.
// Polling rather than inotify: a Kubernetes Secret volume swaps a
// symlinked directory, and certbot repoints a symlink, which a watch on
// the file misses; stat follows the links and sees both.
const PollInterval = 5 * time.Second

// Reloader holds the certificate served to new TLS handshakes.
type Reloader struct {
	certFile, keyFile string
	logger            *slog.Logger

	cur atomic.Pointer[tls.Certificate]

	mu    sync.Mutex     // serialises loads; guards seen
	seen  [2]os.FileInfo // the files as last loaded (or tried)
	ok    atomic.Uint64  // loads that replaced the certificate
	fails atomic.Uint64  // loads that kept the old one
}

// New loads the pair; an error here is a configuration error (there is no
// old certificate to keep).
func New(certFile, keyFile string, logger *slog.Logger) (*Reloader, error) {
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	r := &Reloader{certFile: certFile, keyFile: keyFile, logger: logger}
	r.seen = r.stat()
	c, err := load(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	r.cur.Store(c)
	return r, nil
}

// load reads and checks the pair, with its leaf parsed (for the log line
// and the expiry metric).
func load(certFile, keyFile string) (*tls.Certificate, error) {
	c, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, err
	}
	if c.Leaf == nil {
		if c.Leaf, err = x509.ParseCertificate(c.Certificate[0]); err != nil {
			return nil, err
		}
	}
	return &c, nil
}

// GetCertificate is tls.Config.GetCertificate: each handshake takes the
// certificate current when it starts, so open connections keep the one
// they were made with.
func (r *Reloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return r.cur.Load(), nil
}

// Current is the certificate new handshakes get.
func (r *Reloader) Current() *tls.Certificate { return r.cur.Load() }

// Loads counts the reloads that replaced the certificate and those that
// failed and kept the old one.
func (r *Reloader) Loads() (ok, failed uint64) { return r.ok.Load(), r.fails.Load() }

// Reload reads the files again (SIGHUP). A pair that does not load keeps
// the current certificate; the error says why and is logged once.
func (r *Reloader) Reload() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.seen = r.stat()
	c, err := load(r.certFile, r.keyFile)
	if err != nil {
		r.fails.Add(1)
		old := r.cur.Load().Leaf
		r.logger.Error("TLS certificate reload failed; still serving the old one", "cert", r.certFile, "key", r.keyFile, "error", err, "serial", old.SerialNumber.String(), "not_after", old.NotAfter)
		return fmt.Errorf("certificate %s, key %s: %w", r.certFile, r.keyFile, err)
	}
	r.cur.Store(c)
	r.ok.Add(1)
	r.logger.Info("TLS certificate loaded", "cert", r.certFile, "subject", c.Leaf.Subject.String(), "serial", c.Leaf.SerialNumber.String(), "not_after", c.Leaf.NotAfter)
	return nil
}

// stat is the two files as they stand (nil for one that is missing).
func (r *Reloader) stat() [2]os.FileInfo {
	var out [2]os.FileInfo
	for i, f := range []string{r.certFile, r.keyFile} {
		out[i], _ = os.Stat(f)
	}
	return out
}

// changed reports whether either file differs from when it was last
// loaded: another file behind the name (a renewal's new file, a
// repointed symlink), or a rewrite in place (mtime or size).
func changed(old, cur [2]os.FileInfo) bool {
	for i := range old {
		a, b := old[i], cur[i]
		switch {
		case a == nil || b == nil:
			if a != b {
				return true
			}
		case !os.SameFile(a, b) || !a.ModTime().Equal(b.ModTime()) || a.Size() != b.Size():
			return true
		}
	}
	return false
}

// poll reloads when the files changed since the last load. A file
// half-written (the certificate renewed, the key not yet) fails to load
// and is retried when the key changes in turn; a file that stays broken
// is not retried, so it is logged once, not every tick.
func (r *Reloader) poll() {
	r.mu.Lock()
	cur := r.stat()
	if !changed(r.seen, cur) || cur[0] == nil || cur[1] == nil {
		// A missing file is the middle of a swap (remove, then
		// create): wait for it rather than log a failure.
		r.mu.Unlock()
		return
	}
	r.mu.Unlock()
	_ = r.Reload() // logged
}

// Watch polls the files every interval until ctx ends.
func (r *Reloader) Watch(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	r.watch(ctx, t.C)
}

func (r *Reloader) watch(ctx context.Context, tick <-chan time.Time) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick:
			r.poll()
		}
	}
}
