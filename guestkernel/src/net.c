/* rayguest: virtio-net driver and a tiny IPv4 stack: ARP (request, reply,
 * small cache), ICMP echo (reply, and request for ping), UDP echo on port 7,
 * 802.1Q tagging per address. Jobs: serve, ping:ADDR[+ADDR...][,count=N]. */
#include "virtio.h"

#define VIRTIO_NET_F_MAC	(1ULL << 5)
#define VIRTIO_NET_F_STATUS	(1ULL << 16)

#define NET_HDR		12	/* virtio_net_hdr_v1 (VERSION_1) */
#define BUF_SIZE	2048
#define RX_MAX		32
#define TX_MAX		16

#define ETH_ARP		0x0806
#define ETH_IPV4	0x0800
#define ETH_VLAN	0x8100

#define MAX_ADDRS	8
#define ARP_ENTRIES	8
#define ARP_TRIES	3
#define ARP_WAIT_US	300000
#define PING_WAIT_US	1000000
#define PING_ID		0x7267
#define PING_PAYLOAD	56

static struct vdev nic;
static struct vq rxq, txq;
static u8 mac[6];
static u8 rx_bufs[RX_MAX][BUF_SIZE] ALIGNED(4096);
static u8 tx_bufs[TX_MAX][BUF_SIZE] ALIGNED(4096);
static u8 tx_busy[TX_MAX];

struct ifaddr {
	u32 ip, mask;
	u32 prefix;
	u16 vlan;	/* 0 = untagged */
};
static struct ifaddr addrs[MAX_ADDRS];
static u32 naddrs;
static u32 gateway;

static struct arp_entry {
	u32 ip;
	u16 vlan;
	u8 valid;
	u8 mac[6];
} arp_cache[ARP_ENTRIES];
static u32 arp_next;

static struct {
	u32 dst;
	u16 seq;
	volatile int done;
	u64 t_recv;
} ping;

static const u8 bcast[6] = { 0xff, 0xff, 0xff, 0xff, 0xff, 0xff };

/* ---- helpers ---- */

static void print_ip(u32 ip)
{
	kprintf("%u.%u.%u.%u", ip >> 24, (ip >> 16) & 0xff, (ip >> 8) & 0xff, ip & 0xff);
}

/* csum_add adds the Internet checksum of p (big-endian 16-bit words) to
 * sum. It sums little-endian 32-bit words and byte-swaps the folded result
 * (RFC 1071: the one's complement sum is byte-order independent), a quarter
 * of the iterations of a 16-bit loop. Only the last piece may be odd. */
static u32 csum_add(u32 sum, const u8 *p, u32 len)
{
	u64 acc = 0;
	for (; len >= 8; p += 8, len -= 8)
		acc += (u64)le32(p) + le32(p + 4);
	for (; len >= 2; p += 2, len -= 2)
		acc += le16(p);
	if (len)
		acc += p[0];
	while (acc >> 16)
		acc = (acc & 0xffff) + (acc >> 16);
	return sum + (u32)(((acc >> 8) | (acc << 8)) & 0xffff);
}

static u16 csum_fold(u32 sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (u16)~sum;
}

static struct ifaddr *addr_is_ours(u32 ip, u16 vlan)
{
	for (u32 i = 0; i < naddrs; i++)
		if (addrs[i].ip == ip && addrs[i].vlan == vlan)
			return &addrs[i];
	return NULL;
}

static struct ifaddr *addr_on_link(u32 ip)
{
	for (u32 i = 0; i < naddrs; i++)
		if ((ip & addrs[i].mask) == (addrs[i].ip & addrs[i].mask))
			return &addrs[i];
	return NULL;
}

static struct arp_entry *arp_find(u32 ip, u16 vlan)
{
	for (u32 i = 0; i < ARP_ENTRIES; i++)
		if (arp_cache[i].valid && arp_cache[i].ip == ip && arp_cache[i].vlan == vlan)
			return &arp_cache[i];
	return NULL;
}

