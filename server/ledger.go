package server

import (
	"net"
	"net/netip"
	"sync"
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
	return fiveTuple{src: addrPortOf(src), dst: addrPortOf(dst), tcp: tcp}
}

// allocation is what the ledger knows of one live allocation.
type allocation struct {
	tuple   fiveTuple
	user    string
	realm   string
	relay   netip.AddrPort // the relayed transport address as announced
	created time.Time

	// sock is the UDP relay socket (nil for RFC 6062 TCP allocations);
	// set once when the allocation is recorded.
	sock *relaySocket

	mu sync.Mutex
	// perms are the peer IPs holding a permission (RFC 8656 §9), as pion
	// installs and expires them.
	perms map[netip.Addr]struct{}
	// chans maps a channel number to its peer (RFC 8656 §12), as pion
	// binds and expires channels.
	chans map[uint16]netip.AddrPort
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
	// sockets are the UDP relay sockets by announced address: bound by the
	// generator before pion reports the allocation, removed when closed.
	sockets map[netip.AddrPort]*relaySocket
}

func newLedger() *ledger {
	return &ledger{byTuple: map[fiveTuple]*allocation{}, sockets: map[netip.AddrPort]*relaySocket{}}
}

// lookup returns the allocation on a 5-tuple, or nil.
func (l *ledger) lookup(t fiveTuple) *allocation {
	l.mu.RLock()
	a := l.byTuple[t]
	l.mu.RUnlock()
	return a
}

// created records an allocation pion made, joining it to its relay socket.
func (l *ledger) created(t fiveTuple, user, realm string, relay netip.AddrPort) *allocation {
	a := &allocation{
		tuple: t, user: user, realm: realm, relay: relay, created: time.Now(),
		perms: map[netip.Addr]struct{}{}, chans: map[uint16]netip.AddrPort{},
	}
	l.mu.Lock()
	if s := l.sockets[relay]; s != nil {
		a.sock = s
		s.alloc.Store(a)
	}
	l.byTuple[t] = a
	l.mu.Unlock()
	return a
}

// deleted forgets the allocation on t and returns it (nil if unknown).
func (l *ledger) deleted(t fiveTuple) *allocation {
	l.mu.Lock()
	a := l.byTuple[t]
	delete(l.byTuple, t)
	l.mu.Unlock()
	return a
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
		a.mu.Unlock()
	}
}

func (l *ledger) chanDeleted(t fiveTuple, ch uint16) {
	if a := l.lookup(t); a != nil {
		a.mu.Lock()
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

// count is the number of live allocations.
func (l *ledger) count() int {
	l.mu.RLock()
	defer l.mu.RUnlock()
	return len(l.byTuple)
}

func (l *ledger) addSocket(s *relaySocket) {
	l.mu.Lock()
	l.sockets[s.addr] = s
	l.mu.Unlock()
}

func (l *ledger) removeSocket(s *relaySocket) {
	l.mu.Lock()
	if l.sockets[s.addr] == s {
		delete(l.sockets, s.addr)
	}
	l.mu.Unlock()
}
