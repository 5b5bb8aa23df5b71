//go:build ignore

// SPDX-License-Identifier: GPL-2.0
//
// stund's kernel relay for bound UDP ChannelData channels (RFC 8656 §12).
// One TC ingress program (see doc.go for why TC and not XDP) that turns
//
//   client -> server  ChannelData  into  relay -> peer   raw data, and
//   peer   -> relay   raw data     into  server -> client ChannelData.
//
// Userspace is the authority: a packet is touched only when its exact
// 5-tuple (and channel number) is in relay_chans. Everything else, and
// every packet this program cannot finish (route unknown, too big for the
// egress MTU, helper failure before the first write), returns NOT_OURS
// untouched so that the userspace relay sees exactly what it would have
// seen without us.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>
#include <stdbool.h>

char __license[] SEC("license") = "GPL";

// The verdict for a packet this program leaves alone. TC_ACT_UNSPEC is
// TCX_NEXT: the programs attached after this one on the same hook (an
// operator's firewall, another datapath) still see the packet, and when
// there are none it goes up the stack as if nothing were attached.
// TC_ACT_OK would end the chain here.
#define NOT_OURS TC_ACT_UNSPEC

// The Ethernet header the program expects in front of IP: userspace only
// attaches to Ethernet-like devices and loopback, which carry one as well.
#define L3_OFF ETH_HLEN
// Where the UDP header starts: no IPv4 options, no IPv6 extension headers
// (packets with either go to userspace).
#define L4_OFF4 (L3_OFF + sizeof(struct iphdr))
#define L4_OFF6 (L3_OFF + sizeof(struct ipv6hdr))
#define UDP_HLEN sizeof(struct udphdr)

// RFC 8656 §12.4: the ChannelData header is a 2-byte channel number and a
// 2-byte length of the application data that follows.
#define CHDR_LEN 4

// The largest application data relayed in the kernel: above a typical
// 1500-byte MTU's UDP payload, so media never falls back; anything larger
// (jumbo or loopback datagrams) goes to userspace. It bounds the copy loop.
#define MAX_DATA 2048
// The copy loop moves the data in chunks of this many bytes through the
// stack (512 bytes of BPF stack in all, so half of it at most).
#define CHUNK 256
#define MAX_CHUNKS (MAX_DATA / CHUNK)

// RFC 8656 §12: channel numbers 0x4000 through 0x4FFF.
#define CHAN_MIN 0x4000
#define CHAN_MAX 0x4FFF

// Loopback's ifindex in every network namespace: local delivery is only
// taken for packets that arrived there (see finish()).
#define LOOPBACK_IFINDEX 1

// <sys/socket.h> is not for BPF targets; these are the same on every Linux.
#define AF_INET 2
#define AF_INET6 10

#define DIR_TO_PEER 1
#define DIR_TO_CLIENT 2

// Key of one direction of one channel: the packet's addresses and ports as
// they arrive (network byte order) and, toward the peer, the channel
// number (host order); 0 toward the client, where the datagram has none.
// IPv4 addresses take the first word, the other three are 0.
struct chan_key {
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u16 chan;
	__u16 pad;
};

// What to make of a matching packet: the new addresses and ports, the
// direction and, toward the client, the channel number to prepend.
struct chan_val {
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u16 chan;
	__u8 dir;
	__u8 pad;
};

// Per-CPU counters of one direction: packets and application bytes (the
// ChannelData header and padding excluded), summed by userspace.
struct chan_ctr {
	__u64 pkts;
	__u64 bytes;
};

// Two entries per channel. The size is the number of channel directions a
// server may offload; once full, Install fails and the channel stays in
// userspace.
#define MAX_ENTRIES 131072

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_ENTRIES);
	__type(key, struct chan_key);
	__type(value, struct chan_val);
} relay_chans SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, MAX_ENTRIES);
	__type(key, struct chan_key);
	__type(value, struct chan_ctr);
} relay_ctrs SEC(".maps");

