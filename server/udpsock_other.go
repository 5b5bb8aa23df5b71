//go:build !linux

package server

import (
	"net"
	"syscall"
)

const reusePortSupported = false

func controlUDP(bool) func(network, address string, c syscall.RawConn) error { return nil }

func steerBySourceIP(net.PacketConn, int, bool) error { return nil }
