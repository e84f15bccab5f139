/*
 * masqd.dataplane._fastpath: the native fast path. It forwards packets of
 * established TCP/UDP flows and pings between the two device fds without
 * entering Python.
 *
 * The Python engine stays the only place where decisions are made. Once the
 * engine's own fast path has forwarded a packet of a flow, the data plane
 * teaches this cache the rewrite it did (new address and port or ICMP
 * identifier, the precomputed RFC 1624 checksum deltas, the MTU to check, the
 * output port and its Ethernet header). Every packet that matches a cached flow
 * under the same conditions as the engine's fast path (IPv4 without options or
 * fragments, TTL > 1, TCP without SYN/FIN/RST, length within the MTU, no
 * super-packet, a sane virtio-net header) is rewritten in place and written out,
 * its flow's counters and last-seen time updated; any other packet goes to
 * Python as it was read, before the next one is read, so the order is kept.
 *
 * `on_readable` is the event loop's reader callback for both fds: it reads
 * until EAGAIN, calls the port's Python `miss` handler for what it does not
 * forward, and coalesces under load (rounds of sleep and drain). `drain` serves
 * a Python loop instead (it returns the first packet it does not forward). The
 * cache empties itself, through the Python `on_stale` callback that folds its
 * counts, when the engine's epoch or a neighbour table's version moves; `sync`
 * and `clear` hand the counts back for the engine.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
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

typedef struct {
    uint64_t k0, k1;   /* key: the packet's bytes 12..24, direction and protocol */
    PyObject *token;   /* the engine's session (a strong reference) */
    double last;       /* last packet forwarded (the drain's clock) */
    uint64_t pkts, bytes; /* since the last sync */
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
    int fd;
    int vnet;          /* every read and write carries a virtio-net header */
    int tap;           /* frames carry an Ethernet header */
    uint8_t mac[6];
    uint64_t write_errors;
    PyObject *miss;    /* miss(frame bytes | errno int, now) -> packets passed on (0 or 1) */
} port_t;

typedef struct {
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
    double pause;      /* coalesce: seconds between rounds under load (0: off) */
    long min_busy;     /* a wake-up that passes on this many packets is "under load" */
    double hold;       /* and the rounds stop after this long */
    PyObject *on_traffic; /* called with the time after a wake-up that passed packets on (or NULL) */
    uint64_t passed;   /* packets passed on by on_readable, in all (natively or through Python) */
    uint64_t rounds;   /* coalescing rounds, since the last take_errors */
    PyObject *capture; /* while its "active" is true, every packet goes to Python (or NULL) */
    int bypass;        /* this wake-up: capture active */
    double last_super; /* when a super-packet last went to Python (bulk TCP: no coalescing) */
} FlowCache;

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

/* 1: the packet was forwarded (or counted as a failed write); 0: Python must see it. */
static int forward(FlowCache *self, int in, uint8_t *buf, ssize_t r, double now)
{
    port_t *ip = &self->ports[in];
    int hl = ip->vnet ? VH : 0;
    int sh = ip->tap ? 14 : 0;
    int partial = 0;
    if (r < hl + sh + 40)
        return 0;
    if (hl) {
        if (buf[1] != 0) /* a super-packet */
            return 0;
        partial = buf[0] & 1;
    }
    uint8_t *f = buf + hl;
    if (sh && (f[12] != 8 || f[13] != 0 || memcmp(f, ip->mac, 6) != 0))
        return 0;
    uint8_t *p = f + sh;
    ssize_t n = r - hl - sh;
    if (p[0] != 0x45 || (p[6] & 0x3F) || p[7] || p[8] <= 1)
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
    uint64_t k0, k1;
    make_key(kp, in, proto, &k0, &k1);
    entry_t *e = lookup(self, k0, k1);
    if (e == NULL || (uint64_t)n > e->mtu)
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

    uint8_t vh[VH];
    struct iovec iov[3];
    int k = 0;
    if (op->vnet) {
        if (partial) { /* the header as read, its checksum start moved to the output's framing */
            unsigned cs = 20 + (op->tap ? 14 : 0);
            memcpy(vh, buf, VH);
            vh[6] = (uint8_t)cs;
            vh[7] = (uint8_t)(cs >> 8);
        } else {
            memset(vh, 0, VH);
        }
        iov[k].iov_base = vh;
        iov[k++].iov_len = VH;
    }
    if (op->tap) {
        iov[k].iov_base = e->l2;
        iov[k++].iov_len = 14;
    }
    iov[k].iov_base = p;
    iov[k++].iov_len = (size_t)n;
    if (writev(op->fd, iov, k) < 0)
        op->write_errors++;
    e->pkts++;
    e->bytes += (uint64_t)n;
    e->last = now;
    return 1;
}