// Why packets that matched a channel were nevertheless left to userspace,
// per CPU, so that an operator can see the kernel path declining.
enum {
	PASS_NO_ROUTE = 0, // no route, or forwarding lookups disabled
	PASS_FRAG_NEEDED, // larger than the egress MTU
	PASS_LOCAL_NOT_LO, // peer on this host but packet not from loopback
	PASS_HELPER, // a helper failed before the packet was modified
	ABORTED, // a helper failed after it was modified: dropped
	PASS_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, PASS_MAX);
	__type(key, __u32);
	__type(value, __u64);
} relay_stats SEC(".maps");

static __always_inline void stat(__u32 reason)
{
	__u64 *v = bpf_map_lookup_elem(&relay_stats, &reason);
	if (v)
		*v += 1;
}

// Where the rewritten packet goes.
enum { GO_REDIRECT = 1, GO_LOCAL };

// pkt is what the program read of one datagram before touching it.
struct pkt {
	bool v6;
	__u32 l4; // offset of the UDP header
	__u8 ttl; // IPv4 TTL or IPv6 hop limit
	struct udphdr udp;
	__be32 saddr[4], daddr[4];
	__be16 ip_len; // IPv4 total length or IPv6 payload length, as read
};

static __always_inline __u32 csum_off(const struct pkt *p)
{
	return p->l4 + offsetof(struct udphdr, check);
}

static __always_inline __u32 data_off(const struct pkt *p)
{
	return p->l4 + UDP_HLEN;
}

// route decides, before the packet is touched, how the rewritten packet
// will leave: redirected out of the interface the kernel's route for the
// new destination names (bpf_redirect_neigh resolves the next hop), or
// delivered up the local stack when the destination is on this host and
// the packet came in on loopback (its route is already the local one).
// Any other outcome leaves the packet to userspace. The lookup is made as
// if the packet had arrived on loopback: the route to the peer is what
// matters, and loopback is the one interface where enabling forwarding
// (which the helper insists on) forwards nobody's traffic. new_ulen is the
// rewritten UDP length; the helper checks the whole packet against the
// egress MTU.
static __always_inline int route(struct __sk_buff *skb, const struct pkt *p,
				 const struct chan_val *v, __u16 new_ulen, __u32 *ifindex)
{
	struct bpf_fib_lookup fib = {};
	fib.l4_protocol = IPPROTO_UDP;
	fib.sport = v->sport;
	fib.dport = v->dport;
	fib.ifindex = LOOPBACK_IFINDEX;
	if (p->v6) {
		fib.family = AF_INET6;
		fib.tot_len = sizeof(struct ipv6hdr) + new_ulen;
		__builtin_memcpy(fib.ipv6_src, v->saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, v->daddr, 16);
	} else {
		fib.family = AF_INET;
		fib.tot_len = sizeof(struct iphdr) + new_ulen;
		fib.ipv4_src = v->saddr[0];
		fib.ipv4_dst = v->daddr[0];
	}

	long rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	switch (rc) {
	case BPF_FIB_LKUP_RET_SUCCESS:
	case BPF_FIB_LKUP_RET_NO_NEIGH:
		*ifindex = fib.ifindex;
		return GO_REDIRECT;
	case BPF_FIB_LKUP_RET_NOT_FWDED:
		// A local destination. Only a packet that came in on loopback
		// carries the local route already and may go up the stack.
		if (skb->ingress_ifindex == LOOPBACK_IFINDEX)
			return GO_LOCAL;
		stat(PASS_LOCAL_NOT_LO);
		return 0;
	case BPF_FIB_LKUP_RET_FRAG_NEEDED:
		stat(PASS_FRAG_NEEDED);
		return 0;
	default:
		stat(PASS_NO_ROUTE);
		return 0;
	}
}

