// Package server is the stund service: it binds the RFC 5780 socket grid,
// answers Binding requests itself and hands TURN to pion/turn behind our
// authentication, peer policy and quotas.
package server

import (
	"crypto/tls"
	"errors"
	"fmt"
	"github.com/stund/stund/internal/stunwire"
	"github.com/stund/stund/internal/udpio"
	"github.com/stund/stund/server/binding"
	"github.com/stund/stund/server/offload"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pion/logging"
	"github.com/pion/transport/v5"
	"github.com/pion/transport/v5/stdnet"
	"github.com/pion/turn/v5"
	"github.com/prometheus/client_golang/prometheus"
)

// portPickTries bounds the search for a free port pair when Port or AltPort
// is 0: each try binds up to eight sockets, and a loaded test machine may
// lose a race or two, never twenty.
const portPickTries = 20

// maxBudgetRealm is the longest realm whose 401 (header 20, ERROR-CODE 8,
// NONCE 12, REALM 4+realm) still fits twice a minimal 28-byte Allocate
// (header + REQUESTED-TRANSPORT): 44 + 12 = 56.
const maxBudgetRealm = 12

// Server is a running stund instance.
type Server struct {
	cfg Config
	log *slog.Logger
	net transport.Net

	grid      [2][2]net.PacketConn // raw UDP sockets, nil where absent
	gridAddr  [2][2]netip.AddrPort // their bound addresses
	tcp       []net.Listener       // raw TCP listeners (primary port, each IP)
	tls       []net.Listener       // TLS listeners (TLS port, each IP)
	streamAt  map[net.Listener]int // listener -> ip index
	binder    *binding.Responder
	turn      *turn.Server
	led       *ledger      // the allocations (ledger.go)
	data      *dataPlane   // ChannelData toward peers (dataplane.go)
	authLog   *authLog     // failed authentications (authlog.go)
	pionNonce *pionNonces  // pion's nonces from its private port (piontap.go)
	kern      *kernelRelay // channels relayed in the kernel (kernel.go); nil: none
	fleet     fleet        // drain and alternates (fleet.go)
	usage     *usageSink   // usage records as JSON lines; nil: log only
	tlsAt     map[netip.AddrPort]bool
	clients   streamClients // TCP/TLS clients by 5-tuple, for relayed data (dataplane.go)
	udp       *udpDeps      // what the grid sockets route to (demux.go)
	stream    *streamDeps   // what TCP/TLS connections route to (stream.go)
	auth      *Authenticator
	quotas    *Quotas
	front     *turnFront // auth and RFC 8656 checks in front of pion (front.go)
	demux     demuxStats
	closeOnce sync.Once
	closeErr  error

	// gridSocks holds every socket of a cell, grid[i][p] first: the
	// SO_REUSEPORT siblings, one read loop each (udpsock.go).
	gridSocks [2][2][]net.PacketConn
	// gridIO is grid's sockets opened for batched writes toward clients
	// (internal/udpio), nil where absent or not a kernel socket.
	gridIO [2][2]*udpio.Conn
	// polls read relay sockets for UDP clients (relaypoll.go); nil: a
	// goroutine per relay socket.
	polls *relayPollers

	// Operations (metrics.go, reload.go, probeid.go).
	live        livePolicy // the peer policy in force (Reload swaps it)
	ops         opsStats
	probes      probeLog
	closing     atomic.Bool
	reloadMu    sync.Mutex
	metricsOnce sync.Once
	registry    *prometheus.Registry

	limits limits // rate limits, bandwidth cap, stream bounds (ratelimit.go)
}

