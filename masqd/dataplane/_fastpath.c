/*
 * masqd.dataplane._fastpath: the native fast path. It forwards packets of
 * established TCP/UDP flows, pings, ESP pairs and PPTP calls' GRE between the
 * device fds without entering Python.
 *
 * The Python engine stays the only place where decisions are made. Once the
 * engine's own fast path has forwarded a packet of a flow, the data plane
 * teaches this cache the rewrite it did (new address, and port, ICMP identifier
 * or GRE key where one changes, the precomputed RFC 1624 checksum deltas, the
 * MTU to check, the output port and its Ethernet header). Every packet that
 * matches a cached flow under the same conditions as the engine's fast path
 * (IPv4 without options or fragments, a correct header checksum, TTL > 1, TCP without SYN/FIN/RST, length
 * within the MTU (a super-packet: its segments), a sane virtio-net header; GRE
 * with the headers the PPTP helper's fast path takes) is rewritten in place and
 * written out, its flow's counters and last-seen time updated; any other packet
 * goes to Python as it was read, before the next one of its queue is read, so
 * the order is kept. A super-packet (TSO/USO) is rewritten once, its IPv4
 * checksum computed afresh, its virtio-net header kept (offsets moved to the
 * output's framing): the kernel cuts it on the way out. It counts as one
 * packet for the firewall rules and as its segments on the interfaces, as the
 * engine counts it.
 *
 * Three ways to run it:
 * - reader threads (start_workers(n), what the data plane uses): thread q reads
 *   queue q of both devices (IFF_MULTI_QUEUE; the kernel keeps one flow on one
 *   queue, and tun's flow table sends a flow's replies to the queue its packets
 *   were written to) and forwards without the GIL. A packet for Python waits in
 *   its thread's buffer; the thread wakes the event loop (an eventfd whose
 *   reader is service()) and sleeps until the main thread has handed it to the
 *   port's miss handler and read what queued up behind it on that queue (up to
 *   SERVICE_BATCH packets, in order: a flood of misses costs one wake-up per
 *   batch, not per packet); then it reads on. Coalescing (set_coalesce) runs in
 *   the threads: under load, rounds of sleep and drain without going back to poll.
 * - on_readable(port): the event loop's reader callback for queue 0 of a port,
 *   in the main thread, calling the miss handler at once (coalescing likewise).
 * - drain(port, budget, now): for a Python loop with its own clock (tests).
 *
 * Reader threads and the engine's decisions (the invariant: no packet is
 * forwarded by an entry that was void when the packet was read):
 * - Python, and so the engine and the neighbour tables, run only in the main
 *   thread, with the GIL; the threads never touch a Python object (entries
 *   keep their token, a strong reference, for the main thread only).
 * - Each thread holds its own mutex while it reads and forwards. The main
 *   thread enters an *exclusive section* by raising excl_want and taking every
 *   thread's mutex (a thread looks at excl_want between packets and steps
 *   aside; one waiting in poll, in a coalescing pause or for Python holds none).
 *   Everything that changes the cache (add, clear) or may change the engine's
 *   decisions runs inside one: service() around the miss handlers; hold() ...
 *   release() around whatever Python does after Dataplane.sync_native (expiry,
 *   ops' changes: the data plane calls sync_native first and releases at the end
 *   of that loop iteration, or when the change is done; a read of the engine
 *   folds in a section of its own and holds nothing). take_sections() gives the
 *   sections' count and length: the time the threads stood still.
 * - Leaving the outermost section, the main thread compares the engine's
 *   epoch and each neighbour table's version with those the cache was taught
 *   under and empties the cache (through on_stale, which folds the counts
 *   first) if one moved, before any thread reads again; service() also looks
 *   before the misses and after each one, as on_readable does. At the same
 *   points, sessions the engine removed (engine.gone not empty) leave the cache
 *   one by one (on_gone calls forget with the keys taught for them), the other
 *   flows staying.
 * - The entries' counters are atomic (two threads may forward one flow when the
 *   kernel moves it between queues); sync/clear take them in a section.
 * - Hosts over their mapping rate (set_policer): the engine lists them, each with
 *   a budget (a token bucket) of flow-opening packets (unfragmented UDP, TCP SYN
 *   without ACK, ICMP echo request, from the LAN) for the full path. A miss that
 *   is such a packet of such a host, beyond its budget, is dropped where it was
 *   read and counted by host (take_policed), without waking Python: a flood of
 *   new flows from one host costs a read and a look, not an engine call in an
 *   exclusive section. The rows change in a section only (check_stale reads
 *   them again when engine.mute_serial moves); a bucket's tokens under a spin lock.
 * - A capture (set_capture): while it is active every packet goes to Python;
 *   the threads read a flag the main thread sets from the tap in every section
 *   and in poll_capture (the data plane calls it every 50 ms).
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define SLOT_BITS 16
#define NSLOTS (1u << SLOT_BITS)
#define MAX_ENTRIES (NSLOTS / 2)
#define VH 10
#define BUF_SIZE (VH + 14 + 65536)
#define TTL_DELTA 0xFEFF
#define ICMP 1
#define TCP 6
#define UDP 17
#define GRE 47
#define ESP 50
#define POLL_BATCH 512
#define BULK_QUIET 0.02 /* no coalescing this long after a super-packet */
#define MAXQ 16         /* queues (and reader threads) per device, at most */
#define W_BATCH 64      /* a reader thread looks for a waiting writer at least this often */
#define SERVICE_BATCH 64 /* packets service() reads after a thread's miss, from that thread's queue */
#define MAX_MUTED 64     /* hosts over their mapping rate held at once (masqd.engine.limits.MAX_MUTED) */

/* A LAN host over its mapping rate: its budget of flow-opening packets for Python. */
typedef struct {
    uint32_t ip;       /* as in the packet (network order) */
    double until;      /* the hold ends (the drain's clock) */
    double tokens, last, rate, burst;
    uint64_t drops;    /* since the last take_policed */
} mute_t;

typedef struct {
    uint64_t k0, k1;   /* key: the packet's bytes 12..24, direction and protocol */
    PyObject *token;   /* the engine's session (a strong reference) */
    double last;       /* last packet forwarded (the drain's clock) */
    uint64_t pkts, bytes; /* since the last sync (a super-packet is one packet, as the rules count) */
    uint64_t segs;     /* packets on the wire since the last sync (a super-packet: its segments) */
    int64_t dip, dl4;  /* checksum deltas: IPv4 header (with the TTL), TCP/UDP */
    uint32_t slot;
    uint32_t mtu;
    uint8_t dir;       /* 0: LAN -> WAN (rewrite the source), 1: WAN -> LAN (the destination) */
    uint8_t proto;
    uint8_t poff;      /* where the port (ICMP identifier, GRE key) goes in the packet; 0: nowhere */
    uint8_t addr[4];
    uint8_t port[2];
    uint8_t l2[14];
    uint8_t has_l2;
} entry_t;

typedef struct {
    int fd;            /* queue 0 */
    int fds[MAXQ];     /* every queue's fd (IFF_MULTI_QUEUE), fds[0] == fd */
    int nq;
    int vnet;          /* every read and write carries a virtio-net header */
    int tap;           /* frames carry an Ethernet header */
    uint8_t mac[6];
    uint64_t write_errors; /* (atomic) */
    PyObject *miss;    /* miss(frame bytes | errno int, now) -> packets passed on (0 or 1) */
} port_t;

struct FlowCache;

/* One reader thread: queue q of both devices (see "Reader threads" in the header comment). */
typedef struct {
    struct FlowCache *fc;
    int q;
    pthread_t th;
    int started;
    pthread_mutex_t mu; /* held while it reads and forwards; the main thread takes every one */
    uint8_t *buf;
    double last_super;
    int polling;        /* in poll(): nothing read and not forwarded yet (atomic) */
    /* a packet for Python, waiting in buf: set by the thread, served by the main thread */
    int pending;        /* futex word: 1 while it waits */
    int miss_port;
    ssize_t miss_len;   /* < 0: a read failed with errno miss_err */
    int miss_err;
    double miss_now;
    long miss_passed;   /* the main thread's answer */
} worker_t;

typedef struct FlowCache {
    PyObject_HEAD
    uint32_t *slots;   /* 0: empty, else entry index + 1 */
    entry_t *entries;
    uint32_t n;
    uint64_t full;     /* refused additions: the cache was full */
    port_t ports[2];
    uint8_t *buf;
    /* the state whose change voids cached decisions: engine.epoch, each L2 host's version */
    PyObject *watch[3];
    long seen[3];
    PyObject *on_stale; /* called (no arguments) when it changed: Python folds and clears */
    PyObject *on_gone;  /* called (no arguments) when engine.gone lists sessions: Python forgets them */
    double pause;      /* coalesce: seconds between rounds under load (0: off) */
    long min_busy;     /* a wake-up that passes on this many packets is "under load" */
    double hold;       /* and the rounds stop after this long */
    PyObject *on_traffic; /* called with the time after a wake-up that passed packets on (or NULL) */
    uint64_t passed;   /* packets passed on by on_readable, in all (natively or through Python) */
    uint64_t rounds;   /* coalescing rounds, since the last take_errors */
    uint64_t supers, super_segs; /* super-packets forwarded and their segments, since take_supers */
    PyObject *capture; /* while its "active" is true, every packet goes to Python (or NULL) */
    int bypass;        /* this wake-up: capture active (reader threads: read atomically) */
    double last_super; /* when a super-packet last went to Python (bulk TCP: no coalescing) */
    /* reader threads (start_workers): none while nw == 0 */
    worker_t *w;
    int nw;
    int efd;           /* eventfd: a thread has a packet for Python (or traffic to report) */
    int stop_efd;      /* eventfd: the threads stop */
    int stopping;
    int excl_want;     /* futex word: the main thread wants (or holds) every thread's mutex */
    int excl_depth;    /* main thread only: nesting of exclusive sections */
    int held;          /* hold() took one that release() gives back */
    double excl_t0;    /* when the outermost exclusive section began */
    /* exclusive sections since take_sections: how many, their time, the longest, those over 1 ms */
    uint64_t excl_n, excl_slow;
    double excl_total, excl_max;
    int traffic;       /* a thread passed packets on since the main thread last looked (atomic) */
    int want_traffic;  /* on_traffic is set: the threads report traffic (atomic) */
    int miss_q;        /* the queue of the packet the miss handler has now (its writes go there) */
    /* hosts over their mapping rate (set_policer): rows changed in an exclusive section only */
    mute_t mutes[MAX_MUTED];
    int nmutes;        /* (read by the threads atomically) */
    pthread_spinlock_t mlock; /* a row's tokens and drops */
    PyObject *on_mutes; /* () -> [(address bytes, until, rate, burst)] */
    long mute_seen;    /* engine.mute_serial when the rows were read */
} FlowCache;

