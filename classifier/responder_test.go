package classifier

// responder_test.go is a small RFC 5780 responder for tests of how the
// engine copes with servers that misbehave in ways the real stund never
// does: ignoring CHANGE-REQUEST, rewriting MAPPED-ADDRESS (what a generic
// ALG does), lying in RESPONSE-ORIGIN, sending junk. The matrix itself runs
// against the real server (vnet_test.go).

import (
	"encoding/binary"
	"net"
	"net/netip"
	"sync"

	"github.com/pion/transport/v5"
	"github.com/stund/stund/internal/stunwire"
)

// responderQuirks are the misbehaviours a responder can show.
type responderQuirks struct {
	ignoreChange bool           // answer CHANGE-REQUEST from the socket the request came in on
	algRewrite   netip.AddrPort // when valid, MAPPED-ADDRESS says this instead of the source
	originLie    netip.AddrPort // when valid, RESPONSE-ORIGIN says this
	junkFirst    bool           // send a malformed datagram before each reply
	noOther      bool           // omit OTHER-ADDRESS (and refuse CHANGE-REQUEST with 420)
}

// responder answers Binding requests on the 2×2 grid of ips × ports.
type responder struct {
	q     responderQuirks
	grid  [2][2]net.PacketConn
	addr  [2][2]netip.AddrPort
	wg    sync.WaitGroup
	close func()
}

func newResponder(n transport.Net, ips [2]netip.Addr, ports [2]uint16, q responderQuirks) (*responder, error) {
	r := &responder{q: q}
	for i := range 2 {
		for p := range 2 {
			ap := netip.AddrPortFrom(ips[i], ports[p])
			c, err := n.ListenUDP("udp4", net.UDPAddrFromAddrPort(ap))
			if err != nil {
				return nil, err
			}
			r.grid[i][p], r.addr[i][p] = c, ap
		}
	}
	for i := range 2 {
		for p := range 2 {
			r.wg.Add(1)
			go r.serve(i, p)
		}
	}
	r.close = func() {
		for i := range 2 {
			for p := range 2 {
				_ = r.grid[i][p].Close()
			}
		}
		r.wg.Wait()
	}
	return r, nil
}

func (r *responder) serve(i, p int) {
	defer r.wg.Done()
	buf := make([]byte, 1500)
	for {
		n, from, err := r.grid[i][p].ReadFrom(buf)
		if err != nil {
			return
		}
		src := stunwire.AddrPortOf(from)
		reply, fi, fp, to, ok := r.answer(buf[:n], i, p, src)
		if !ok {
			continue
		}
		if r.q.junkFirst {
			_, _ = r.grid[fi][fp].WriteTo([]byte{0x01, 0x01, 0x00, 0x04, 1, 2, 3}, net.UDPAddrFromAddrPort(to))
		}
		_, _ = r.grid[fi][fp].WriteTo(reply, net.UDPAddrFromAddrPort(to))
	}
}

func (r *responder) answer(req []byte, i, p int, src netip.AddrPort) (reply []byte, fi, fp int, to netip.AddrPort, ok bool) {
	h, err := stunwire.ParseHeader(req)
	if err != nil || h.Type != stunwire.TypeBindingRequest {
		return nil, 0, 0, to, false
	}
	var change uint32
	var respPort uint16
	it := stunwire.NewAttrs(req)
	for {
		typ, val, _, more := it.Next()
		if !more {
			break
		}
		switch typ {
		case stunwire.AttrChangeRequest:
			change = binary.BigEndian.Uint32(val)
		case stunwire.AttrResponsePort:
			respPort = binary.BigEndian.Uint16(val)
		}
	}
	fi, fp, to = i, p, src
	if respPort != 0 {
		to = netip.AddrPortFrom(src.Addr(), respPort)
	}
	if r.q.noOther && change != 0 {
		m := stunwire.AppendHeader(nil, stunwire.TypeBindingError, &h.ID)
		m = stunwire.AppendErrorCode(m, 420, "Unknown Attribute")
		return stunwire.Finish(m, 0), i, p, src, true
	}
	if !r.q.ignoreChange {
		if change&stunwire.ChangeIP != 0 {
			fi ^= 1
		}
		if change&stunwire.ChangePort != 0 {
			fp ^= 1
		}
	}
	mapped := src
	if r.q.algRewrite.IsValid() {
		mapped = r.q.algRewrite
	}
	origin := r.addr[fi][fp]
	if r.q.originLie.IsValid() {
		origin = r.q.originLie
	}
	m := stunwire.AppendHeader(nil, stunwire.TypeBindingSuccess, &h.ID)
	if h.Cookie {
		m = stunwire.AppendXORAddress(m, stunwire.AttrXORMappedAddress, src, &h.ID)
		m = stunwire.AppendAddress(m, stunwire.AttrMappedAddress, mapped)
		if !r.q.noOther {
			m = stunwire.AppendAddress(m, stunwire.AttrOtherAddress, r.addr[1-i][1-p])
		}
		m = stunwire.AppendAddress(m, stunwire.AttrResponseOrigin, origin)
		return stunwire.AppendFingerprint(m, 0), fi, fp, to, true
	}
	m = stunwire.AppendAddress(m, stunwire.AttrMappedAddress, mapped)
	return stunwire.Finish(m, 0), fi, fp, to, true
}