// rewrite_addrs sets the new addresses in the IP header and carries them
// into the UDP checksum's pseudo header (and, for IPv4, the header
// checksum). The helpers keep the checksums right for every checksum state
// the skb may be in: BPF_F_PSEUDO_HDR updates a CHECKSUM_PARTIAL pseudo
// sum, BPF_F_MARK_MANGLED_0 keeps an IPv4 "no checksum".
static __always_inline int rewrite_addrs(struct __sk_buff *skb, const struct pkt *p,
					 const struct chan_val *v)
{
	const __u64 l4 = BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | 4;
	__u32 words = p->v6 ? 4 : 1;
	__u32 src = L3_OFF + (p->v6 ? offsetof(struct ipv6hdr, saddr) : offsetof(struct iphdr, saddr));
	__u32 dst = L3_OFF + (p->v6 ? offsetof(struct ipv6hdr, daddr) : offsetof(struct iphdr, daddr));
	__u32 l3sum = L3_OFF + offsetof(struct iphdr, check);
	for (__u32 i = 0; i < 4; i++) {
		if (i >= words)
			break;
		if (bpf_l4_csum_replace(skb, csum_off(p), p->saddr[i], v->saddr[i], l4) ||
		    bpf_l4_csum_replace(skb, csum_off(p), p->daddr[i], v->daddr[i], l4))
			return -1;
		if (!p->v6 && (bpf_l3_csum_replace(skb, l3sum, p->saddr[i], v->saddr[i], 4) ||
			       bpf_l3_csum_replace(skb, l3sum, p->daddr[i], v->daddr[i], 4)))
			return -1;
	}
	if (bpf_skb_store_bytes(skb, src, v->saddr, words * 4, 0) ||
	    bpf_skb_store_bytes(skb, dst, v->daddr, words * 4, 0))
		return -1;
	return 0;
}

// rewrite_ip sets the IP length and the TTL or hop limit, and carries the
// UDP length change into the pseudo header (IPv6's is 32 bits wide, its
// upper half stays 0).
static __always_inline int rewrite_ip(struct __sk_buff *skb, const struct pkt *p,
				      __u16 new_ulen)
{
	__be16 old_ulen = p->udp.len;
	__be16 ulen = bpf_htons(new_ulen);
	if (bpf_l4_csum_replace(skb, csum_off(p), old_ulen, ulen,
				BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | 2))
		return -1;
	// RFC 8656 §14 (UDP-to-UDP relay, preferred behaviour): the outgoing
	// TTL is one less than the incoming one; DSCP, ECN and DF (and IPv6's
	// traffic class) are copied.
	__u8 ttl = p->ttl - 1;
	if (p->v6) {
		if (bpf_skb_store_bytes(skb, L3_OFF + offsetof(struct ipv6hdr, payload_len), &ulen, 2, 0) ||
		    bpf_skb_store_bytes(skb, L3_OFF + offsetof(struct ipv6hdr, hop_limit), &ttl, 1, 0))
			return -1;
		return 0;
	}
	__u32 l3sum = L3_OFF + offsetof(struct iphdr, check);
	__be16 tot = bpf_htons(sizeof(struct iphdr) + new_ulen);
	__be16 old_tp = bpf_htons(((__u16)p->ttl << 8) | IPPROTO_UDP);
	__be16 new_tp = bpf_htons(((__u16)ttl << 8) | IPPROTO_UDP);
	if (bpf_l3_csum_replace(skb, l3sum, p->ip_len, tot, 2) ||
	    bpf_l3_csum_replace(skb, l3sum, old_tp, new_tp, 2))
		return -1;
	if (bpf_skb_store_bytes(skb, L3_OFF + offsetof(struct iphdr, tot_len), &tot, 2, 0) ||
	    bpf_skb_store_bytes(skb, L3_OFF + offsetof(struct iphdr, ttl), &ttl, 1, 0))
		return -1;
	return 0;
}

