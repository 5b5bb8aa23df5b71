package server

import (
	"syscall"

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
