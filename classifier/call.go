package classifier

// CallReport is sip.rtp (and sip.rtp_relay): a G.711 call to the SIP
// mirror's media echo (--call), measured each way.
type CallReport struct {
	Packets    int     `json:"packets"`      // RTP packets sent
	LossPctOut float64 `json:"loss_pct_out"` // lost toward the echo (its receive count)
	LossPctIn  float64 `json:"loss_pct_in"`  // echoes lost on the way back
	// JitterMS is the worse direction's RFC 3550 §6.4.1 interarrival
	// jitter; JitterOutMS as the echo computed it, JitterInMS ours.
	JitterMS    float64 `json:"jitter_ms"`
	JitterOutMS float64 `json:"jitter_out_ms"`
	JitterInMS  float64 `json:"jitter_in_ms"`
	RTTMS       float64 `json:"rtt_ms"`   // median round trip
	RFactor     float64 `json:"r_factor"` // ITU-T G.107 E-model
	MOS         float64 `json:"mos"`      // G.107 Annex B from R
	// RTPParityKept: the even local RTP port left as an even port;
	// RTCPAdjacent: RTCP from the next local port left from the next
	// external port (RFC 4787 §4.2.2, §4.2.3, for this real flow); null
	// when the echo did not say.
	RTPParityKept *bool  `json:"rtp_parity_kept"`
	RTCPAdjacent  *bool  `json:"rtcp_adjacent"`
	RTPSource     string `json:"rtp_source,omitempty"` // the RTP flow's source as the echo saw it
	Error         string `json:"error,omitempty"`      // why the call could not be measured
}