static void arp_learn(u32 ip, u16 vlan, const u8 *hw)
{
	struct arp_entry *e = arp_find(ip, vlan);
	if (!e) {
		e = &arp_cache[arp_next++ % ARP_ENTRIES];
		e->ip = ip;
		e->vlan = vlan;
		e->valid = 1;
	}
	memcpy(e->mac, hw, 6);
}

/* ---- transmit ---- */

static void tx_reclaim(void)
{
	u32 id, len;
	while (vq_pop(&txq, &id, &len))
		if (id < TX_MAX)
			tx_busy[id] = 0;
}

static int tx_free_slot(void)
{
	for (u32 i = 0; i < txq.size; i++)
		if (!tx_busy[i])
			return (int)i;
	return -1;
}

static int tx_has_slot(void *arg)
{
	(void)arg;
	return tx_free_slot() >= 0;
}

/* tx_begin takes a free transmit buffer and writes the Ethernet header
 * (802.1Q-tagged when vlan != 0); returns the slot and the payload start. */
static int tx_begin(const u8 *dst, u16 vlan, u16 type, u8 **payload)
{
	tx_reclaim();
	int slot = tx_free_slot();
	if (slot < 0) {
		wait_for(tx_has_slot, NULL, 100000, tx_reclaim);
		if ((slot = tx_free_slot()) < 0)
			return -1;	/* device stuck: drop */
	}
	tx_busy[slot] = 1;
	u8 *b = tx_bufs[slot];
	memset(b, 0, NET_HDR);
	u8 *f = b + NET_HDR;
	memcpy(f, dst, 6);
	memcpy(f + 6, mac, 6);
	if (vlan) {
		put16(f + 12, ETH_VLAN);
		put16(f + 14, vlan);
		put16(f + 16, type);
		*payload = f + 18;
	} else {
		put16(f + 12, type);
		*payload = f + 14;
	}
	return slot;
}

static void tx_send(int slot, u8 *end)
{
	u8 *b = tx_bufs[slot];
	u32 len = (u32)(end - b);
	if (len < NET_HDR + 60) {	/* pad to the Ethernet minimum */
		memset(end, 0, NET_HDR + 60 - len);
		len = NET_HDR + 60;
	}
	volatile struct vring_desc *d = &txq.desc[slot];
	d->addr = (u64)b;
	d->len = len;
	d->flags = 0;
	d->next = 0;
	vq_push(&txq, (u16)slot);
	vq_kick(&txq);
}

static void arp_send(u16 op, const u8 *dst_hw, u16 vlan, u32 sip, const u8 *tha, u32 tip)
{
	u8 *a;
	int slot = tx_begin(dst_hw, vlan, ETH_ARP, &a);
	if (slot < 0)
		return;
	put16(a, 1);		/* Ethernet */
	put16(a + 2, ETH_IPV4);
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, op);
	memcpy(a + 8, mac, 6);
	put32(a + 14, sip);
	memcpy(a + 18, tha, 6);
	put32(a + 24, tip);
	tx_send(slot, a + 28);
}

static u16 ip_id;

/* ip_begin writes Ethernet and IPv4 headers for a payload of plen bytes;
 * returns the slot, *payload points after the IP header. */
static int ip_begin(const u8 *dst_hw, u16 vlan, u32 src, u32 dst, u8 proto, u32 plen,
		    u8 **payload)
{
	u8 *p;
	int slot = tx_begin(dst_hw, vlan, ETH_IPV4, &p);
	if (slot < 0)
		return -1;
	p[0] = 0x45;
	p[1] = 0;
	put16(p + 2, (u16)(20 + plen));
	put16(p + 4, ip_id++);
	put16(p + 6, 0x4000);	/* DF */
	p[8] = 64;
	p[9] = proto;
	put16(p + 10, 0);
	put32(p + 12, src);
	put32(p + 16, dst);
	put16(p + 10, csum_fold(csum_add(0, p, 20)));
	*payload = p + 20;
	return slot;
}

/* ---- receive ---- */

