// Package offload relays bound UDP ChannelData channels in the kernel.
//
// After a ChannelBind on a UDP allocation the server calls Install with the
// channel's 5-tuple, relayed address and peer; from then on an eBPF program
// on the ingress of the server's interfaces turns the client's ChannelData
// into plain datagrams from the relayed address to the peer (RFC 8656 §12.5),
// and the peer's datagrams to the relayed address into ChannelData from the
// server to the client, without the packets ever reaching a socket.
// Userspace stays the authority: a packet is touched only when its exact
// 5-tuple and channel number are installed, and Remove stops the kernel
// path before it returns. Everything else (Send indications, STUN,
// fragments, IP options and IPv6 extension headers, malformed or oversized
// ChannelData, destinations the kernel cannot route) passes untouched to
// the next program on the hook, if any, and to the userspace sockets.
//
// # TC ingress, not XDP
//
// The program runs at TC ingress (attached through TCX links, Linux 6.6+,
// behind whatever programs were on the hook before it), not XDP. This was
// reasoned out, not measured against an XDP version:
//   - loopback and veth have no native XDP. Generic XDP runs after the skb
//     is built, so it saves nothing over TC there, and loopback is where a
//     relay with local peers (and every test) lives;
//   - a packet from a local socket (loopback, or veth from a container) is
//     CHECKSUM_PARTIAL: its UDP checksum field holds only the pseudo-header
//     sum and the device fills in the rest. The TC checksum helpers
//     (bpf_l4_csum_replace with BPF_F_PSEUDO_HDR) know the skb's checksum
//     state and keep it right; XDP sees bytes without that state and would
//     have to guess;
//   - bpf_redirect_neigh (TC only) resolves the next hop's MAC through the
//     kernel's neighbour table, so a peer whose ARP or NDP entry is not yet
//     known is still relayed; XDP_REDIRECT needs the MAC already known.
//
// The price is the skb allocation XDP would save on a NIC with native XDP;
// an XDP front for such NICs can come later without changing the maps.
//
// The data is moved inside the packet (bpf_skb_load_bytes/store_bytes in
// 256-byte chunks) rather than the headers (bpf_skb_adjust_room): moving
// the headers leaves a CHECKSUM_PARTIAL skb's csum_start 4 bytes off, and a
// device finishing the checksum would then write it into the payload.
//
// # Where the packet goes
//
// The program asks the kernel's routing table (bpf_fib_lookup) for the new
// destination before touching the packet. A routed destination is sent out
// of the interface the route names (bpf_redirect_neigh). A destination on
// this host is delivered up the local stack, but only for packets that
// came in on loopback, which already carry the local route. Anything else
// (no route, the packet too large for the egress MTU after adding the
// 4-byte header) stays with userspace. bpf_fib_lookup refuses to answer
// unless forwarding is enabled on the interface the lookup names; the
// program names loopback, where forwarding lets no outside packet through,
// and New enables net.ipv4.conf.lo.forwarding and net.ipv6.conf.lo.forwarding
// when they are off (and Close turns them off again; without the IPv6 one,
// IPv6 channels stay in userspace).
//
// # What the kernel emits
//
// Toward the peer: the application data only, padding removed (RFC 8656
// §12.5). Toward the client: the 4-byte ChannelData header and the data,
// without padding (over UDP the padding is optional, RFC 8656 §12.5). The
// TTL is one less than the incoming one, and DSCP, ECN and DF are kept as
// they came (RFC 8656 §14, preferred behaviour); a packet whose TTL would
// reach 0 goes to userspace. IPv4 and IPv6 alike, as long as all four
// addresses of a channel are of one family (Install returns ErrUnsupported
// otherwise); IPv6 packets with extension headers go to userspace.
package offload
