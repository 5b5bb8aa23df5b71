package stunwire

import (
	"net"
	"net/netip"
)

// Message classes: the C1 and C0 bits of the message type (RFC 8489 §5).
const (
	ClassRequest    uint16 = 0x0000
	ClassIndication uint16 = 0x0010
	ClassSuccess    uint16 = 0x0100
	ClassError      uint16 = 0x0110
	// ClassMask selects the class bits of a message type.
	ClassMask uint16 = 0x0110
)

// Methods (RFC 8489 §18.2; RFC 8656 §18; RFC 6062 §6.1).
const (
	MethodBinding          uint16 = 0x001
	MethodAllocate         uint16 = 0x003
	MethodRefresh          uint16 = 0x004
	MethodSend             uint16 = 0x006
	MethodData             uint16 = 0x007
	MethodCreatePermission uint16 = 0x008
	MethodChannelBind      uint16 = 0x009
	MethodConnect          uint16 = 0x00A
	MethodConnectionBind   uint16 = 0x00B
)

// TURN attribute types (RFC 8656 §18, RFC 6062 §6.2, RFC 6156 §4.1.1).
const (
	AttrChannelNumber          uint16 = 0x000C
	AttrLifetime               uint16 = 0x000D
	AttrXORPeerAddress         uint16 = 0x0012
	AttrData                   uint16 = 0x0013
	AttrXORRelayedAddress      uint16 = 0x0016
	AttrRequestedAddressFamily uint16 = 0x0017
	AttrEvenPort               uint16 = 0x0018
	AttrRequestedTransport     uint16 = 0x0019
	AttrDontFragment           uint16 = 0x001A
	AttrReservationToken       uint16 = 0x0022
	AttrConnectionID           uint16 = 0x002A
)

// CHANGE-REQUEST flags, the A and B bits of its 32-bit value (RFC 5780
// §7.2): reply from the alternate IP, from the alternate port.
const (
	ChangeIP   uint32 = 0x4
	ChangePort uint32 = 0x2
)

// Method extracts the 12-bit method from a message type, dropping the class
// bits interleaved in it (RFC 8489 §5, Figure 3).
func Method(typ uint16) uint16 { return typ&0x000F | (typ&0x00E0)>>1 | (typ&0x3E00)>>2 }

// MessageType builds a message type from a method and a class (Class*), the
// inverse of Method and typ&ClassMask (RFC 8489 §5).
func MessageType(method, class uint16) uint16 {
	return method&0x000F | (method&0x0070)<<1 | (method&0x0F80)<<2 | class
}

// Unmap turns an IPv4-mapped IPv6 address (::ffff:a.b.c.d) into plain IPv4,
// so that an address read from the wire and one from a dual-stack socket
// compare equal.
func Unmap(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// AddrPortOf converts a net.Addr from the standard library or pion's
// transport.Net (vnet) to an unmapped netip.AddrPort; the zero AddrPort when
// a is nil or names no IP address and port.
func AddrPortOf(a net.Addr) netip.AddrPort {
	switch v := a.(type) {
	case *net.UDPAddr:
		return Unmap(v.AddrPort())
	case *net.TCPAddr:
		return Unmap(v.AddrPort())
	case nil:
		return netip.AddrPort{}
	}
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.AddrPort{}
	}
	return Unmap(ap)
}