static void arp_input(const u8 *a, u32 len, u16 vlan)
{
	if (len < 28 || get16(a) != 1 || get16(a + 2) != ETH_IPV4 || a[4] != 6 || a[5] != 4)
		return;
	u16 op = get16(a + 6);
	u32 spa = get32(a + 14), tpa = get32(a + 24);
	struct ifaddr *ia = addr_is_ours(tpa, vlan);
	if (spa && (ia || arp_find(spa, vlan)))
		arp_learn(spa, vlan, a + 8);
	if (op == 1 && ia)
		arp_send(2, a + 8, vlan, tpa, a + 8, spa);
}

static void icmp_input(const u8 *eth_src, u16 vlan, u32 src, u32 dst, const u8 *m, u32 len)
{
	if (len < 8 || csum_fold(csum_add(0, m, len)) != 0)
		return;
	if (m[0] == 8 && m[1] == 0) {	/* echo request -> reply */
		u8 *r;
		int slot = ip_begin(eth_src, vlan, dst, src, 1, len, &r);
		if (slot < 0)
			return;
		memcpy(r, m, len);
		r[0] = 0;
		u32 s = (u32)get16(r + 2) + 0x0800;	/* type 8 -> 0 (RFC 1624) */
		put16(r + 2, (u16)((s & 0xffff) + (s >> 16)));
		tx_send(slot, r + len);
	} else if (m[0] == 0 && m[1] == 0 && src == ping.dst && get16(m + 4) == PING_ID &&
		   get16(m + 6) == ping.seq && !ping.done) {
		ping.t_recv = rdtsc();
		ping.done = 1;
	}
}

/* udp_csum: the UDP checksum over the pseudo-header and the datagram. */
static u16 udp_csum(u32 src, u32 dst, const u8 *u, u32 ulen)
{
	u8 ph[12];
	put32(ph, src);
	put32(ph + 4, dst);
	ph[8] = 0;
	ph[9] = 17;
	put16(ph + 10, (u16)ulen);
	return csum_fold(csum_add(csum_add(0, ph, 12), u, ulen));
}

static void udp_input(const u8 *eth_src, u16 vlan, u32 src, u32 dst, const u8 *u, u32 len)
{
	if (len < 8)
		return;
	u32 ulen = get16(u + 4);
	if (ulen < 8 || ulen > len)
		return;
	if (get16(u + 6) && udp_csum(src, dst, u, ulen) != 0)	/* present: verify */
		return;
	if (get16(u + 2) != 7)
		return;
	u8 *r;
	int slot = ip_begin(eth_src, vlan, dst, src, 17, ulen, &r);
	if (slot < 0)
		return;
	memcpy(r, u, ulen);
	put16(r, 7);
	put16(r + 2, get16(u));
	put16(r + 6, 0);
	u16 c = udp_csum(dst, src, r, ulen);
	put16(r + 6, c ? c : 0xffff);
	tx_send(slot, r + ulen);
}

static void ip_input(const u8 *eth_src, const u8 *p, u32 len, u16 vlan)
{
	if (len < 20 || (p[0] >> 4) != 4)
		return;
	u32 ihl = (p[0] & 0xfu) * 4, tot = get16(p + 2);
	if (ihl < 20 || tot < ihl || tot > len || csum_fold(csum_add(0, p, ihl)) != 0)
		return;
	if (get16(p + 6) & 0x3fff)	/* fragments are not reassembled */
		return;
	u32 src = get32(p + 12), dst = get32(p + 16);
	if (!addr_is_ours(dst, vlan))
		return;
	if (p[9] == 1)
		icmp_input(eth_src, vlan, src, dst, p + ihl, tot - ihl);
	else if (p[9] == 17)
		udp_input(eth_src, vlan, src, dst, p + ihl, tot - ihl);
}

static void frame_input(const u8 *f, u32 len)
{
	if (len < 14)
		return;
	if (!(f[0] & 1) && memcmp(f, mac, 6) != 0)
		return;
	u16 type = get16(f + 12), vlan = 0;
	u32 off = 14;
	if (type == ETH_VLAN) {
		if (len < 18)
			return;
		vlan = get16(f + 14) & 0xfff;
		type = get16(f + 16);
		off = 18;
	}
	if (type == ETH_ARP)
		arp_input(f + off, len - off, vlan);
	else if (type == ETH_IPV4)
		ip_input(f + 6, f + off, len - off, vlan);
}