// rewrite_udp sets the new ports and length of the UDP header; these are
// not in the pseudo header, so the helper leaves a CHECKSUM_PARTIAL sum
// alone (the device or the stack sums the header itself).
static __always_inline int rewrite_udp(struct __sk_buff *skb, const struct pkt *p,
				       const struct chan_val *v, __u16 new_ulen)
{
	__be16 ulen = bpf_htons(new_ulen);
	const __u64 l4 = BPF_F_MARK_MANGLED_0 | 2;
	__u32 at = p->l4;

	if (bpf_l4_csum_replace(skb, csum_off(p), p->udp.source, v->sport, l4) ||
	    bpf_l4_csum_replace(skb, csum_off(p), p->udp.dest, v->dport, l4) ||
	    bpf_l4_csum_replace(skb, csum_off(p), p->udp.len, ulen, l4))
		return -1;
	if (bpf_skb_store_bytes(skb, at + offsetof(struct udphdr, source), &v->sport, 2, 0) ||
	    bpf_skb_store_bytes(skb, at + offsetof(struct udphdr, dest), &v->dport, 2, 0) ||
	    bpf_skb_store_bytes(skb, at + offsetof(struct udphdr, len), &ulen, 2, 0))
		return -1;
	return 0;
}

// chunk_len is min(left, CHUNK) in a form the verifier can bound: the
// empty asm stops clang from folding the range checks into a wider
// register the verifier cannot follow; 0 means a bug, not a length.
static __always_inline __u64 chunk_len(__u32 left)
{
	__u64 len = left;
	if (len > CHUNK)
		len = CHUNK;
	asm volatile("" : "+r"(len));
	if (len < 1 || len > CHUNK)
		return 0;
	return len;
}

// move_data copies the n data bytes between data_off+CHDR_LEN (where they
// sit behind a ChannelData header) and data_off (right behind the UDP
// header): down when the header goes, up when it comes. Down copies front
// to back and up back to front, so every chunk is read before its bytes
// are overwritten. The IP and UDP headers stay where they are: moving them
// instead (as bpf_skb_adjust_room does) would leave a CHECKSUM_PARTIAL
// skb's csum_start pointing 4 bytes off, and a device would then write the
// checksum into the payload.
static __always_inline int move_data(struct __sk_buff *skb, const struct pkt *p, __u32 n, bool up)
{
	__u32 from = up ? data_off(p) : data_off(p) + CHDR_LEN;
	__u32 to = up ? data_off(p) + CHDR_LEN : data_off(p);
	__u8 buf[CHUNK];
	for (__u32 i = 0; i < MAX_CHUNKS; i++) {
		__u32 done = i * CHUNK;
		if (done >= n)
			break;
		__u64 len = chunk_len(n - done);
		if (!len)
			return -1;
		__u32 at = up ? n - done - len : done;
		if (bpf_skb_load_bytes(skb, from + at, buf, len) ||
		    bpf_skb_store_bytes(skb, to + at, buf, len, 0))
			return -1;
	}
	return 0;
}

static __always_inline void count(const struct chan_key *k, __u32 bytes)
{
	struct chan_ctr *c = bpf_map_lookup_elem(&relay_ctrs, k);
	if (c) {
		c->pkts += 1;
		c->bytes += bytes;
	}
}

// drop ends a packet that failed after it was modified: handing userspace
// a half-rewritten datagram would be worse than losing it.
static __always_inline int drop(void)
{
	stat(ABORTED);
	return TC_ACT_SHOT;
}

// deliver finishes a rewrite whose data is in place: the UDP and IP
// headers, the counter, and the way out that route() chose.
static __always_inline int deliver(struct __sk_buff *skb, const struct chan_key *k,
				   const struct chan_val *v, const struct pkt *p, __u16 new_ulen,
				   __u32 n, int how, __u32 ifindex)
{
	if (rewrite_udp(skb, p, v, new_ulen) || rewrite_ip(skb, p, new_ulen) ||
	    rewrite_addrs(skb, p, v))
		return drop();
	count(k, n);
	if (how == GO_LOCAL)
		return TC_ACT_OK;
	return bpf_redirect_neigh(ifindex, NULL, 0, 0);
}

