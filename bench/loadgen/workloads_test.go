package loadgen

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/pion/stun/v4"
)

// TestSendPacket: pion decodes the Send indication template as one to the
// peer with size bytes of DATA at TSOffset, and Reply reads the timestamp
// back out of pion's Data indication.
func TestSendPacket(t *testing.T) {
	peer := netip.MustParseAddrPort("198.51.100.7:40001")
	for _, size := range []int{16, 17, 100} {
		p := SendPacket(peer, size)
		m := &stun.Message{Raw: append([]byte(nil), p.Template...)}
		if err := m.Decode(); err != nil {
			t.Fatal(err)
		}
		var xpa stun.XORMappedAddress // XOR-PEER-ADDRESS has its layout (RFC 8656 §14.3)
		if err := xpa.GetFromAs(m, stun.AttrXORPeerAddress); err != nil || m.Type != (stun.MessageType{Method: stun.MethodSend, Class: stun.ClassIndication}) {
			t.Fatalf("type %v peer %v: %v", m.Type, xpa, err)
		}
		data, err := m.Get(stun.AttrData)
		if err != nil || len(data) != size || netip.AddrPortFrom(netip.AddrFrom4([4]byte(xpa.IP.To4())), uint16(xpa.Port)) != peer {
			t.Fatalf("size %d: DATA %d bytes (%v), peer %v", size, len(data), err, xpa)
		}
		if binary.BigEndian.Uint16(p.Template[p.TSOffset-4:]) != uint16(stun.AttrData) ||
			int(binary.BigEndian.Uint16(p.Template[p.TSOffset-2:])) != size || p.SeqOffset != p.TSOffset+8 {
			t.Errorf("TSOffset %d does not start DATA's value", p.TSOffset)
		}

		ts := make([]byte, 8)
		binary.BigEndian.PutUint64(ts, 1234567)
		reply, err := stun.Build(stun.TransactionID, stun.MessageType{Method: stun.MethodData, Class: stun.ClassIndication},
			stun.RawAttribute{Type: stun.AttrData, Value: ts})
		if err != nil {
			t.Fatal(err)
		}
		if got, ok := p.Reply(reply.Raw); !ok || got != 1234567 {
			t.Errorf("Reply: %d %v", got, ok)
		}
		if _, ok := p.Reply(p.Template); ok {
			t.Error("Reply takes the Send indication itself")
		}
	}
}

// TestBindingPacket: a bare cookie Binding request; Reply takes a success
// response carrying the timestamp in its transaction ID.
func TestBindingPacket(t *testing.T) {
	p := BindingPacket()
	m := &stun.Message{Raw: append([]byte(nil), p.Template...)}
	if err := m.Decode(); err != nil || m.Type != stun.BindingRequest || len(p.Template) != 20 {
		t.Fatalf("%v %v", m, err)
	}
	resp := append([]byte(nil), p.Template...)
	binary.BigEndian.PutUint16(resp, 0x0101)
	binary.BigEndian.PutUint64(resp[p.TSOffset:], 42)
	if got, ok := p.Reply(resp); !ok || got != 42 {
		t.Errorf("Reply: %d %v", got, ok)
	}
	binary.BigEndian.PutUint32(resp[4:], 0)
	if _, ok := p.Reply(resp); ok {
		t.Error("Reply takes a message without the magic cookie")
	}
}
