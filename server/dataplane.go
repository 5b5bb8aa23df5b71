package server

import (
	"encoding/binary"
	"sync/atomic"

	"github.com/stund/stund/internal/stunwire"
)

// dataPlane relays ChannelData from clients to peers (RFC 8656 §12.5),
// over UDP and streams alike, without pion: one ledger lookup from the
// 5-tuple to the allocation, the channel's peer and its permission checked
// there, then the relay socket's policy, cap and counters (relaysock.go).
// pion keeps the control plane (Allocate, Refresh, permissions, channels)
// and the peer-to-client direction.
type dataPlane struct {
	led *ledger

	relayed   atomic.Uint64 // ChannelData frames sent on to a peer
	noChannel atomic.Uint64 // dropped: no allocation, channel or permission
	malformed atomic.Uint64 // dropped: length field past the frame
}

// DataPlaneStats counts the ChannelData the data plane saw.
type DataPlaneStats struct {
	Relayed, NoChannel, Malformed uint64
}

func (d *dataPlane) stats() DataPlaneStats {
	return DataPlaneStats{Relayed: d.relayed.Load(), NoChannel: d.noChannel.Load(), Malformed: d.malformed.Load()}
}

// fromClient relays one ChannelData message that arrived on 5-tuple t.
// Over a stream the frame is padded to 4 (RFC 8656 §12.5); over UDP the
// padding is optional and the Length field says how much is data.
func (d *dataPlane) fromClient(t fiveTuple, frame []byte) {
	if len(frame) < stunwire.ChannelDataHeaderSize {
		d.malformed.Add(1)
		return
	}
	ch := binary.BigEndian.Uint16(frame[0:2])
	n := int(binary.BigEndian.Uint16(frame[2:4]))
	data := frame[stunwire.ChannelDataHeaderSize:]
	if n > len(data) {
		d.malformed.Add(1)
		return
	}
	data = data[:n]
	a := d.led.lookup(t)
	if a == nil || a.sock == nil {
		d.noChannel.Add(1)
		return
	}
	peer, ok := a.channelPeer(ch)
	if !ok {
		d.noChannel.Add(1)
		return
	}
	if _, err := a.sock.send(data, peer); err == nil {
		d.relayed.Add(1)
	}
}
