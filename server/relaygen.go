package server

import (
	"context"
	"errors"
	"fmt"
	"github.com/stund/stund/internal/stunwire"
	"math/rand/v2"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/pion/transport/v5"
	"github.com/pion/transport/v5/reuseport"
	"github.com/pion/transport/v5/stdnet"
	"github.com/pion/turn/v5"
)

// Bounds on RFC 6062 peer data connections. Each one holds a descriptor
// (two once bound), and a pending one (dialled by Connect or accepted on
// the relay, no ConnectionBind yet) holds it for up to 30 s (RFC 6062
// §5.2, §5.3) without the client doing anything more.
const (
	// maxPeerConnsPerAllocation bounds the pending plus open peer
	// connections of one TCP allocation. An RFC 6062 client opens one
	// data connection per TCP peer (an ICE-TCP candidate pair, a media
	// server); 32 leaves room for a client that talks to many peers
	// through one relay, and stops one Connect loop at 32 descriptors.
	maxPeerConnsPerAllocation = 32
	// maxPeerConnsPerUser bounds them over all of one user's TCP
	// allocations: four busy allocations' worth, so that a credential
	// with its DefaultUserQuota of 10 allocations holds at most 128 peer
	// descriptors instead of 320.
	maxPeerConnsPerUser = 128
	// peerDialTimeout bounds an outgoing peer connection (Connect):
	// RFC 6062 §5.2 "The timeout value MUST be at least 30 seconds", and
	// no longer, because a peer that drops SYNs holds a connection slot
	// for as long as the dial lasts.
	peerDialTimeout = 30 * time.Second
	// maxRelayBindFailures bounds the binds one allocation may try: a
	// port free in the ledger but held by another process fails its bind
	// in microseconds, and 32 such failures in a row mean the range is
	// (nearly) taken outside stund, where failing fast is right.
	maxRelayBindFailures = 32
)

var (
	// errRequestedPortOutsideRange refuses an Allocate asking for a relay
	// port outside the operator's range: pion would bind any port the
	// client names.
	errRequestedPortOutsideRange = errors.New("requested relay port is outside the relay port range")
	// errRelayPortsExhausted: every port of the range on this IP and
	// transport is held (RFC 8656 §7.2: 508 Insufficient Capacity).
	errRelayPortsExhausted = errors.New("no free relay port in the relay port range")
	// errRelayPortTaken: a requested port (EVEN-PORT, RESERVATION-TOKEN)
	// already belongs to another allocation.
	errRelayPortTaken = errors.New("requested relay port belongs to another allocation")
	// errPeerConnLimit: an allocation or a user has as many peer
	// connections as it may (RFC 6062 §5.2: 447 for Connect).
	errPeerConnLimit = errors.New("too many peer connections")
	// errAllocationGone: the allocation's relay listener closed while a
	// Connect was on its way.
	errAllocationGone = errors.New("the allocation's relayed address is closed")
)

// relayGenerator owns the relay port choice (RFC 8656 §7.2) and puts the
// peer policy and the RFC 6062 connection bounds in front of every relay
// socket, listener and outgoing TCP connection.
//
// Every relay port is taken from relays, the process's ledger, so that a
// relayed transport address belongs to exactly one allocation. The kernel
// alone does not ensure that for TCP: the relay listener is bound with
// SO_REUSEPORT (a Connect dials its peer from the relayed address, which
// the listener already holds), and SO_REUSEPORT lets a second listener of
// the same user bind the same port, after which the kernel hands each
// incoming peer connection to either allocation.
//
// pion answers any error of AllocatePacketConn or AllocateListener with
// 508 Insufficient Capacity (internal/server/turn.go, handleAllocateRequest
// after CreateAllocation), and any error of AllocateConn with 447
// Connection Timeout or Failure (CreateTCPConnection wraps it in
// ErrTCPConnectionTimeoutOrFailure; handleConnectRequest), which are the
// answers RFC 8656 §7.2 and RFC 6062 §5.2 give.
type relayGenerator struct {
	// inner is pion's port-range generator; only its settings are used
	// (Net, Address, RelayAddress), the binds are ours.
	inner    *turn.RelayAddressGeneratorPortRange
	min, max uint16
	live     *livePolicy   // the peer policy in force (Reload swaps it)
	ops      *opsStats     // relayed packet and byte counters
	bw       *bandwidth    // per-user cap (bandwidth.go); nil: none
	led      *ledger       // relay sockets and listeners are recorded there (ledger.go)
	polls    *relayPollers // peer-to-client reads for UDP clients (relaypoll.go); nil: a goroutine per socket
	// local is the IP relays are bound on; the announced relayed address
	// carries its public form (--advertise), which the host may not have.
	local netip.Addr
	// dialTimeout: tests only, a shorter peerDialTimeout; 0 means that.
	dialTimeout time.Duration
}

