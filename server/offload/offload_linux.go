package offload

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// Values of relay.c's chan_val.dir.
const (
	dirToPeer   = 1
	dirToClient = 2
)

// Offload is the loaded program, its maps and its attachments.
type Offload struct {
	log   *slog.Logger
	objs  relayObjects
	links []link.Link
	// sync is an array of maps: updating it makes the kernel wait for
	// every running BPF program to finish (synchronize_rcu), which is how
	// Remove knows no CPU still relays with the deleted entry.
	sync, syncInner *ebpf.Map
	ncpu            int
	flipped         []flipped
	// v6 says whether IPv6 channels can be installed: the kernel has
	// IPv6 and the route lookup for it is allowed.
	v6 bool

	mu     sync.Mutex
	closed bool
}

// New loads and attaches the program. In ModeAuto any error means the
// kernel path is unavailable (kernel, privileges, interfaces): New returns
// nil and the reason, and the caller logs it once and relays in userspace.
// In ModeEBPF the same error is meant to stop the server. ModeOff returns
// nil, nil.
func New(cfg Config) (*Offload, error) {
	if cfg.Mode == ModeOff {
		return nil, nil
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	o, err := load(cfg, log)
	if err != nil {
		return nil, fmt.Errorf("offload (%s): %w", cfg.Mode, err)
	}
	return o, nil
}

func load(cfg Config, log *slog.Logger) (*Offload, error) {
	ifaces, err := pickInterfaces(cfg)
	if err != nil {
		return nil, err
	}
	// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later
	// ones ignore it, and failing to raise it is not itself a reason.
	_ = rlimit.RemoveMemlock()

	o := &Offload{log: log}
	if err := loadRelayObjects(&o.objs, nil); err != nil {
		if errors.Is(err, unix.EPERM) {
			// The library's own hint (MEMLOCK) misleads on kernels
			// that no longer charge BPF memory to it.
			return nil, fmt.Errorf("load program: not permitted: needs CAP_BPF and CAP_NET_ADMIN (or root): %w", err)
		}
		return nil, fmt.Errorf("load program: %w", err)
	}
	if o.ncpu, err = ebpf.PossibleCPU(); err != nil {
		o.Close()
		return nil, err
	}
	inner := &ebpf.MapSpec{Name: "stund_sync_in", Type: ebpf.Array, KeySize: 4, ValueSize: 4, MaxEntries: 1}
	if o.syncInner, err = ebpf.NewMap(inner); err != nil {
		o.Close()
		return nil, fmt.Errorf("sync map: %w", err)
	}
	if o.sync, err = ebpf.NewMap(&ebpf.MapSpec{Name: "stund_sync", Type: ebpf.ArrayOfMaps,
		KeySize: 4, ValueSize: 4, MaxEntries: 1, InnerMap: inner}); err != nil {
		o.Close()
		return nil, fmt.Errorf("sync map: %w", err)
	}
	if err := o.enableForwarding(loForwarding4); err != nil {
		o.Close()
		return nil, err
	}
	if err := o.enableForwarding(loForwarding6); err != nil {
		log.Info("offload: IPv6 channels stay in userspace", "reason", err)
	} else {
		o.v6 = true
	}
	for _, ifc := range ifaces {
		l, err := link.AttachTCX(link.TCXOptions{
			Interface: ifc.Index,
			Program:   o.objs.StundRelay,
			Attach:    ebpf.AttachTCXIngress,
			// Last: programs already there (an operator's firewall)
			// see every packet before this one relays it.
			Anchor: link.Tail(),
		})
		if err != nil {
			o.Close()
			return nil, fmt.Errorf("attach to %s ingress (TCX, Linux 6.6+): %w", ifc.Name, err)
		}
		o.links = append(o.links, l)
		log.Info("offload: UDP ChannelData relayed in the kernel", "interface", ifc.Name)
	}
	return o, nil
}

// pickInterfaces resolves cfg.Interfaces, or finds the interfaces holding
// cfg.Addrs, and refuses any the program cannot parse: it expects a 14-byte
// Ethernet header in front of IPv4, which loopback carries too.
func pickInterfaces(cfg Config) ([]net.Interface, error) {
	var out []net.Interface
	if len(cfg.Interfaces) > 0 {
		for _, name := range cfg.Interfaces {
			ifc, err := net.InterfaceByName(name)
			if err != nil {
				return nil, fmt.Errorf("interface %q: %w", name, err)
			}
			out = append(out, *ifc)
		}
	} else {
		all, err := net.Interfaces()
		if err != nil {
			return nil, err
		}
		for _, ifc := range all {
			if holdsAny(ifc, cfg.Addrs) {
				out = append(out, ifc)
			}
		}
		if len(out) == 0 {
			return nil, fmt.Errorf("no interface holds any of %v", cfg.Addrs)
		}
	}
	for _, ifc := range out {
		t, err := linkType(ifc.Name)
		if err != nil {
			return nil, fmt.Errorf("interface %s: %w", ifc.Name, err)
		}
		if t != unix.ARPHRD_ETHER && t != unix.ARPHRD_LOOPBACK {
			return nil, fmt.Errorf("interface %s: link type %d is neither Ethernet nor loopback", ifc.Name, t)
		}
	}
	return out, nil
}

// linkType is the interface's ARPHRD_* type. It asks the kernel through a
// socket rather than /sys/class/net, which shows the namespace sysfs was
// mounted in, not the caller's.
func linkType(name string) (uint16, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		return 0, err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFHWADDR, ifr); err != nil {
		return 0, fmt.Errorf("SIOCGIFHWADDR: %w", err)
	}
	// ifr_hwaddr is a sockaddr whose family is the link type.
	return ifr.Uint16(), nil
}

