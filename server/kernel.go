package server

import (
	"log/slog"
	"net/netip"
	"sync"

	"github.com/stund/stund/internal/stunwire"
	"github.com/stund/stund/server/offload"
)

// The kernel relay: the channels of UDP allocations mirrored into the eBPF
// relay (server/offload), which then carries their ChannelData both ways
// without waking userspace. Userspace stays the authority: a channel is in
// the kernel only while pion has it bound and its peer holds a permission
// (RFC 8656 §9, §12), and it leaves the kernel in the event that ends either,
// before the event returns, so the kernel stops relaying when userspace
// would. What the kernel relayed is added to the allocation's usage and to
// the relay counters when the channel leaves it, and read live for the
// admin API and metrics. A user with a bandwidth cap is never offloaded
// (the kernel does not enforce it); nor is anything but UDP ChannelData
// (Send indications, TCP/TLS clients stay in the userspace data plane).
type kernelRelay struct {
	o      *offload.Offload
	ops    *opsStats
	policy *livePolicy // the port-level peer rules, checked before install
	capped bool        // --max-bps is set: nothing is offloaded
	log    *slog.Logger

	// mu guards every allocation's kernel map (allocation.kernel).
	mu sync.Mutex
}

// channelFor is the kernel's view of channel ch of a to peer; ok is false
// for what the kernel does not relay.
func (k *kernelRelay) channelFor(a *allocation, ch uint16, peer netip.AddrPort) (offload.Channel, bool) {
	if k == nil || k.capped || a.tuple.tcp || a.sock == nil {
		return offload.Channel{}, false
	}
	return offload.Channel{
		Client: a.tuple.src, Server: a.tuple.dst, Number: ch,
		Relay: stunwire.AddrPortOf(a.sock.LocalAddr()), Peer: peer,
	}, true
}

// install puts channel ch of a in the kernel, if its peer holds a
// permission and the kernel can relay it.
func (k *kernelRelay) install(a *allocation, ch uint16, peer netip.AddrPort) {
	c, ok := k.channelFor(a, ch, peer)
	// The kernel does not consult the peer policy per packet as the relay
	// socket does (relaysock.go), so a peer the port-level rules refuse
	// (the host's own listeners) stays in userspace, where it is refused.
	if !ok || !a.permitted(peer.Addr()) || !k.policy.load().AllowedAddrPort(peer) {
		return
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if err := k.o.Install(c); err != nil {
		k.log.Debug("channel stays in userspace", "channel", ch, "peer", peer.String(), "reason", err)
		return
	}
	if a.kernel == nil {
		a.kernel = map[uint16]offload.Channel{}
	}
	a.kernel[ch] = c
}

// remove takes channel ch of a out of the kernel and books what it
// relayed there.
func (k *kernelRelay) remove(a *allocation, ch uint16) {
	if k == nil {
		return
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	c, ok := a.kernel[ch]
	if !ok {
		return
	}
	delete(a.kernel, ch)
	n, err := k.o.RemoveCounters(c)
	if err != nil {
		k.log.Warn("kernel relay: channel removal failed", "channel", ch, "error", err)
		return
	}
	a.usage.pktsOut.Add(n.PktsToPeer)
	a.usage.bytesOut.Add(n.BytesToPeer)
	a.usage.pktsIn.Add(n.PktsToClient)
	a.usage.bytesIn.Add(n.BytesToClient)
	k.ops.relayPktsOut.Add(n.PktsToPeer)
	k.ops.relayBytesOut.Add(n.BytesToPeer)
	k.ops.relayPktsIn.Add(n.PktsToClient)
	k.ops.relayBytesIn.Add(n.BytesToClient)
	k.ops.relayBytesBy[transportIndex(a.transport)][0].Add(n.BytesToPeer)
	k.ops.relayBytesBy[transportIndex(a.transport)][1].Add(n.BytesToClient)
}

// removePeer takes out of the kernel every channel of a to ip (its
// permission ended).
func (k *kernelRelay) removePeer(a *allocation, ip netip.Addr) {
	if k == nil {
		return
	}
	for _, ch := range k.channelsTo(a, ip, true) {
		k.remove(a, ch)
	}
}

// installPeer puts in the kernel the channels of a to ip that are not
// there (a permission to ip was installed again).
func (k *kernelRelay) installPeer(a *allocation, ip netip.Addr) {
	if k == nil {
		return
	}
	for _, ch := range k.channelsTo(a, ip, false) {
		a.mu.Lock()
		peer := a.chans[ch]
		a.mu.Unlock()
		k.install(a, ch, peer)
	}
}

// channelsTo lists a's channels to ip that are (in) or are not in the
// kernel.
func (k *kernelRelay) channelsTo(a *allocation, ip netip.Addr, in bool) []uint16 {
	k.mu.Lock()
	defer k.mu.Unlock()
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []uint16
	for ch, peer := range a.chans {
		if _, there := a.kernel[ch]; peer.Addr() == ip && there == in {
			out = append(out, ch)
		}
	}
	return out
}

// removeAll takes every channel of a out of the kernel (a ends).
func (k *kernelRelay) removeAll(a *allocation) {
	if k == nil {
		return
	}
	k.mu.Lock()
	chs := make([]uint16, 0, len(a.kernel))
	for ch := range a.kernel {
		chs = append(chs, ch)
	}
	k.mu.Unlock()
	for _, ch := range chs {
		k.remove(a, ch)
	}
}

// live is what the kernel relayed so far for a's channels still there.
func (k *kernelRelay) live(a *allocation) offload.Counters {
	var sum offload.Counters
	if k == nil {
		return sum
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, c := range a.kernel {
		if n, err := k.o.Counters(c); err == nil {
			sum.PktsToPeer += n.PktsToPeer
			sum.BytesToPeer += n.BytesToPeer
			sum.PktsToClient += n.PktsToClient
			sum.BytesToClient += n.BytesToClient
		}
	}
	return sum
}

// offloaded is the number of channels in the kernel now, over all of as.
func (k *kernelRelay) offloaded(as []*allocation) int {
	if k == nil {
		return 0
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	n := 0
	for _, a := range as {
		n += len(a.kernel)
	}
	return n
}

// recheck takes out of the kernel every channel whose peer the current
// policy refuses (after a reload narrowed it), as the relay socket refuses
// its next packet in userspace.
func (k *kernelRelay) recheck(as []*allocation) {
	if k == nil {
		return
	}
	pol := k.policy.load()
	for _, a := range as {
		k.mu.Lock()
		var gone []uint16
		for ch, c := range a.kernel {
			if !pol.Allowed(c.Peer.Addr()) || !pol.AllowedAddrPort(c.Peer) {
				gone = append(gone, ch)
			}
		}
		k.mu.Unlock()
		for _, ch := range gone {
			k.remove(a, ch)
		}
	}
}