func (g *relayGenerator) Validate() error { return g.inner.Validate() }

func (g *relayGenerator) checkPort(p int) error {
	if p != 0 && (p < int(g.min) || p > int(g.max)) {
		return fmt.Errorf("%w: %d not in %d-%d", errRequestedPortOutsideRange, p, g.min, g.max)
	}
	return nil
}

// key is the ledger entry of port on this generator's IP.
func (g *relayGenerator) key(tcp bool, port uint16) portKey {
	var ns transport.Net
	if _, host := g.inner.Net.(*stdnet.Net); !host {
		ns = g.inner.Net // an emulated network has ports of its own
	}
	return portKey{ns: ns, ip: g.local, tcp: tcp, port: port}
}

func (g *relayGenerator) listenAddr(port uint16) string {
	return net.JoinHostPort(g.inner.Address, strconv.Itoa(int(port)))
}

// take checks a requested port and takes a port for the relay c asks
// for from the ledger, bound with bind.
func (g *relayGenerator) take(tcp bool, c turn.AllocateListenerConfig, bind func(port uint16) error) (portKey, error) {
	if err := g.checkPort(c.RequestedPort); err != nil {
		return portKey{}, err
	}
	return relays.take(g.key(tcp, 0), g.live, c.UserID, uint16(c.RequestedPort), g.min, g.max, bind)
}

// AllocatePacketConn binds a UDP relay (RFC 8656 §7.2).
func (g *relayGenerator) AllocatePacketConn(c turn.AllocateListenerConfig) (net.PacketConn, net.Addr, error) {
	var conn net.PacketConn
	k, err := g.take(false, c, func(port uint16) error {
		var err error
		conn, err = g.inner.Net.ListenPacket(c.Network, g.listenAddr(port)) //nolint:noctx // transport.Net has no context form
		return err
	})
	if err != nil {
		return nil, nil, err
	}
	relayed := &net.UDPAddr{IP: g.inner.RelayAddress, Port: int(k.port)}
	rs := newRelaySocket(conn, stunwire.AddrPortOf(relayed), c.UserID, g.led, g.live, g.ops, g.bw, g.polls)
	rs.onClose = (&portHold{key: k}).free
	return rs, relayed, nil
}

// AllocateListener binds a TCP relay (RFC 6062 §5.1) with SO_REUSEPORT,
// which outgoing connections from the relayed address need (AllocateConn);
// the ledger keeps the port to this one allocation.
func (g *relayGenerator) AllocateListener(c turn.AllocateListenerConfig) (net.Listener, net.Addr, error) {
	lc := g.inner.Net.CreateListenConfig(&net.ListenConfig{Control: reuseport.Control})
	var ln net.Listener
	k, err := g.take(true, c, func(port uint16) error {
		var err error
		ln, err = lc.Listen(context.Background(), c.Network, g.listenAddr(port))
		return err
	})
	if err != nil {
		return nil, nil, err
	}
	relayed := &net.TCPAddr{IP: g.inner.RelayAddress, Port: int(k.port)}
	rl := &relayListener{Listener: ln, portHold: portHold{key: k}, ops: g.ops, led: g.led, addr: stunwire.AddrPortOf(relayed), gen: g, user: c.UserID}
	g.led.addListener(rl.addr, rl) // the allocation can be ended through it (kill)
	return rl, relayed, nil
}