/* the queue whose fds the calling thread writes to (0: the main thread) */
static __thread int cur_q;

static inline void make_key(const uint8_t *k12, int dir, int proto, uint64_t *k0, uint64_t *k1)
{
    uint32_t tail;
    memcpy(k0, k12, 8);
    memcpy(&tail, k12 + 8, 4);
    *k1 = (uint64_t)tail | ((uint64_t)(dir + 1) << 32) | ((uint64_t)proto << 40);
}

static inline uint32_t slot_of(uint64_t k0, uint64_t k1)
{
    uint64_t h = k0 * 0x9E3779B97F4A7C15ull ^ k1 * 0xC2B2AE3D27D4EB4Full;
    h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9ull;
    return (uint32_t)(h >> (64 - SLOT_BITS));
}

static inline entry_t *lookup(FlowCache *self, uint64_t k0, uint64_t k1)
{
    uint32_t i = slot_of(k0, k1);
    for (;;) {
        uint32_t v = self->slots[i];
        if (!v)
            return NULL;
        entry_t *e = &self->entries[v - 1];
        if (e->k0 == k0 && e->k1 == k1)
            return e;
        i = (i + 1) & (NSLOTS - 1);
    }
}

static inline int64_t fold2(int64_t c)
{
    c = (c & 0xFFFF) + (c >> 16);
    return (c & 0xFFFF) + (c >> 16);
}

static inline void put16(uint8_t *p, unsigned v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

/*
 * ESP and GRE (PPTP's enhanced GRE) of established pairs and calls, as the engine's helpers'
 * fast paths take them: ESP by its addresses and SPI (the packet's bytes 12..24); GRE only with
 * the headers those take (K and S set, A optional, version 1, PPP) and a payload length that
 * fits, by its addresses and key field (IP + 26). 1: *kp is the lookup key.
 */
static int vpn_key(const uint8_t *p, ssize_t n, uint8_t *key, const uint8_t **kp)
{
    if (p[9] == ESP) {
        *kp = p + 12;
        return 1;
    }
    static const uint8_t gre_s[4] = {0x30, 0x01, 0x88, 0x0b}, gre_sa[4] = {0x30, 0x81, 0x88, 0x0b};
    int hl = memcmp(p + 20, gre_s, 4) == 0 ? 32 : memcmp(p + 20, gre_sa, 4) == 0 ? 36 : 0;
    if (!hl || n < hl || ((p[24] << 8) | p[25]) > n - hl)
        return 0;
    memcpy(key, p + 12, 8);
    memcpy(key + 8, p + 26, 2);
    key[10] = key[11] = 0;
    *kp = key;
    return 1;
}

/* The size of the packets a super-packet (virtio-net gso_type) of protocol proto will be cut
 * into, as Engine.process_vnet checks it; -1: not one the fast path takes (Python decides). */
static long super_segment(const uint8_t *p, int proto, int gso, unsigned gsz)
{
    int t = gso & 0x7F; /* (without GSO_ECN) */
    if (t == 1) /* TCPv4 */
        return proto == TCP ? 20 + ((p[32] >> 4) << 2) + (long)gsz : -1;
    if (t == 3 || t == 5) /* UDP, UDP_L4 */
        return proto == UDP ? 20 + 8 + (long)gsz : -1;
    return -1;
}

/* The IPv4 header checksum (20 bytes) computed afresh. */
static void ip_checksum(uint8_t *p)
{
    uint32_t sum = 0;
    p[10] = p[11] = 0;
    for (int i = 0; i < 20; i += 2)
        sum += (uint32_t)((p[i] << 8) | p[i + 1]);
    sum = (sum & 0xFFFF) + (sum >> 16);
    sum = (sum & 0xFFFF) + (sum >> 16);
    put16(p + 10, ~sum & 0xFFFF);
}

/* 1: the packet was forwarded (or counted as a failed write); 0: Python must see it. */
static int forward(FlowCache *self, int in, uint8_t *buf, ssize_t r, double now)
{
    port_t *ip = &self->ports[in];
    int hl = ip->vnet ? VH : 0;
    int sh = ip->tap ? 14 : 0;
    int partial = 0, gso = 0;
    if (r < hl + sh + 40)
        return 0;
    if (hl) {
        gso = buf[1]; /* a super-packet: the kernel cuts it on the way out */
        partial = buf[0] & 1;
    }
    uint8_t *f = buf + hl;
    if (sh && (f[12] != 8 || f[13] != 0 || memcmp(f, ip->mac, 6) != 0))
        return 0;
    uint8_t *p = f + sh;
    ssize_t n = r - hl - sh;
    if (p[0] != 0x45 || (p[6] & 0x3F) || p[7] || p[8] <= 1)
        return 0;
    /* RFC 1812 5.2.2: a header with a wrong checksum goes to Python, which drops and counts it */
    uint32_t hs = 0;
    for (int i = 0; i < 20; i += 2)
        hs += (uint32_t)((p[i] << 8) | p[i + 1]);
    hs = (hs & 0xFFFF) + (hs >> 16);
    hs = (hs & 0xFFFF) + (hs >> 16);
    if (hs != 0xFFFF)
        return 0;
    ssize_t tl = (p[2] << 8) | p[3];
    if (sh && tl >= 20 && tl < n)
        n = tl; /* a short frame's padding */
    if (tl != n || n < 40)
        return 0;
    int proto = p[9];
    uint8_t key[12];
    const uint8_t *kp = p + 12;
    int o; /* the TCP/UDP/ICMP checksum field */
    if (proto == TCP) {
        if (p[33] & 7)
            return 0;
        o = 36;
    } else if (proto == UDP) {
        o = 26;
    } else if (proto == ICMP) {
        /* echo or timestamp request out, their reply in; the identifier is the port */
        uint8_t t = p[20];
        if (partial || (in == 0 ? (t != 8 && t != 13) : (t != 0 && t != 14)))
            return 0;
        memcpy(key, p + 12, 8);
        memset(key + 8, 0, 4);
        memcpy(key + (in == 0 ? 8 : 10), p + 24, 2);
        kp = key;
        o = 22;
    } else if (proto == ESP || proto == GRE) {
        if (partial || !vpn_key(p, n, key, &kp))
            return 0;
        o = 0;
    } else {
        return 0;
    }
    if (partial) {
        unsigned cstart = buf[6] | (buf[7] << 8), coff = buf[8] | (buf[9] << 8);
        if (cstart != (unsigned)(sh + 20) || coff != (unsigned)(o - 20))
            return 0;
    }
    long seg = gso ? super_segment(p, proto, gso, buf[4] | (buf[5] << 8)) : 0;
    if (seg < 0)
        return 0;
    uint64_t k0, k1;
    make_key(kp, in, proto, &k0, &k1);
    entry_t *e = lookup(self, k0, k1);
    if (e == NULL || (uint64_t)(seg ? seg : n) > e->mtu)
        return 0;
    port_t *op = &self->ports[e->dir ? 0 : 1];
    if ((op->tap && !e->has_l2) || (partial && !op->vnet))
        return 0;

    /* the field of a partial checksum holds the pseudo-header sum (addresses only, not inverted) */
    int64_t u = 0;
    if (partial) {
        u = ((p[o] << 8) | p[o + 1]) + e->dip - TTL_DELTA;
        u = (u & 0xFFFF) + (u >> 16);
        u = (u & 0xFFFF) + (u >> 16);
        if (u < 0 || u > 0xFFFF)
            return 0; /* Python decides what such a packet is */
    }
    p[8] -= 1;
    int64_t c = fold2((((p[10] << 8) | p[11]) ^ 0xFFFF) + e->dip);
    put16(p + 10, (unsigned)(c ^ 0xFFFF));
    memcpy(p + (e->dir == 0 ? 12 : 16), e->addr, 4);
    if (e->poff)
        memcpy(p + e->poff, e->port, 2);
    if (!o) {
        /* ESP, GRE: no transport checksum covers what changed */
    } else if (partial) {
        put16(p + o, (unsigned)u);
    } else if (proto == UDP) {
        u = (p[26] << 8) | p[27];
        if (u) {
            u = fold2((u ^ 0xFFFF) + e->dl4) ^ 0xFFFF;
            put16(p + 26, (unsigned)(u ? u : 0xFFFF));
        }
    } else { /* TCP, ICMP */
        u = fold2((((p[o] << 8) | p[o + 1]) ^ 0xFFFF) + e->dl4);
        put16(p + o, (unsigned)(u ^ 0xFFFF));
    }
    uint64_t nseg = 1;
    if (seg) { /* the kernel reads a super-packet's IPv4 header as it is: a full checksum */
        ip_checksum(p);
        unsigned gsz = buf[4] | (buf[5] << 8);
        nseg = gsz ? (uint64_t)(n - (seg - gsz) + gsz - 1) / gsz : 1;
        __atomic_fetch_add(&self->supers, 1, __ATOMIC_RELAXED);
        __atomic_fetch_add(&self->super_segs, nseg, __ATOMIC_RELAXED);
    }

    uint8_t vh[VH];
    if (op->vnet) {
        if (partial || gso) { /* the header as read, its offsets moved to the output's framing */
            int d = (op->tap ? 14 : 0) - sh;
            memcpy(vh, buf, VH);
            if (partial) {
                unsigned cs = 20 + (op->tap ? 14 : 0);
                vh[6] = (uint8_t)cs;
                vh[7] = (uint8_t)(cs >> 8);
            }
            if (gso) {
                int hlen = (buf[2] | (buf[3] << 8)) + d;
                if (hlen < 0)
                    hlen = 0;
                vh[2] = (uint8_t)hlen;
                vh[3] = (uint8_t)(hlen >> 8);
            }
        } else {
            memset(vh, 0, VH);
        }
    }
    /* The output's headers (virtio-net, Ethernet) go in front of the packet, in the read buffer,
     * when there is room (the input's were as long or longer: TAP to TAP, TUN to TUN, TAP to TUN): one write
     * of one contiguous buffer. Otherwise (TUN to TAP) a writev of the pieces. The buffer is the
     * packet's own from here on (this packet no longer goes to Python). */
    ptrdiff_t head = (op->vnet ? VH : 0) + (op->tap ? 14 : 0);
    int wfd = op->fds[cur_q % op->nq];
    ssize_t wrote;
    if (p - buf >= head) {
        uint8_t *w = p - head;
        if (op->vnet)
            memcpy(w, vh, VH);
        if (op->tap)
            memcpy(w + (op->vnet ? VH : 0), e->l2, 14);
        wrote = write(wfd, w, (size_t)(head + n));
    } else {
        struct iovec iov[3];
        int k = 0;
        if (op->vnet) {
            iov[k].iov_base = vh;
            iov[k++].iov_len = VH;
        }
        if (op->tap) {
            iov[k].iov_base = e->l2;
            iov[k++].iov_len = 14;
        }
        iov[k].iov_base = p;
        iov[k++].iov_len = (size_t)n;
        wrote = writev(wfd, iov, k);
    }
    if (wrote < 0)
        __atomic_fetch_add(&op->write_errors, 1, __ATOMIC_RELAXED);
    /* (two reader threads may forward packets of one flow: the kernel moved it between queues) */
    __atomic_fetch_add(&e->pkts, 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&e->segs, nseg, __ATOMIC_RELAXED);
    __atomic_fetch_add(&e->bytes, (uint64_t)n, __ATOMIC_RELAXED);
    __atomic_store(&e->last, &now, __ATOMIC_RELAXED);
    return 1;
}

static double monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* 1: a frame read on port `in` is a flow-opening packet of a LAN host over its mapping rate and
 * beyond its budget: drop it (counted). The same reading and arithmetic as
 * masqd.engine.limits.opener_src and Bucket.take. */
static int police(FlowCache *self, int in, const uint8_t *buf, ssize_t r, double now)
{
    if (in != 0 || __atomic_load_n(&self->nmutes, __ATOMIC_ACQUIRE) == 0)
        return 0;
    port_t *pt = &self->ports[0];
    int hl = pt->vnet ? VH : 0, sh = pt->tap ? 14 : 0;
    if (r < hl + sh + 20)
        return 0;
    const uint8_t *f = buf + hl;
    if (sh && (f[12] != 8 || f[13] != 0 || memcmp(f, pt->mac, 6) != 0))
        return 0; /* (a frame for another host is the L2 host's to drop) */
    const uint8_t *p = f + sh;
    ssize_t n = r - hl - sh;
    int ihl = (p[0] & 15) << 2;
    if ((p[0] >> 4) != 4 || (p[6] & 0x3F) || p[7] || ihl < 20)
        return 0;
    int proto = p[9];
    if (proto == TCP) {
        if (n < ihl + 14 || (p[ihl + 13] & 0x12) != 0x02)
            return 0;
    } else if (proto == ICMP) {
        if (n < ihl + 1 || p[ihl] != 8)
            return 0;
    } else if (proto != UDP) {
        return 0;
    }
    uint32_t src;
    memcpy(&src, p + 12, 4);
    int drop = 0;
    pthread_spin_lock(&self->mlock);
    for (int i = 0; i < self->nmutes; i++) {
        mute_t *m = &self->mutes[i];
        if (m->ip != src)
            continue;
        if (now < m->until) {
            double t = m->tokens;
            if (now > m->last) {
                t += (now - m->last) * m->rate;
                m->last = now;
            }
            if (t > m->burst)
                t = m->burst;
            if (t < 1.0) {
                m->tokens = t;
                m->drops++;
                drop = 1;
            } else {
                m->tokens = t - 1.0;
            }
        }
        break;
    }
    pthread_spin_unlock(&self->mlock);
    return drop;
}

/* Read the engine's hosts over their mapping rate again (main thread; threads excluded or none).
 * A host still listed keeps its tokens and drops. -1: a Python exception. */
static int load_mutes(FlowCache *self)
{
    PyObject *rows = PyObject_CallNoArgs(self->on_mutes);
    if (rows == NULL)
        return -1;
    PyObject *seq = PySequence_Fast(rows, "on_mutes() must return a sequence");
    Py_DECREF(rows);
    if (seq == NULL)
        return -1;
    mute_t next[MAX_MUTED];
    int k = 0;
    Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t j = 0; j < len && k < MAX_MUTED; j++) {
        const char *ip;
        Py_ssize_t iplen;
        double until, rate, burst;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, j), "y#ddd", &ip, &iplen, &until, &rate, &burst)) {
            Py_DECREF(seq);
            return -1;
        }
        if (iplen != 4)
            continue;
        mute_t *m = &next[k++];
        memcpy(&m->ip, ip, 4);
        m->until = until;
        m->rate = rate;
        m->burst = burst;
        m->tokens = burst;
        m->last = -1e18;
        m->drops = 0;
        for (int i = 0; i < self->nmutes; i++)
            if (self->mutes[i].ip == m->ip) {
                m->tokens = self->mutes[i].tokens;
                m->last = self->mutes[i].last;
                m->drops = self->mutes[i].drops;
                break;
            }
    }
    Py_DECREF(seq);
    /* drops of hosts no longer listed stay until take_policed: keep their rows with a hold over */
    for (int i = 0; i < self->nmutes && k < MAX_MUTED; i++) {
        if (!self->mutes[i].drops)
            continue;
        int listed = 0;
        for (int j = 0; j < k; j++)
            listed |= next[j].ip == self->mutes[i].ip;
        if (!listed) {
            next[k] = self->mutes[i];
            next[k++].until = -1e18;
        }
    }
    pthread_spin_lock(&self->mlock);
    memcpy(self->mutes, next, sizeof(mute_t) * (size_t)k);
    __atomic_store_n(&self->nmutes, k, __ATOMIC_RELEASE);
    pthread_spin_unlock(&self->mlock);
    return 0;
}

