package classifier

import (
	"testing"
	"testing/synctest"
	"time"

	"github.com/pion/transport/v5/vnet"
)

func TestLifetimeSchedule(t *testing.T) {
	s := lifetimeSchedule(300 * time.Second)
	if s[0] != 5*time.Second || s[len(s)-1] != 300*time.Second {
		t.Errorf("schedule %v", s)
	}
	for i := 1; i < len(s); i++ {
		if s[i] <= s[i-1] {
			t.Fatalf("not increasing: %v", s)
		}
	}
	if s := lifetimeSchedule(2 * time.Second); len(s) != 1 || s[0] != 2*time.Second {
		t.Errorf("short maximum: %v", s)
	}
}

// TestLifetimeSearch runs the real search against vnet NATs whose mappings
// expire after a known idle time, inside a synctest bubble: the minutes of
// idling pass on the fake clock in milliseconds.
func TestLifetimeSearch(t *testing.T) {
	for _, c := range []struct {
		name          string
		lifetime, max time.Duration
		// the bracket must contain the NAT's lifetime: alive at minS
		// (>= wantMin), gone at maxS (<= wantMax); wantMax 0 = null.
		wantMin, wantMax float64
	}{
		{"25 s", 25 * time.Second, 60 * time.Second, 20, 31},
		{"100 s", 100 * time.Second, 300 * time.Second, 90, 121},
		{"outlives the search", 90 * time.Second, 60 * time.Second, 60, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				nat := vnet.NATType{MappingBehavior: vnet.EndpointIndependent, FilteringBehavior: vnet.EndpointAddrPortDependent, MappingLifeTime: c.lifetime}
				tp := newTopo(t, topoOpts{nat: &nat})
				r, err := tp.probe(t, func(cfg *Config) {
					cfg.Lifetime, cfg.LifetimeMax, cfg.Hairpin = true, c.max, false
				})
				if err != nil {
					t.Fatal(err)
				}
				lt := r.MappingLifetime
				if lt != nil {
					t.Logf("bracket [%g, %v] s for a %s NAT timer; keep-alive %d s", lt.MinS, fmtFloat(lt.MaxS), c.lifetime, r.SIPRTP.KeepaliveIntervalS)
				}
				if lt == nil {
					t.Fatalf("no lifetime: %q", r.Reasons["mapping_lifetime"])
				}
				if lt.MinS < c.wantMin || lt.MinS > c.lifetime.Seconds() {
					t.Errorf("alive at %g s, want in [%g, %g]", lt.MinS, c.wantMin, c.lifetime.Seconds())
				}
				switch {
				case c.wantMax == 0 && lt.MaxS != nil:
					t.Errorf("gone at %g s, want still alive at the %s maximum", *lt.MaxS, c.max)
				case c.wantMax != 0 && (lt.MaxS == nil || *lt.MaxS < c.lifetime.Seconds() || *lt.MaxS > c.wantMax):
					t.Errorf("gone at %v s, want in [%g, %g]", fmtFloat(lt.MaxS), c.lifetime.Seconds(), c.wantMax)
				}
				if r.Mapping != MappingEndpointIndependent || r.Filtering != FilteringAddressPortDependent {
					t.Errorf("%s/%s alongside the search", r.Mapping, r.Filtering)
				}
				if c.wantMax != 0 && r.SIPRTP.KeepaliveIntervalS != int(lt.MinS/2) {
					t.Errorf("keep-alive %d s from a lifetime alive at %g s", r.SIPRTP.KeepaliveIntervalS, lt.MinS)
				}
			})
		})
	}
}
