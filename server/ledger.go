package server

import (
	"crypto/rand"
	"encoding/hex"
	"github.com/stund/stund/internal/stunwire"
	"github.com/stund/stund/server/offload"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// The allocation ledger: stund's one record of the allocations pion holds.
//
// pion owns an allocation's lifecycle (Allocate, Refresh, expiry) and tells
// us through its EventHandler; the ledger is filled only from those events
// and from the relay sockets our generator binds, and everything else that
// needs to know about an allocation reads it here: the TURN front (who owns
// a 5-tuple, how many permissions it holds), the data plane (which peer a
// channel names, whether a peer holds a permission) and the quotas. There
// is no second copy to drift.
//
// Lock order: ledger.mu before allocation.mu; relay sockets take neither
// while doing I/O.

// fiveTuple identifies an allocation (RFC 8656 §2): client and server
// transport addresses and the transport between them.
type fiveTuple struct {
	src, dst netip.AddrPort
	tcp      bool
}

func tupleOf(src, dst net.Addr) fiveTuple {
	_, tcp := src.(*net.TCPAddr)
	return fiveTuple{src: stunwire.AddrPortOf(src), dst: stunwire.AddrPortOf(dst), tcp: tcp}
}

// Why an allocation ended, for its usage record.
const (
	endExpired = "expired" // its lifetime ran out (RFC 8656 §7.3)
	endDeleted = "deleted" // the client refreshed it to 0 (RFC 8656 §7.3)
	endClosed  = "closed"  // its TCP/TLS control connection closed (RFC 6062 §5.3)
	endKilled  = "killed"  // the operator ended it (admin API)
	endDrained = "drained" // the node stopped with it still running
)

// allocation is what the ledger knows of one live allocation.
type allocation struct {
	id        string // opaque, for the admin API and usage records
	tuple     fiveTuple
	transport string // udp, tcp or tls: client to server
	user      string
	realm     string
	relay     netip.AddrPort // the relayed transport address as announced
	created   time.Time

	// relayCloser ends an RFC 6062 TCP allocation's relay listener (kill);
	// UDP allocations are ended through sock.
	relayCloser io.Closer
	// usage counts what was relayed: the relay socket's counters for a
	// UDP allocation, its peer connections' for a TCP one.
	usage *usageCounters

	// sock is the UDP relay socket (nil for RFC 6062 TCP allocations);
	// set once when the allocation is recorded.
	sock *relaySocket

	mu sync.Mutex
	// perms are the peer IPs holding a permission (RFC 8656 §9), as pion
	// installs and expires them.
	perms map[netip.Addr]struct{}
	// chans maps a channel number to its peer (RFC 8656 §12), as pion
	// binds and expires channels; peerChans is the reverse, for the
	// peer-to-client direction.
	chans     map[uint16]netip.AddrPort
	peerChans map[netip.AddrPort]uint16
	// client is the way back to the client (its UDP 5-tuple or its
	// TCP/TLS connection); nil when unknown, and pion relays instead.
	client clientWriter
	// kernel are the channels relayed in the kernel now (kernel.go;
	// guarded by kernelRelay.mu).
	kernel map[uint16]offload.Channel
	// end is why the allocation is ending, when something other than
	// expiry ends it; empty means expired.
	end string
}

// ending records why the allocation is about to end (the first reason
// given wins: a kill is not turned into "closed" by its own effects).
func (a *allocation) ending(why string) {
	a.mu.Lock()
	if a.end == "" {
		a.end = why
	}
	a.mu.Unlock()
}

// endReason is why the allocation ended.
func (a *allocation) endReason() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.end == "" {
		return endExpired
	}
	return a.end
}

// kill ends the allocation now: closing its relay makes pion's relay read
// fail, and pion then deletes the allocation (and reports it, ledger.deleted).
func (a *allocation) kill() {
	a.ending(endKilled)
	switch {
	case a.sock != nil:
		_ = a.sock.Close()
	case a.relayCloser != nil:
		_ = a.relayCloser.Close()
	}
}

