/* fio's libaio engine in miniature, for the lab guest (the golden image has no fio).
 *
 *   iobench DEVICE MODE BS IODEPTH SECONDS [SPAN_BYTES]
 *   MODE: randread | randwrite | read | write
 *
 * O_DIRECT, Linux native AIO (io_setup/io_submit/io_getevents through raw syscalls, so it links
 * statically with nothing but libc), IODEPTH requests kept in flight, offsets aligned to BS,
 * random offsets uniform over [0, SPAN) (xorshift), sequential ones wrapping at SPAN. Prints one
 * JSON line: ops, seconds, iops, MiB/s, mean latency in microseconds.
 * Build: gcc -O2 -static -o iobench guest_iobench.c
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/fs.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static uint64_t rng = 88172645463325252ULL;
static uint64_t xs(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

int main(int argc, char **argv)
{
    if (argc < 6) {
        fprintf(stderr, "usage: %s DEVICE randread|randwrite|read|write BS IODEPTH SECONDS [SPAN]\n", argv[0]);
        return 2;
    }
    const char *mode = argv[2];
    size_t bs = strtoull(argv[3], NULL, 0);
    int depth = atoi(argv[4]);
    double secs = atof(argv[5]);
    int rnd = !strncmp(mode, "rand", 4);
    int wr = strstr(mode, "write") != NULL;
    int fd = open(argv[1], (wr ? O_RDWR : O_RDONLY) | O_DIRECT);
    if (fd < 0) {
        perror(argv[1]);
        return 1;
    }
    uint64_t span = 0;
    if (argc > 6)
        span = strtoull(argv[6], NULL, 0);
    if (!span && ioctl(fd, BLKGETSIZE64, &span) < 0) {
        perror("BLKGETSIZE64");
        return 1;
    }
    uint64_t nblocks = span / bs;
    if (depth < 1 || depth > 256 || !nblocks) {
        fprintf(stderr, "bad depth or span\n");
        return 2;
    }
    aio_context_t ctx = 0;
    if (syscall(SYS_io_setup, depth, &ctx) < 0) {
        perror("io_setup");
        return 1;
    }
    struct iocb *cbs = calloc(depth, sizeof *cbs);
    double *start = calloc(depth, sizeof *start);
    struct io_event *ev = calloc(depth, sizeof *ev);
    uint64_t seq = 0, ops = 0;
    double lat = 0;
    for (int i = 0; i < depth; i++) {
        void *buf;
        if (posix_memalign(&buf, 4096, bs))
            return 1;
        memset(buf, 0x5a + i, bs);
        cbs[i].aio_data = (uint64_t)i;
        cbs[i].aio_fildes = (uint32_t)fd;
        cbs[i].aio_lio_opcode = wr ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
        cbs[i].aio_buf = (uint64_t)(uintptr_t)buf;
        cbs[i].aio_nbytes = bs;
    }
    double t0 = now(), end = t0 + secs;
    for (int i = 0; i < depth; i++) {
        cbs[i].aio_offset = (int64_t)((rnd ? xs() % nblocks : seq++ % nblocks) * bs);
        struct iocb *p = &cbs[i];
        start[i] = now();
        if (syscall(SYS_io_submit, ctx, 1, &p) != 1) {
            perror("io_submit");
            return 1;
        }
    }
    int inflight = depth;
    while (inflight) {
        int n = (int)syscall(SYS_io_getevents, ctx, 1, depth, ev, NULL);
        if (n < 0) {
            perror("io_getevents");
            return 1;
        }
        double t = now();
        for (int k = 0; k < n; k++) {
            int i = (int)ev[k].data;
            if (ev[k].res != (int64_t)bs) {
                fprintf(stderr, "I/O error at %lld: %lld\n", (long long)cbs[i].aio_offset, (long long)ev[k].res);
                return 1;
            }
            ops++;
            lat += t - start[i];
            inflight--;
            if (t < end) {
                cbs[i].aio_offset = (int64_t)((rnd ? xs() % nblocks : seq++ % nblocks) * bs);
                struct iocb *p = &cbs[i];
                start[i] = t;
                if (syscall(SYS_io_submit, ctx, 1, &p) != 1) {
                    perror("io_submit");
                    return 1;
                }
                inflight++;
            }
        }
    }
    double el = now() - t0;
    printf("{\"mode\": \"%s\", \"bs\": %zu, \"depth\": %d, \"ops\": %llu, \"seconds\": %.3f, \"iops\": %.1f, "
           "\"mib_s\": %.2f, \"lat_us\": %.1f}\n",
           mode, bs, depth, (unsigned long long)ops, el, ops / el, ops * (double)bs / el / 1048576.0,
           ops ? lat / ops * 1e6 : 0.0);
    return 0;
}