// AllocateConn opens an outgoing TCP connection to a peer (RFC 6062 §5.2)
// from the allocation's relayed address. The peer is checked again here,
// at the port level (AllowedAddrPort: the server's own listeners), which a
// permission cannot express; the connection takes one of the allocation's
// and the user's peer connection slots until it closes.
func (g *relayGenerator) AllocateConn(c turn.AllocateConnConfig) (net.Conn, error) {
	if ap := stunwire.AddrPortOf(c.RemoteAddr); !ap.IsValid() || !g.live.load().AllowedAddrPort(ap) {
		g.ops.relayRefused.Add(1)
		return nil, fmt.Errorf("%w: %v", ErrPeerRefused, c.RemoteAddr)
	}
	la, ok := c.LocalAddr.(*net.TCPAddr)
	if !ok {
		return nil, fmt.Errorf("relayed address %v is not TCP", c.LocalAddr)
	}
	// pion binds the connection to the allocation's relayed address, the
	// announced one; behind a 1:1 NAT that is the public IP, which the host
	// cannot bind. Bind the private IP on the same port instead.
	local := &net.TCPAddr{IP: g.local.AsSlice(), Port: la.Port}
	k := g.key(true, uint16(la.Port))
	if err := relays.openConn(k); err != nil {
		if errors.Is(err, errPeerConnLimit) {
			g.ops.peerConnRefusedOut.Add(1)
		}
		return nil, err
	}
	timeout := peerDialTimeout
	if g.dialTimeout != 0 {
		timeout = g.dialTimeout
	}
	d := g.inner.Net.CreateDialer(&net.Dialer{LocalAddr: local, Control: reuseport.Control, Timeout: timeout})
	conn, err := d.Dial(c.Network, c.RemoteAddr.String())
	if err != nil {
		relays.release(k, true)
		g.ops.peerDialFailed[classifyDial(err)].Add(1)
		return nil, err
	}
	return g.newPeerConn(conn, k, stunwire.AddrPortOf(c.LocalAddr), c.UserID), nil
}

// dialFailure is why a Connect's dial to its peer failed (RFC 6062 §5.2:
// the client gets 447 whatever the reason; operators see which).
type dialFailure int

const (
	dialRefused dialFailure = iota
	dialTimeout
	dialUnreachable
	dialAddrInUse
	dialOther
	numDialFailures
)

func (r dialFailure) String() string {
	return [...]string{"refused", "timeout", "unreachable", "address_in_use", "other"}[r]
}

func classifyDial(err error) dialFailure {
	var ne net.Error
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return dialRefused
	case errors.As(err, &ne) && ne.Timeout(), errors.Is(err, syscall.ETIMEDOUT):
		return dialTimeout
	case errors.Is(err, syscall.ENETUNREACH), errors.Is(err, syscall.EHOSTUNREACH):
		return dialUnreachable
	case errors.Is(err, syscall.EADDRINUSE), errors.Is(err, syscall.EADDRNOTAVAIL):
		return dialAddrInUse
	}
	return dialOther
}

// RelayStats says how full the relays are, for metrics and operators.
type RelayStats struct {
	// UDPPortsInUse and TCPPortsInUse count the relay ports this server
	// holds, over all its IPs; PortsPerIP is the size of the relay port
	// range, the most each IP and transport can hold.
	UDPPortsInUse, TCPPortsInUse, PortsPerIP int
	// PeerConnections counts the open and pending RFC 6062 peer data
	// connections; PeerConnectionsRefusedOut and ...In count those refused
	// at the per-allocation or per-user bound: a Connect answered 447
	// (Out), or a peer's connection to a relayed address closed at once
	// (In).
	PeerConnections                                     int
	PeerConnectionsRefusedOut, PeerConnectionsRefusedIn uint64
}