// New validates cfg, binds every socket (or none: on any error all that
// was bound is closed again) and starts serving.
func New(cfg Config) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	cfg = cfg.withDefaults()
	s := &Server{cfg: cfg, log: cfg.Logger, net: cfg.Net, streamAt: map[net.Listener]int{}}
	if s.net == nil {
		n, err := stdnet.NewNet()
		if err != nil {
			return nil, fmt.Errorf("network: %w", err)
		}
		s.net = n
	}

	var err error
	for try := 0; try < portPickTries; try++ {
		err = s.bind()
		if err == nil {
			break
		}
		s.closeSockets()
		if cfg.Port != 0 && cfg.AltPort != 0 && (cfg.TLSConfig == nil || cfg.TLSPort != 0) {
			break // fixed ports: retrying cannot help
		}
	}
	if err != nil {
		return nil, err
	}

	if err := s.startTURN(); err != nil {
		s.closeSockets()
		return nil, err
	}
	if err := s.startOffload(); err != nil {
		_ = s.turn.Close()
		s.closeSockets()
		return nil, err
	}
	if n := len(cfg.Realm); n > maxBudgetRealm {
		s.log.Warn("realm is long: over UDP a 401 to a minimal 28-byte Allocate would be more than twice the request and is dropped (amplification budget); clients that send SOFTWARE or other attributes are unaffected, TCP/TLS always",
			"realm_bytes", n, "fits_bytes", maxBudgetRealm)
	}
	s.log.Info("stund listening",
		"primary", s.gridAddr[0][0], "alternate", s.gridAddr[1][1],
		"single_ip", !cfg.AlternateIP.IsValid(), "tcp", len(s.tcp), "tls", len(s.tls))
	s.logDataPlane()
	return s, nil
}

// logDataPlane says once how relayed datagrams move on this host: the
// batched path always; io_uring for sends from many relay sockets where
// the kernel and the sandbox allow it (seccomp profiles often refuse it).
func (s *Server) logDataPlane() {
	if s.polls == nil {
		return // not kernel sockets (tests on a virtual network)
	}
	if s.cfg.DisableIOURing {
		s.log.Info("relay data plane: recvmmsg/sendmmsg and UDP GSO; io_uring is off (--io-uring off), each relay socket sends on its own")
	} else if r, err := udpio.NewRing(); err != nil {
		s.log.Info("relay data plane: recvmmsg/sendmmsg and UDP GSO; io_uring is not available, each relay socket sends on its own", "reason", err.Error())
	} else {
		_ = r.Close()
		s.log.Info("relay data plane: recvmmsg/sendmmsg, UDP GSO, and io_uring for datagrams leaving many relay sockets at once")
	}
}

// ips returns the configured IPs, primary first.
func (s *Server) ips() []netip.Addr {
	if s.cfg.AlternateIP.IsValid() {
		return []netip.Addr{s.cfg.PrimaryIP, s.cfg.AlternateIP}
	}
	return []netip.Addr{s.cfg.PrimaryIP}
}

func udpNetwork(a netip.Addr) string {
	if a.Unmap().Is4() {
		return "udp4"
	}
	return "udp6"
}

func tcpNetwork(a netip.Addr) string {
	if a.Unmap().Is4() {
		return "tcp4"
	}
	return "tcp6"
}

// bind opens the grid, the TCP and the TLS listeners. With port 0 the
// primary IP picks the port and every other socket must get the same one,
// which is what RFC 5780 clients expect (OTHER-ADDRESS names one port).
func (s *Server) bind() error {
	ports := [2]int{s.cfg.Port, s.cfg.AltPort}
	for i, ip := range s.ips() {
		for p := 0; p < 2; p++ {
			socks, err := s.listenUDP(ip, ports[p])
			if err != nil {
				return fmt.Errorf("bind udp %s: %w", netip.AddrPortFrom(ip, uint16(ports[p])), err)
			}
			conn := socks[0]
			s.grid[i][p], s.gridSocks[i][p] = conn, socks
			s.gridIO[i][p] = udpio.NewConn(conn)
			s.gridAddr[i][p] = stunwire.AddrPortOf(conn.LocalAddr())
			ports[p] = int(s.gridAddr[i][p].Port())
		}
	}
	if !s.cfg.DisableTCP {
		for i, ip := range s.ips() {
			l, err := s.net.ListenTCP(tcpNetwork(ip), net.TCPAddrFromAddrPort(netip.AddrPortFrom(ip, uint16(ports[0]))))
			if err != nil {
				return fmt.Errorf("bind tcp %s: %w", netip.AddrPortFrom(ip, uint16(ports[0])), err)
			}
			pl := proxyListener(l, s.cfg.ProxyProtocolFrom)
			s.tcp = append(s.tcp, pl)
			s.streamAt[pl] = i
		}
	}
	if s.cfg.TLSConfig != nil {
		port := s.cfg.TLSPort
		for i, ip := range s.ips() {
			l, err := s.net.ListenTCP(tcpNetwork(ip), net.TCPAddrFromAddrPort(netip.AddrPortFrom(ip, uint16(port))))
			if err != nil {
				return fmt.Errorf("bind tls %s: %w", netip.AddrPortFrom(ip, uint16(port)), err)
			}
			port = int(stunwire.AddrPortOf(l.Addr()).Port())
			tl := tls.NewListener(proxyListener(l, s.cfg.ProxyProtocolFrom), s.cfg.TLSConfig)
			s.tls = append(s.tls, tl)
			s.streamAt[tl] = i
		}
	}
	return nil
}

