package loadgen

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stund/stund/internal/stunwire"
)

// BindingPacket is a bare RFC 8489 Binding request (20 bytes). The
// transaction ID carries the send timestamp (bytes 8..15) and a sequence
// number; a reply is a Binding success response, or (against the echo)
// the request itself.
func BindingPacket() Packet {
	var id [16]byte
	binary.BigEndian.PutUint32(id[:4], stunwire.MagicCookie)
	t := stunwire.Finish(stunwire.AppendHeader(make([]byte, 0, stunwire.HeaderSize), stunwire.TypeBindingRequest, &id), 0)
	return Packet{Template: t, TSOffset: 8, SeqOffset: 16, Reply: func(p []byte) (int64, bool) {
		if len(p) < stunwire.HeaderSize || binary.BigEndian.Uint32(p[4:]) != stunwire.MagicCookie {
			return 0, false
		}
		if typ := binary.BigEndian.Uint16(p); typ != stunwire.TypeBindingSuccess && typ != stunwire.TypeBindingRequest {
			return 0, false
		}
		return int64(binary.BigEndian.Uint64(p[8:])), true
	}}
}

// ChannelDataPacket is a ChannelData message (RFC 8656 §12.4) of size
// bytes of payload on channel ch; the timestamp is the first 8 bytes of
// the payload, which the peer echo returns unchanged.
func ChannelDataPacket(ch uint16, size int) Packet {
	t := make([]byte, stunwire.ChannelDataHeaderSize+size)
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
// bytes of DATA; the reply is a Data indication (RFC 8656 §11.4) whose
// DATA carries the timestamp back.
func SendPacket(peer netip.AddrPort, size int) Packet {
	var id [16]byte
	binary.BigEndian.PutUint32(id[:4], stunwire.MagicCookie)
	copy(id[4:], "stundbench00")
	t := stunwire.AppendHeader(nil, stunwire.MessageType(stunwire.MethodSend, stunwire.ClassIndication), &id)
	t = stunwire.AppendXORAddress(t, stunwire.AttrXORPeerAddress, peer, &id)
	dataOff := len(t) + 4 // past DATA's type and length
	t = stunwire.Finish(stunwire.AppendAttr(t, stunwire.AttrData, make([]byte, size)), 0)
	dataInd := stunwire.MessageType(stunwire.MethodData, stunwire.ClassIndication)
	return Packet{Template: t, TSOffset: dataOff, SeqOffset: dataOff + 8, Reply: func(p []byte) (int64, bool) {
		if len(p) < stunwire.HeaderSize || binary.BigEndian.Uint16(p) != dataInd {
			return 0, false
		}
		it := stunwire.NewAttrs(p)
		for {
			typ, val, _, ok := it.Next()
			if !ok {
				return 0, false
			}
			if typ == stunwire.AttrData && len(val) >= 8 {
				return int64(binary.BigEndian.Uint64(val)), true
			}
		}
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
