// Package udpio moves UDP datagrams in batches without allocating: one
// recvmmsg fills many buffers, one sendmmsg sends many datagrams, and a run
// of equal-sized datagrams to one address leaves as a single UDP GSO
// message (UDP_SEGMENT), which the kernel (or the NIC) splits late, so the
// stack is walked once per run instead of once per datagram.
//
// A relay's cost is its system calls and the stack behind them: on the
// loopback bench a relayed datagram costs a few microseconds of kernel time
// and well under one of our own. golang.org/x/net's ReadBatch/WriteBatch
// do the batching but return a fresh net.Addr per datagram and cannot say
// "these datagrams are one GSO run"; this package does both with
// golang.org/x/sys/unix's types, over the socket's syscall.RawConn, so the
// Go runtime's poller still does the waiting.
//
// A Batch is scratch for one goroutine; the socket may be shared.
package udpio

import (
	"net/netip"
	"sync/atomic"
)

const (
	// MaxBatch bounds the datagrams of one recvmmsg or sendmmsg: enough
	// to drain what a busy socket holds between two wakeups (a few tens at
	// bench load), small enough that a batch's scratch stays in cache.
	MaxBatch = 32

	// maxSegments is the kernel's UDP_MAX_SEGMENTS on every kernel with
	// UDP GSO (4.18+; later ones allow 128).
	maxSegments = 64

	// maxGSOBytes bounds the payload of one GSO message: the IP length
	// field less the largest IP and UDP headers.
	maxGSOBytes = 65535 - 40 - 8

	// maxGSOSegment: datagrams above a 1500-byte path's payload (IPv6:
	// 1500-40-8) are never sent as GSO runs. The kernel refuses a run
	// whose segment does not fit the route's MTU (EINVAL) instead of
	// fragmenting it; media stays well below this.
	maxGSOSegment = 1452
)

// Out is one datagram to send.
type Out struct {
	B  []byte
	To netip.AddrPort
}

// gsoOff is set once the kernel has refused a GSO message for a reason
// that will not go away (EIO: no checksum offload on the way out); from
// then on every datagram leaves on its own.
var gsoOff atomic.Bool

// GSODisabled reports whether GSO was turned off after the kernel refused it.
func GSODisabled() bool { return gsoOff.Load() }

// sameRun reports whether datagram o may join a GSO run of segment size
// seg (all segments equal, the last one may be shorter) going to to, whose
// segments so far total bytes.
func sameRun(o Out, to netip.AddrPort, seg, segs, bytes int) bool {
	return o.To == to && len(o.B) <= seg && segs < maxSegments && bytes+len(o.B) <= maxGSOBytes
}

// runLen returns how many datagrams from outs[0] form one GSO run: the same
// destination, the same size, except that the last may be shorter (after
// which the run ends).
func runLen(outs []Out, gso bool) int {
	if len(outs) < 2 || !gso || gsoOff.Load() {
		return 1
	}
	seg := len(outs[0].B)
	if seg == 0 || seg > maxGSOSegment {
		return 1
	}
	to := outs[0].To
	n, bytes := 1, seg
	for n < len(outs) && sameRun(outs[n], to, seg, n, bytes) {
		bytes += len(outs[n].B)
		n++
		if len(outs[n-1].B) < seg {
			break // a shorter segment ends a run (it must be the last)
		}
	}
	return n
}