// closeAll closes every socket and listener, leaving the fields as they
// are for read loops that are still unwinding.
func (s *Server) closeAll() {
	for i := range s.gridSocks {
		for p := range s.gridSocks[i] {
			for _, c := range s.gridSocks[i][p] {
				_ = c.Close()
			}
		}
	}
	for _, l := range append(append([]net.Listener{}, s.tcp...), s.tls...) {
		_ = l.Close()
	}
}

// closeSockets closes and forgets everything bound, so that bind can try
// again; only for a failed bind, before any read loop runs.
func (s *Server) closeSockets() {
	s.closeAll()
	s.grid, s.gridSocks = [2][2]net.PacketConn{}, [2][2][]net.PacketConn{}
	s.tcp, s.tls = nil, nil
	s.streamAt = map[net.Listener]int{}
}

// startTURN builds the stages a packet passes (the pipeline, in the order
// of docs/design.md) and pion's TURN server on top of the wrapped sockets.
func (s *Server) startTURN() error {
	s.buildState()
	s.buildStages()
	tc := s.pionConfig()
	ts, err := turn.NewServer(tc)
	if err != nil {
		if s.polls != nil {
			s.polls.close()
			s.polls = nil
		}
		return fmt.Errorf("turn: %w", err)
	}
	s.turn = ts
	if s.pionNonce.current() == nil {
		_ = ts.Close()
		return fmt.Errorf("turn: pion did not mint a nonce on its private port")
	}
	return nil
}

// buildState makes what the stages share: the peer policy, credentials,
// quotas and limits, the allocation ledger, the fleet state.
func (s *Server) buildState() {
	cfg := s.cfg
	s.live.swap(s.buildPolicy(cfg)) // Reload swaps it
	s.auth = NewAuthenticator(Credentials{Realm: cfg.Realm, Users: cfg.Users, Secrets: cfg.AuthSecrets})
	s.quotas = NewQuotas(cfg.UserQuota, cfg.TotalQuota)
	s.initLimits(cfg.abuse)
	s.led = newLedger()
	s.led.relayBytesBy = &s.ops.relayBytesBy
	if _, host := s.net.(*stdnet.Net); host || s.net == nil {
		s.polls = newRelayPollers() // kernel sockets only: vnet's are not pollable
	}
	// Allocation lifetimes run from seconds (a failed call) to hours (a
	// long meeting, refreshed); the default lifetime is 10 minutes.
	s.ops.allocDurations = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "stund_allocation_duration_seconds",
		Help:    "How long TURN allocations lived, observed when each ends.",
		Buckets: []float64{1, 10, 60, 300, 600, 1800, 3600, 3 * 3600, 12 * 3600},
	})
	s.fleet.alts = cfg.AlternateServers
	s.fleet.started = make(chan struct{})
	if cfg.UsageLog != nil {
		s.usage = &usageSink{w: cfg.UsageLog}
	}
	s.tlsAt = map[netip.AddrPort]bool{}
	for _, l := range s.tls {
		s.tlsAt[stunwire.AddrPortOf(l.Addr())] = true
	}
	s.authLog = newAuthLog(s.log, &s.ops)
	s.pionNonce = newPionNonces()
}

