package loadgen

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

const magicCookie = 0x2112A442

// BindingPacket is a bare RFC 8489 Binding request (20 bytes). The
// transaction ID carries the send timestamp (bytes 8..15) and a sequence
// number; a reply is a Binding success response, or (against the echo)
// the request itself.
func BindingPacket() Packet {
	t := make([]byte, 20)
	binary.BigEndian.PutUint16(t[0:], 0x0001)
	binary.BigEndian.PutUint32(t[4:], magicCookie)
	return Packet{Template: t, TSOffset: 8, SeqOffset: 16, Reply: func(p []byte) (int64, bool) {
		if len(p) < 20 || binary.BigEndian.Uint32(p[4:]) != magicCookie {
			return 0, false
		}
		if typ := binary.BigEndian.Uint16(p); typ != 0x0101 && typ != 0x0001 {
			return 0, false
		}
		return int64(binary.BigEndian.Uint64(p[8:])), true
	}}
}

// ChannelDataPacket is a ChannelData message (RFC 8656 §12.4) of size
// bytes of payload on channel ch; the timestamp is the first 8 bytes of
// the payload, which the peer echo returns unchanged.
func ChannelDataPacket(ch uint16, size int) Packet {
	t := make([]byte, 4+size)
	binary.BigEndian.PutUint16(t[0:], ch)
	binary.BigEndian.PutUint16(t[2:], uint16(size))
	return Packet{Template: t, TSOffset: 4, SeqOffset: 12, Reply: func(p []byte) (int64, bool) {
		if len(p) < 12 || binary.BigEndian.Uint16(p) != ch {
			return 0, false
		}
		return int64(binary.BigEndian.Uint64(p[4:])), true
	}}
}

// SendPacket is a Send indication (RFC 8656 §11.3) to peer with size
// bytes of DATA; the reply is a Data indication whose DATA carries the
// timestamp back.
func SendPacket(peer netip.AddrPort, size int) Packet {
	pad := (4 - size%4) % 4
	attrs := 12 + 4 + size + pad
	t := make([]byte, 20+attrs)
	binary.BigEndian.PutUint16(t[0:], 0x0016) // Send indication
	binary.BigEndian.PutUint16(t[2:], uint16(attrs))
	binary.BigEndian.PutUint32(t[4:], magicCookie)
	copy(t[8:20], "stundbench00")
	o := 20
	binary.BigEndian.PutUint16(t[o:], 0x0012) // XOR-PEER-ADDRESS
	binary.BigEndian.PutUint16(t[o+2:], 8)
	t[o+5] = 0x01
	binary.BigEndian.PutUint16(t[o+6:], peer.Port()^uint16(magicCookie>>16))
	ip := peer.Addr().As4()
	binary.BigEndian.PutUint32(t[o+8:], binary.BigEndian.Uint32(ip[:])^magicCookie)
	o += 12
	binary.BigEndian.PutUint16(t[o:], 0x0013) // DATA
	binary.BigEndian.PutUint16(t[o+2:], uint16(size))
	dataOff := o + 4
	return Packet{Template: t, TSOffset: dataOff, SeqOffset: dataOff + 8, Reply: func(p []byte) (int64, bool) {
		if len(p) < 20 || binary.BigEndian.Uint16(p) != 0x0017 {
			return 0, false
		}
		for a := 20; a+4 <= len(p); {
			typ, l := binary.BigEndian.Uint16(p[a:]), int(binary.BigEndian.Uint16(p[a+2:]))
			if typ == 0x0013 && l >= 8 && a+4+8 <= len(p) {
				return int64(binary.BigEndian.Uint64(p[a+4:])), true
			}
			a += 4 + (l+3)&^3
		}
		return 0, false
	}}
}

// BindingFlows opens n sockets to target carrying Binding requests.
func BindingFlows(target netip.AddrPort, n int) ([]Flow, func(), error) {
	var fs []Flow
	closeAll := func() {
		for _, f := range fs {
			f.Conn.Close()
		}
	}
	for i := 0; i < n; i++ {
		c, err := Dial(target)
		if err != nil {
			closeAll()
			return nil, nil, err
		}
		fs = append(fs, Flow{Conn: c, Packet: BindingPacket()})
	}
	return fs, closeAll, nil
}

// Allocs opens n allocations in parallel (workers at a time).
func Allocs(server netip.AddrPort, user, pass string, n, workers int, limit time.Duration) ([]*Alloc, time.Duration, error) {
	out := make([]*Alloc, n)
	var next atomic.Int64
	var firstErr atomic.Value
	deadline := time.Now().Add(limit)
	start := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) && firstErr.Load() == nil {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				a, err := Allocate(server, user, pass)
				if err != nil {
					firstErr.CompareAndSwap(nil, fmt.Errorf("allocation %d: %w", i, err))
					return
				}
				out[i] = a
			}
		}()
	}
	wg.Wait()
	el := time.Since(start)
	var got []*Alloc
	for _, a := range out {
		if a != nil {
			got = append(got, a)
		}
	}
	if e, _ := firstErr.Load().(error); e != nil {
		return got, el, e
	}
	if len(got) < n {
		return got, el, fmt.Errorf("%d of %d allocations within %s", len(got), n, limit)
	}
	return got, el, nil
}

// Release deletes allocations with Refresh(0) in parallel and closes
// their sockets; it returns how many succeeded and the time taken.
func Release(as []*Alloc, workers int) (int, time.Duration) {
	var next, ok atomic.Int64
	start := time.Now()
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= len(as) {
					return
				}
				if as[i].Refresh(0) == nil {
					ok.Add(1)
				}
				as[i].Close()
			}
		}()
	}
	wg.Wait()
	return int(ok.Load()), time.Since(start)
}

// RelayFlows turns allocations into relay flows toward peer: with
// channel true each gets a ChannelBind (channel 0x4000+i) and carries
// ChannelData, else a permission and Send indications.
func RelayFlows(as []*Alloc, peer netip.AddrPort, channel bool, size int) ([]Flow, error) {
	fs := make([]Flow, 0, len(as))
	for i, a := range as {
		if channel {
			ch := uint16(0x4000 + i)
			if err := a.ChannelBind(peer, ch); err != nil {
				return nil, err
			}
			fs = append(fs, Flow{Conn: a.Conn, Packet: ChannelDataPacket(ch, size)})
		} else {
			if err := a.CreatePermission(peer); err != nil {
				return nil, err
			}
			fs = append(fs, Flow{Conn: a.Conn, Packet: SendPacket(peer, size)})
		}
	}
	return fs, nil
}

// WithPacket returns flows on the same sockets with another packet.
func WithPacket(fs []Flow, mk func(i int) Packet) []Flow {
	out := make([]Flow, len(fs))
	for i, f := range fs {
		out[i] = Flow{Conn: f.Conn, Packet: mk(i)}
	}
	return out
}