// permitted reports whether ip holds a permission (RFC 8656 §9: data to
// and from a peer without one is dropped).
func (a *allocation) permitted(ip netip.Addr) bool {
	a.mu.Lock()
	_, ok := a.perms[ip]
	a.mu.Unlock()
	return ok
}

// channelPeer returns the peer bound to channel ch, if that peer still
// holds a permission.
func (a *allocation) channelPeer(ch uint16) (netip.AddrPort, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	peer, ok := a.chans[ch]
	if !ok {
		return netip.AddrPort{}, false
	}
	_, ok = a.perms[peer.Addr()]
	return peer, ok
}

// peerRoute says how a datagram from peer reaches the client: on a
// channel (ch != 0), in a Data indication (ch == 0), or not at all (no
// permission, RFC 8656 §9).
func (a *allocation) peerRoute(peer netip.AddrPort) (ch uint16, ok bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok = a.perms[peer.Addr()]; !ok {
		return 0, false
	}
	return a.peerChans[peer], true
}

// permCount is the number of permissions installed.
func (a *allocation) permCount() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.perms)
}

// ledger is the set of live allocations and of the relay sockets bound for
// them.
type ledger struct {
	mu      sync.RWMutex
	byTuple map[fiveTuple]*allocation
	byID    map[string]*allocation
	byRelay map[netip.AddrPort]*allocation
	// sockets are the UDP relay sockets by announced address: bound by the
	// generator before pion reports the allocation, removed when closed.
	sockets map[netip.AddrPort]*relaySocket
	// listeners are the RFC 6062 TCP relay listeners by announced address.
	listeners map[netip.AddrPort]io.Closer
	// relayBytesBy are the server's relayed-byte counters by client
	// transport (metrics.go); nil in tests that need none.
	relayBytesBy *[numTransports][2]atomic.Uint64
	// clientOf finds the way back to a 5-tuple's client (dataplane.go);
	// nil: pion relays toward clients.
	clientOf func(fiveTuple) clientWriter
}

func newLedger() *ledger {
	return &ledger{
		byTuple: map[fiveTuple]*allocation{}, byID: map[string]*allocation{}, byRelay: map[netip.AddrPort]*allocation{},
		sockets: map[netip.AddrPort]*relaySocket{}, listeners: map[netip.AddrPort]io.Closer{},
	}
}

// lookup returns the allocation on a 5-tuple, or nil.
func (l *ledger) lookup(t fiveTuple) *allocation {
	l.mu.RLock()
	a := l.byTuple[t]
	l.mu.RUnlock()
	return a
}

// created records an allocation pion made, joining it to its relay socket
// (UDP) or listener (TCP).
func (l *ledger) created(t fiveTuple, transport, user, realm string, relay netip.AddrPort) *allocation {
	a := &allocation{
		id: newAllocID(), tuple: t, transport: transport, user: user, realm: realm, relay: relay, created: time.Now(),
		perms: map[netip.Addr]struct{}{}, chans: map[uint16]netip.AddrPort{}, peerChans: map[netip.AddrPort]uint16{},
	}
	if l.clientOf != nil {
		a.client = l.clientOf(t)
	}
	l.mu.Lock()
	a.usage = new(usageCounters)
	if s := l.sockets[relay]; s != nil {
		a.sock = s
		a.usage = &s.usage
		if l.relayBytesBy != nil {
			s.by.Store(&l.relayBytesBy[transportIndex(transport)])
		} else {
			s.by.Store(new([2]atomic.Uint64))
		}
		s.alloc.Store(a)
	}
	a.relayCloser = l.listeners[relay]
	if old := l.byTuple[t]; old != nil {
		delete(l.byID, old.id)
	}
	l.byTuple[t] = a
	l.byID[a.id] = a
	l.byRelay[relay] = a
	l.mu.Unlock()
	if a.sock != nil {
		a.sock.attached(a)
	}
	return a
}