// buildStages makes the stages each gets as arguments: the Binding
// responder, the TURN front, the data plane, and what the UDP sockets and
// the stream connections route to.
func (s *Server) buildStages() {
	cfg := s.cfg
	s.binder = binding.New(binding.Config{
		Grid:        s.gridAddr,
		Advertise:   cfg.Advertise,
		Software:    cfg.Software,
		RFC5780Lean: cfg.RFC5780Lean,
	})
	s.data = &dataPlane{led: s.led}
	s.front = newTurnFront(frontDeps{
		auth: s.auth, policy: &s.live, led: s.led, pion: s.pionNonce,
		allowUnauth: s.allowUnauth, authFailed: s.authLog.failed, admitAllocate: s.admitAllocate,
		log: s.log, realmLen: len(cfg.Realm),
	}, cfg.PrimaryIP.Unmap().Is4(), DefaultNonceLifetime)
	binding := &bindingStage{binder: s.binder, noteProbe: s.noteProbe}
	s.udp = &udpDeps{binding: binding, front: s.front, data: s.data, demux: &s.demux, allowUnauth: s.allowUnauth, grid: &s.grid, requests: &s.ops.requestsBy, ring: !s.cfg.DisableIOURing}
	s.led.clientOf = s.clientOf
	s.stream = &streamDeps{binding: binding, front: s.front, data: s.data, led: s.led, clients: &s.clients, limits: &s.limits, demux: &s.demux, requests: &s.ops.requestsBy}
}

// pionConfig is pion's configuration: its hooks, and every socket and
// listener wrapped so that our stages see each packet first.
func (s *Server) pionConfig() turn.ServerConfig {
	cfg := s.cfg
	lf := cfg.LoggerFactory
	if lf == nil {
		f := logging.NewDefaultLoggerFactory()
		f.DefaultLogLevel = logging.LogLevelDisabled
		lf = f
	}
	tc := turn.ServerConfig{
		Realm: cfg.Realm,
		// The front has verified every request pion sees (front.go), so
		// pion's own check only repeats ours under the key we re-signed with.
		AuthHandler:   s.auth.AuthHandler(),
		QuotaHandler:  s.allocRateThen(s.quotas.QuotaHandler()),
		EventHandler:  s.eventHandler(),
		LoggerFactory: lf,
		// RFC 8656 §7.2: the front (front.go) writes a LIFETIME clamped
		// to [600 s, 3600 s] into every Allocate and Refresh; pion takes
		// values under an hour as they are and falls back to this for
		// 3600, so this must be the maximum.
		AllocationLifetime: maxLifetimeSec * time.Second,
		InboundMTU:         pionInboundMTU,
		// pion's private port for minting its nonces (piontap.go).
		PacketConnConfigs: []turn.PacketConnConfig{{PacketConn: s.pionNonce.tap, RelayAddressGenerator: noRelay{}}},
	}
	for i := range s.grid {
		for p := range s.grid[i] {
			// One read loop per socket of the cell (udpsock.go).
			for _, c := range s.gridSocks[i][p] {
				tc.PacketConnConfigs = append(tc.PacketConnConfigs, turn.PacketConnConfig{
					PacketConn:            &stunPacketConn{PacketConn: c, deps: s.udp, at: endpoint{IP: i, Port: p}, local: s.gridAddr[i][p]},
					RelayAddressGenerator: s.relayGen(i),
					PermissionHandler:     s.live.permissionHandler(),
				})
			}
		}
	}
	for n, l := range append(append([]net.Listener{}, s.tcp...), s.tls...) {
		i, tr := s.streamAt[l], trTCP
		if n >= len(s.tcp) {
			tr = trTLS
		}
		tc.ListenerConfigs = append(tc.ListenerConfigs, turn.ListenerConfig{
			Listener:              &stunListener{Listener: l, deps: s.stream, ip: i, tr: tr},
			RelayAddressGenerator: s.relayGen(i),
			PermissionHandler:     s.live.permissionHandler(),
		})
	}
	return tc
}

