/*
 * Paced UDP sender for bench/run.py: sends prebuilt datagrams to 127.0.0.1:<port> at a target rate.
 *
 *   udp_sender PORT PAYLOAD_FILE PACKETS_PER_SECOND DURATION_SECONDS
 *
 * PAYLOAD_FILE holds records of [u16 little-endian length][u16 little-endian line count][bytes],
 * sent in a cycle. The run is bounded twice: it stops after rate x duration datagrams or after
 * duration + 2 s of wall time, whichever comes first. A rate of 0 sends as fast as it can for the
 * duration (to find the sender's own ceiling). Datagrams go out with sendmmsg() in batches of at
 * most 64, paced against CLOCK_MONOTONIC. It prints one JSON object on stdout:
 *   {"packets": N, "lines": N, "bytes": N, "errors": N, "elapsed": seconds, "max_behind_ms": ms}
 * where packets/lines/bytes count only datagrams the kernel accepted, and max_behind_ms is how far
 * the sender ever fell behind its schedule (it then catches up in a burst, so a large value means
 * the receiver saw bursts, not an even rate).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s PORT PAYLOAD_FILE PACKETS_PER_SECOND DURATION_SECONDS\n", argv[0]);
        return 2;
    }
    int port = atoi(argv[1]);
    double rate = atof(argv[3]);
    double duration = atof(argv[4]);
    if (port <= 0 || port > 65535 || rate < 0 || duration <= 0) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }

    FILE *f = fopen(argv[2], "rb");
    if (!f) {
        perror("payload file");
        return 1;
    }
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *blob = malloc((size_t)size);
    if (!blob || fread(blob, 1, (size_t)size, f) != (size_t)size) {
        fprintf(stderr, "cannot read payload file\n");
        return 1;
    }
    fclose(f);

    size_t count = 0;
    for (long off = 0; off + 4 <= size; count++) {
        off += 4 + (blob[off] | (blob[off + 1] << 8));
    }
    if (count == 0) {
        fprintf(stderr, "payload file holds no datagram\n");
        return 1;
    }
    struct iovec *iov = calloc(count, sizeof *iov);
    unsigned *lines = calloc(count, sizeof *lines);
    long off = 0;
    for (size_t i = 0; i < count; i++) {
        size_t len = blob[off] | (blob[off + 1] << 8);
        lines[i] = blob[off + 2] | (blob[off + 3] << 8);
        iov[i].iov_base = blob + off + 4;
        iov[i].iov_len = len;
        off += 4 + (long)len;
    }

    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) {
        perror("socket");
        return 1;
    }
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("connect");
        return 1;
    }

    struct mmsghdr msgs[BATCH];
    memset(msgs, 0, sizeof msgs);
    unsigned long long total = rate > 0 ? (unsigned long long)(rate * duration + 0.5) : ~0ULL;
    unsigned long long sent = 0, sent_lines = 0, sent_bytes = 0, errors = 0, max_behind = 0;
    size_t next = 0;
    double start = now();
    double deadline = start + duration + (rate > 0 ? 2.0 : 0.0);
    double t = start;

    while (sent < total) {
        t = now();
        if (t >= deadline) {
            break;
        }
        unsigned long long due = rate > 0 ? (unsigned long long)((t - start) * rate) + 1 : sent + BATCH;
        if (due > total) {
            due = total;
        }
        if (due <= sent) {
            struct timespec pause = {0, 50000};
            nanosleep(&pause, NULL);
            continue;
        }
        if (rate > 0 && due - sent > max_behind) {
            max_behind = due - sent;
        }
        unsigned want = due - sent > BATCH ? BATCH : (unsigned)(due - sent);
        for (unsigned i = 0; i < want; i++) {
            msgs[i].msg_hdr.msg_iov = &iov[(next + i) % count];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        int n = sendmmsg(fd, msgs, want, 0);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            errors++;
            /* ENOBUFS/EAGAIN/ECONNREFUSED: count the datagram as not sent and move on. */
            next = (next + 1) % count;
            sent++;
            continue;
        }
        for (int i = 0; i < n; i++) {
            size_t k = (next + (size_t)i) % count;
            sent_lines += lines[k];
            sent_bytes += iov[k].iov_len;
        }
        next = (next + (size_t)n) % count;
        sent += (unsigned long long)n;
    }
    double elapsed = now() - start;
    printf("{\"packets\": %llu, \"lines\": %llu, \"bytes\": %llu, \"errors\": %llu, \"elapsed\": %.6f, "
           "\"max_behind_ms\": %.3f}\n",
           sent - errors, sent_lines, sent_bytes, errors, elapsed,
           rate > 0 ? (double)max_behind / rate * 1000.0 : 0.0);
    close(fd);
    return 0;
}
