package loadgen

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/pion/stun/v4"
)

// Control-message retransmission: loopback loses nothing unless a
// buffer overflows, so a short timeout and few tries suffice.
const (
	ctlTimeout = 500 * time.Millisecond
	ctlTries   = 4
)

// Alloc is one TURN allocation over its own UDP socket (one 5-tuple).
type Alloc struct {
	Conn  *net.UDPConn
	Relay netip.AddrPort

	user, realm, nonce string
	integrity          stun.MessageIntegrity
	buf                []byte
}

var errNoRealm = errors.New("401 without REALM/NONCE")

// Allocate performs the full RFC 8656 §7.2 exchange on a fresh socket:
// an unauthenticated Allocate, the 401 with REALM and NONCE, then the
// authenticated Allocate.
func Allocate(server netip.AddrPort, user, pass string) (*Alloc, error) {
	// A server may refuse a first Allocate for a passing reason (coturn
	// now and then answers a fresh 5-tuple with an error other than 401
	// while it starts up); a few fresh sockets tell that from a broken
	// harness without letting one such answer fail a whole run.
	var err error
	for try := 0; try < allocateTries; try++ {
		var a *Alloc
		if a, err = allocateOnce(server, user, pass); err == nil || !errors.Is(err, errFirstAllocate) {
			return a, err
		}
	}
	return nil, err
}

// allocateTries bounds the fresh sockets Allocate tries (see there).
const allocateTries = 3

var errFirstAllocate = errors.New("first allocate: want 401")

func allocateOnce(server netip.AddrPort, user, pass string) (*Alloc, error) {
	c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(server))
	if err != nil {
		return nil, err
	}
	// Relay runs put tens of 1200-byte packets in flight per socket.
	_ = c.SetReadBuffer(1 << 20)
	_ = c.SetWriteBuffer(1 << 20)
	a := &Alloc{Conn: c, user: user, buf: make([]byte, bufSize)}
	rt := stun.RawAttribute{Type: stun.AttrRequestedTransport, Value: []byte{17, 0, 0, 0}} // UDP
	res, err := a.roundTrip(stun.MustBuild(stun.TransactionID, stun.NewType(stun.MethodAllocate, stun.ClassRequest), rt, stun.Fingerprint))
	if err != nil {
		c.Close()
		return nil, err
	}
	var code stun.ErrorCodeAttribute
	if res.Type.Class != stun.ClassErrorResponse || code.GetFrom(res) != nil || code.Code != stun.CodeUnauthorized {
		c.Close()
		return nil, fmt.Errorf("%w, got %s %d %s", errFirstAllocate, res.Type, code.Code, code.Reason)
	}
	var realm stun.Realm
	var nonce stun.Nonce
	if realm.GetFrom(res) != nil || nonce.GetFrom(res) != nil {
		c.Close()
		return nil, errNoRealm
	}
	a.realm, a.nonce = realm.String(), nonce.String()
	a.integrity = stun.NewLongTermIntegrity(user, a.realm, pass)
	res, err = a.authed(stun.MethodAllocate, rt)
	if err != nil {
		c.Close()
		return nil, err
	}
	var relay stun.XORMappedAddress
	if err := relay.GetFromAs(res, stun.AttrXORRelayedAddress); err != nil {
		c.Close()
		return nil, fmt.Errorf("allocate: no XOR-RELAYED-ADDRESS: %w", err)
	}
	ip, _ := netip.AddrFromSlice(relay.IP)
	a.Relay = netip.AddrPortFrom(ip.Unmap(), uint16(relay.Port))
	return a, nil
}

// CreatePermission installs a permission for peer's IP (RFC 8656 §9).
func (a *Alloc) CreatePermission(peer netip.AddrPort) error {
	_, err := a.authed(stun.MethodCreatePermission, peerAttr(peer))
	return err
}

// ChannelBind binds ch to peer (RFC 8656 §11).
func (a *Alloc) ChannelBind(peer netip.AddrPort, ch uint16) error {
	v := make([]byte, 4)
	binary.BigEndian.PutUint16(v, ch)
	_, err := a.authed(stun.MethodChannelBind, peerAttr(peer), stun.RawAttribute{Type: stun.AttrChannelNumber, Value: v})
	return err
}

// Refresh sends Refresh with LIFETIME; 0 deletes the allocation.
func (a *Alloc) Refresh(lifetime uint32) error {
	v := make([]byte, 4)
	binary.BigEndian.PutUint32(v, lifetime)
	_, err := a.authed(stun.MethodRefresh, stun.RawAttribute{Type: stun.AttrLifetime, Value: v})
	return err
}

// Close closes the socket (the allocation lives on until it expires
// unless Refresh(0) deleted it).
func (a *Alloc) Close() { _ = a.Conn.Close() }

func peerAttr(peer netip.AddrPort) stun.Setter {
	return peerSetter{peer}
}

type peerSetter struct{ p netip.AddrPort }

func (s peerSetter) AddTo(m *stun.Message) error {
	return stun.XORMappedAddress{IP: s.p.Addr().AsSlice(), Port: int(s.p.Port())}.AddToAs(m, stun.AttrXORPeerAddress)
}

// authed sends an authenticated request, following one 438 (stale nonce).
func (a *Alloc) authed(method stun.Method, attrs ...stun.Setter) (*stun.Message, error) {
	for try := 0; try < 2; try++ {
		setters := []stun.Setter{stun.TransactionID, stun.NewType(method, stun.ClassRequest)}
		setters = append(setters, attrs...)
		setters = append(setters, stun.NewUsername(a.user), stun.NewRealm(a.realm), stun.NewNonce(a.nonce), a.integrity, stun.Fingerprint)
		res, err := a.roundTrip(stun.MustBuild(setters...))
		if err != nil {
			return nil, err
		}
		if res.Type.Class == stun.ClassSuccessResponse {
			return res, nil
		}
		var code stun.ErrorCodeAttribute
		_ = code.GetFrom(res)
		if code.Code == stun.CodeStaleNonce {
			var nonce stun.Nonce
			if nonce.GetFrom(res) == nil {
				a.nonce = nonce.String()
				continue
			}
		}
		return nil, fmt.Errorf("%s: %d %s", method, code.Code, code.Reason)
	}
	return nil, fmt.Errorf("%s: stale nonce twice", method)
}

func (a *Alloc) roundTrip(req *stun.Message) (*stun.Message, error) {
	for try := 0; try < ctlTries; try++ {
		if _, err := a.Conn.Write(req.Raw); err != nil {
			return nil, err
		}
		deadline := time.Now().Add(ctlTimeout)
		for {
			_ = a.Conn.SetReadDeadline(deadline)
			n, err := a.Conn.Read(a.buf)
			if err != nil {
				var ne net.Error
				if errors.As(err, &ne) && ne.Timeout() {
					break // retransmit
				}
				return nil, err
			}
			res := new(stun.Message)
			if err := stun.Decode(a.buf[:n], res); err != nil || res.TransactionID != req.TransactionID {
				continue // a stray data packet or an old reply
			}
			_ = a.Conn.SetReadDeadline(time.Time{})
			return res, nil
		}
	}
	return nil, fmt.Errorf("%s: no answer", req.Type)
}
