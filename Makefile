# Top-level targets. `make test` is what CI runs (.ci/run); it needs root
# for the NAT lab (network namespaces) and the interop tools from Debian
# (coturn, stun-client, nftables, iproute2).

.PHONY: all build deps test unit natlab demo clean bench bench-smoke

GO ?= go
BIN ?= bin

all: build

# VERSION is what --version, natprobe's SOFTWARE attribute and stund's
# build-info metric report: the git description when there is one.
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)

build:
	$(GO) build -ldflags "-X main.version=$(VERSION)" -o $(BIN)/ ./cmd/stund ./cmd/natprobe

# deps: what the tests need beyond Go, from Debian's packages (root).
# nftables, iproute2 (ip, ss) and procps (sysctl): the NAT lab; coturn +
# stun-client: interop with clients nobody here wrote; chromium: the WebRTC
# browser test; clang, llvm and libbpf-dev: bpf-check recompiles the kernel
# relay's eBPF program.
deps:
	DEBIAN_FRONTEND=noninteractive apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		nftables iproute2 procps coturn stun-client chromium ca-certificates \
		clang llvm libbpf-dev >/dev/null
	@# Debian may enable coturn's own service on 3478; stop that unit only,
	@# never other turnserver processes (a concurrent lab or bench run's).
	-command -v systemctl >/dev/null 2>&1 && systemctl disable --now coturn >/dev/null 2>&1 || true

# unit: the Go tests (in-process, loopback and vnet), with the interop
# tests required rather than skipped when their tools are missing.
unit:
	$(GO) vet ./...
	STUND_REQUIRE_INTEROP=$${STUND_REQUIRE_INTEROP:-1} $(GO) test -count=1 -timeout 15m ./...

# test: everything CI runs.
test: unit bpf-check natlab bench-smoke fuzz-smoke vulncheck

# demo: stund on its embedded default (127.0.0.1 + 127.0.0.2) with the SIP
# mirror (UDP/TCP 5060-5065 must be free) and natprobe against it; stund
# keeps running for other clients until Ctrl-C.
demo: build
	@$(BIN)/stund --sip-mirror & pid=$$!; \
	trap 'kill $$pid 2>/dev/null' INT TERM EXIT; \
	sleep 1; kill -0 $$pid 2>/dev/null || { echo "stund did not start (ports 3478/3479 in use?)"; exit 1; }; \
	$(BIN)/natprobe 127.0.0.1; \
	echo "stund still running (pid $$pid); try: turnutils_natdiscovery -m -f 127.0.0.1 — Ctrl-C stops it"; \
	wait $$pid

clean:
	rm -rf $(BIN)

# natlab (root): natprobe, stund, coturn and two third-party clients on
# either side of real kernel NATs (nftables in network namespaces), one line
# per profile, exit 1 on any FAIL; about a minute on 2 cores (lab/README.md).
# PROFILE=name[,name] runs only those profiles (go run ./lab/natlab -list).
PROFILE ?=
# NATLAB_FLAGS passes more flags, e.g. NATLAB_FLAGS='-checks lab -j 2'.
NATLAB_FLAGS ?=

natlab:
	$(GO) run ./lab/natlab $(if $(PROFILE),-profile $(PROFILE)) $(NATLAB_FLAGS)

# bench: stund (--offload auto: the kernel relay when root), the same
# stund with --offload off (the "base" column) and coturn's turnserver on
# loopback, same workloads, alternating rounds with fresh processes;
# prints medians and ratios
# (bench/README.md). About 5 minutes on 2 cores. BENCH_FLAGS passes more
# flags, e.g. BENCH_FLAGS='-rounds 5'.
BENCH_FLAGS ?=
bench:
	$(GO) build -o $(BIN)/stund ./cmd/stund
	$(GO) build -o $(BIN)/stundbench ./bench/cmd/stundbench
	$(BIN)/stundbench -stund $(BIN)/stund -base $(BIN)/stund -base-args=--offload=off $(BENCH_FLAGS)

# bench-smoke: seconds-long run of the same harness, so it cannot rot;
# asserts only that both servers answered every workload, not speed.
bench-smoke:
	$(GO) build -o $(BIN)/stund ./cmd/stund
	$(GO) build -o $(BIN)/stundbench ./bench/cmd/stundbench
	$(BIN)/stundbench -smoke -stund $(BIN)/stund