/* net_poll handles every received frame, gives the buffers back, and
 * reclaims sent ones. */
static void net_poll(void)
{
	u32 id, len;
	int refill = 0;
	while (vq_pop(&rxq, &id, &len)) {
		if (id >= rxq.size)
			continue;
		if (len > NET_HDR && len <= BUF_SIZE)
			frame_input(rx_bufs[id] + NET_HDR, len - NET_HDR);
		vq_push(&rxq, (u16)id);
		refill = 1;
	}
	if (refill)
		vq_kick(&rxq);
	tx_reclaim();
}

/* ---- setup ---- */

static int parse_addrs(void)
{
	u64 vlan_all = 0;
	if (cfg.vlan) {
		const char *e = parse_u64(cfg.vlan, 10, &vlan_all);
		if (!e || *e || vlan_all > 4094) {
			kprintf("rayguest: bad rayguest.vlan=%s\n", cfg.vlan);
			return 0;
		}
	}
	if (cfg.gw && (!parse_ipv4(cfg.gw, &gateway, NULL) || cfg.gw[strlen(cfg.gw) - 1] == '.')) {
		kprintf("rayguest: bad rayguest.gw=%s\n", cfg.gw);
		return 0;
	}
	const char *p = cfg.ip;
	while (p && *p) {
		struct ifaddr a = { .vlan = (u16)vlan_all };
		u64 prefix, vlan;
		const char *e = NULL;
		if (naddrs == MAX_ADDRS || !parse_ipv4(p, &a.ip, &e) || *e != '/' ||
		    !(e = parse_u64(e + 1, 10, &prefix)) || prefix > 32)
			goto bad;
		a.prefix = (u32)prefix;
		a.mask = prefix ? ~0u << (32 - prefix) : 0;
		if (*e == '@') {
			if (!(e = parse_u64(e + 1, 10, &vlan)) || vlan > 4094)
				goto bad;
			a.vlan = (u16)vlan;
		}
		if (*e != ',' && *e != 0)
			goto bad;
		addrs[naddrs++] = a;
		p = *e ? e + 1 : e;
	}
	if (naddrs == 0) {
		kputs("rayguest: net no addresses (rayguest.ip=)\n");
		return 0;
	}
	return 1;
bad:
	kprintf("rayguest: bad rayguest.ip=%s\n", cfg.ip);
	return 0;
}

static const char *nic_init(void)
{
	const char *err = NULL;
	u32 i;
	for (i = 0; i < cfg.nvirtio; i++) {
		if (virtio_probe(&nic, &cfg.virtio[i], &err) == VIRTIO_ID_NET)
			break;
		if (err && nic.id == 0)
			kprintf("rayguest: virtio %lx: %s\n", cfg.virtio[i].base, err);
		err = NULL;
	}
	if (i == cfg.nvirtio)
		return "no virtio-net device";
	if ((err = virtio_start(&nic, VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS)) ||
	    (err = vq_setup(&nic, &rxq, 0, RX_MAX)) || (err = vq_setup(&nic, &txq, 1, TX_MAX))) {
		virtio_fail(&nic);
		return err;
	}
	if (nic.features & VIRTIO_NET_F_MAC) {
		for (u32 j = 0; j < 6; j++)
			mac[j] = virtio_config8(&nic, j);
	} else {
		static const u8 dflt[6] = { 0x52, 0x54, 0x00, 0x72, 0x67, 0x01 };
		memcpy(mac, dflt, 6);
	}
	for (u16 j = 0; j < rxq.size; j++) {
		rxq.desc[j].addr = (u64)rx_bufs[j];
		rxq.desc[j].len = BUF_SIZE;
		rxq.desc[j].flags = VRING_DESC_F_WRITE;
		rxq.desc[j].next = 0;
		vq_push(&rxq, j);
	}
	virtio_ready(&nic);
	vq_kick(&rxq);
	return NULL;
}