// holdsAny reports whether ifc has one of addrs assigned; loopback holds
// all of 127.0.0.0/8 (and ::1) whatever its listed prefix.
func holdsAny(ifc net.Interface, addrs []netip.Addr) bool {
	ias, err := ifc.Addrs()
	if err != nil {
		return false
	}
	for _, a := range addrs {
		a = a.Unmap()
		if ifc.Flags&net.FlagLoopback != 0 && a.IsLoopback() {
			return true
		}
		for _, ia := range ias {
			ipn, ok := ia.(*net.IPNet)
			if !ok {
				continue
			}
			if ip, ok := netip.AddrFromSlice(ipn.IP); ok && ip.Unmap() == a {
				return true
			}
		}
	}
	return false
}

// The sysctls bpf_fib_lookup needs on the interface the program names in
// its lookups (loopback, see doc.go), per address family.
const (
	loForwarding4 = "/proc/sys/net/ipv4/conf/lo/forwarding"
	loForwarding6 = "/proc/sys/net/ipv6/conf/lo/forwarding"
)

// flipped is a forwarding sysctl an Offload turned on. The file stays open
// because a /proc/sys/net file belongs to the network namespace it was
// opened in, and Close may run on a thread in another one.
type flipped struct {
	f   *os.File
	key string // path and namespace, for loFwdUsers
}

// loFwdUsers counts, per sysctl and network namespace, the Offloads of this
// process that rely on a flag one of them turned on, so that the last
// Close turns it off again.
var (
	loFwdMu    sync.Mutex
	loFwdUsers = map[string]int{}
)

// enableForwarding turns the sysctl at path on if it is off; an error
// means the flag could not be read or set.
func (o *Offload) enableForwarding(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	b := make([]byte, 8)
	n, err := f.ReadAt(b, 0)
	if n == 0 {
		f.Close()
		return fmt.Errorf("read %s: %w", path, err)
	}
	if strings.TrimSpace(string(b[:n])) != "0" {
		f.Close()
		return nil
	}
	if _, err := f.WriteAt([]byte("1\n"), 0); err != nil {
		f.Close()
		return fmt.Errorf("enable %s (the kernel's route lookup requires it): %w", path, err)
	}
	ns, _ := os.Readlink("/proc/thread-self/ns/net")
	key := path + " " + ns
	loFwdMu.Lock()
	loFwdUsers[key]++
	loFwdMu.Unlock()
	o.flipped = append(o.flipped, flipped{f: f, key: key})
	o.log.Info("offload: enabled forwarding on loopback for the kernel's route lookup; no outside packet enters through loopback", "sysctl", path)
	return nil
}