static double monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* Empty the cache (through Python, which folds the counts) if the watched state moved. */
static int check_stale(FlowCache *self)
{
    int changed = 0;
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
 * Read port i until EAGAIN (or `budget` reads): cached flows are forwarded here, anything else
 * goes to the port's Python miss handler and the reads go on. Adds to *passed the packets
 * passed on; sets *super when a super-packet went to Python. -1: a Python exception.
 */
static int drain_port(FlowCache *self, int i, long budget, double now, long *passed, int *super)
{
    port_t *pt = &self->ports[i];
    for (long k = 0; k < budget; k++) {
        ssize_t r = read(pt->fd, self->buf, BUF_SIZE);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            return call_miss(self, i, PyLong_FromLong(errno), now) < 0 ? -1 : 0;
        }
        if (!self->bypass && forward(self, i, self->buf, r, now)) {
            (*passed)++;
            continue;
        }
        if (pt->vnet && r > 1 && self->buf[1] != 0) {
            *super = 1;
            self->last_super = now;
        }
        long n = call_miss(self, i, PyBytes_FromStringAndSize((const char *)self->buf, r), now);
        if (n < 0 || check_stale(self) < 0)
            return -1;
        *passed += n;
    }
    return 0;
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
        || self->ports[1].miss == NULL) {
        PyErr_SetString(PyExc_ValueError, "on_readable: ports or miss handlers not set");
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
            self->rounds++;
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
    self->passed += (uint64_t)passed;
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
    if (in < 0 || in > 1 || self->ports[in].fd < 0) {
        PyErr_SetString(PyExc_ValueError, "drain: port not set");
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
    return PyLong_FromUnsignedLongLong(self->passed);
}

static PyObject *FlowCache_set_port(FlowCache *self, PyObject *args)
{
    int idx, fd, vnet, tap;
    Py_buffer mac;
    if (!PyArg_ParseTuple(args, "iipiy*", &idx, &fd, &vnet, &tap, &mac))
        return NULL;
    if (idx < 0 || idx > 1 || (tap && mac.len != 6)) {
        PyBuffer_Release(&mac);
        PyErr_SetString(PyExc_ValueError, "set_port(idx 0|1, fd, vnet, tap, mac of 6 bytes)");
        return NULL;
    }
    port_t *p = &self->ports[idx];
    p->fd = fd;
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
    entry_t *e = lookup(self, k0, k1);
    if (e == NULL) {
        if (self->n >= MAX_ENTRIES) {
            self->full++;
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
    PyBuffer_Release(&key);
    PyBuffer_Release(&addr);
    PyBuffer_Release(&l2);
    return res;
}

/* (token, dir, proto, packets, bytes, last) of every entry that forwarded since the last call */
static PyObject *collect(FlowCache *self)
{
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    for (uint32_t i = 0; i < self->n; i++) {
        entry_t *e = &self->entries[i];
        if (!e->pkts)
            continue;
        PyObject *t = Py_BuildValue("(OiiKKd)", e->token, e->dir, e->proto, (unsigned long long)e->pkts,
                                    (unsigned long long)e->bytes, e->last);
        if (t == NULL || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(t);
        e->pkts = e->bytes = 0;
    }
    return out;
}

static PyObject *FlowCache_sync(FlowCache *self, PyObject *Py_UNUSED(ignored))
{
    return collect(self);
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

static PyObject *FlowCache_clear(FlowCache *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *out = collect(self);
    if (out == NULL)
        return NULL;
    drop_all(self);
    return out;
}

static PyObject *FlowCache_take_errors(FlowCache *self, PyObject *Py_UNUSED(ignored))
{
    PyObject *t = Py_BuildValue("(KKKK)", (unsigned long long)self->ports[0].write_errors,
                                (unsigned long long)self->ports[1].write_errors,
                                (unsigned long long)self->full, (unsigned long long)self->rounds);
    self->ports[0].write_errors = self->ports[1].write_errors = 0;
    self->full = self->rounds = 0;
    return t;
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
    Py_VISIT(self->on_traffic);
    Py_VISIT(self->capture);
    Py_VISIT(self->ports[0].miss);
    Py_VISIT(self->ports[1].miss);
    return 0;
}

static int FlowCache_tp_clear(FlowCache *self)
{
    if (self->entries != NULL)
        drop_all(self);
    for (int i = 0; i < 3; i++)
        Py_CLEAR(self->watch[i]);
    Py_CLEAR(self->on_stale);
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
    {"sync", (PyCFunction)FlowCache_sync, METH_NOARGS,
     "sync() -> [(token, dir, proto, packets, bytes, last)]: counts since the last sync."},
    {"clear", (PyCFunction)FlowCache_clear, METH_NOARGS, "clear() -> like sync(), then forget every flow."},
    {"take_errors", (PyCFunction)FlowCache_take_errors, METH_NOARGS,
     "take_errors() -> (LAN write errors, WAN write errors, refused additions, coalescing rounds) since "
     "the last call."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef FlowCache_getset[] = {
    {"passed", (getter)FlowCache_get_passed, NULL, "packets passed on by on_readable since creation", NULL},
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