// to_peer: RFC 8656 §12.5, a ChannelData message from the client is
// relayed to the peer as a UDP datagram carrying only the application
// data, from the relayed transport address.
static __always_inline int to_peer(struct __sk_buff *skb, const struct chan_key *k,
				   const struct chan_val *v, const struct pkt *p, __u32 chdr,
				   __u16 payload)
{
	__u16 n = bpf_ntohl(chdr) & 0xffff;
	// RFC 8656 §12.4: a Length larger than the datagram holds is
	// malformed; §12.5: over UDP up to 3 bytes of padding may follow.
	if (n > MAX_DATA || (__u32)n + CHDR_LEN > payload || payload - CHDR_LEN - n > 3)
		return NOT_OURS;
	__u16 new_ulen = UDP_HLEN + n;

	__u32 ifindex = 0;
	int how = route(skb, p, v, new_ulen, &ifindex);
	if (!how)
		return NOT_OURS;

	// The padding's share of the UDP checksum, read while it is still
	// there: the 16-bit words from the even offset that holds the last
	// data byte when n is odd, up to the end of the datagram.
	__u32 pad_from = data_off(p) + CHDR_LEN + (n & ~1);
	__u64 pad_len = data_off(p) + payload - pad_from;
	__be32 tail_old = 0, tail_new = 0;
	asm volatile("" : "+r"(pad_len));
	if (pad_len > 4)
		return NOT_OURS;
	if (pad_len > 0) {
		if (bpf_skb_load_bytes(skb, pad_from, &tail_old, pad_len)) {
			stat(PASS_HELPER);
			return NOT_OURS;
		}
		if (n & 1)
			*(__u8 *)&tail_new = *(__u8 *)&tail_old;
	}

	// From here on the packet is ours (see drop).
	__be32 zero = 0;
	if (bpf_l4_csum_replace(skb, csum_off(p), chdr, zero, BPF_F_MARK_MANGLED_0 | 4) ||
	    bpf_l4_csum_replace(skb, csum_off(p), tail_old, tail_new, BPF_F_MARK_MANGLED_0 | 4))
		return drop();
	if (move_data(skb, p, n, false))
		return drop();
	if (bpf_skb_change_tail(skb, p->l4 + new_ulen, 0))
		return drop();
	return deliver(skb, k, v, p, new_ulen, n, how, ifindex);
}

// to_client: RFC 8656 §12.5, a datagram from the peer to the relayed
// address is sent to the client as a ChannelData message. Over UDP the
// padding is optional and this program sends none: the datagram ends
// with the data, as Length says.
static __always_inline int to_client(struct __sk_buff *skb, const struct chan_key *k,
				     const struct chan_val *v, const struct pkt *p, __u16 payload)
{
	__u16 n = payload;
	if (n > MAX_DATA)
		return NOT_OURS;
	__u16 new_ulen = UDP_HLEN + CHDR_LEN + n;

	__u32 ifindex = 0;
	int how = route(skb, p, v, new_ulen, &ifindex);
	if (!how)
		return NOT_OURS;

	__be32 chdr = bpf_htonl(((__u32)v->chan << 16) | n);
	__be32 zero = 0;
	if (bpf_skb_change_tail(skb, p->l4 + new_ulen, 0))
		return drop();
	if (move_data(skb, p, n, true))
		return drop();
	if (bpf_skb_store_bytes(skb, data_off(p), &chdr, CHDR_LEN, 0) ||
	    bpf_l4_csum_replace(skb, csum_off(p), zero, chdr, BPF_F_MARK_MANGLED_0 | 4))
		return drop();
	return deliver(skb, k, v, p, new_ulen, n, how, ifindex);
}

// parse4 reads an IPv4 header: no options, no fragments (the first one's
// UDP length would not match), UDP.
static __always_inline int parse4(struct __sk_buff *skb, struct pkt *p)
{
	struct iphdr ip;
	if (bpf_skb_load_bytes(skb, L3_OFF, &ip, sizeof(ip)))
		return -1;
	if (ip.version != 4 || ip.ihl != 5 || ip.protocol != IPPROTO_UDP)
		return -1;
	if (ip.frag_off & bpf_htons(0x3fff))
		return -1;
	__u16 ulen = bpf_ntohs(ip.tot_len);
	if (ulen < sizeof(struct iphdr))
		return -1;
	p->v6 = false;
	p->l4 = L4_OFF4;
	p->ttl = ip.ttl;
	p->ip_len = ip.tot_len;
	p->saddr[0] = ip.saddr;
	p->daddr[0] = ip.daddr;
	return ulen - sizeof(struct iphdr);
}