# fuzz: every Go fuzz target over bytes from the network or the config
# file, FUZZTIME each (go test -fuzz runs one target at a time). Inputs
# that fail land in the package's testdata/fuzz/ and are then replayed by
# every plain `go test`; commit those.
FUZZTIME ?= 60s
FUZZ_TARGETS = ./internal/stunwire:FuzzParse ./server/binding:FuzzBindingHandle \
	./server:FuzzDemuxUDP ./server:FuzzDemuxStream ./classifier:FuzzParseMessage \
	./cmd/stund:FuzzConfigYAML ./server/sipmirror:FuzzHandle
.PHONY: fuzz fuzz-smoke vulncheck soak
fuzz:
	@set -e; for ft in $(FUZZ_TARGETS); do \
		pkg=$${ft%%:*}; fn=$${ft##*:}; echo "fuzz $$pkg $$fn ($(FUZZTIME))"; \
		$(GO) test -run '^$$' -fuzz "^$$fn\$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 10s -timeout 10m $$pkg; \
	done

# fuzz-smoke: each target briefly, so the targets cannot rot (CI). A count
# of executions, not a duration: Go 1.26's fuzz coordinator can fail a
# duration run with "context deadline exceeded" and no failing input when
# the deadline lands while a worker is busy (go.dev/issue/75804, fixed in
# Go 1.27); a count has no deadline to race. -timeout still bounds it.
fuzz-smoke:
	$(MAKE) --no-print-directory fuzz FUZZTIME=20000x

# vulncheck: known vulnerabilities in the code paths stund and natprobe
# reach (golang.org/x/vuln, from the Go module proxy, pinned: v1.9.0 needs
# an x/telemetry version the proxy does not serve). It reads the database
# at vuln.go.dev, or a mirror given as VULNDB=URL (file:// works). Where
# the database cannot be reached at all (CI's network reaches only the
# package registries) it says so loudly and checks nothing: "not run" is
# not "clean". Any finding, or any other failure, fails the target.
GOVULNCHECK ?= golang.org/x/vuln/cmd/govulncheck@v1.8.0
VULNDB ?=
vulncheck:
	@out=$$($(GO) run $(GOVULNCHECK) $(if $(VULNDB),-db $(VULNDB)) ./... 2>&1); rc=$$?; echo "$$out"; \
	if [ $$rc -ne 0 ] && echo "$$out" | grep -q 'fetching vulnerabilities'; then \
		echo "vulncheck: NOT RUN: the vulnerability database is unreachable from this machine (set VULNDB to a mirror); nothing was checked"; \
		exit 0; \
	fi; exit $$rc

# soak: SOAK_DURATION of allocation churn, relay traffic and malformed
# packets against a stund process on loopback; fails unless its RSS,
# goroutines and open fds come back within 10% of the baseline
# (soak/README.md). Not in CI: it takes ten minutes.
SOAK_DURATION ?= 10m
SOAK_FLAGS ?=
soak:
	$(GO) build -o $(BIN)/stund ./cmd/stund
	$(GO) run ./soak -stund $(BIN)/stund -duration $(SOAK_DURATION) $(SOAK_FLAGS)

# bpf-generate: recompile server/offload's eBPF program and its Go bindings
# (bpf2go; needs clang, llvm and libbpf-dev from Debian). The output is
# committed so that `go build` needs no clang.
.PHONY: bpf-generate bpf-check
BPF_PKG = server/offload
bpf-generate:
	cd $(BPF_PKG) && $(GO) generate ./

# bpf-check: regenerate into a temporary directory with the go:generate
# line's own arguments and fail if the result differs from what is
# committed (CI runs it after installing clang).
bpf-check:
	@set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	cd $(BPF_PKG); \
	args=$$(sed -n 's|^//go:generate go run github.com/cilium/ebpf/cmd/bpf2go ||p' gen.go); \
	test -n "$$args" || { echo "bpf-check: no bpf2go go:generate line in $(BPF_PKG)/gen.go"; exit 1; }; \
	eval "GOPACKAGE=offload $(GO) run github.com/cilium/ebpf/cmd/bpf2go -output-dir $$tmp $$args"; \
	for f in relay_bpfel.go relay_bpfel.o; do \
		cmp -s "$$f" "$$tmp/$$f" || { echo "bpf-check: $(BPF_PKG)/$$f is stale: run make bpf-generate and commit"; exit 1; }; \
	done; \
	echo "bpf-check: $(BPF_PKG) generated files match relay.c"