/* Empty the cache (through Python, which folds the counts) if the watched state moved. */
static int check_stale(FlowCache *self)
{
    int changed = 0;
    if (self->on_gone != NULL && self->watch[0] != NULL) { /* (even empty: the list must not grow) */
        /* sessions the engine removed: only their entries go (forget), the other flows stay */
        PyObject *g = PyObject_GetAttrString(self->watch[0], "gone");
        if (g == NULL)
            return -1;
        int any = PyList_Check(g) && PyList_GET_SIZE(g) > 0;
        Py_DECREF(g);
        if (any) {
            PyObject *r = PyObject_CallNoArgs(self->on_gone);
            if (r == NULL)
                return -1;
            Py_DECREF(r);
        }
    }
    for (int i = 0; i < 3; i++) {
        if (self->watch[i] == NULL)
            continue;
        PyObject *v = PyObject_GetAttrString(self->watch[i], i == 0 ? "epoch" : "version");
        if (v == NULL)
            return -1;
        long x = PyLong_AsLong(v);
        Py_DECREF(v);
        if (x == -1 && PyErr_Occurred())
            return -1;
        if (x != self->seen[i]) {
            self->seen[i] = x;
            changed = 1;
        }
    }
    if (changed && self->n && self->on_stale != NULL) {
        PyObject *r = PyObject_CallNoArgs(self->on_stale);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
    }
    if (self->on_mutes != NULL && self->watch[0] != NULL) {
        PyObject *v = PyObject_GetAttrString(self->watch[0], "mute_serial");
        if (v == NULL)
            return -1;
        long x = PyLong_AsLong(v);
        Py_DECREF(v);
        if (x == -1 && PyErr_Occurred())
            return -1;
        if (x != self->mute_seen) {
            self->mute_seen = x;
            if (load_mutes(self) < 0)
                return -1;
        }
    }
    return 0;
}

/* Hand a frame (or an errno) to Python; returns the packets it passed on, or -1 (exception set). */
static long call_miss(FlowCache *self, int i, PyObject *what, double now)
{
    if (what == NULL)
        return -1;
    PyObject *t = PyFloat_FromDouble(now);
    if (t == NULL) {
        Py_DECREF(what);
        return -1;
    }
    PyObject *r = PyObject_CallFunctionObjArgs(self->ports[i].miss, what, t, NULL);
    Py_DECREF(what);
    Py_DECREF(t);
    if (r == NULL)
        return -1;
    long n = PyLong_AsLong(r);
    Py_DECREF(r);
    if (n == -1 && PyErr_Occurred())
        return -1;
    return n;
}

/*
 * Read port i (its queue 0, or the queue whose fd is given) until EAGAIN (or `budget` reads):
 * cached flows are forwarded here, anything else
 * goes to the port's Python miss handler and the reads go on. Adds to *passed the packets
 * passed on; sets *super when a super-packet went to Python. -1: a Python exception.
 */