// Relays returns the relay counts.
func (s *Server) Relays() RelayStats {
	st := relays.stats(&s.live)
	st.PortsPerIP = int(s.cfg.RelayPortMax) - int(s.cfg.RelayPortMin) + 1
	st.PeerConnectionsRefusedOut = s.ops.peerConnRefusedOut.Load()
	st.PeerConnectionsRefusedIn = s.ops.peerConnRefusedIn.Load()
	return st
}

// relays is the process's ledger of relay ports. One per process, not per
// server: ports are the host's (or an emulated network's), and two
// servers of one process binding the same IP must not share a port
// either.
var relays = portLedger{
	held:  map[portKey]*heldPort{},
	users: map[userKey]int{},
}

// portKey names one relay port. ns is nil for the host's network stack,
// else the emulated network (tests) whose ports these are.
type portKey struct {
	ns   transport.Net
	ip   netip.Addr
	tcp  bool
	port uint16
}

// userKey names one user of one server; owner is the server's livePolicy,
// the one object all of a server's relay generators share.
type userKey struct {
	owner *livePolicy
	user  string
}

// heldPort is a port in use: by its relay socket or listener (open until
// it closes) and by the peer connections dialled from it or accepted on
// it, which keep the port out of the ledger until they close too.
type heldPort struct {
	owner *livePolicy
	user  string
	open  bool // the relay socket or listener is open
	conns int  // RFC 6062 peer connections, pending or open
}

type portLedger struct {
	mu    sync.Mutex
	held  map[portKey]*heldPort
	users map[userKey]int // peer connections per user, over all allocations
}

// take finds a free port for k (k.port is ignored) and binds it with bind,
// holding the ledger lock so that no other allocation of the process can
// pick the same port meanwhile. A requested port (RFC 8656 §7.2 EVEN-PORT
// and RESERVATION-TOKEN, which pion turns into one) is tried alone;
// otherwise the walk starts at a random port of lo..hi, so that the next
// relayed address cannot be predicted, and visits each port once, giving
// up after maxRelayBindFailures failed binds.
func (l *portLedger) take(k portKey, owner *livePolicy, user string, requested, lo, hi uint16, bind func(port uint16) error) (portKey, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	hold := func(port uint16) (portKey, error) {
		k.port = port
		if l.held[k] != nil {
			return k, errRelayPortTaken
		}
		if err := bind(port); err != nil {
			return k, err
		}
		l.held[k] = &heldPort{owner: owner, user: user, open: true}
		return k, nil
	}
	if requested != 0 {
		return hold(requested)
	}
	size := int(hi) - int(lo) + 1
	start := rand.IntN(size) //nolint:gosec // unpredictable enough: not a secret
	failures := 0
	for i := 0; i < size && failures < maxRelayBindFailures; i++ {
		port := uint16(int(lo) + (start+i)%size)
		k, err := hold(port)
		switch {
		case err == nil:
			return k, nil
		case !errors.Is(err, errRelayPortTaken):
			failures++
		}
	}
	return k, fmt.Errorf("%w %d-%d on %s", errRelayPortsExhausted, lo, hi, k.ip)
}

// openConn takes a peer connection slot on the allocation holding k and
// on its user.
func (l *portLedger) openConn(k portKey) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	h := l.held[k]
	if h == nil || !h.open {
		return errAllocationGone
	}
	u := userKey{h.owner, h.user}
	if h.conns >= maxPeerConnsPerAllocation {
		return fmt.Errorf("%w: the allocation has %d", errPeerConnLimit, h.conns)
	}
	if l.users[u] >= maxPeerConnsPerUser {
		return fmt.Errorf("%w: the user has %d", errPeerConnLimit, l.users[u])
	}
	h.conns++
	l.users[u]++
	return nil
}

// release gives back what one closed thing held: a peer connection slot
// (conn) or the relay socket or listener itself. The port leaves the
// ledger when nothing holds it any more.
func (l *portLedger) release(k portKey, conn bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	h := l.held[k]
	if h == nil {
		return
	}
	if conn {
		h.conns--
		u := userKey{h.owner, h.user}
		if l.users[u]--; l.users[u] <= 0 {
			delete(l.users, u)
		}
	} else {
		h.open = false
	}
	if !h.open && h.conns <= 0 {
		delete(l.held, k)
	}
}