// parse6 reads an IPv6 header whose next header is UDP: extension headers
// (fragments among them) go to userspace.
static __always_inline int parse6(struct __sk_buff *skb, struct pkt *p)
{
	struct ipv6hdr ip;
	if (bpf_skb_load_bytes(skb, L3_OFF, &ip, sizeof(ip)))
		return -1;
	if (ip.version != 6 || ip.nexthdr != IPPROTO_UDP)
		return -1;
	p->v6 = true;
	p->l4 = L4_OFF6;
	p->ttl = ip.hop_limit;
	p->ip_len = ip.payload_len;
	__builtin_memcpy(p->saddr, &ip.saddr, 16);
	__builtin_memcpy(p->daddr, &ip.daddr, 16);
	return bpf_ntohs(ip.payload_len);
}

SEC("tc")
int stund_relay(struct __sk_buff *skb)
{
	// A GSO or GRO super-packet holds many datagrams; userspace splits
	// them.
	if (skb->gso_size || skb->gso_segs > 1)
		return NOT_OURS;

	struct pkt p = {};
	int l3_payload;
	if (skb->protocol == bpf_htons(ETH_P_IP))
		l3_payload = parse4(skb, &p);
	else if (skb->protocol == bpf_htons(ETH_P_IPV6))
		l3_payload = parse6(skb, &p);
	else
		return NOT_OURS;
	if (l3_payload < 0)
		return NOT_OURS;
	// RFC 8656 §14: a TTL that would reach 0 is not relayed here;
	// userspace decides what to do with it.
	if (p.ttl <= 1)
		return NOT_OURS;
	if (bpf_skb_load_bytes(skb, p.l4, &p.udp, sizeof(p.udp)))
		return NOT_OURS;
	__u16 ulen = bpf_ntohs(p.udp.len);
	if (ulen != l3_payload || ulen < UDP_HLEN)
		return NOT_OURS;
	// IPv6 has no "no checksum"; a zero one is the receiver's to reject.
	if (p.v6 && p.udp.check == 0)
		return NOT_OURS;
	// Ethernet pads frames shorter than 60 bytes, so the skb may be longer
	// than the IP packet; the rewrite sets the exact new length
	// (bpf_skb_change_tail), which cuts that padding as ip_rcv would.
	if (skb->len < p.l4 + ulen)
		return NOT_OURS;
	__u16 payload = ulen - UDP_HLEN;

	struct chan_key k = {
		.sport = p.udp.source,
		.dport = p.udp.dest,
	};
	__builtin_memcpy(k.saddr, p.saddr, 16);
	__builtin_memcpy(k.daddr, p.daddr, 16);

	// RFC 8656 §12.4: a ChannelData message starts with the bits 01 and
	// a channel number in 0x4000-0x4FFF.
	if (payload >= CHDR_LEN) {
		__be32 chdr;
		if (bpf_skb_load_bytes(skb, data_off(&p), &chdr, CHDR_LEN))
			return NOT_OURS;
		__u16 chan = bpf_ntohl(chdr) >> 16;
		if (chan >= CHAN_MIN && chan <= CHAN_MAX) {
			k.chan = chan;
			struct chan_val *v = bpf_map_lookup_elem(&relay_chans, &k);
			if (v && v->dir == DIR_TO_PEER) {
				struct chan_val val = *v;
				return to_peer(skb, &k, &val, &p, chdr, payload);
			}
			k.chan = 0;
		}
	}
	struct chan_val *v = bpf_map_lookup_elem(&relay_chans, &k);
	if (v && v->dir == DIR_TO_CLIENT) {
		struct chan_val val = *v;
		return to_client(skb, &k, &val, &p, payload);
	}
	return NOT_OURS;
}
