package rtpstat

import "testing"

// RFC 3550 §A.8: packets spaced exactly by their timestamps have no
// jitter; a delay alternating by 80 units converges on 80; the estimate
// does not jump when the timestamps wrap past 2^32.
func TestJitter(t *testing.T) {
	var j Jitter
	const start = uint32(1<<32 - 160*25) // wraps half way
	for i := range 50 {
		j.Add(uint32(i)*160+7, start+uint32(i)*160)
	}
	if j.Value() != 0 {
		t.Fatalf("jitter %v on a perfect stream across the wrap", j.Value())
	}
	for i := 50; i < 250; i++ {
		j.Add(uint32(i)*160+uint32(i%2)*80, start+uint32(i)*160)
	}
	if v := j.Value(); v < 70 || v > 90 {
		t.Fatalf("jitter %v, want about 80", v)
	}
}