// stats counts what owner holds.
func (l *portLedger) stats(owner *livePolicy) RelayStats {
	l.mu.Lock()
	defer l.mu.Unlock()
	var st RelayStats
	for k, h := range l.held {
		if h.owner != owner {
			continue
		}
		st.PeerConnections += h.conns
		if !h.open {
			continue
		}
		if k.tcp {
			st.TCPPortsInUse++
		} else {
			st.UDPPortsInUse++
		}
	}
	return st
}

// portHold is a relay socket's or listener's hold on its ledger entry,
// given back once however often the socket is closed.
type portHold struct {
	key  portKey
	once sync.Once
}

func (h *portHold) free() { h.once.Do(func() { relays.release(h.key, false) }) }

// relayListener is a TCP relay listener (RFC 6062 §5.3): every accepted
// peer connection takes a slot, and one over the allocation's or the
// user's bound is closed at once and counted. Its port returns to the
// ledger when it and every connection from it are closed.
type relayListener struct {
	net.Listener
	portHold
	ops  *opsStats
	led  *ledger
	addr netip.AddrPort // the announced relayed address, its key in led
	gen  *relayGenerator
	user string
}

// Accept never returns a refused connection, nor an error for one: pion
// deletes the allocation when Accept fails.
func (l *relayListener) Accept() (net.Conn, error) {
	for {
		conn, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		if err := relays.openConn(l.key); err != nil {
			if errors.Is(err, errPeerConnLimit) {
				l.ops.peerConnRefusedIn.Add(1) // before the close a peer can see
			}
			_ = conn.Close()
			continue
		}
		return l.gen.newPeerConn(conn, l.key, l.addr, l.user), nil
	}
}

func (l *relayListener) Close() error {
	defer l.free()
	l.led.removeListener(l.addr, l)
	return l.Listener.Close()
}

// peerConn is an RFC 6062 peer data connection; closing it frees its slot
// exactly once, although pion closes a bound connection twice (after the
// copy ends, and again when it removes the connection) and an unbound one
// on its 30 s timer or with the allocation.
type peerConn struct {
	net.Conn
	key  portKey
	once sync.Once
	// usage is the allocation's (nil if it was already gone); bw and bwu
	// the user's --max-bps buckets (nil: no cap).
	usage *usageCounters
	bw    *bandwidth
	bwu   *userBW
	user  string
}

// newPeerConn meters conn for the allocation on relayed and user's cap.
func (g *relayGenerator) newPeerConn(conn net.Conn, k portKey, relayed netip.AddrPort, user string) *peerConn {
	pc := &peerConn{Conn: conn, key: k, bw: g.bw, user: user}
	if a := g.led.byRelayLookup(relayed); a != nil {
		pc.usage = a.usage
	}
	if g.bw != nil {
		pc.bwu = g.bw.acquire(user)
	}
	return pc
}

// Read takes the peer's bytes for the client (counted "in"), at most at
// the user's cap.
func (c *peerConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 {
		if c.usage != nil {
			c.usage.in(n)
		}
		if c.bwu != nil {
			time.Sleep(c.bw.wait(&c.bwu.in, n))
		}
	}
	return n, err
}

// Write sends the client's bytes to the peer (counted "out"), at most at
// the user's cap.
func (c *peerConn) Write(p []byte) (int, error) {
	if c.bwu != nil {
		time.Sleep(c.bw.wait(&c.bwu.out, len(p)))
	}
	n, err := c.Conn.Write(p)
	if n > 0 && c.usage != nil {
		c.usage.out(n)
	}
	return n, err
}

// Close frees the slot before closing, so that whoever sees the
// connection end can count on the slot being free.
func (c *peerConn) Close() error {
	c.once.Do(func() {
		relays.release(c.key, true)
		if c.bwu != nil {
			c.bw.release(c.user, c.bwu)
		}
	})
	return c.Conn.Close()
}