// deleted forgets the allocation on t and returns it (nil if unknown).
func (l *ledger) deleted(t fiveTuple) *allocation {
	l.mu.Lock()
	a := l.byTuple[t]
	delete(l.byTuple, t)
	if a != nil {
		delete(l.byID, a.id)
		if l.byRelay[a.relay] == a {
			delete(l.byRelay, a.relay)
		}
	}
	l.mu.Unlock()
	return a
}

// byRelayLookup returns the allocation on a relayed address, or nil.
func (l *ledger) byRelayLookup(relay netip.AddrPort) *allocation {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.byRelay[relay]
}

// byIDLookup returns the allocation with id, or nil.
func (l *ledger) byIDLookup(id string) *allocation {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return l.byID[id]
}

// all returns the live allocations, only user's when user != "": user is
// a user ID ("user:alice", "rest:alice") or a bare name, which matches
// both kinds.
func (l *ledger) all(user string) []*allocation {
	l.mu.RLock()
	defer l.mu.RUnlock()
	out := make([]*allocation, 0, len(l.byTuple))
	for _, a := range l.byTuple {
		if user == "" || a.user == user || userName(a.user) == user {
			out = append(out, a)
		}
	}
	return out
}

// userName is the name in a user ID (auth.go: "kind:name").
func userName(id string) string {
	if _, name, ok := strings.Cut(id, ":"); ok {
		return name
	}
	return id
}

// newAllocID is a random 64-bit ID in hex: unguessable, so that an ID seen
// in a usage record does not name another user's allocation to the API.
func newAllocID() string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (l *ledger) permCreated(t fiveTuple, peer netip.Addr) {
	if a := l.lookup(t); a != nil {
		a.mu.Lock()
		a.perms[peer] = struct{}{}
		a.mu.Unlock()
	}
}

func (l *ledger) permDeleted(t fiveTuple, peer netip.Addr) {
	if a := l.lookup(t); a != nil {
		a.mu.Lock()
		delete(a.perms, peer)
		a.mu.Unlock()
	}
}

func (l *ledger) chanCreated(t fiveTuple, ch uint16, peer netip.AddrPort) {
	if a := l.lookup(t); a != nil {
		a.mu.Lock()
		a.chans[ch] = peer
		a.peerChans[peer] = ch
		a.mu.Unlock()
	}
}

func (l *ledger) chanDeleted(t fiveTuple, ch uint16) {
	if a := l.lookup(t); a != nil {
		a.mu.Lock()
		if peer, ok := a.chans[ch]; ok && a.peerChans[peer] == ch {
			delete(a.peerChans, peer)
		}
		delete(a.chans, ch)
		a.mu.Unlock()
	}
}

// controlTuples returns up to len(dst) 5-tuples of userID's TCP
// allocations from ip (RFC 6062 control connections).
func (l *ledger) controlTuples(dst []netip.AddrPort, ip netip.Addr, userID string) int {
	n := 0
	l.mu.RLock()
	defer l.mu.RUnlock()
	for t, a := range l.byTuple {
		if n == len(dst) {
			break
		}
		if t.tcp && t.src.Addr() == ip && a.user == userID {
			dst[n] = t.src
			n++
		}
	}
	return n
}

func (l *ledger) addSocket(s *relaySocket) {
	l.mu.Lock()
	l.sockets[s.addr] = s
	l.mu.Unlock()
}

// addListener records an RFC 6062 relay listener under its announced
// address, so that the allocation made on it can be ended (kill).
func (l *ledger) addListener(addr netip.AddrPort, c io.Closer) {
	l.mu.Lock()
	l.listeners[addr] = c
	l.mu.Unlock()
}

func (l *ledger) removeListener(addr netip.AddrPort, c io.Closer) {
	l.mu.Lock()
	if l.listeners[addr] == c {
		delete(l.listeners, addr)
	}
	l.mu.Unlock()
}

// relaysInUse is the number of relay sockets and listeners open.
func (l *ledger) relaysInUse() (udp, tcp int) {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return len(l.sockets), len(l.listeners)
}

func (l *ledger) removeSocket(s *relaySocket) {
	l.mu.Lock()
	if l.sockets[s.addr] == s {
		delete(l.sockets, s.addr)
	}
	l.mu.Unlock()
}