func (o *Offload) restoreForwarding() {
	loFwdMu.Lock()
	defer loFwdMu.Unlock()
	for _, fl := range o.flipped {
		loFwdUsers[fl.key]--
		if loFwdUsers[fl.key] == 0 {
			delete(loFwdUsers, fl.key)
			_, _ = fl.f.WriteAt([]byte("0\n"), 0)
		}
		fl.f.Close()
	}
	o.flipped = nil
}

// Close detaches the program from every interface and releases the maps;
// packets then take the userspace path.
func (o *Offload) Close() error {
	if o == nil {
		return nil
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return nil
	}
	o.closed = true
	var errs []error
	for _, l := range o.links {
		errs = append(errs, l.Close())
	}
	o.links = nil
	errs = append(errs, o.objs.Close())
	if o.sync != nil {
		errs = append(errs, o.sync.Close())
	}
	if o.syncInner != nil {
		errs = append(errs, o.syncInner.Close())
	}
	o.restoreForwarding()
	return errors.Join(errs...)
}

var (
	errClosed = errors.New("offload: closed")
	// errNotLoaded is what a nil Offload (ModeOff, or ModeAuto that fell
	// back) answers, so that callers need not check for nil first.
	errNotLoaded = errors.New("offload: not loaded")
)

// keys returns the map keys and values of both directions of ch.
func keys(ch Channel, v6 bool) (toPeer, toClient relayChanKey, vPeer, vClient relayChanVal, err error) {
	c, s, r, p := unmap(ch.Client), unmap(ch.Server), unmap(ch.Relay), unmap(ch.Peer)
	// The program rewrites addresses in place: it cannot turn an IPv4
	// packet into an IPv6 one (RFC 8656 §13's translations stay in
	// userspace).
	is6 := c.Addr().Is6()
	for _, ap := range []netip.AddrPort{c, s, r, p} {
		if !ap.Addr().IsValid() || ap.Addr().Is6() != is6 || ap.Addr().Zone() != "" || (is6 && !v6) {
			return toPeer, toClient, vPeer, vClient, ErrUnsupported
		}
	}
	if ch.Number < chanMin || ch.Number > chanMax {
		return toPeer, toClient, vPeer, vClient, fmt.Errorf("offload: channel number %#x outside 0x4000-0x4FFF", ch.Number)
	}
	toPeer = relayChanKey{Saddr: words(c), Daddr: words(s), Sport: be16(c), Dport: be16(s), Chan: ch.Number}
	vPeer = relayChanVal{Saddr: words(r), Daddr: words(p), Sport: be16(r), Dport: be16(p), Chan: ch.Number, Dir: dirToPeer}
	toClient = relayChanKey{Saddr: words(p), Daddr: words(r), Sport: be16(p), Dport: be16(r)}
	vClient = relayChanVal{Saddr: words(s), Daddr: words(c), Sport: be16(s), Dport: be16(c), Chan: ch.Number, Dir: dirToClient}
	return toPeer, toClient, vPeer, vClient, nil
}

