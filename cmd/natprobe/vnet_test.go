package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/pion/logging"
	"github.com/pion/transport/v5/vnet"

	"github.com/stund/stund/classifier"
	"github.com/stund/stund/server"
)

// Behind an emulated symmetric NAT (APDM/APDF, pion vnet), natprobe must
// see that media needs a relay and prove one without being asked: the
// automatic fallback (media behind a symmetric NAT needs a relay, and
// the report must say whether one works), end to end through the NAT.
func TestSymmetricNATFallsBackToRelay(t *testing.T) {
	lf := logging.NewDefaultLoggerFactory()
	lf.DefaultLogLevel = logging.LogLevelDisabled
	wan, err := vnet.NewRouter(&vnet.RouterConfig{CIDR: "0.0.0.0/0", LoggerFactory: lf})
	if err != nil {
		t.Fatal(err)
	}
	srvNet, err := vnet.NewNet(&vnet.NetConfig{StaticIPs: []string{"1.2.3.4", "1.2.3.5"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := wan.AddNet(srvNet); err != nil {
		t.Fatal(err)
	}
	lan, err := vnet.NewRouter(&vnet.RouterConfig{
		CIDR: "192.168.1.0/24", StaticIPs: []string{"5.6.7.8"}, LoggerFactory: lf,
		NATType: &vnet.NATType{MappingBehavior: vnet.EndpointAddrPortDependent, FilteringBehavior: vnet.EndpointAddrPortDependent},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := wan.AddRouter(lan); err != nil {
		t.Fatal(err)
	}
	client, err := vnet.NewNet(&vnet.NetConfig{StaticIPs: []string{"192.168.1.2"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := lan.AddNet(client); err != nil {
		t.Fatal(err)
	}
	if err := wan.Start(); err != nil {
		t.Fatal(err)
	}
	srv, err := server.New(server.Config{
		PrimaryIP: netip.MustParseAddr("1.2.3.4"), AlternateIP: netip.MustParseAddr("1.2.3.5"),
		Port: 3478, AltPort: 3479, DisableTCP: true, Net: srvNet, LoggerFactory: lf,
		Users: map[string]string{testUser: testPass},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = srv.Close() })
	// Cleanups run last-in first-out: the network stops before the server
	// closes, so no datagram is in flight into a closing server.
	t.Cleanup(func() { _ = wan.Stop() })

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second) // safety net
	defer cancel()
	o := &options{
		server: "1.2.3.4:3478", format: "json", hairpin: true, lifetimeMax: defaultLifetimeMax,
		turnUser: testUser, turnPass: testPass, transports: []string{"udp"},
		timeout: 30 * time.Second, net: client,
	}
	var out, errb bytes.Buffer
	code, err := probe(ctx, o, &out, &errb)
	if err != nil {
		t.Fatalf("exit %d: %v", code, err)
	}
	var rep classifier.Report
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Mapping != classifier.MappingAddressPortDependent {
		t.Fatalf("mapping %q, want APDM (reasons %v)", rep.Mapping, rep.Reasons)
	}
	if rep.Relay == nil || !rep.Relay.OK {
		t.Fatalf("relay %+v, want a proven relay", rep.Relay)
	}
	if rep.Relay.RelayedAddress == "" || rep.Relay.RTTMS <= 0 {
		t.Errorf("relay %+v", rep.Relay)
	}
	t.Logf("exit %d, relay %+v", code, *rep.Relay)

	// Without credentials the relay is not tried, and the report says why.
	o.turnUser, o.turnPass = "", ""
	out.Reset()
	if _, err := probe(ctx, o, &out, &errb); err != nil {
		t.Fatal(err)
	}
	rep = classifier.Report{}
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatal(err)
	}
	if rep.Relay != nil || rep.Reasons["relay"] == "" {
		t.Errorf("relay %+v, reason %q: want null with a reason", rep.Relay, rep.Reasons["relay"])
	}
}

// An unresolvable name is not a usage error: HOST[:PORT] is well-formed,
// the network says no. natprobe exits 3, "unreachable", and prints no
// report. The name is looked up in a pion vnet, so no DNS query leaves the
// test.
func TestUnresolvableName(t *testing.T) {
	lf := logging.NewDefaultLoggerFactory()
	lf.DefaultLogLevel = logging.LogLevelDisabled
	wan, err := vnet.NewRouter(&vnet.RouterConfig{CIDR: "1.2.3.0/24", LoggerFactory: lf})
	if err != nil {
		t.Fatal(err)
	}
	client, err := vnet.NewNet(&vnet.NetConfig{StaticIPs: []string{"1.2.3.4"}})
	if err != nil {
		t.Fatal(err)
	}
	if err := wan.AddNet(client); err != nil {
		t.Fatal(err)
	}
	if err := wan.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = wan.Stop() })

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second) // safety net
	defer cancel()
	server, err := hostPort("stun.example.invalid")
	if err != nil {
		t.Fatalf("a well-formed name refused: %v", err)
	}
	o := &options{server: server, format: "json", lifetimeMax: defaultLifetimeMax, timeout: 10 * time.Second, net: client}
	var out, errb bytes.Buffer
	code, err := probe(ctx, o, &out, &errb)
	if code != exitServer || err == nil || !strings.Contains(err.Error(), "is unreachable") || !strings.Contains(err.Error(), "resolving") {
		t.Fatalf("exit %d, err %v; want %d, unreachable (resolving)", code, err, exitServer)
	}
	if out.Len() != 0 {
		t.Errorf("a report for a name that does not resolve: %q", out.String())
	}
	t.Logf("%v", err)
}
