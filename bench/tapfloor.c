/* The floor of any TUN/TAP router: frames read from one TAP device are written to the other,
 * with nothing done to them but the two Ethernet addresses. No NAT, no table, no checks.
 *
 * bench/e2e.py --floor runs it beside masqd and the kernel, on devices opened exactly as masqd
 * opens its own (virtio-net header, offloads, IFF_NAPI, one queue per CPU; bench/floor.py), with
 * masqd's reader loop shape: one thread per queue pair polls both, drains each up to BATCH
 * frames, and under load sleeps PAUSE and drains again (dataplane.coalesce, with masqd's 1 µs
 * timer slack) for at most HOLD before it polls again. What this process costs per packet is what the device interface costs:
 * one read and one write per frame (a super-packet counts as one). masqd cannot cost less.
 *
 * usage: tapfloor PAUSE_US HOLD_US LAN_SRC LAN_DST WAN_SRC WAN_DST LANFD WANFD [LANFD WANFD ...]
 *   (MACs as aa:bb:cc:dd:ee:ff: the source and destination of frames written to that side;
 *   the fds are inherited, non-blocking, each with a 10-byte virtio-net header)
 * Runs until SIGTERM or SIGINT, then prints {"forwarded": N, "dropped": N} on stdout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define VNET 10
#define BATCH 512
#define MAXQ 16
#define BULK_QUIET 0.02 /* as masqd: no coalescing this long after a super-packet */

static volatile sig_atomic_t stopping;
static unsigned char mac[2][2][6]; /* [side written to][0 source, 1 destination] */
static double pause_s, hold_s;

struct pair {
    int fd[2];
    pthread_t th;
    uint64_t forwarded, dropped;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static int parse_mac(const char *s, unsigned char *out)
{
    unsigned v[6];
    if (sscanf(s, "%x:%x:%x:%x:%x:%x", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5]) != 6)
        return -1;
    for (int i = 0; i < 6; i++)
        out[i] = (unsigned char)v[i];
    return 0;
}

/* Drain side i of the pair (at most BATCH frames) into the other side. */
static long drain(struct pair *p, int i, unsigned char *buf, size_t size, int *super)
{
    long n = 0;
    int o = 1 - i;
    for (int k = 0; k < BATCH; k++) {
        ssize_t r = read(p->fd[i], buf, size);
        if (r < 0)
            break; /* EAGAIN: drained */
        if (r < VNET + 14 + 20 || buf[VNET + 12] != 0x08 || buf[VNET + 13] != 0x00) {
            p->dropped++; /* not IPv4 (ARP, IPv6): this relay forwards IPv4 only */
            continue;
        }
        if (buf[1] != 0) /* gso_type: a super-packet, bulk TCP */
            *super = 1;
        memcpy(buf + VNET, mac[o][1], 6);
        memcpy(buf + VNET + 6, mac[o][0], 6);
        if (write(p->fd[o], buf, (size_t)r) == r) {
            p->forwarded++;
            n++;
        } else {
            p->dropped++;
        }
    }
    return n;
}

static void *run(void *arg)
{
    struct pair *p = arg;
    size_t size = VNET + 14 + 65535;
    unsigned char *buf = malloc(size);
    if (buf == NULL)
        return NULL;
    struct pollfd pf[2] = {{p->fd[0], POLLIN, 0}, {p->fd[1], POLLIN, 0}};
    double last_super = 0;
    while (!stopping) {
        int pr = poll(pf, 2, 200);
        if (pr <= 0)
            continue;
        double now = now_s(), end = 0;
        for (;;) {
            int super = 0;
            long n = drain(p, 0, buf, size, &super) + drain(p, 1, buf, size, &super);
            if (super)
                last_super = now;
            if (!(pause_s > 0 && n >= 2 && !super && now - last_super > BULK_QUIET))
                break;
            if (end == 0)
                end = now + hold_s;
            if (now >= end || stopping)
                break;
            struct timespec ts = {0, (long)(pause_s * 1e9)};
            nanosleep(&ts, NULL);
            now = now_s();
        }
    }
    free(buf);
    return NULL;
}

static void on_signal(int sig)
{
    (void)sig;
    stopping = 1;
}

int main(int argc, char **argv)
{
    if (argc < 9 || (argc - 7) % 2 != 0 || (argc - 7) / 2 > MAXQ) {
        fprintf(stderr, "usage: %s PAUSE_US HOLD_US LAN_SRC LAN_DST WAN_SRC WAN_DST LANFD WANFD "
                        "[LANFD WANFD ...]\n", argv[0]);
        return 2;
    }
    pause_s = atof(argv[1]) / 1e6;
    hold_s = atof(argv[2]) / 1e6;
    for (int k = 0; k < 4; k++)
        if (parse_mac(argv[3 + k], mac[k / 2][k % 2]) < 0) {
            fprintf(stderr, "%s: bad MAC %s\n", argv[0], argv[3 + k]);
            return 2;
        }
    int nq = (argc - 7) / 2;
    struct pair pairs[MAXQ];
    memset(pairs, 0, sizeof pairs);
    for (int q = 0; q < nq; q++) {
        pairs[q].fd[0] = atoi(argv[7 + 2 * q]);
        pairs[q].fd[1] = atoi(argv[8 + 2 * q]);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    /* as masqd with coalescing on: a 1 µs timer slack (threads inherit it), so a pause is PAUSE */
    if (pause_s > 0)
        prctl(PR_SET_TIMERSLACK, 1000UL, 0UL, 0UL, 0UL);
    for (int q = 0; q < nq; q++)
        if (pthread_create(&pairs[q].th, NULL, run, &pairs[q]) != 0) {
            fprintf(stderr, "%s: pthread_create failed\n", argv[0]);
            return 1;
        }
    printf("ready\n");
    fflush(stdout);
    uint64_t fwd = 0, drop = 0;
    for (int q = 0; q < nq; q++) {
        pthread_join(pairs[q].th, NULL);
        fwd += pairs[q].forwarded;
        drop += pairs[q].dropped;
    }
    printf("{\"forwarded\": %llu, \"dropped\": %llu}\n", (unsigned long long)fwd, (unsigned long long)drop);
    return 0;
}