static int drain_fd(FlowCache *self, int i, int fd, long budget, double now, long *passed, int *super,
                    double *last_super)
{
    port_t *pt = &self->ports[i];
    for (long k = 0; k < budget; k++) {
        ssize_t r = read(fd, self->buf, BUF_SIZE);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            return call_miss(self, i, PyLong_FromLong(errno), now) < 0 ? -1 : 0;
        }
        if (pt->vnet && r > 1 && self->buf[1] != 0) { /* bulk TCP: no coalescing for a while */
            *super = 1;
            __atomic_store(last_super, &now, __ATOMIC_RELAXED); /* (read by the last_super getter) */
        }
        if (!self->bypass && forward(self, i, self->buf, r, now)) {
            (*passed)++;
            continue;
        }
        if (police(self, i, self->buf, r, now))
            continue;
        long n = call_miss(self, i, PyBytes_FromStringAndSize((const char *)self->buf, r), now);
        if (n < 0 || check_stale(self) < 0)
            return -1;
        *passed += n;
    }
    return 0;
}

static int drain_port(FlowCache *self, int i, long budget, double now, long *passed, int *super)
{
    return drain_fd(self, i, self->ports[i].fd, budget, now, passed, super, &self->last_super);
}

/* ------------------------------------------------------------------ reader threads */

static void futex_wait(int *addr, int val)
{
    syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
}

static void futex_wake(int *addr)
{
    syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* A reader thread takes its mutex, letting a main thread that wants every mutex in first. */
static void w_lock(worker_t *w)
{
    FlowCache *fc = w->fc;
    for (;;) {
        while (__atomic_load_n(&fc->excl_want, __ATOMIC_ACQUIRE))
            futex_wait(&fc->excl_want, 1);
        pthread_mutex_lock(&w->mu);
        if (!__atomic_load_n(&fc->excl_want, __ATOMIC_ACQUIRE))
            return;
        pthread_mutex_unlock(&w->mu);
    }
}

/* Main thread: from here until the matching excl_leave no reader thread reads or forwards. */
static void excl_enter(FlowCache *self)
{
    if (self->excl_depth++ > 0 || self->nw == 0)
        return;
    __atomic_store_n(&self->excl_want, 1, __ATOMIC_SEQ_CST);
    self->excl_t0 = monotonic_now(); /* from the moment the threads are asked to stop */
    for (int i = 0; i < self->nw; i++)
        pthread_mutex_lock(&self->w[i].mu);
}

/* Main thread: leave an exclusive section; the outermost one first empties the cache if the
 * engine's epoch or a neighbour table moved meanwhile (-1: a Python exception, the section is
 * left all the same). */
static int excl_leave(FlowCache *self)
{
    int rc = 0;
    if (self->excl_depth == 1 && self->nw > 0)
        rc = check_stale(self);
    if (--self->excl_depth > 0 || self->nw == 0)
        return rc;
    for (int i = 0; i < self->nw; i++)
        pthread_mutex_unlock(&self->w[i].mu);
    __atomic_store_n(&self->excl_want, 0, __ATOMIC_SEQ_CST);
    futex_wake(&self->excl_want);
    double took = monotonic_now() - self->excl_t0;
    self->excl_n++;
    self->excl_total += took;
    if (took > self->excl_max)
        self->excl_max = took;
    if (took > 1e-3)
        self->excl_slow++;
    return rc;
}

static void wake_main(FlowCache *fc)
{
    uint64_t one = 1;
    ssize_t r = write(fc->efd, &one, sizeof(one));
    (void)r;
}

/* A reader thread hands the packet in its buffer (or a read's errno) to the main thread and
 * waits for Python to have taken it; returns the packets Python passed on. */
static long w_miss(worker_t *w, int port, ssize_t len, int err, double now)
{
    FlowCache *fc = w->fc;
    w->miss_port = port;
    w->miss_len = len;
    w->miss_err = err;
    w->miss_now = now;
    w->miss_passed = 0;
    pthread_mutex_unlock(&w->mu);
    __atomic_store_n(&w->pending, 1, __ATOMIC_SEQ_CST);
    wake_main(fc);
    /* (stop_workers raises stopping before it clears every pending: either is seen) */
    while (__atomic_load_n(&w->pending, __ATOMIC_SEQ_CST) && !__atomic_load_n(&fc->stopping, __ATOMIC_SEQ_CST))
        futex_wait(&w->pending, 1);
    w_lock(w);
    return w->miss_passed;
}

/* drain_port for a reader thread: queue w->q of port i, its mutex held. */
static void w_drain(worker_t *w, int i, long budget, double now, long *passed, int *super)
{
    FlowCache *fc = w->fc;
    int fd = fc->ports[i].fds[w->q % fc->ports[i].nq];
    for (long k = 0; k < budget && !__atomic_load_n(&fc->stopping, __ATOMIC_RELAXED); k++) {
        ssize_t r = read(fd, w->buf, BUF_SIZE);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                w_miss(w, i, -1, errno, now);
            return;
        }
        if (fc->ports[i].vnet && r > 1 && w->buf[1] != 0) { /* bulk TCP: no coalescing for a while */
            *super = 1;
            __atomic_store(&w->last_super, &now, __ATOMIC_RELAXED);
        }
        if (!__atomic_load_n(&fc->bypass, __ATOMIC_RELAXED) && forward(fc, i, w->buf, r, now))
            (*passed)++;
        else if (!police(fc, i, w->buf, r, now))
            *passed += w_miss(w, i, r, 0, now);
        if ((k + 1) % W_BATCH == 0 && __atomic_load_n(&fc->excl_want, __ATOMIC_RELAXED)) {
            pthread_mutex_unlock(&w->mu); /* the main thread waits for it: let it in */
            w_lock(w);
        }
    }
}

/* A reader thread: wait for its queues, drain them; under load, rounds of sleep and drain
 * (dataplane.coalesce, as on_readable does) without going back to poll. */
