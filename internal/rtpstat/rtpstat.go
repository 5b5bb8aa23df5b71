// Package rtpstat computes RTP receive statistics that both ends of
// natprobe's call test need alike: the media echo in server/sipmirror and
// the prober in classifier.
package rtpstat

// Jitter is the RFC 3550 §6.4.1 interarrival jitter estimator (the
// algorithm of RFC 3550 §A.8), in RTP timestamp units. The zero value is
// ready.
type Jitter struct {
	transit uint32
	j       float64
	have    bool
}

// Add takes one packet: its arrival time and its RTP timestamp, both in
// units of the RTP clock. The arithmetic is modulo 2^32, as the
// timestamps', so a stream whose timestamps wrap is measured right.
func (s *Jitter) Add(arrival, rtpTS uint32) {
	transit := arrival - rtpTS
	if s.have {
		d := int64(int32(transit - s.transit))
		if d < 0 {
			d = -d
		}
		s.j += (float64(d) - s.j) / 16
	}
	s.transit, s.have = transit, true
}

// Value is the current estimate, in RTP timestamp units.
func (s *Jitter) Value() float64 { return s.j }
