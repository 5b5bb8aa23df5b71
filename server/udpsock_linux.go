package server

import (
	"fmt"
	"net"
	"syscall"
	"unsafe"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

const reusePortSupported = true

// controlUDP sets SO_REUSEPORT before bind when the grid address gets
// several sockets. Linux lets only sockets of the same effective UID
// share the port, so no other user can join the group.
func controlUDP(reuse bool) func(network, address string, c syscall.RawConn) error {
	if !reuse {
		return nil
	}
	return func(network, address string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		}); err != nil {
			return err
		}
		return serr
	}
}

// skfNetOff is the classic BPF offset base of the network header
// (SKF_NET_OFF in linux/filter.h): loads relative to it read the IP
// header of the packet being steered.
const skfNetOff = -0x100000

// steerBySourceIP attaches a reuseport program to a group of n sockets that
// picks the socket from the client's source IP alone, not the kernel's
// default 4-tuple hash. Each socket is its own pion allocation manager, and
// some TURN state spans a client's 5-tuples: the RTP/RTCP pair of RFC 8656
// §7 (EVEN-PORT with a RESERVATION-TOKEN, redeemed from the client's next
// port) lives in the manager that issued it, so with the 4-tuple hash
// coturn's turnutils_uclient got 508 about half the time. Hashing the
// source IP keeps all of a client's flows on one socket and still spreads
// clients over the cores. The program reads the last 32 bits of the source
// address (IPv4: offset 12; IPv6: offset 8+12) modulo n.
func steerBySourceIP(c net.PacketConn, n int, v4 bool) error {
	off := 12
	if !v4 {
		off = 8 + 12
	}
	raw, err := bpf.Assemble([]bpf.Instruction{
		bpf.LoadAbsolute{Off: uint32(int32(skfNetOff + off)), Size: 4},
		bpf.ALUOpConstant{Op: bpf.ALUOpMod, Val: uint32(n)},
		bpf.RetA{},
	})
	if err != nil {
		return fmt.Errorf("assemble reuseport program: %w", err)
	}
	filter := make([]unix.SockFilter, len(raw))
	for i, r := range raw {
		filter[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	prog := unix.SockFprog{Len: uint16(len(filter)), Filter: (*unix.SockFilter)(unsafe.Pointer(&filter[0]))}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return fmt.Errorf("reuseport program: %T has no file descriptor", c)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptSockFprog(int(fd), unix.SOL_SOCKET, unix.SO_ATTACH_REUSEPORT_CBPF, &prog)
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("SO_ATTACH_REUSEPORT_CBPF: %w", serr)
	}
	return nil
}