func unmap(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// words and be16 give the values whose in-memory bytes are the address or
// port in network order, as the program compares them with the packet; an
// IPv4 address takes the first word, the others stay 0.
func words(ap netip.AddrPort) (w [4]uint32) {
	if a := ap.Addr(); a.Is4() {
		b := a.As4()
		w[0] = binary.NativeEndian.Uint32(b[:])
		return w
	}
	b := ap.Addr().As16()
	for i := range w {
		w[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return w
}

func be16(ap netip.AddrPort) uint16 {
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], ap.Port())
	return binary.NativeEndian.Uint16(b[:])
}

// channel is one channel's map keys and values, both directions.
type channel struct {
	kp, kc relayChanKey // to the peer, to the client
	vp, vc relayChanVal
}

// with runs fn on ch's keys and values under the lock of an open Offload.
func (o *Offload) with(ch Channel, fn func(c channel) error) error {
	if o == nil {
		return errNotLoaded
	}
	var c channel
	var err error
	if c.kp, c.kc, c.vp, c.vc, err = keys(ch, o.v6); err != nil {
		return err
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return errClosed
	}
	return fn(c)
}

// Install relays both directions of ch in the kernel. Installing it again
// refreshes the entry and keeps its counters.
func (o *Offload) Install(ch Channel) error {
	return o.with(ch, func(c channel) error {
		zero := make([]relayChanCtr, o.ncpu)
		// Counters first: a packet relayed as soon as the channel entry
		// exists must find its counter.
		for _, k := range []relayChanKey{c.kp, c.kc} {
			if err := o.objs.RelayCtrs.Update(k, zero, ebpf.UpdateNoExist); err != nil && !errors.Is(err, ebpf.ErrKeyExist) {
				return fmt.Errorf("offload: install counters: %w", err)
			}
		}
		if err := o.objs.RelayChans.Update(c.kp, c.vp, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("offload: install to-peer: %w", err)
		}
		if err := o.objs.RelayChans.Update(c.kc, c.vc, ebpf.UpdateAny); err != nil {
			_ = o.objs.RelayChans.Delete(c.kp)
			return fmt.Errorf("offload: install to-client: %w", err)
		}
		return nil
	})
}

// Remove stops relaying ch in the kernel: when it returns no CPU relays
// another packet of it, and its packets reach the userspace sockets.
func (o *Offload) Remove(ch Channel) error {
	_, err := o.RemoveCounters(ch)
	return err
}

// RemoveCounters is Remove that also returns the channel's final counters,
// read after the kernel stopped relaying it, so that no relayed packet is
// missing from the usage figures.
func (o *Offload) RemoveCounters(ch Channel) (Counters, error) {
	var out Counters
	err := o.with(ch, func(c channel) error {
		for _, k := range []relayChanKey{c.kp, c.kc} {
			if err := o.objs.RelayChans.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				return fmt.Errorf("offload: remove: %w", err)
			}
		}
		// Wait for programs that looked the entry up before the delete.
		if err := o.sync.Put(uint32(0), o.syncInner); err != nil {
			return fmt.Errorf("offload: remove: wait for running programs: %w", err)
		}
		var err error
		out, err = o.counters(c)
		for _, k := range []relayChanKey{c.kp, c.kc} {
			_ = o.objs.RelayCtrs.Delete(k)
		}
		return err
	})
	return out, err
}

// Counters returns what the kernel relayed for ch so far.
func (o *Offload) Counters(ch Channel) (Counters, error) {
	var out Counters
	err := o.with(ch, func(c channel) error {
		var err error
		out, err = o.counters(c)
		return err
	})
	return out, err
}

func (o *Offload) counters(c channel) (Counters, error) {
	var out Counters
	for _, d := range []struct {
		k           relayChanKey
		pkts, bytes *uint64
	}{{c.kp, &out.PktsToPeer, &out.BytesToPeer}, {c.kc, &out.PktsToClient, &out.BytesToClient}} {
		var per []relayChanCtr
		if err := o.objs.RelayCtrs.Lookup(d.k, &per); err != nil {
			return Counters{}, fmt.Errorf("offload: counters: %w", err)
		}
		for _, v := range per {
			*d.pkts += v.Pkts
			*d.bytes += v.Bytes
		}
	}
	return out, nil
}

// Declined returns the counts, summed over CPUs, in relay.c's order.
func (o *Offload) Declined() (Declined, error) {
	if o == nil {
		return Declined{}, errNotLoaded
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.closed {
		return Declined{}, errClosed
	}
	var d Declined
	for i, f := range []*uint64{&d.NoRoute, &d.TooBig, &d.LocalNotLoopback, &d.Helper, &d.Aborted} {
		var per []uint64
		if err := o.objs.RelayStats.Lookup(uint32(i), &per); err != nil {
			return Declined{}, fmt.Errorf("offload: declined: %w", err)
		}
		for _, v := range per {
			*f += v
		}
	}
	return d, nil
}
