package server

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/pion/turn/v5"
	"github.com/stund/stund/internal/stunwire"
)

// pion's nonces, minted on a private port.
//
// pion checks a NONCE on every authenticated request and offers no way to
// configure or mint one (its nonce manager is internal), while the wire
// carries only our nonces (nonce.go). The front re-signs each accepted
// request with a current pion nonce, which it gets here: pionTap is an
// in-memory net.PacketConn given to pion as one more listening socket. No
// client can reach it. To mint, we hand pion's read loop on the tap an
// unauthenticated Allocate and read the NONCE of its 401, synchronously and
// bounded in time; the read loops that serve clients are never involved.

const (
	// pionNonceRefresh: pion's short nonces are valid 60 minutes (minute
	// granularity); re-minting at 20 leaves 40 minutes of margin.
	pionNonceRefresh = 20 * time.Minute
	// pionMintWait bounds one mint: pion answers in microseconds; a pion
	// that does not answer within this leaves the previous nonce in use
	// (or, at start, fails New).
	pionMintWait = 2 * time.Second
	// pionMintRetry spaces the attempts after a failed mint; the nonce in
	// hand stays valid for 40 more minutes.
	pionMintRetry = time.Minute
)

var (
	errTapClosed = errors.New("pion tap: closed")
	errNoNonce   = errors.New("pion tap: pion did not answer with a nonce")
)

// pionNonces caches pion's current nonce.
type pionNonces struct {
	tap *pionTap

	mu    sync.Mutex
	val   []byte
	at    time.Time
	mints int // nonces pion minted so far
}

func newPionNonces() *pionNonces { return &pionNonces{tap: newPionTap()} }

// current returns a pion nonce young enough to be accepted, minting one
// when the cached one is old; nil only when pion never answered.
func (p *pionNonces) current() []byte {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.val != nil && time.Since(p.at) < pionNonceRefresh {
		return p.val
	}
	if v, err := p.tap.mint(); err == nil {
		p.val, p.at = v, time.Now()
		p.mints++
	} else if p.val != nil {
		// Keep the old nonce (valid 60 minutes) and try again in a
		// minute, not on every request: a mint that fails waits
		// pionMintWait, and a read loop must not pay that per packet.
		p.at = time.Now().Add(-pionNonceRefresh + pionMintRetry)
	}
	return p.val
}

// pionTap is the private port: ReadFrom feeds pion the requests mint
// queues, WriteTo takes pion's answers.
type pionTap struct {
	in     chan []byte
	out    chan []byte
	closed chan struct{}
	once   sync.Once
	mintMu sync.Mutex
}

func newPionTap() *pionTap {
	return &pionTap{in: make(chan []byte, 1), out: make(chan []byte, 1), closed: make(chan struct{})}
}

// tapAddr is the (never routed) address pion sees on the tap.
var tapAddr = net.UDPAddrFromAddrPort(netip.MustParseAddrPort("0.0.0.0:0"))

// mint asks pion for a fresh nonce.
func (t *pionTap) mint() ([]byte, error) {
	t.mintMu.Lock()
	defer t.mintMu.Unlock()
	var id [16]byte
	binary.BigEndian.PutUint32(id[:4], stunwire.MagicCookie)
	if _, err := rand.Read(id[4:]); err != nil {
		return nil, err
	}
	req := stunwire.Finish(stunwire.AppendHeader(nil, stunwire.MessageType(stunwire.MethodAllocate, stunwire.ClassRequest), &id), 0)
	timer := time.NewTimer(pionMintWait)
	defer timer.Stop()
	select {
	case t.in <- req:
	case <-t.closed:
		return nil, errTapClosed
	case <-timer.C:
		return nil, errNoNonce
	}
	for {
		select {
		case ans := <-t.out:
			if len(ans) < stunwire.HeaderSize || string(ans[4:20]) != string(id[:]) {
				continue // a late answer to an earlier mint
			}
			it := stunwire.NewAttrs(ans)
			for {
				typ, val, _, ok := it.Next()
				if !ok {
					return nil, errNoNonce
				}
				if typ == stunwire.AttrNonce && len(val) > 0 {
					return append([]byte(nil), val...), nil
				}
			}
		case <-t.closed:
			return nil, errTapClosed
		case <-timer.C:
			return nil, errNoNonce
		}
	}
}

func (t *pionTap) ReadFrom(p []byte) (int, net.Addr, error) {
	select {
	case req := <-t.in:
		return copy(p, req), tapAddr, nil
	case <-t.closed:
		return 0, nil, net.ErrClosed
	}
}

func (t *pionTap) WriteTo(b []byte, _ net.Addr) (int, error) {
	select {
	case t.out <- append([]byte(nil), b...):
	default: // nobody is waiting: drop, as a socket would
	}
	return len(b), nil
}

func (t *pionTap) Close() error {
	t.once.Do(func() { close(t.closed) })
	return nil
}

func (t *pionTap) LocalAddr() net.Addr              { return tapAddr }
func (t *pionTap) SetDeadline(time.Time) error      { return nil }
func (t *pionTap) SetReadDeadline(time.Time) error  { return nil }
func (t *pionTap) SetWriteDeadline(time.Time) error { return nil }

// noRelay is the tap's relay generator: nothing is ever allocated there.
type noRelay struct{}

var errNoRelayOnTap = errors.New("pion tap: no relays")

func (noRelay) Validate() error { return nil }
func (noRelay) AllocatePacketConn(turn.AllocateListenerConfig) (net.PacketConn, net.Addr, error) {
	return nil, nil, errNoRelayOnTap
}
func (noRelay) AllocateListener(turn.AllocateListenerConfig) (net.Listener, net.Addr, error) {
	return nil, nil, errNoRelayOnTap
}
func (noRelay) AllocateConn(turn.AllocateConnConfig) (net.Conn, error) { return nil, errNoRelayOnTap }
