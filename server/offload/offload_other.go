//go:build !linux

package offload

import "errors"

// errNotLinux is New's reason everywhere but Linux: the program needs TC
// and eBPF.
var errNotLinux = errors.New("offload: the kernel relay needs Linux")

// Offload is never created off Linux; its methods exist so that the server
// builds everywhere.
type Offload struct{}

// New returns nil, nil for ModeOff and nil and the reason otherwise.
func New(cfg Config) (*Offload, error) {
	if cfg.Mode == ModeOff {
		return nil, nil
	}
	return nil, errNotLinux
}

func (o *Offload) Install(Channel) error                    { return errNotLinux }
func (o *Offload) Remove(Channel) error                     { return errNotLinux }
func (o *Offload) RemoveCounters(Channel) (Counters, error) { return Counters{}, errNotLinux }
func (o *Offload) Counters(Channel) (Counters, error)       { return Counters{}, errNotLinux }
func (o *Offload) Declined() (Declined, error)              { return Declined{}, errNotLinux }
func (o *Offload) Close() error                             { return nil }