// relayGen returns the relay address generator for allocations made
// through IP index i: relays are bound on that IP and announced with its
// public (advertised) form, inside the configured port range.
func (s *Server) relayGen(i int) turn.RelayAddressGenerator {
	ip := s.ips()[i]
	return &relayGenerator{
		inner: &turn.RelayAddressGeneratorPortRange{
			RelayAddress: net.IP(s.cfg.public(ip).AsSlice()),
			Address:      ip.String(),
			MinPort:      s.cfg.RelayPortMin,
			MaxPort:      s.cfg.RelayPortMax,
			// Random ports in the range: a full range has 16k
			// ports, so 32 tries find a free one unless the range
			// is nearly exhausted, where failing fast is right.
			MaxRetries: 32,
			Net:        s.net,
		},
		min:   s.cfg.RelayPortMin,
		max:   s.cfg.RelayPortMax,
		live:  &s.live,
		ops:   &s.ops,
		bw:    s.limits.bw,
		led:   s.led,
		polls: s.polls,
		local: ip,
	}
}

// eventHandler keeps the ledger (ledger.go) and the quotas in step with
// pion, and logs one line per allocation lifecycle event.
func (s *Server) eventHandler() turn.EventHandler {
	return turn.EventHandler{
		OnAllocationCreated: func(src, dst net.Addr, proto, user, realm string, relay net.Addr, reqPort int) {
			s.quotas.OnCreated(user)
			t := tupleOf(src, dst)
			tr := s.transportOf(t)
			s.led.created(t, tr, user, realm, stunwire.AddrPortOf(relay))
			s.ops.allocCreatedBy[transportIndex(tr)].Add(1)
			s.ops.allocCreated.Add(1)
			s.log.Info("allocation created", "client", src.String(), "server", dst.String(), "proto", proto, "user", user, "relay", relay.String())
		},
		OnAllocationDeleted: func(src, dst net.Addr, proto, user, realm string) {
			s.quotas.OnDeleted(user)
			if a := s.led.deleted(tupleOf(src, dst)); a != nil {
				s.kern.removeAll(a)
				s.allocationEnded(a)
			}
			s.ops.allocDeleted.Add(1)
			s.log.Info("allocation deleted", "client", src.String(), "server", dst.String(), "proto", proto, "user", user)
		},
		OnAllocationError: func(src, dst net.Addr, proto, msg string) {
			s.log.Debug("turn request failed", "client", src.String(), "server", dst.String(), "proto", proto, "error", msg)
		},
		// Counted for metrics only: one line per permission or channel
		// would be a line per peer, too many at info.
		OnPermissionCreated: func(src, dst net.Addr, _, _, _ string, _ net.Addr, peer net.IP) {
			s.ops.permCreated.Add(1)
			if ip, ok := netip.AddrFromSlice(peer); ok {
				t := tupleOf(src, dst)
				s.led.permCreated(t, ip.Unmap())
				if a := s.led.lookup(t); a != nil {
					s.kern.installPeer(a, ip.Unmap())
				}
			}
		},
		OnPermissionDeleted: func(src, dst net.Addr, _, _, _ string, _ net.Addr, peer net.IP) {
			s.ops.permDeleted.Add(1)
			if ip, ok := netip.AddrFromSlice(peer); ok {
				t := tupleOf(src, dst)
				if a := s.led.lookup(t); a != nil {
					s.kern.removePeer(a, ip.Unmap()) // the kernel stops first
				}
				s.led.permDeleted(t, ip.Unmap())
			}
		},
		OnChannelCreated: func(src, dst net.Addr, _, _, _ string, _, peer net.Addr, number uint16) {
			s.ops.chanCreated.Add(1)
			t := tupleOf(src, dst)
			s.led.chanCreated(t, number, stunwire.AddrPortOf(peer))
			if a := s.led.lookup(t); a != nil {
				s.kern.install(a, number, stunwire.AddrPortOf(peer))
			}
		},
		OnChannelDeleted: func(src, dst net.Addr, _, _, _ string, _, _ net.Addr, number uint16) {
			s.ops.chanDeleted.Add(1)
			t := tupleOf(src, dst)
			if a := s.led.lookup(t); a != nil {
				s.kern.remove(a, number) // the kernel stops first
			}
			s.led.chanDeleted(t, number)
		},
	}
}

