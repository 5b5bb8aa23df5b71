//go:build !linux

package server

import "syscall"

const reusePortSupported = false

func controlUDP(bool) func(network, address string, c syscall.RawConn) error { return nil }
