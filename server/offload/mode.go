package offload

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
)

// Mode says whether the kernel relay is used.
type Mode int

const (
	// ModeOff never loads the program.
	ModeOff Mode = iota
	// ModeAuto loads it when the kernel and privileges allow, and
	// otherwise leaves the relay to userspace with one logged reason.
	ModeAuto
	// ModeEBPF requires it: New fails when it cannot be loaded.
	ModeEBPF
)

// ParseMode reads the --offload flag's value.
func ParseMode(s string) (Mode, error) {
	switch s {
	case "off":
		return ModeOff, nil
	case "auto":
		return ModeAuto, nil
	case "ebpf":
		return ModeEBPF, nil
	}
	return ModeOff, fmt.Errorf("offload: unknown mode %q (want auto, ebpf or off)", s)
}

func (m Mode) String() string {
	switch m {
	case ModeOff:
		return "off"
	case ModeAuto:
		return "auto"
	case ModeEBPF:
		return "ebpf"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// Config says where the program attaches.
type Config struct {
	Mode Mode
	// Interfaces to attach to by name; empty means every interface that
	// holds one of Addrs (loopback for 127.0.0.0/8).
	Interfaces []string
	// Addrs are the server's listening IPs and relay IPs. An unspecified
	// address (0.0.0.0, ::) is held by no interface: name Interfaces then.
	Addrs  []netip.Addr
	Logger *slog.Logger
}

// Channel is one bound channel of one UDP allocation: the 5-tuple
// client<->server, the relayed address and the peer.
type Channel struct {
	Client, Server netip.AddrPort
	Number         uint16
	Relay, Peer    netip.AddrPort
}

// Counters are what the kernel relayed for one channel, summed over CPUs.
// Bytes are application data: the 4-byte ChannelData header and padding
// are not counted, as the userspace relay counts them.
type Counters struct {
	PktsToPeer, BytesToPeer, PktsToClient, BytesToClient uint64
}

// Declined counts, since New and over all channels, the packets of an
// installed channel that the kernel left to userspace, and those it
// dropped after it had begun to rewrite them (a helper failed midway).
type Declined struct {
	NoRoute          uint64 // no route to the new destination
	TooBig           uint64 // larger than the egress MTU once rewritten
	LocalNotLoopback uint64 // destination on this host, packet not from loopback
	Helper           uint64 // a helper failed before the packet was touched
	Aborted          uint64 // dropped: a helper failed after the packet was touched
}

// ErrUnsupported is returned by Install for a channel the kernel path does
// not relay: client and peer sides of different address families (the
// program rewrites addresses in place, it does not translate IPv4 to IPv6),
// scoped addresses, or IPv6 on a kernel where New could not enable it. The
// channel stays in userspace.
var ErrUnsupported = errors.New("offload: channel not supported in the kernel")

// RFC 8656 §12: channel numbers 0x4000 through 0x4FFF.
const (
	chanMin = 0x4000
	chanMax = 0x4FFF
)