// startOffload loads the kernel relay (kernel.go) as Config.Offload asks:
// in auto mode a kernel or privileges that do not allow it leave the relay
// in userspace, with one logged reason.
func (s *Server) startOffload() error {
	if s.cfg.Offload == offload.ModeOff {
		return nil
	}
	o, err := offload.New(offload.Config{Mode: s.cfg.Offload, Addrs: s.ips(), Logger: s.log})
	if err != nil {
		if s.cfg.Offload == offload.ModeEBPF {
			return fmt.Errorf("offload: %w", err)
		}
		s.log.Info("UDP channels are relayed in userspace: the kernel relay is not available", "reason", err.Error())
		return nil
	}
	if o == nil {
		return nil
	}
	s.kern = &kernelRelay{o: o, ops: &s.ops, policy: &s.live, capped: s.limits.bw != nil, log: s.log}
	if s.kern.capped {
		s.log.Info("UDP channels are relayed in userspace: --max-bps is set, and the kernel relay does not enforce it")
	} else {
		s.log.Info("UDP channels are relayed in the kernel (eBPF)")
	}
	return nil
}

// clientOf is the way back to a 5-tuple's client for relayed data: the
// grid socket its datagrams arrived on, or its TCP/TLS connection.
func (s *Server) clientOf(t fiveTuple) clientWriter {
	if t.tcp {
		if c := s.clients.get(t); c != nil {
			return c
		}
		return nil
	}
	for i := range s.gridAddr {
		for p, a := range s.gridAddr[i] {
			if a == t.dst && s.grid[i][p] != nil {
				uc, _ := s.grid[i][p].(*net.UDPConn)
				return &udpClient{conn: s.grid[i][p], uc: uc, io: s.gridIO[i][p], to: t.src}
			}
		}
	}
	return nil
}

// transportOf names the transport of a 5-tuple: TLS listeners have
// their own addresses.
func (s *Server) transportOf(t fiveTuple) string {
	switch {
	case !t.tcp:
		return "udp"
	case s.tlsAt[t.dst]:
		return "tls"
	}
	return "tcp"
}

// Grid returns the bound addresses of the RFC 5780 grid,
// Grid()[ip][port] with 0 = primary, 1 = alternate; absent cells are zero.
func (s *Server) Grid() [2][2]netip.AddrPort { return s.gridAddr }

// TCPAddrs returns the bound TCP listener addresses, primary IP first.
func (s *Server) TCPAddrs() []netip.AddrPort { return listenerAddrs(s.tcp) }

// TLSAddrs returns the bound TLS listener addresses, primary IP first.
func (s *Server) TLSAddrs() []netip.AddrPort { return listenerAddrs(s.tls) }

// AllocationCount is the number of live TURN allocations.
func (s *Server) AllocationCount() int { return s.turn.AllocationCount() }

func listenerAddrs(ls []net.Listener) []netip.AddrPort {
	out := make([]netip.AddrPort, 0, len(ls))
	for _, l := range ls {
		out = append(out, stunwire.AddrPortOf(l.Addr()))
	}
	return out
}

// Close stops every listener and releases every allocation. It is safe to
// call more than once.
func (s *Server) Close() error {
	s.closing.Store(true) // /readyz answers 503 from here on
	s.closeOnce.Do(func() {
		if s.turn != nil {
			s.closeErr = s.turn.Close() // closes the wrapped grid and listeners, the tap, and the allocations
			s.endAll()
			if s.kern != nil {
				_ = s.kern.o.Close() // detaches the program
			}
		}
		if s.polls != nil {
			s.polls.close() // after the relay sockets: nothing is left to poll
		}
		// Close only: the read loops may still be answering a Binding
		// from the grid while they unwind, so the grid must not be
		// cleared under them (closeSockets is for a failed bind, before
		// any loop runs).
		s.closeAll()
		s.log.Info("stund stopped")
	})
	if errors.Is(s.closeErr, net.ErrClosed) {
		return nil
	}
	return s.closeErr
}
