/*
 * bench/pktgen.c: the packet generator and counter of bench/e2e.py's small-packet workloads.
 *
 * Built by bench/e2e.py (cc -O2) and run inside the lab's namespaces only: it sends to the
 * address it is given and nowhere else, for a bounded time, at a bounded rate.
 *
 *   pktgen send udp|esp|gre DST RATE SECONDS SIZE ARG
 *       RATE packets/s (paced in batches with sendmmsg) for SECONDS, SIZE bytes of IP payload
 *       (UDP: the datagram's payload; ESP: SPI and sequence number then filler; GRE: an enhanced
 *       GRE header, key ARG, with a PPP payload). ARG: the UDP port, the ESP SPI or the GRE key.
 *       UDP goes through a connected UDP socket, ESP and GRE through raw sockets of their
 *       protocol (the kernel builds the IPv4 header). Prints {"sent": N, "seconds": T}.
 *   pktgen recv udp|esp|gre SECONDS [PORT]
 *       Counts what arrives (UDP: on PORT; ESP and GRE: every packet of the protocol) until
 *       SECONDS have passed; prints {"received": N}.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAXB 64
#define MAX_RATE 5000000.0
#define MAX_SECONDS 60.0

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int proto_of(const char *name)
{
    if (strcmp(name, "udp") == 0)
        return IPPROTO_UDP;
    if (strcmp(name, "esp") == 0)
        return IPPROTO_ESP;
    if (strcmp(name, "gre") == 0)
        return IPPROTO_GRE;
    return -1;
}

static int usage(void)
{
    fprintf(stderr, "usage: pktgen send udp|esp|gre DST RATE SECONDS SIZE ARG | recv udp|esp|gre SECONDS [PORT]\n");
    return 2;
}

static int do_send(int proto, const char *dst, double rate, double seconds, int size, unsigned long arg)
{
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    if (inet_pton(AF_INET, dst, &sa.sin_addr) != 1 || rate <= 0 || rate > MAX_RATE || seconds <= 0
        || seconds > MAX_SECONDS || size < 8 || size > 1400)
        return usage();
    int fd;
    if (proto == IPPROTO_UDP) {
        fd = socket(AF_INET, SOCK_DGRAM, 0);
        sa.sin_port = htons((uint16_t)arg);
    } else {
        fd = socket(AF_INET, SOCK_RAW, proto);
    }
    if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        perror("pktgen: socket");
        return 1;
    }
    int sndbuf = 4 << 20;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf));
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    static uint8_t bufs[MAXB][1500];
    struct mmsghdr msgs[MAXB];
    struct iovec iov[MAXB];
    memset(msgs, 0, sizeof(msgs));
    for (int i = 0; i < MAXB; i++) {
        uint8_t *b = bufs[i];
        memset(b, 0x5a, (size_t)size);
        if (proto == IPPROTO_ESP) {
            uint32_t spi = htonl((uint32_t)arg);
            memcpy(b, &spi, 4);
        } else if (proto == IPPROTO_GRE) {
            /* K and S set, version 1, PPP; payload length; key (the call ID); then a PPP frame */
            uint8_t h[8] = {0x30, 0x01, 0x88, 0x0b, 0, 0, (uint8_t)(arg >> 8), (uint8_t)arg};
            unsigned plen = (unsigned)size - 12;
            h[4] = (uint8_t)(plen >> 8);
            h[5] = (uint8_t)plen;
            memcpy(b, h, 8);
            b[12] = 0xff;
            b[13] = 0x03;
            b[14] = 0x00;
            b[15] = 0x21;
        }
        iov[i].iov_base = b;
        iov[i].iov_len = (size_t)size;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    /* batches: at most about 20 000 wake-ups a second */
    int batch = (int)(rate / 20000.0) + 1;
    if (batch > MAXB)
        batch = MAXB;
    double gap = batch / rate, t0 = now(), next = t0, end = t0 + seconds;
    unsigned long long sent = 0;
    uint32_t seq = 0;
    while (1) {
        double t = now();
        if (t >= end)
            break;
        if (t < next) {
            double d = next - t;
            struct timespec ts = {(time_t)d, (long)((d - (time_t)d) * 1e9)};
            nanosleep(&ts, NULL);
            continue;
        }
        for (int i = 0; i < batch; i++) {
            uint32_t s = htonl(++seq);
            memcpy(bufs[i] + (proto == IPPROTO_GRE ? 8 : 4), &s, 4);
        }
        int n = sendmmsg(fd, msgs, (unsigned)batch, 0);
        if (n > 0)
            sent += (unsigned long long)n;
        next += gap;
        if (next < t - 0.01)
            next = t; /* fell behind (the machine is busy): no burst to catch up */
    }
    printf("{\"sent\": %llu, \"seconds\": %.6f}\n", sent, now() - t0);
    return 0;
}

static int do_recv(int proto, double seconds, unsigned port)
{
    if (seconds <= 0 || seconds > MAX_SECONDS)
        return usage();
    int fd;
    if (proto == IPPROTO_UDP) {
        struct sockaddr_in sa = {0};
        sa.sin_family = AF_INET;
        sa.sin_port = htons((uint16_t)port);
        fd = socket(AF_INET, SOCK_DGRAM, 0);
        if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
            perror("pktgen: bind");
            return 1;
        }
    } else {
        fd = socket(AF_INET, SOCK_RAW, proto);
        if (fd < 0) {
            perror("pktgen: socket");
            return 1;
        }
    }
    int rcvbuf = 16 << 20;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf));
    static uint8_t bufs[MAXB][2048];
    struct mmsghdr msgs[MAXB];
    struct iovec iov[MAXB];
    memset(msgs, 0, sizeof(msgs));
    for (int i = 0; i < MAXB; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = sizeof(bufs[i]);
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    printf("ready\n");
    fflush(stdout);
    unsigned long long got = 0;
    double end = now() + seconds;
    while (1) {
        double left = end - now();
        if (left <= 0)
            break;
        struct pollfd pf = {fd, POLLIN, 0};
        int r = poll(&pf, 1, (int)(left * 1000) + 1);
        if (r <= 0)
            continue;
        int n = recvmmsg(fd, msgs, MAXB, MSG_DONTWAIT, NULL);
        if (n > 0)
            got += (unsigned long long)n;
    }
    printf("{\"received\": %llu}\n", got);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 4)
        return usage();
    int proto = proto_of(argv[2]);
    if (proto < 0)
        return usage();
    if (strcmp(argv[1], "send") == 0 && argc == 8)
        return do_send(proto, argv[3], atof(argv[4]), atof(argv[5]), atoi(argv[6]), strtoul(argv[7], NULL, 0));
    if (strcmp(argv[1], "recv") == 0)
        return do_recv(proto, atof(argv[3]), argc > 4 ? (unsigned)atoi(argv[4]) : 0);
    return usage();
}
