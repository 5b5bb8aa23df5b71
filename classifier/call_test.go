package classifier

import (
	"math"
	"testing"
)

// A call on loopback: every packet back, parity and adjacency kept (no
// NAT), a G.711 score near the codec's best.
func TestCallLoopback(t *testing.T) {
	t.Parallel()
	addr, ports := startLoopbackMirror(t)
	r := probeSIP(t, addr, SIPConfig{Port: uint16(ports.SIP), ControlPort: uint16(ports.Control), Call: 400 * rtpInterval / 10})
	c := r.SIP.RTP
	if c == nil || c.Error != "" {
		t.Fatalf("call %+v", c)
	}
	if c.Packets != 40 || c.LossPctOut != 0 || c.LossPctIn != 0 {
		t.Errorf("packets %d loss %v/%v, want 40 and none lost on loopback", c.Packets, c.LossPctOut, c.LossPctIn)
	}
	if c.RTPParityKept == nil || !*c.RTPParityKept || c.RTCPAdjacent == nil || !*c.RTCPAdjacent {
		t.Errorf("parity %v adjacency %v without a NAT", fmtBool(c.RTPParityKept), fmtBool(c.RTCPAdjacent))
	}
	if c.MOS < 4.3 || c.RFactor < 90 || c.RTTMS <= 0 {
		t.Errorf("R %v MOS %v rtt %v on loopback", c.RFactor, c.MOS, c.RTTMS)
	}
}

// G.107 figures: the E-model's best for G.711, what loss and delay cost.
func TestEModel(t *testing.T) {
	for _, c := range []struct {
		rtt, jitter, loss float64
		r, mos            float64
	}{
		{0, 0, 0, 92.7, 4.41},   // 20 ms frame only: Id = 0.48
		{100, 5, 0, 91.3, 4.39}, // d = 80 ms
		{0, 0, 5, 76.9, 3.91},   // Ie,eff = 95 * 5 / 30.1
		{400, 0, 0, 83.2, 4.14}, // d = 220 ms: past 177.3, Id = 5.28 + 4.70
		{0, 0, 100, 16.8, 1.16}, // everything lost: Ie,eff = 95 * 100 / 125.1
		{2000, 0, 50, -87.2, 1}, // MOS clamped at 1
	} {
		r, mos := eModel(c.rtt, c.jitter, c.loss)
		if math.Abs(r-c.r) > 0.15 || math.Abs(mos-c.mos) > 0.02 {
			t.Errorf("eModel(%v, %v, %v) = R %v MOS %v, want %v %v", c.rtt, c.jitter, c.loss, r, mos, c.r, c.mos)
		}
	}
}

// Loss each way from the echo's receive count: of 100 packets the highest
// echoed had sequence 99 and count 90 (10 lost out), and 81 echoes came
// back (10 % of the 90 lost in).
func TestCallLossFromStamps(t *testing.T) {
	st := &callStats{got: map[uint16]bool{}, topSeq: 99, topCount: 90, outJitter: 80, rtpPort: 40001, rtcpPort: 40002}
	for i := range 81 {
		st.got[uint16(i)] = true
		st.rtts = append(st.rtts, 0)
	}
	r := st.report(100)
	if math.Abs(r.LossPctOut-10) > 1e-9 || math.Abs(r.LossPctIn-10) > 1e-9 || r.JitterOutMS != 10 {
		t.Errorf("loss %v/%v jitter out %v, want 10/10 and 10 ms", r.LossPctOut, r.LossPctIn, r.JitterOutMS)
	}
	if r.RTPParityKept == nil || *r.RTPParityKept || r.RTCPAdjacent == nil || !*r.RTCPAdjacent {
		t.Errorf("odd RTP source: parity %v adjacency %v", fmtBool(r.RTPParityKept), fmtBool(r.RTCPAdjacent))
	}
	none := (&callStats{got: map[uint16]bool{}, topSeq: -1}).report(50)
	if none.Error == "" || none.LossPctOut != 100 {
		t.Errorf("no echo at all: %+v", none)
	}
}