static void *w_main(void *arg)
{
    worker_t *w = arg;
    FlowCache *fc = w->fc;
    cur_q = w->q;
    struct pollfd pf[3] = {
        {fc->ports[0].fds[w->q % fc->ports[0].nq], POLLIN, 0},
        {fc->ports[1].fds[w->q % fc->ports[1].nq], POLLIN, 0},
        {fc->stop_efd, POLLIN, 0},
    };
    /* a port with fewer queues than threads is read by the threads of its own queues only */
    if (w->q >= fc->ports[0].nq)
        pf[0].fd = -1;
    if (w->q >= fc->ports[1].nq)
        pf[1].fd = -1;
    while (!__atomic_load_n(&fc->stopping, __ATOMIC_RELAXED)) {
        __atomic_store_n(&w->polling, 1, __ATOMIC_SEQ_CST);
        int pr = poll(pf, 3, -1);
        __atomic_store_n(&w->polling, 0, __ATOMIC_SEQ_CST);
        if (pr < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        if (pf[2].revents)
            break;
        double now = monotonic_now(), end = 0;
        for (;;) {
            long n = 0;
            int super = 0;
            w_lock(w);
            for (int i = 0; i < 2; i++)
                if (pf[i].fd >= 0)
                    w_drain(w, i, POLL_BATCH, now, &n, &super);
            pthread_mutex_unlock(&w->mu);
            if (n) {
                __atomic_fetch_add(&fc->passed, (uint64_t)n, __ATOMIC_RELAXED);
                if (__atomic_load_n(&fc->want_traffic, __ATOMIC_RELAXED)
                    && __atomic_load_n(&fc->traffic, __ATOMIC_RELAXED) == 0
                    && __atomic_exchange_n(&fc->traffic, 1, __ATOMIC_ACQ_REL) == 0)
                    wake_main(fc); /* keep_warm wants to hear of it (set_traffic) */
            }
            double pause = fc->pause;
            if (!(pause > 0 && n >= fc->min_busy && !super && now - w->last_super > BULK_QUIET))
                break;
            if (end == 0)
                end = now + fc->hold;
            if (now >= end || __atomic_load_n(&fc->stopping, __ATOMIC_RELAXED))
                break; /* back to poll (a level-triggered look: data left brings it straight back) */
            struct timespec ts = {0, (long)(pause * 1e9)};
            nanosleep(&ts, NULL);
            __atomic_fetch_add(&fc->rounds, 1, __ATOMIC_RELAXED);
            now = monotonic_now();
        }
    }
    return NULL;
}

/* Whether every packet must go to Python now (a capture is active). -1: a Python exception. */
static int update_bypass(FlowCache *self)
{
    int b = 0;
    if (self->capture != NULL) {
        PyObject *a = PyObject_GetAttrString(self->capture, "active");
        if (a == NULL)
            return -1;
        b = PyObject_IsTrue(a);
        Py_DECREF(a);
        if (b < 0)
            return -1;
    }
    __atomic_store_n(&self->bypass, b, __ATOMIC_RELAXED);
    return 0;
}

static void stop_workers(FlowCache *self)
{
    if (self->nw == 0)
        return;
    /* a section still held: the threads must be able to take their mutexes to see the end */
    if (self->excl_depth > 0) {
        for (int i = 0; i < self->nw; i++)
            pthread_mutex_unlock(&self->w[i].mu);
        self->excl_depth = 0;
        self->held = 0;
    }
    __atomic_store_n(&self->stopping, 1, __ATOMIC_SEQ_CST);
    __atomic_store_n(&self->excl_want, 0, __ATOMIC_SEQ_CST);
    futex_wake(&self->excl_want);
    uint64_t one = 1;
    ssize_t r = write(self->stop_efd, &one, sizeof(one));
    (void)r;
    for (int i = 0; i < self->nw; i++) { /* a packet waiting for Python is dropped */
        __atomic_store_n(&self->w[i].pending, 0, __ATOMIC_SEQ_CST);
        futex_wake(&self->w[i].pending);
    }
    Py_BEGIN_ALLOW_THREADS
    for (int i = 0; i < self->nw; i++)
        if (self->w[i].started)
            pthread_join(self->w[i].th, NULL);
    Py_END_ALLOW_THREADS
    for (int i = 0; i < self->nw; i++) {
        pthread_mutex_destroy(&self->w[i].mu);
        PyMem_Free(self->w[i].buf);
    }
    PyMem_Free(self->w);
    self->w = NULL;
    self->nw = 0;
    close(self->efd);
    close(self->stop_efd);
    self->efd = self->stop_efd = -1;
    self->stopping = 0;
}

/* start_workers(n) -> eventfd: n reader threads, thread q reading queue q of both devices. */
static PyObject *FlowCache_start_workers(FlowCache *self, PyObject *arg)
{
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 1 || n > MAXQ || self->nw || self->ports[0].fd < 0 || self->ports[1].fd < 0
        || self->ports[0].miss == NULL || self->ports[1].miss == NULL) {
        PyErr_SetString(PyExc_ValueError, "start_workers(1..16): ports and miss handlers set, no threads yet");
        return NULL;
    }
    self->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    self->stop_efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    self->w = PyMem_Calloc((size_t)n, sizeof(worker_t));
    if (self->efd < 0 || self->stop_efd < 0 || self->w == NULL) {
        if (self->efd >= 0)
            close(self->efd);
        if (self->stop_efd >= 0)
            close(self->stop_efd);
        self->efd = self->stop_efd = -1;
        PyMem_Free(self->w);
        self->w = NULL;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (update_bypass(self) < 0 || check_stale(self) < 0) /* (the state the cache was taught under) */
        goto fail_early;
    for (long i = 0; i < n; i++) {
        worker_t *w = &self->w[i];
        w->fc = self;
        w->q = (int)i;
        pthread_mutex_init(&w->mu, NULL);
        w->buf = PyMem_Malloc(BUF_SIZE);
        self->nw = (int)i + 1;
        if (w->buf == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
    }
    for (long i = 0; i < n; i++) {
        int rc = pthread_create(&self->w[i].th, NULL, w_main, &self->w[i]);
        if (rc) {
            errno = rc;
            PyErr_SetFromErrno(PyExc_OSError);
            goto fail;
        }
        self->w[i].started = 1;
        char name[16];
        snprintf(name, sizeof(name), "masqd-rx%ld", i); /* (top -H, perf: the readers by name) */
        pthread_setname_np(self->w[i].th, name);
    }
    return PyLong_FromLong(self->efd);
fail:
    stop_workers(self);
    return NULL;
fail_early:
    close(self->efd);
    close(self->stop_efd);
    self->efd = self->stop_efd = -1;
    PyMem_Free(self->w);
    self->w = NULL;
    return NULL;
}

static PyObject *FlowCache_stop_workers(FlowCache *self, PyObject *Py_UNUSED(ignored))
{
    stop_workers(self);
    Py_RETURN_NONE;
}

/*
 * service(): the event loop's reader callback for the eventfd of start_workers. In one
 * exclusive section: every packet a thread waits with goes to its port's miss handler (as
 * on_readable's misses) and the packets behind it on the thread's queue are read here (up to
 * SERVICE_BATCH; cached flows forwarded, the rest to the miss handler), the cache empties itself if the engine or a neighbour table moved,
 * the capture's state is read; then the threads go on. keep_warm's callback hears of traffic.
 */
static PyObject *FlowCache_service(FlowCache *self, PyObject *Py_UNUSED(ignored))
{
    if (self->nw == 0)
        Py_RETURN_NONE;
    uint64_t v;
    ssize_t rr = read(self->efd, &v, sizeof(v));
    (void)rr;
    int served[MAXQ] = {0};
    int err = 0;
    long passed = 0;
    excl_enter(self);
    if (check_stale(self) < 0) /* (a change made outside any section: as on_readable does) */
        err = 1;
    for (int i = 0; i < self->nw; i++) {
        worker_t *w = &self->w[i];
        if (!__atomic_load_n(&w->pending, __ATOMIC_ACQUIRE))
            continue;
        served[i] = 1;
        if (err)
            continue; /* after an exception: the packet is dropped, the thread goes on */
        PyObject *what = w->miss_len >= 0 ? PyBytes_FromStringAndSize((const char *)w->buf, w->miss_len)
                                          : PyLong_FromLong(w->miss_err);
        self->miss_q = w->q;
        long n = call_miss(self, w->miss_port, what, w->miss_now);
        if (n < 0 || check_stale(self) < 0) {
            self->miss_q = 0;
            err = 1;
            continue;
        }
        w->miss_passed = n;
        passed += n;
        /* While the thread waits, what came in after the packet on its queue is read here, in
         * order (the thread reads that queue again only once released): under a flood of
         * misses, one wake-up of the loop serves a batch instead of one packet, and the
         * cached flows behind them are forwarded meanwhile. */
        if (w->miss_len >= 0) {
            port_t *pt = &self->ports[w->miss_port];
            int sup = 0;
            long more = 0;
            int rc = drain_fd(self, w->miss_port, pt->fds[w->q % pt->nq], SERVICE_BATCH, monotonic_now(),
                              &more, &sup, &w->last_super); /* (the thread's coalescing state) */
            passed += more;
            if (rc < 0)
                err = 1;
        }
        self->miss_q = 0;
    }
    if (!err && update_bypass(self) < 0)
        err = 1;
    if (err) {
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        excl_leave(self);
        PyErr_Clear();
        PyErr_Restore(et, ev, tb);
    } else if (excl_leave(self) < 0) {
        err = 1;
    }
    for (int i = 0; i < self->nw; i++)
        if (served[i]) {
            __atomic_store_n(&self->w[i].pending, 0, __ATOMIC_RELEASE);
            futex_wake(&self->w[i].pending);
        }
    if (err)
        return NULL;
    __atomic_fetch_add(&self->passed, (uint64_t)passed, __ATOMIC_RELAXED);
    if (__atomic_exchange_n(&self->traffic, 0, __ATOMIC_ACQ_REL) && self->on_traffic != NULL) {
        PyObject *t = PyFloat_FromDouble(monotonic_now());
        if (t == NULL)
            return NULL;
        PyObject *r = PyObject_CallOneArg(self->on_traffic, t);
        Py_DECREF(t);
        if (r == NULL)
            return NULL;
        Py_DECREF(r);
    }
    Py_RETURN_NONE;
}

/* hold() -> bool: enter an exclusive section that lasts until release() (True: newly held). */
static PyObject *FlowCache_hold(FlowCache *self, PyObject *Py_UNUSED(ignored))
{
    if (self->held || self->nw == 0)
        Py_RETURN_FALSE;
    excl_enter(self);
    self->held = 1;
    Py_RETURN_TRUE;
}

/* release(): leave hold()'s section: the cache empties itself first if a decision could have changed. */
static PyObject *FlowCache_release(FlowCache *self, PyObject *Py_UNUSED(ignored))
{
    if (!self->held)
        Py_RETURN_NONE;
    self->held = 0;
    int rc = update_bypass(self);
    if (excl_leave(self) < 0 || rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* poll_capture(): read the capture's "active" now (reader threads: every packet to Python while on). */
static PyObject *FlowCache_poll_capture(FlowCache *self, PyObject *Py_UNUSED(ignored))
{
    if (update_bypass(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* add_queue(idx, fd): one more queue of port idx (IFF_MULTI_QUEUE), before start_workers. */
static PyObject *FlowCache_add_queue(FlowCache *self, PyObject *args)
{
    int idx, fd;
    if (!PyArg_ParseTuple(args, "ii", &idx, &fd))
        return NULL;
    if (idx < 0 || idx > 1 || fd < 0 || self->nw || self->ports[idx].fd < 0 || self->ports[idx].nq >= MAXQ) {
        PyErr_SetString(PyExc_ValueError, "add_queue(idx 0|1, fd): after set_port, before start_workers");
        return NULL;
    }
    port_t *p = &self->ports[idx];
    p->fds[p->nq++] = fd;
    Py_RETURN_NONE;
}

/* idle() -> bool: every reader thread waits in poll() with nothing for Python (for tests: with
 * their devices' fds empty too, nothing is in flight). */
static PyObject *FlowCache_idle(FlowCache *self, PyObject *Py_UNUSED(ignored))
{
    for (int i = 0; i < self->nw; i++)
        if (!__atomic_load_n(&self->w[i].polling, __ATOMIC_SEQ_CST)
            || __atomic_load_n(&self->w[i].pending, __ATOMIC_SEQ_CST))
            Py_RETURN_FALSE;
    Py_RETURN_TRUE;
}

static PyObject *FlowCache_get_queue(FlowCache *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(self->miss_q);
}

/* when a super-packet was last read (the drain's clock), by any reader: bulk TCP */
static PyObject *FlowCache_get_last_super(FlowCache *self, void *Py_UNUSED(closure))
{
    double t;
    __atomic_load(&self->last_super, &t, __ATOMIC_RELAXED);
    for (int i = 0; i < self->nw; i++) {
        double u;
        __atomic_load(&self->w[i].last_super, &u, __ATOMIC_RELAXED);
        if (u > t)
            t = u;
    }
    return PyFloat_FromDouble(t);
}

static PyObject *FlowCache_get_workers(FlowCache *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(self->nw);
}

/*
 * on_readable(port): the event loop's reader callback for a device fd. Reads and forwards as
 * drain_port; then, when coalescing is on and the wake-up passed on min_busy packets or more
 * (and no super-packet in the last BULK_QUIET seconds: bulk TCP keeps its ACK clock, whose
 * small ACKs would otherwise start the pauses), rounds of: sleep `pause`, drain both
 * ports, while each round passes on min_busy packets, for at most `hold`. No Python runs while
 * only cached flows arrive.
 */
static PyObject *FlowCache_on_readable(FlowCache *self, PyObject *arg)
{
    long in = PyLong_AsLong(arg);
    if (in == -1 && PyErr_Occurred())
        return NULL;
    if (in < 0 || in > 1 || self->ports[0].fd < 0 || self->ports[1].fd < 0 || self->ports[0].miss == NULL
        || self->ports[1].miss == NULL || self->nw) {
        PyErr_SetString(PyExc_ValueError, "on_readable: ports or miss handlers not set, or reader threads run");
        return NULL;
    }
    double now = monotonic_now();
    long passed = 0;
    int super = 0;
    self->bypass = 0;
    if (self->capture != NULL) {
        PyObject *a = PyObject_GetAttrString(self->capture, "active");
        if (a == NULL)
            return NULL;
        self->bypass = PyObject_IsTrue(a);
        Py_DECREF(a);
        if (self->bypass < 0)
            return NULL;
    }
    if (check_stale(self) < 0 || drain_port(self, (int)in, POLL_BATCH, now, &passed, &super) < 0)
        return NULL;
    if (self->pause > 0 && passed >= self->min_busy && !super && now - self->last_super > BULK_QUIET) {
        double end = now + self->hold;
        struct timespec ts = {0, (long)(self->pause * 1e9)};
        for (;;) {
            Py_BEGIN_ALLOW_THREADS
            nanosleep(&ts, NULL);
            Py_END_ALLOW_THREADS
            __atomic_fetch_add(&self->rounds, 1, __ATOMIC_RELAXED);
            now = monotonic_now();
            long n = 0;
            for (int i = 0; i < 2; i++)
                if (drain_port(self, i, POLL_BATCH, now, &n, &super) < 0)
                    return NULL;
            passed += n;
            if (n < self->min_busy || now >= end || super)
                break;
        }
    }
    __atomic_fetch_add(&self->passed, (uint64_t)passed, __ATOMIC_RELAXED);
    if (passed && self->on_traffic != NULL) {
        PyObject *t = PyFloat_FromDouble(monotonic_now());
        if (t == NULL)
            return NULL;
        PyObject *r = PyObject_CallOneArg(self->on_traffic, t);
        Py_DECREF(t);
        if (r == NULL)
            return NULL;
        Py_DECREF(r);
    }
    Py_RETURN_NONE;
}

/* drain(port, budget, now) -> (reads, forwarded, rest): for a caller that handles the rest itself
 * (the Python loop of Port.drain, with its own clock). */
static PyObject *FlowCache_drain(FlowCache *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "drain(port, budget, now)");
        return NULL;
    }
    long in = PyLong_AsLong(args[0]);
    long budget = PyLong_AsLong(args[1]);
    double now = PyFloat_AsDouble(args[2]);
    if (PyErr_Occurred())
        return NULL;
    if (in < 0 || in > 1 || self->ports[in].fd < 0 || self->nw) {
        PyErr_SetString(PyExc_ValueError, "drain: port not set, or reader threads run");
        return NULL;
    }
    if (check_stale(self) < 0)
        return NULL;
    int fd = self->ports[in].fd;
    long reads = 0, fwd = 0;
    PyObject *rest = NULL;
    while (reads < budget) {
        ssize_t r = read(fd, self->buf, BUF_SIZE);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                rest = PyLong_FromLong(errno);
            break;
        }
        reads++;
        if (forward(self, (int)in, self->buf, r, now)) {
            fwd++;
            continue;
        }
        if (police(self, (int)in, self->buf, r, now))
            continue;
        rest = PyBytes_FromStringAndSize((const char *)self->buf, r);
        if (rest == NULL)
            return NULL;
        break;
    }
    if (rest == NULL) {
        rest = Py_None;
        Py_INCREF(rest);
    }
    return Py_BuildValue("(llN)", reads, fwd, rest);
}

/* set_watch(engine, lan_l2, wan_l2, on_stale): see check_stale (an L2 host may be None: TUN). */
static PyObject *FlowCache_set_watch(FlowCache *self, PyObject *args)
{
    PyObject *w[3], *cb;
    if (!PyArg_ParseTuple(args, "OOOO", &w[0], &w[1], &w[2], &cb))
        return NULL;
    if (!PyCallable_Check(cb)) {
        PyErr_SetString(PyExc_TypeError, "set_watch: on_stale must be callable");
        return NULL;
    }
    for (int i = 0; i < 3; i++) {
        PyObject *o = w[i] == Py_None ? NULL : w[i];
        Py_XINCREF(o);
        Py_XSETREF(self->watch[i], o);
        self->seen[i] = -1;
    }
    Py_INCREF(cb);
    Py_XSETREF(self->on_stale, cb);
    Py_RETURN_NONE;
}

/* set_hooks(idx, miss), set_coalesce(pause, min_busy, hold), set_traffic(callable or None) */
static PyObject *FlowCache_set_miss(FlowCache *self, PyObject *args)
{
    int idx;
    PyObject *cb;
    if (!PyArg_ParseTuple(args, "iO", &idx, &cb))
        return NULL;
    if (idx < 0 || idx > 1 || !PyCallable_Check(cb)) {
        PyErr_SetString(PyExc_ValueError, "set_miss(idx 0|1, callable)");
        return NULL;
    }
    Py_INCREF(cb);
    Py_XSETREF(self->ports[idx].miss, cb);
    Py_RETURN_NONE;
}

static PyObject *FlowCache_set_coalesce(FlowCache *self, PyObject *args)
{
    double pause, hold;
    long min_busy;
    if (!PyArg_ParseTuple(args, "dld", &pause, &min_busy, &hold))
        return NULL;
    if (!(pause >= 0 && pause < 1) || !(hold >= 0 && hold < 1) || min_busy < 1) {
        PyErr_SetString(PyExc_ValueError, "set_coalesce: pause and hold in [0, 1) s, min_busy >= 1");
        return NULL;
    }
    self->pause = pause;
    self->min_busy = min_busy;
    self->hold = hold;
    Py_RETURN_NONE;
}

static PyObject *FlowCache_set_traffic(FlowCache *self, PyObject *cb)
{
    if (cb != Py_None && !PyCallable_Check(cb)) {
        PyErr_SetString(PyExc_TypeError, "set_traffic: a callable or None");
        return NULL;
    }
    PyObject *o = cb == Py_None ? NULL : cb;
    Py_XINCREF(o);
    Py_XSETREF(self->on_traffic, o);
    __atomic_store_n(&self->want_traffic, o != NULL, __ATOMIC_RELAXED);
    Py_RETURN_NONE;
}

static PyObject *FlowCache_set_capture(FlowCache *self, PyObject *obj)
{
    PyObject *o = obj == Py_None ? NULL : obj;
    Py_XINCREF(o);
    Py_XSETREF(self->capture, o);
    Py_RETURN_NONE;
}

static PyObject *FlowCache_get_passed(FlowCache *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(__atomic_load_n(&self->passed, __ATOMIC_RELAXED));
}

static PyObject *FlowCache_set_port(FlowCache *self, PyObject *args)
{
    int idx, fd, vnet, tap;
    Py_buffer mac;
    if (!PyArg_ParseTuple(args, "iipiy*", &idx, &fd, &vnet, &tap, &mac))
        return NULL;
    if (idx < 0 || idx > 1 || (tap && mac.len != 6) || self->nw) {
        PyBuffer_Release(&mac);
        PyErr_SetString(PyExc_ValueError, "set_port(idx 0|1, fd, vnet, tap, mac of 6 bytes), before start_workers");
        return NULL;
    }
    port_t *p = &self->ports[idx];
    p->fd = fd;
    p->fds[0] = fd;
    p->nq = 1;
    p->vnet = vnet;
    p->tap = tap;
    memset(p->mac, 0, 6);
    if (tap)
        memcpy(p->mac, mac.buf, 6);
    PyBuffer_Release(&mac);
    Py_RETURN_NONE;
}

static PyObject *FlowCache_add(FlowCache *self, PyObject *args)
{
    int dir, proto, port;
    long long dip, dl4;
    unsigned int mtu;
    Py_buffer key, addr, l2;
    PyObject *token;
    if (!PyArg_ParseTuple(args, "iiy*Oy*iLLIy*", &dir, &proto, &key, &token, &addr, &port, &dip, &dl4,
                          &mtu, &l2))
        return NULL;
    PyObject *res = NULL;
    int entered = 0;
    /* the port: -1 (none) for ESP and outbound GRE, which keep theirs; a port, identifier or key else */
    int no_port = proto == ESP || (proto == GRE && dir == 0);
    if (dir < 0 || dir > 1 || (proto != TCP && proto != UDP && proto != ICMP && proto != ESP && proto != GRE)
        || key.len != 12 || addr.len != 4 || (no_port ? port != -1 : (port < 0 || port > 0xFFFF))
        || (l2.len != 0 && l2.len != 14) || dip < 0 || dl4 < 0 || dip > 0x7FFFFFFF || dl4 > 0x7FFFFFFF) {
        PyErr_SetString(PyExc_ValueError, "add: bad entry");
        goto done;
    }
    uint64_t k0, k1;
    make_key((const uint8_t *)key.buf, dir, proto, &k0, &k1);
    excl_enter(self); /* (reader threads: only between two of their packets) */
    entered = 1;
    entry_t *e = lookup(self, k0, k1);
    if (e == NULL) {
        if (self->n >= MAX_ENTRIES) {
            __atomic_fetch_add(&self->full, 1, __ATOMIC_RELAXED);
            res = Py_False;
            Py_INCREF(res);
            goto done;
        }
        uint32_t i = slot_of(k0, k1);
        while (self->slots[i])
            i = (i + 1) & (NSLOTS - 1);
        e = &self->entries[self->n];
        memset(e, 0, sizeof(*e));
        e->k0 = k0;
        e->k1 = k1;
        e->slot = i;
        self->slots[i] = ++self->n;
    } else if (e->token != token && e->pkts) {
        /* a new session under the same key: its predecessor's counts must not be lost */
        PyErr_SetString(PyExc_RuntimeError, "add: sync before replacing an entry with counts");
        goto done;
    }
    Py_INCREF(token);
    Py_XSETREF(e->token, token);
    e->dir = (uint8_t)dir;
    e->proto = (uint8_t)proto;
    memcpy(e->addr, addr.buf, 4);
    e->poff = no_port ? 0 : proto == ICMP ? 24 : proto == GRE ? 26 : dir == 0 ? 20 : 22;
    put16(e->port, no_port ? 0 : (unsigned)port);
    e->dip = dip;
    e->dl4 = dl4;
    e->mtu = mtu;
    e->has_l2 = l2.len == 14;
    if (e->has_l2)
        memcpy(e->l2, l2.buf, 14);
    res = Py_True;
    Py_INCREF(res);
done:
    if (entered && excl_leave(self) < 0)
        Py_CLEAR(res);
    PyBuffer_Release(&key);
    PyBuffer_Release(&addr);
    PyBuffer_Release(&l2);
    return res;
}

/* (token, dir, proto, packets, bytes, last) of every entry that forwarded since the last call */
/* Append a new reference (NULL: a failed build) to the list `out`; on failure `out` is released
 * too and -1 returned, with the exception set. */
static int append_new(PyObject *out, PyObject *item)
{
    if (item == NULL || PyList_Append(out, item) < 0) {
        Py_XDECREF(item);
        Py_DECREF(out);
        return -1;
    }
    Py_DECREF(item);
    return 0;
}

/* Append e's counts since the last take, as sync gives them, and zero them (nothing when it
 * forwarded nothing); -1 as append_new (`out` released). Under an exclusive section: no thread
 * adds to them meanwhile. */
static int take_counts(PyObject *out, entry_t *e)
{
    if (!__atomic_load_n(&e->pkts, __ATOMIC_RELAXED))
        return 0;
    uint64_t pk = __atomic_exchange_n(&e->pkts, 0, __ATOMIC_RELAXED);
    uint64_t sg = __atomic_exchange_n(&e->segs, 0, __ATOMIC_RELAXED);
    uint64_t by = __atomic_exchange_n(&e->bytes, 0, __ATOMIC_RELAXED);
    double last;
    __atomic_load(&e->last, &last, __ATOMIC_RELAXED);
    return append_new(out, Py_BuildValue("(OiiKKdK)", e->token, e->dir, e->proto, (unsigned long long)pk,
                                         (unsigned long long)by, last, (unsigned long long)sg));
}

static PyObject *collect(FlowCache *self)
{
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (uint32_t i = 0; i < self->n; i++)
        if (take_counts(out, &self->entries[i]) < 0)
            return NULL;
    return out;
}

static PyObject *FlowCache_sync(FlowCache *self, PyObject *Py_UNUSED(ignored))
{
    excl_enter(self);
    PyObject *out = collect(self);
    if (excl_leave(self) < 0)
        Py_CLEAR(out);
    return out;
}

static void drop_all(FlowCache *self)
{
    for (uint32_t i = 0; i < self->n; i++) {
        entry_t *e = &self->entries[i];
        self->slots[e->slot] = 0;
        Py_CLEAR(e->token);
    }
    self->n = 0;
}

/* Remove one entry (main thread, in an exclusive section or with no threads): its slot by
 * backward-shift deletion, so that no probe run is cut; the last entry moves into its place. */
static void drop_entry(FlowCache *self, entry_t *e)
{
    uint32_t idx = (uint32_t)(e - self->entries);
    uint32_t i = e->slot, j = i;
    self->slots[i] = 0;
    for (;;) {
        j = (j + 1) & (NSLOTS - 1);
        uint32_t v = self->slots[j];
        if (!v)
            break;
        entry_t *x = &self->entries[v - 1];
        uint32_t h = slot_of(x->k0, x->k1);
        /* x stays where it is if its home slot h lies cyclically in (i, j] */
        int stays = i <= j ? (h > i && h <= j) : (h > i || h <= j);
        if (!stays) {
            self->slots[i] = v;
            x->slot = i;
            self->slots[j] = 0;
            i = j;
        }
    }
    PyObject *token = e->token;
    e->token = NULL;
    uint32_t last = self->n - 1;
    if (idx != last) {
        *e = self->entries[last];
        self->slots[e->slot] = idx + 1;
    }
    self->entries[last].token = NULL;
    self->n = last;
    Py_XDECREF(token);
}

/* forget([(dir, proto, key, token)]) -> the counts of the entries dropped, as sync gives them: the
 * entries of those keys that still hold that token leave the cache (a session removed). */
static PyObject *FlowCache_forget(FlowCache *self, PyObject *rows)
{
    if (!PyList_Check(rows)) {
        PyErr_SetString(PyExc_TypeError, "forget: a list of (dir, proto, key, token)");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    excl_enter(self);
    for (Py_ssize_t r = 0; r < PyList_GET_SIZE(rows); r++) {
        int dir, proto;
        Py_buffer key;
        PyObject *token;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(rows, r), "iiy*O", &dir, &proto, &key, &token)) {
            Py_CLEAR(out);
            break;
        }
        if (key.len != 12 || dir < 0 || dir > 1) {
            PyBuffer_Release(&key);
            PyErr_SetString(PyExc_ValueError, "forget: bad key");
            Py_CLEAR(out);
            break;
        }
        uint64_t k0, k1;
        make_key((const uint8_t *)key.buf, dir, proto, &k0, &k1);
        PyBuffer_Release(&key);
        entry_t *e = lookup(self, k0, k1);
        if (e == NULL || e->token != token)
            continue; /* gone already, or the key is another session's now */
        if (take_counts(out, e) < 0) {
            out = NULL;
            break;
        }
        drop_entry(self, e);
    }
    if (excl_leave(self) < 0)
        Py_CLEAR(out);
    return out;
}

/* set_gone(on_gone or None): see check_stale. */
static PyObject *FlowCache_set_gone(FlowCache *self, PyObject *cb)
{
    if (cb != Py_None && !PyCallable_Check(cb)) {
        PyErr_SetString(PyExc_TypeError, "set_gone: a callable or None");
        return NULL;
    }
    PyObject *o = cb == Py_None ? NULL : cb;
    Py_XINCREF(o);
    Py_XSETREF(self->on_gone, o);
    Py_RETURN_NONE;
}

static PyObject *FlowCache_clear(FlowCache *self, PyObject *Py_UNUSED(ignored))
{
    excl_enter(self);
    PyObject *out = collect(self);
    if (out != NULL)
        drop_all(self);
    if (excl_leave(self) < 0)
        Py_CLEAR(out);
    return out;
}

static PyObject *FlowCache_take_errors(FlowCache *self, PyObject *Py_UNUSED(ignored))
{
    unsigned long long a = __atomic_exchange_n(&self->ports[0].write_errors, 0, __ATOMIC_RELAXED);
    unsigned long long b = __atomic_exchange_n(&self->ports[1].write_errors, 0, __ATOMIC_RELAXED);
    unsigned long long c = __atomic_exchange_n(&self->full, 0, __ATOMIC_RELAXED);
    unsigned long long d = __atomic_exchange_n(&self->rounds, 0, __ATOMIC_RELAXED);
    return Py_BuildValue("(KKKK)", a, b, c, d);
}

/* take_sections() -> (sections, seconds, longest, over 1 ms): the exclusive sections (the time
 * the reader threads stood still) since the last call; main thread only. */
static PyObject *FlowCache_take_sections(FlowCache *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *r = Py_BuildValue("(KddK)", (unsigned long long)self->excl_n, self->excl_total, self->excl_max,
                                (unsigned long long)self->excl_slow);
    if (r != NULL) {
        self->excl_n = self->excl_slow = 0;
        self->excl_total = self->excl_max = 0.0;
    }
    return r;
}

/* set_policer(on_mutes or None): the hosts over their mapping rate (see the header comment). */
static PyObject *FlowCache_set_policer(FlowCache *self, PyObject *cb)
{
    if (cb != Py_None && !PyCallable_Check(cb)) {
        PyErr_SetString(PyExc_TypeError, "set_policer: a callable or None");
        return NULL;
    }
    excl_enter(self);
    Py_XINCREF(cb == Py_None ? NULL : cb);
    Py_XSETREF(self->on_mutes, cb == Py_None ? NULL : cb);
    self->mute_seen = -1;
    __atomic_store_n(&self->nmutes, 0, __ATOMIC_RELEASE);
    int rc = 0;
    if (self->on_mutes != NULL && self->watch[0] == NULL) {
        PyErr_SetString(PyExc_ValueError, "set_policer: set_watch(engine, ...) first");
        rc = -1;
    }
    if (excl_leave(self) < 0 || rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* take_policed() -> [(address bytes, drops)] since the last call */
static PyObject *FlowCache_take_policed(FlowCache *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    uint32_t ips[MAX_MUTED];
    uint64_t drops[MAX_MUTED];
    int k = 0;
    pthread_spin_lock(&self->mlock);
    for (int i = 0; i < self->nmutes; i++)
        if (self->mutes[i].drops) {
            ips[k] = self->mutes[i].ip;
            drops[k++] = self->mutes[i].drops;
            self->mutes[i].drops = 0;
        }
    pthread_spin_unlock(&self->mlock);
    for (int i = 0; i < k; i++) {
        if (append_new(out, Py_BuildValue("(y#K)", (const char *)&ips[i], (Py_ssize_t)4,
                                          (unsigned long long)drops[i])) < 0)
            return NULL;
    }
    return out;
}

static PyObject *FlowCache_take_supers(FlowCache *self, PyObject *Py_UNUSED(ignored))
{
    unsigned long long a = __atomic_exchange_n(&self->supers, 0, __ATOMIC_RELAXED);
    unsigned long long b = __atomic_exchange_n(&self->super_segs, 0, __ATOMIC_RELAXED);
    return Py_BuildValue("(KK)", a, b);
}

static Py_ssize_t FlowCache_len(FlowCache *self)
{
    return (Py_ssize_t)self->n;
}

static int FlowCache_traverse(FlowCache *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    for (uint32_t i = 0; i < self->n; i++)
        Py_VISIT(self->entries[i].token);
    for (int i = 0; i < 3; i++)
        Py_VISIT(self->watch[i]);
    Py_VISIT(self->on_stale);
    Py_VISIT(self->on_gone);
    Py_VISIT(self->on_mutes);
    Py_VISIT(self->on_traffic);
    Py_VISIT(self->capture);
    Py_VISIT(self->ports[0].miss);
    Py_VISIT(self->ports[1].miss);
    return 0;
}

static int FlowCache_tp_clear(FlowCache *self)
{
    stop_workers(self);
    if (self->entries != NULL)
        drop_all(self);
    for (int i = 0; i < 3; i++)
        Py_CLEAR(self->watch[i]);
    Py_CLEAR(self->on_stale);
    Py_CLEAR(self->on_gone);
    Py_CLEAR(self->on_mutes);
    self->nmutes = 0;
    Py_CLEAR(self->on_traffic);
    Py_CLEAR(self->capture);
    Py_CLEAR(self->ports[0].miss);
    Py_CLEAR(self->ports[1].miss);
    return 0;
}

static void FlowCache_dealloc(FlowCache *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    FlowCache_tp_clear(self);
    PyMem_Free(self->slots);
    PyMem_Free(self->entries);
    PyMem_Free(self->buf);
    pthread_spin_destroy(&self->mlock);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *FlowCache_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "FlowCache() takes no arguments");
        return NULL;
    }
    FlowCache *self = (FlowCache *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->slots = PyMem_Calloc(NSLOTS, sizeof(uint32_t));
    self->entries = PyMem_Calloc(MAX_ENTRIES, sizeof(entry_t));
    self->buf = PyMem_Malloc(BUF_SIZE);
    self->ports[0].fd = self->ports[1].fd = -1;
    self->efd = self->stop_efd = -1;
    pthread_spin_init(&self->mlock, PTHREAD_PROCESS_PRIVATE);
    self->mute_seen = -1;
    if (self->slots == NULL || self->entries == NULL || self->buf == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    return (PyObject *)self;
}

static PyMethodDef FlowCache_methods[] = {
    {"drain", (PyCFunction)(void (*)(void))FlowCache_drain, METH_FASTCALL,
     "drain(port, budget, now) -> (reads, forwarded, rest): read from port 0 (LAN) or 1 (WAN) and "
     "forward cached flows; rest is the first packet Python must handle (bytes, as read), None when "
     "the fd would block or the budget is spent, or an errno (int) when a read failed."},
    {"on_readable", (PyCFunction)FlowCache_on_readable, METH_O,
     "on_readable(port): the event loop's reader callback (see the source)."},
    {"set_watch", (PyCFunction)FlowCache_set_watch, METH_VARARGS,
     "set_watch(engine, lan_l2, wan_l2, on_stale): when engine.epoch or an L2 host's version moves, "
     "on_stale() is called before the next packet is looked up."},
    {"set_miss", (PyCFunction)FlowCache_set_miss, METH_VARARGS,
     "set_miss(idx, miss): miss(frame bytes or errno int, now) -> packets passed on, for on_readable."},
    {"set_coalesce", (PyCFunction)FlowCache_set_coalesce, METH_VARARGS,
     "set_coalesce(pause, min_busy, hold): interrupt moderation in on_readable (pause 0: off)."},
    {"set_capture", (PyCFunction)FlowCache_set_capture, METH_O,
     "set_capture(tap or None): while tap.active, on_readable hands every packet to Python."},
    {"set_traffic", (PyCFunction)FlowCache_set_traffic, METH_O,
     "set_traffic(callable or None): called with the time after a wake-up that passed packets on."},
    {"set_port", (PyCFunction)FlowCache_set_port, METH_VARARGS,
     "set_port(idx, fd, vnet, tap, mac): the device of port 0 (LAN) or 1 (WAN)."},
    {"add", (PyCFunction)FlowCache_add, METH_VARARGS,
     "add(dir, proto, key12, token, addr4, port, dip, dl4, mtu, l2hdr) -> bool: cache a flow's "
     "rewrite (False: the cache is full)."},
    {"start_workers", (PyCFunction)FlowCache_start_workers, METH_O,
     "start_workers(n) -> eventfd: n reader threads (thread q reads queue q of both ports and forwards "
     "cached flows without the GIL); call service() whenever the eventfd is readable."},
    {"stop_workers", (PyCFunction)FlowCache_stop_workers, METH_NOARGS,
     "stop_workers(): the reader threads end (joined)."},
    {"service", (PyCFunction)FlowCache_service, METH_NOARGS,
     "service(): hand the packets the reader threads wait with to the miss handlers (the eventfd's reader)."},
    {"hold", (PyCFunction)FlowCache_hold, METH_NOARGS,
     "hold() -> bool: stop the reader threads between two packets until release() (True: newly held)."},
    {"release", (PyCFunction)FlowCache_release, METH_NOARGS,
     "release(): end hold(); the cache empties itself first if the engine or a neighbour table moved."},
    {"idle", (PyCFunction)FlowCache_idle, METH_NOARGS,
     "idle() -> bool: every reader thread waits for its devices, with nothing for Python."},
    {"poll_capture", (PyCFunction)FlowCache_poll_capture, METH_NOARGS,
     "poll_capture(): read the capture's state now (reader threads)."},
    {"add_queue", (PyCFunction)FlowCache_add_queue, METH_VARARGS,
     "add_queue(idx, fd): one more queue (IFF_MULTI_QUEUE fd) of port idx, for the reader threads."},
    {"set_policer", (PyCFunction)FlowCache_set_policer, METH_O,
     "set_policer(on_mutes or None): on_mutes() -> [(address, until, rate, burst)], the LAN hosts over "
     "their mapping rate, read again whenever engine.mute_serial moves; their flow-opening misses beyond "
     "the budget are dropped (take_policed)."},
    {"forget", (PyCFunction)FlowCache_forget, METH_O,
     "forget([(dir, proto, key, token)]) -> [(token, dir, proto, packets, bytes, last, segments)]: the "
     "entries of those keys that still hold that token leave the cache; their counts since the last sync."},
    {"set_gone", (PyCFunction)FlowCache_set_gone, METH_O,
     "set_gone(on_gone or None): called when engine.gone lists sessions the engine removed (on_gone "
     "forgets their entries); checked where engine.epoch is."},
    {"take_policed", (PyCFunction)FlowCache_take_policed, METH_NOARGS,
     "take_policed() -> [(address bytes, packets dropped)] since the last call."},
    {"take_supers", (PyCFunction)FlowCache_take_supers, METH_NOARGS,
     "take_supers() -> (super-packets forwarded, their segments) since the last call."},
    {"sync", (PyCFunction)FlowCache_sync, METH_NOARGS,
     "sync() -> [(token, dir, proto, packets, bytes, last, segments)]: counts since the last sync "
     "(a super-packet is one packet and its segments)."},
    {"clear", (PyCFunction)FlowCache_clear, METH_NOARGS, "clear() -> like sync(), then forget every flow."},
    {"take_sections", (PyCFunction)FlowCache_take_sections, METH_NOARGS,
     "take_sections() -> (sections, seconds, longest, over 1 ms): the reader threads' stops since the last call."},
    {"take_errors", (PyCFunction)FlowCache_take_errors, METH_NOARGS,
     "take_errors() -> (LAN write errors, WAN write errors, refused additions, coalescing rounds) since "
     "the last call."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef FlowCache_getset[] = {
    {"passed", (getter)FlowCache_get_passed, NULL, "packets passed on (natively or through Python) since creation",
     NULL},
    {"workers", (getter)FlowCache_get_workers, NULL, "reader threads running", NULL},
    {"last_super", (getter)FlowCache_get_last_super, NULL,
     "when a super-packet (TSO/USO) was last read, by any reader (the drain's clock; 0: never)", NULL},
    {"queue", (getter)FlowCache_get_queue, NULL,
     "the queue of the packet the miss handler is given now (0 outside one): Python writes what "
     "follows from it on the same queue of the other device, so tun's flow table keeps the flow's "
     "replies on that queue's reader", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot FlowCache_slots[] = {
    {Py_tp_getset, FlowCache_getset},
    {Py_tp_doc, "Established flows forwarded without Python (see the module's documentation)."},
    {Py_tp_new, FlowCache_new},
    {Py_tp_dealloc, FlowCache_dealloc},
    {Py_tp_traverse, FlowCache_traverse},
    {Py_tp_clear, FlowCache_tp_clear},
    {Py_tp_methods, FlowCache_methods},
    {Py_mp_length, FlowCache_len},
    {0, NULL},
};

static PyType_Spec FlowCache_spec = {
    .name = "masqd.dataplane._fastpath.FlowCache",
    .basicsize = sizeof(FlowCache),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = FlowCache_slots,
};

static int module_exec(PyObject *m)
{
    PyObject *t = PyType_FromModuleAndSpec(m, &FlowCache_spec, NULL);
    if (t == NULL)
        return -1;
    if (PyModule_AddObject(m, "FlowCache", t) < 0) {
        Py_DECREF(t);
        return -1;
    }
    if (PyModule_AddIntConstant(m, "MAX_ENTRIES", MAX_ENTRIES) < 0)
        return -1;
    return 0;
}

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "masqd.dataplane._fastpath",
    .m_doc = "The native fast path: established TCP/UDP flows forwarded between the device fds "
             "without entering Python.",
    .m_size = 0,
    .m_slots = module_slots,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    return PyModuleDef_Init(&module_def);
}
