package offload

// The compiled program and its Go bindings are committed so that `go build`
// needs no clang; `make bpf-check` proves they match relay.c. The two -I
// directories are Debian's multiarch homes of <asm/types.h> (amd64, arm64);
// the one that does not exist is ignored.
//go:generate go run github.com/cilium/ebpf/cmd/bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -I/usr/include/x86_64-linux-gnu -I/usr/include/aarch64-linux-gnu" -target bpfel -type chan_key -type chan_val -type chan_ctr relay relay.c
