//go:build !linux

package udpio

import (
	"errors"
	"net"
	"net/netip"
	"sync"
)

// Conn is a UDP socket opened for batched I/O; there is none off Linux,
// and callers keep their one-datagram path.
type Conn struct{}

// NewConn returns nil off Linux.
func NewConn(net.PacketConn) *Conn { return nil }

// Batch is scratch for batched I/O (unused off Linux).
type Batch struct {
	Bufs [][]byte
	Outs []Out
}

// Reader reads one socket in batches (none off Linux).
type Reader struct{}

// NewReader returns nil off Linux.
func NewReader(*Conn, *sync.Pool, int, int) *Reader { return nil }

func (*Reader) Read() (*Batch, int, error) { return nil, 0, errUnsupported }
func (*Reader) Release(*Batch)             {}

// NewBatchWith returns a Batch with buffers.
func NewBatchWith(n, size int) *Batch { return &Batch{} }

// NewBatch returns scratch for one goroutine.
func NewBatch() *Batch { return &Batch{} }

var errUnsupported = errors.New("udpio: batched UDP I/O needs Linux")

// ErrFamily is the error for a destination of the other address family.
var ErrFamily = errors.New("udpio: destination not reachable from this socket's address family")

func (*Batch) Read(*Conn, [][]byte) (int, error) { return 0, errUnsupported }
func (*Batch) Len(int) int                       { return 0 }
func (*Batch) Truncated(int) bool                { return false }
func (*Batch) Addr(int) netip.AddrPort           { return netip.AddrPort{} }
func (*Batch) Write(*Conn, []Out) (int, error)   { return 0, errUnsupported }

// ReadNow reads what c has queued (nothing off Linux).
func (*Batch) ReadNow(*Conn, [][]byte, int, int) (int, error) { return 0, errUnsupported }

// Poller waits on many sockets at once (epoll; none off Linux).
type Poller struct{}

// NewPoller fails off Linux.
func NewPoller() (*Poller, error) { return nil, errUnsupported }

func (*Poller) Add(*Conn, uint64) error { return errUnsupported }
func (*Poller) Remove(*Conn) error      { return errUnsupported }
func (*Poller) Wait() (int, error)      { return 0, errUnsupported }
func (*Poller) Token(int) uint64        { return 0 }
func (*Poller) Close() error            { return nil }

// Ring sends datagrams from many sockets with one system call (none off
// Linux).
type Ring struct{}

// RingOut is one datagram for a Ring.
type RingOut struct {
	C   *Conn
	Out Out
}

// NewRing fails off Linux.
func NewRing() (*Ring, error) { return nil, errUnsupported }

func (*Ring) Write([]RingOut) ([]int32, error) { return nil, errUnsupported }
func (*Ring) Close() error                     { return nil }

// ErrRingBroken: the ring was given up on.
var ErrRingBroken = errors.New("udpio: io_uring ring retired after the kernel stopped completing sends")