/* net_start parses the addresses and brings the NIC up; powers off with a
 * message when either fails. */
static void net_start(void)
{
	if (!parse_addrs())
		poweroff();
	const char *err = nic_init();
	if (err) {
		kprintf("rayguest: net FAIL %s\n", err);
		poweroff();
	}
	timer_calibrate();
}

static int never(void *arg)
{
	(void)arg;
	return 0;
}

NORETURN void job_serve(void)
{
	net_start();
	kputs("rayguest: serving ");
	for (u32 i = 0; i < naddrs; i++) {
		if (i)
			kputs(",");
		print_ip(addrs[i].ip);
		kprintf("/%u", addrs[i].prefix);
		if (addrs[i].vlan)
			kprintf("@%u", addrs[i].vlan);
	}
	kputs("\n");
	for (;;)
		wait_for(never, NULL, 0, net_poll);
}

struct resolve {
	u32 ip;
	u16 vlan;
};

static int arp_known(void *arg)
{
	struct resolve *r = arg;
	return arp_find(r->ip, r->vlan) != NULL;
}

static int ping_done(void *arg)
{
	(void)arg;
	return ping.done;
}

/* ping_once sends one echo request; returns the RTT in µs, or -1. */
static s64 ping_once(u32 dst, u16 seq)
{
	struct ifaddr *ia = addr_on_link(dst);
	u32 hop = dst;
	if (!ia && gateway) {
		ia = addr_on_link(gateway);
		hop = gateway;
	}
	if (!ia)
		return -1;	/* no route */
	struct resolve r = { hop, ia->vlan };
	for (int i = 0; i < ARP_TRIES && !arp_known(&r); i++) {
		static const u8 zero[6];
		arp_send(1, bcast, ia->vlan, ia->ip, zero, hop);
		wait_for(arp_known, &r, ARP_WAIT_US, net_poll);
	}
	struct arp_entry *e = arp_find(hop, ia->vlan);
	if (!e)
		return -1;
	u8 *m;
	int slot = ip_begin(e->mac, ia->vlan, ia->ip, dst, 1, 8 + PING_PAYLOAD, &m);
	if (slot < 0)
		return -1;
	m[0] = 8;
	m[1] = 0;
	put16(m + 2, 0);
	put16(m + 4, PING_ID);
	put16(m + 6, seq);
	for (u32 i = 0; i < PING_PAYLOAD; i++)
		m[8 + i] = (u8)i;
	put16(m + 2, csum_fold(csum_add(0, m, 8 + PING_PAYLOAD)));
	ping.dst = dst;
	ping.seq = seq;
	ping.done = 0;
	u64 t0 = rdtsc();
	tx_send(slot, m + 8 + PING_PAYLOAD);
	if (!wait_for(ping_done, NULL, PING_WAIT_US, net_poll))
		return -1;
	return (s64)((ping.t_recv - t0) * 1000 / tsc_khz);
}

NORETURN void job_ping(const char *spec)
{
	/* ADDR[+ADDR...][,count=N] */
	u32 targets[16], n = 0;
	u64 count = 3;
	const char *p = spec;
	for (;;) {
		if (n == ARRAY_LEN(targets) || !parse_ipv4(p, &targets[n], &p))
			goto bad;
		n++;
		if (*p == '+') {
			p++;
			continue;
		}
		break;
	}
	if (startswith(p, ",count=")) {
		if (!(p = parse_u64(p + 7, 10, &count)))
			goto bad;
	}
	if (*p)
		goto bad;
	net_start();
	for (u32 i = 0; i < n; i++) {
		for (u64 seq = 1; seq <= count; seq++) {
			s64 rtt = ping_once(targets[i], (u16)seq);
			kputs("rayguest: ping ");
			print_ip(targets[i]);
			if (rtt < 0)
				kputs(" FAIL\n");
			else
				kprintf(" ok rtt_us=%ld\n", rtt);
		}
	}
	poweroff();
bad:
	kprintf("rayguest: bad ping spec %s\n", spec);
	poweroff();
}
