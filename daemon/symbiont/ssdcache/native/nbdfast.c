/* The NBD transmission phase of one elastic-SSD export, outside Python's GIL.
 *
 * Python (nbdserver.py) does the handshake (export name + secret check) and then hands the
 * connected socket to nbdx_serve(), called through ctypes (which releases the GIL). Here
 * NTHREADS workers serve the connection leader/follower style: the worker holding recv_mu
 * reads one request (header, and the payload of a WRITE), lets go of recv_mu, translates and
 * does the I/O, and sends its reply under send_mu. Replies carry the client's handle, so
 * their order does not matter (simple replies only).
 *
 * Translation is SymFlex's, exactly as layout.translate_range: byte b of the virtual disk is
 * byte (map[b >> 20] << 20) | (b & (1 MiB - 1)) of the pool. The map is the Python Export's own
 * array('q') (its buffer, never reallocated): Python writes its entries only while holding
 * this export's rwlock exclusively (nbdx_wrlock); a request translates and does its I/O under
 * the shared lock. So when an unmap returns, no request still uses the unmapped block, and a
 * request sees either the old or the new map as a whole, never half of a resize. A request
 * touching an unbacked block (-1) is refused whole with EIO: nothing is read or written.
 *
 * The client is untrusted: a bad magic, a write larger than MAX_REQUEST or a truncated frame
 * ends the connection (return -1 with the reason in last_error); a bad command, flags or range
 * is answered with an error and the connection goes on, exactly as the Python path.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/aio_abi.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define BLOCK_SHIFT 20
#define POOL_BLOCK (1ULL << BLOCK_SHIFT)
#define ALIGN 4096
#define REQUEST_MAGIC 0x25609513u
#define SIMPLE_REPLY_MAGIC 0x67446698u
#define CMD_READ 0
#define CMD_WRITE 1
#define CMD_DISC 2
#define CMD_FLUSH 3
#define CMD_TRIM 4
#define CMD_WRITE_ZEROES 6
#define CMDFLAG_FUA 1
#define CMDFLAGS_KNOWN 3
#define KEEP_BUFFER (4u << 20) /* a worker keeps a buffer up to this size between requests */
#define MAX_PIECES 64          /* 32 MiB / 1 MiB + 2 */
#define CHUNK (256u << 10)     /* a large aligned request goes to the pool as parallel chunks */
#define MAX_CHUNKS 64
#define SPLICE_MIN (64u << 10) /* smaller reads: one pread + sendmsg costs less than pipe set-up */

enum { ST_READS, ST_WRITES, ST_FLUSHES, ST_TRIMS, ST_ZEROES, ST_READ_BYTES, ST_WRITE_BYTES,
       ST_UNBACKED, ST_IO_ERRORS, ST_INVALID, ST_SPLICED, ST_N };

struct export {
    pthread_rwlock_t lock;
    int64_t *map;
    double *last_access;
    int64_t size_blocks;
    uint64_t size;
    uint64_t pool_bytes;
    int fd, dfd; /* buffered, O_DIRECT (-1: none) */
    int read_only;
    uint32_t max_request;
    uint32_t chunk; /* large aligned requests go to the pool in chunks of this size, in parallel; 0: off */
    int splice;     /* reads with others in flight go pool -> pipe -> socket (splice), no user copy */
    uint64_t stats[ST_N];
    pthread_mutex_t err_mu;
    char last_error[256];
    uint64_t error_seq; /* errors recorded so far (under err_mu) */
};

struct conn {
    struct export *ex;
    int sock;
    pthread_mutex_t recv_mu, send_mu;
    unsigned char *rbuf; /* what came off the socket and is not parsed yet (under recv_mu) */
    size_t rcap, rpos, rlen;
    volatile int done;
    int failed;
    int max_threads, nthreads; /* workers allowed, started (under recv_mu) */
    int waiting;               /* workers waiting to become the reader (atomic) */
    int inflight;              /* requests read and not yet answered (atomic) */
    pthread_t threads[64];
    char why[200];
};

static void set_error(struct export *ex, const char *msg)
{
    pthread_mutex_lock(&ex->err_mu);
    snprintf(ex->last_error, sizeof ex->last_error, "%s", msg);
    ex->error_seq++;
    pthread_mutex_unlock(&ex->err_mu);
}

struct export *nbdx_export_new(int64_t *map, double *last_access, int64_t size_blocks, int fd, int dfd,
                               int read_only, uint64_t pool_bytes, uint32_t max_request)
{
    struct export *ex = calloc(1, sizeof *ex);
    if (!ex)
        return NULL;
    pthread_rwlockattr_t a;
    pthread_rwlockattr_init(&a);
    /* a waiting remap goes before new requests: a resize commit is not starved by guest I/O */
    pthread_rwlockattr_setkind_np(&a, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&ex->lock, &a);
    pthread_rwlockattr_destroy(&a);
    pthread_mutex_init(&ex->err_mu, NULL);
    ex->map = map;
    ex->last_access = last_access;
    ex->size_blocks = size_blocks;
    ex->size = (uint64_t)size_blocks << BLOCK_SHIFT;
    ex->fd = fd;
    ex->dfd = dfd;
    ex->read_only = read_only;
    ex->pool_bytes = pool_bytes;
    ex->max_request = max_request;
    ex->chunk = CHUNK;
    ex->splice = 1;
    return ex;
}

void nbdx_export_free(struct export *ex)
{
    if (!ex)
        return;
    pthread_rwlock_destroy(&ex->lock);
    pthread_mutex_destroy(&ex->err_mu);
    free(ex);
}

void nbdx_set_fds(struct export *ex, int fd, int dfd)
{
    pthread_rwlock_wrlock(&ex->lock);
    ex->fd = fd;
    ex->dfd = dfd;
    pthread_rwlock_unlock(&ex->lock);
}

/* Chunk size of the parallel path (a multiple of 4 KiB; 0 turns it off: benchmarks compare). */
void nbdx_set_chunk(struct export *ex, uint32_t chunk)
{
    __atomic_store_n(&ex->chunk, chunk - chunk % ALIGN, __ATOMIC_RELEASE);
}

/* Reads through a pipe (splice) on or off (benchmarks compare). */
void nbdx_set_splice(struct export *ex, int on) { __atomic_store_n(&ex->splice, on, __ATOMIC_RELEASE); }

void nbdx_wrlock(struct export *ex) { pthread_rwlock_wrlock(&ex->lock); }
void nbdx_unlock(struct export *ex) { pthread_rwlock_unlock(&ex->lock); }

void nbdx_stats(struct export *ex, uint64_t *out)
{
    for (int i = 0; i < ST_N; i++)
        out[i] = __atomic_load_n(&ex->stats[i], __ATOMIC_RELAXED);
}

uint64_t nbdx_last_error(struct export *ex, char *out, size_t n)
{
    pthread_mutex_lock(&ex->err_mu);
    snprintf(out, n, "%s", ex->last_error);
    uint64_t seq = ex->error_seq;
    pthread_mutex_unlock(&ex->err_mu);
    return seq;
}

static inline void bump(struct export *ex, int k, uint64_t v) { __atomic_fetch_add(&ex->stats[k], v, __ATOMIC_RELAXED); }

static inline uint64_t be64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = v << 8 | p[i];
    return v;
}
static inline uint32_t be32(const unsigned char *p) { return (uint32_t)p[0] << 24 | p[1] << 16 | p[2] << 8 | p[3]; }
static inline uint16_t be16(const unsigned char *p) { return (uint16_t)(p[0] << 8 | p[1]); }

/* Read exactly n bytes through the connection's buffer: one recv brings in as many pipelined
 * requests as the client has sent; a large payload goes straight into buf.
 * 1: done, 0: EOF before the first byte, -1: error or EOF in the middle. */
static int readn(struct conn *c, unsigned char *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        if (c->rpos < c->rlen) {
            size_t k = c->rlen - c->rpos < n - got ? c->rlen - c->rpos : n - got;
            memcpy(buf + got, c->rbuf + c->rpos, k);
            c->rpos += k;
            got += k;
            continue;
        }
        ssize_t r;
        if (n - got >= c->rcap / 2) {
            r = recv(c->sock, buf + got, n - got, 0);
            if (r > 0) {
                got += (size_t)r;
                continue;
            }
        } else {
            r = recv(c->sock, c->rbuf, c->rcap, 0);
            if (r > 0) {
                c->rpos = 0;
                c->rlen = (size_t)r;
                continue;
            }
        }
        if (r < 0 && errno == EINTR)
            continue;
        return got == 0 ? 0 : -1;
    }
    return 1;
}

/* Step an iovec array past the first `done` bytes (after a short transfer). */
static void iov_advance(struct iovec **iov, size_t *n, size_t done)
{
    while (*n && done >= (*iov)->iov_len) {
        done -= (*iov)->iov_len;
        (*iov)++;
        (*n)--;
    }
    if (*n && done) {
        (*iov)->iov_base = (char *)(*iov)->iov_base + done;
        (*iov)->iov_len -= done;
    }
}

/* Send all of iov (it is consumed) on a socket; -1 if the peer went away. */
static int send_iov(int sock, struct iovec *iov, int n)
{
    struct msghdr m = {0};
    m.msg_iov = iov;
    m.msg_iovlen = (size_t)n;
    while (m.msg_iovlen) {
        ssize_t r = sendmsg(sock, &m, MSG_NOSIGNAL);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        iov_advance(&m.msg_iov, &m.msg_iovlen, (size_t)r);
    }
    return 0;
}

static int sendv(struct conn *c, struct iovec *iov, int n) { return send_iov(c->sock, iov, n); }

static void header(unsigned char *h, uint32_t err, const unsigned char *handle);

static void reply(struct conn *c, uint32_t err, const unsigned char *handle, void *data, size_t len)
{
    unsigned char h[16];
    header(h, err, handle);
    struct iovec iov[2] = {{h, 16}, {data, len}};
    pthread_mutex_lock(&c->send_mu);
    int r = sendv(c, iov, data && len ? 2 : 1);
    pthread_mutex_unlock(&c->send_mu);
    if (r < 0)
        c->done = 1; /* the client went away; the reader sees EOF too */
}

struct piece { uint64_t phys, boff, len; };

/* Translate [off, off+len) under the shared lock; -1 (and *bad = lbn) when a block is unbacked. */
static int translate(struct export *ex, uint64_t off, uint64_t len, struct piece *p, int *np, int64_t *bad)
{
    int n = 0;
    uint64_t done = 0;
    while (len) {
        int64_t lbn = (int64_t)(off >> BLOCK_SHIFT);
        uint64_t o = off & (POOL_BLOCK - 1), k = POOL_BLOCK - o < len ? POOL_BLOCK - o : len;
        int64_t pbn = __atomic_load_n(&ex->map[lbn], __ATOMIC_ACQUIRE);
        if (pbn < 0) {
            *bad = lbn;
            return -1;
        }
        uint64_t phys = (uint64_t)pbn << BLOCK_SHIFT | o;
        if (phys + k > ex->pool_bytes) {
            *bad = -2 - lbn;
            return -1;
        }
        if (n && p[n - 1].phys + p[n - 1].len == phys)
            p[n - 1].len += k;
        else {
            if (n == MAX_PIECES)
                return -1;
            p[n++] = (struct piece){phys, done, k};
        }
        done += k;
        off += k;
        len -= k;
    }
    *np = n;
    return 0;
}

/* Why translate() refused (its *bad). */
static void unbacked_msg(int64_t bad, char *msg, size_t n)
{
    if (bad >= 0)
        snprintf(msg, n, "logical block %lld is not backed", (long long)bad);
    else
        snprintf(msg, n, "logical block %lld maps outside the pool", (long long)(-2 - bad));
}

static void touch(struct export *ex, uint64_t off, uint64_t len)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double now = (double)ts.tv_sec + ts.tv_nsec * 1e-9;
    for (uint64_t l = off >> BLOCK_SHIFT; l <= (off + len - 1) >> BLOCK_SHIFT; l++)
        ex->last_access[l] = now;
}

static unsigned char *zero_block;
static pthread_once_t zero_once = PTHREAD_ONCE_INIT;
static void zero_init(void)
{
    if (posix_memalign((void **)&zero_block, ALIGN, POOL_BLOCK) == 0)
        memset(zero_block, 0, POOL_BLOCK);
}
static const unsigned char *zeros(void)
{
    pthread_once(&zero_once, zero_init);
    return zero_block;
}

static int chunked_io(struct conn *c, aio_context_t aio, int cmd, const struct piece *p, int n, unsigned char *buf,
                      uint64_t len, const unsigned char *handle, int stream, char *msg, size_t msgn,
                      size_t *rest, size_t *hsent);

/* Returns 0, an errno for the reply, -2 when the reply was streamed already, or -3 when the
 * connection had to end in the middle of a streamed reply. */
static int do_io(struct conn *c, aio_context_t aio, int cmd, uint64_t off, uint64_t len, unsigned char *buf,
                 const unsigned char *handle, char *msg, size_t msgn)
{
    struct export *ex = c->ex;
    struct piece p[MAX_PIECES];
    int n = 0;
    int64_t bad = 0;
    int rc = 0;
    pthread_rwlock_rdlock(&ex->lock);
    if (translate(ex, off, len, p, &n, &bad) < 0) {
        pthread_rwlock_unlock(&ex->lock);
        bump(ex, ST_UNBACKED, 1);
        unbacked_msg(bad, msg, msgn);
        return EIO;
    }
    if (cmd != CMD_WRITE_ZEROES) {
        int stream = cmd == CMD_READ && __atomic_load_n(&c->inflight, __ATOMIC_ACQUIRE) == 1;
        size_t rest = 0, hsent = 0;
        int r = chunked_io(c, aio, cmd, p, n, buf, len, handle, stream, msg, msgn, &rest, &hsent);
        if (r != 1) {
            if (r == 0 || r == 2)
                touch(ex, off, len);
            pthread_rwlock_unlock(&ex->lock);
            if (r == 2) { /* the rest of a streamed reply, outside the export's lock */
                unsigned char h[16];
                header(h, 0, handle);
                struct iovec iov[2];
                int ni = 0;
                if (hsent < 16)
                    iov[ni++] = (struct iovec){h + hsent, 16 - hsent};
                if (rest)
                    iov[ni++] = (struct iovec){buf + len - rest, rest};
                if (ni && sendv(c, iov, ni) < 0)
                    c->done = 1;
                pthread_mutex_unlock(&c->send_mu);
                return -2;
            }
            if (r == -1 || r == EIO)
                bump(ex, ST_IO_ERRORS, 1);
            if (r == -1) {
                char full[256];
                snprintf(full, sizeof full, "read %llu+%llu: %s (connection closed mid-reply)",
                         (unsigned long long)off, (unsigned long long)len, msg);
                set_error(ex, full);
                return -3;
            }
            return r;
        }
    }
    for (int i = 0; i < n && !rc; i++) {
        uint64_t left = p[i].len, pos = p[i].phys, bo = p[i].boff;
        while (left) {
            ssize_t r;
            if (cmd == CMD_WRITE_ZEROES) {
                size_t k = left < POOL_BLOCK ? left : POOL_BLOCK;
                int fd = ex->dfd >= 0 && pos % ALIGN == 0 && k % ALIGN == 0 ? ex->dfd : ex->fd;
                r = pwrite(fd, zeros(), k, (off_t)pos);
            } else {
                int fd = ex->dfd >= 0 && pos % ALIGN == 0 && left % ALIGN == 0 && bo % ALIGN == 0 ? ex->dfd : ex->fd;
                r = cmd == CMD_READ ? pread(fd, buf + bo, left, (off_t)pos) : pwrite(fd, buf + bo, left, (off_t)pos);
            }
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0) {
                snprintf(msg, msgn, "%s at %llu: %s", cmd == CMD_READ ? "read" : "write", (unsigned long long)pos,
                         r < 0 ? strerror(errno) : "short");
                rc = EIO;
                break;
            }
            left -= (uint64_t)r;
            pos += (uint64_t)r;
            bo += (uint64_t)r;
        }
    }
    if (!rc)
        touch(ex, off, len);
    pthread_rwlock_unlock(&ex->lock);
    if (rc)
        bump(ex, ST_IO_ERRORS, 1);
    return rc;
}

static void header(unsigned char *h, uint32_t err, const unsigned char *handle)
{
    uint32_t m = SIMPLE_REPLY_MAGIC;
    for (int i = 0; i < 4; i++) {
        h[i] = (unsigned char)(m >> (24 - 8 * i));
        h[4 + i] = (unsigned char)(err >> (24 - 8 * i));
    }
    memcpy(h + 8, handle, 8);
}

/* A large aligned READ or WRITE as parallel O_DIRECT chunks through Linux AIO (the pool's
 * device serves several at once, as it does for a guest's plain virtio disk with queue depth).
 * With stream (a READ and nothing else in flight: QD 1), the reply header and each chunk go
 * out as soon as it and those before it are in, so the client copies chunk k while chunk k+1
 * is read. Called under the export's shared lock with translated pieces.
 * Returns 0 (done, nothing sent), EIO (nothing sent), 1 (not applicable: use the synchronous
 * path), 2 (streamed: the send lock is held, *hsent header bytes and all but the last *rest data
 * bytes are out; the caller sends the rest once it let go of the export's lock) or -1 (a chunk
 * failed after the reply began, or the client is gone: the connection ends). */
static int chunked_io(struct conn *c, aio_context_t aio, int cmd, const struct piece *p, int n, unsigned char *buf,
                      uint64_t len, const unsigned char *handle, int stream, char *msg, size_t msgn,
                      size_t *rest, size_t *hsent)
{
    struct export *ex = c->ex;
    uint64_t chunk = __atomic_load_n(&ex->chunk, __ATOMIC_ACQUIRE);
    if (!aio || !chunk || ex->dfd < 0 || len < 2 * chunk || len > (uint64_t)MAX_CHUNKS * chunk)
        return 1;
    struct iocb cb[MAX_CHUNKS], *cbp[MAX_CHUNKS];
    int k = 0;
    for (int i = 0; i < n; i++) {
        if (p[i].phys % ALIGN || p[i].len % ALIGN || p[i].boff % ALIGN)
            return 1;
        for (uint64_t o = 0; o < p[i].len; o += chunk) {
            if (k == MAX_CHUNKS)
                return 1;
            memset(&cb[k], 0, sizeof cb[k]);
            cb[k].aio_data = (uint64_t)k;
            cb[k].aio_fildes = (uint32_t)ex->dfd;
            cb[k].aio_lio_opcode = cmd == CMD_READ ? IOCB_CMD_PREAD : IOCB_CMD_PWRITE;
            cb[k].aio_buf = (uint64_t)(uintptr_t)(buf + p[i].boff + o);
            cb[k].aio_nbytes = p[i].len - o < chunk ? p[i].len - o : chunk;
            cb[k].aio_offset = (int64_t)(p[i].phys + o);
            cbp[k] = &cb[k];
            k++;
        }
    }
    int sub = 0;
    while (sub < k) {
        long r = syscall(SYS_io_submit, aio, (long)(k - sub), cbp + sub);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        sub += (int)r;
    }
    if (sub == 0)
        return 1; /* nothing submitted: the synchronous path does it */
    int rc = sub < k ? EIO : 0;
    if (rc)
        snprintf(msg, msgn, "io_submit: %s", strerror(errno));
    unsigned char ok[MAX_CHUNKS] = {0};
    int reaped = 0, next = 0, started = 0, stalled = 0, broken = 0;
    size_t avail = 0, hs = 0, ds = 0;
    unsigned char h[16];
    header(h, 0, handle);
    struct io_event ev[MAX_CHUNKS];
    while (reaped < sub) {
        long r = syscall(SYS_io_getevents, aio, 1L, (long)MAX_CHUNKS, ev, NULL);
        if (r < 0)
            continue; /* EINTR; the buffers are in use until every chunk is reaped */
        for (long j = 0; j < r; j++) {
            int i = (int)ev[j].data;
            if (ev[j].res == (int64_t)cb[i].aio_nbytes)
                ok[i] = 1;
            else if (!rc) {
                snprintf(msg, msgn, "%s at %llu: %s", cmd == CMD_READ ? "read" : "write",
                         (unsigned long long)cb[i].aio_offset,
                         ev[j].res < 0 ? strerror((int)-ev[j].res) : "short");
                rc = EIO;
            }
        }
        reaped += (int)r;
        if (!stream || rc || stalled || broken || c->done)
            continue;
        while (next < k && ok[next])
            next++;
        if (!next)
            continue;
        avail = (size_t)((unsigned char *)(uintptr_t)cb[next - 1].aio_buf + cb[next - 1].aio_nbytes - buf);
        if (!started) {
            pthread_mutex_lock(&c->send_mu);
            started = 1;
        }
        /* Never block on the client while holding the export's lock: a client that stops
         * reading would hold up every resize. What does not fit now is sent after the lock. */
        while (hs < 16 || ds < avail) {
            struct iovec iov[2];
            int ni = 0;
            if (hs < 16)
                iov[ni++] = (struct iovec){h + hs, 16 - hs};
            if (ds < avail)
                iov[ni++] = (struct iovec){buf + ds, avail - ds};
            struct msghdr m = {0};
            m.msg_iov = iov;
            m.msg_iovlen = (size_t)ni;
            ssize_t w = sendmsg(c->sock, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    stalled = 1;
                else
                    broken = 1;
                break;
            }
            size_t hw = (size_t)w < 16 - hs ? (size_t)w : 16 - hs;
            hs += hw;
            ds += (size_t)w - hw;
        }
    }
    if (!started)
        return rc;
    if (rc || broken) { /* the header said success (or the client is gone): hang up */
        c->done = 1;
        shutdown(c->sock, SHUT_RDWR);
        pthread_mutex_unlock(&c->send_mu);
        return -1;
    }
    *rest = (size_t)len - ds; /* the send lock stays held: the caller sends the rest */
    *hsent = hs;
    return 2;
}

/* A worker's pipe for splice_read: fd[0] < 0 when it has none (yet, or splice does not work). */
struct wpipe { int fd[2]; size_t cap; int tried; };

static void wpipe_close(struct wpipe *wp)
{
    if (wp->fd[0] >= 0) {
        close(wp->fd[0]);
        close(wp->fd[1]);
    }
    wp->fd[0] = wp->fd[1] = -1;
    wp->cap = 0;
}

/* The pipe, made at the first read that can use it, as large as the kernel allows (a 1 MiB
 * request fits whole; 1 MiB is pipe-max-size's default, root may go above). */
static int wpipe_ready(struct wpipe *wp)
{
    if (wp->fd[0] >= 0 || wp->tried)
        return wp->fd[0] >= 0;
    wp->tried = 1;
    if (pipe2(wp->fd, O_CLOEXEC) < 0) {
        wp->fd[0] = wp->fd[1] = -1;
        return 0;
    }
    if (fcntl(wp->fd[1], F_SETPIPE_SZ, 4 << 20) < 0)
        fcntl(wp->fd[1], F_SETPIPE_SZ, 1 << 20);
    int cap = fcntl(wp->fd[1], F_GETPIPE_SZ);
    wp->cap = cap > 0 ? (size_t)cap : 0;
    return 1;
}

/* A READ while other requests are in flight, without copying the data through this process:
 * under the export's shared lock splice() reads the pieces from the pool's O_DIRECT descriptor
 * into the worker's pipe (the device writes fresh pages; nothing is copied by the CPU), and once
 * the lock is let go the reply header and then the pipe's pages go to the socket (AF_UNIX
 * attaches them to the socket buffer: MSG_SPLICE_PAGES). The client's recv is the only copy
 * left, as on the buffered path, where this process's pread-then-sendmsg added one more (and
 * the pinning of its buffer for O_DIRECT). The socket is written only after the lock is let go:
 * a client that stops reading holds up no resize.
 * Returns -2 (replied), -3 (the client went away mid-reply), EIO (nothing sent: the caller
 * replies the error) or -4 (not applicable: the caller takes the buffer path). */
static int splice_read(struct conn *c, struct wpipe *wp, uint64_t off, uint64_t len, const unsigned char *handle,
                       char *msg, size_t msgn)
{
    struct export *ex = c->ex;
    if (!__atomic_load_n(&ex->splice, __ATOMIC_ACQUIRE) || !wpipe_ready(wp) || len > wp->cap)
        return -4;
    struct piece p[MAX_PIECES];
    int n = 0;
    int64_t bad = 0;
    pthread_rwlock_rdlock(&ex->lock);
    if (ex->dfd < 0) {
        pthread_rwlock_unlock(&ex->lock);
        return -4;
    }
    if (translate(ex, off, len, p, &n, &bad) < 0) {
        pthread_rwlock_unlock(&ex->lock);
        return -4; /* do_io refuses it with the reason */
    }
    for (int i = 0; i < n; i++)
        if (p[i].phys % ALIGN || p[i].len % ALIGN) {
            pthread_rwlock_unlock(&ex->lock);
            return -4;
        }
    uint64_t in = 0;
    int rc = 0, err = 0;
    for (int i = 0; i < n && !rc; i++) {
        loff_t pos = (loff_t)p[i].phys;
        uint64_t left = p[i].len;
        while (left) {
            ssize_t r = splice(ex->dfd, &pos, wp->fd[1], NULL, left, SPLICE_F_MOVE);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0) {
                err = r < 0 ? errno : 0;
                snprintf(msg, msgn, "read at %llu: %s", (unsigned long long)pos, r < 0 ? strerror(errno) : "short");
                rc = EIO;
                break;
            }
            left -= (uint64_t)r;
            in += (uint64_t)r;
        }
    }
    if (!rc)
        touch(ex, off, len);
    pthread_rwlock_unlock(&ex->lock);
    if (rc) {
        wpipe_close(wp); /* whatever part came in is dropped with the pipe */
        if (in == 0 && (err == EINVAL || err == ENOSYS || err == EOPNOTSUPP)) {
            wp->tried = 1; /* this kernel cannot splice the pool: this worker uses its buffer */
            return -4;
        }
        wp->tried = 0;
        bump(ex, ST_IO_ERRORS, 1);
        return EIO;
    }
    unsigned char h[16];
    header(h, 0, handle);
    struct iovec iov[1] = {{h, 16}};
    pthread_mutex_lock(&c->send_mu);
    int broken = sendv(c, iov, 1) < 0;
    uint64_t out = 0;
    while (!broken && out < len) {
        ssize_t r = splice(wp->fd[0], NULL, c->sock, NULL, len - out, SPLICE_F_MOVE);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            broken = 1;
        else
            out += (uint64_t)r;
    }
    pthread_mutex_unlock(&c->send_mu);
    if (broken) {
        c->done = 1; /* the client went away; the reader sees EOF too */
        wpipe_close(wp);
        wp->tried = 0;
        return -3;
    }
    bump(ex, ST_SPLICED, 1);
    return -2;
}

static int flush_all(struct export *ex)
{
    int rc = fsync(ex->fd);
    if (!rc && ex->dfd >= 0)
        rc = fsync(ex->dfd);
    return rc;
}

static uint32_t validate(struct export *ex, int cmd, int flags, uint64_t off, uint64_t len)
{
    if (!(cmd == CMD_READ || cmd == CMD_WRITE || cmd == CMD_FLUSH || cmd == CMD_TRIM || cmd == CMD_WRITE_ZEROES))
        return EINVAL;
    if (flags & ~CMDFLAGS_KNOWN)
        return EINVAL;
    if (cmd == CMD_FLUSH)
        return 0;
    if (ex->read_only && (cmd == CMD_WRITE || cmd == CMD_TRIM || cmd == CMD_WRITE_ZEROES))
        return EPERM;
    if (cmd == CMD_READ && len > ex->max_request)
        return EINVAL;
    if (len == 0)
        return EINVAL;
    if (len > ex->size || off > ex->size - len)
        return cmd == CMD_WRITE ? ENOSPC : EINVAL;
    return 0;
}

static void fail(struct conn *c, const char *why)
{
    if (!c->failed) {
        c->failed = 1;
        snprintf(c->why, sizeof c->why, "%s", why);
    }
    c->done = 1;
}

static void *worker(void *arg);

/* Called by the reader, holding recv_mu, once it has a request: if no other worker is waiting
 * to read the next one, start one (up to max_threads). Workers are only as many as the
 * client's queue depth needs: at QD 1 two threads take turns, their buffers stay warm. */
static void maybe_spawn(struct conn *c)
{
    if (__atomic_load_n(&c->waiting, __ATOMIC_ACQUIRE) > 0 || c->nthreads >= c->max_threads)
        return;
    pthread_attr_t a;
    pthread_attr_init(&a);
    pthread_attr_setstacksize(&a, 256 << 10);
    if (pthread_create(&c->threads[c->nthreads - 1], &a, worker, c) == 0)
        c->nthreads++;
    pthread_attr_destroy(&a);
}

static void *worker(void *arg)
{
    struct conn *c = arg;
    struct export *ex = c->ex;
    unsigned char *buf = NULL;
    size_t cap = 0;
    unsigned char hdr[28];
    char msg[200];
    aio_context_t aio = 0; /* set up at the first large request (io_destroy costs an RCU grace period) */
    int aio_tried = 0;
    struct wpipe wp = {{-1, -1}, 0, 0};
    for (;;) {
        __atomic_fetch_add(&c->waiting, 1, __ATOMIC_ACQ_REL);
        pthread_mutex_lock(&c->recv_mu);
        __atomic_fetch_sub(&c->waiting, 1, __ATOMIC_ACQ_REL);
        if (c->done) {
            pthread_mutex_unlock(&c->recv_mu);
            break;
        }
        int r = readn(c, hdr, sizeof hdr);
        if (r == 0) { /* closed between two requests (no DISC): it just left */
            c->done = 1;
            pthread_mutex_unlock(&c->recv_mu);
            break;
        }
        if (r < 0) {
            fail(c, "truncated request header");
            pthread_mutex_unlock(&c->recv_mu);
            break;
        }
        uint32_t magic = be32(hdr);
        int flags = be16(hdr + 4), cmd = be16(hdr + 6);
        unsigned char handle[8];
        memcpy(handle, hdr + 8, 8);
        uint64_t off = be64(hdr + 16);
        uint32_t len = be32(hdr + 24);
        if (magic != REQUEST_MAGIC) {
            snprintf(msg, sizeof msg, "bad request magic %#x", magic);
            fail(c, msg);
            pthread_mutex_unlock(&c->recv_mu);
            break;
        }
        if (cmd == CMD_DISC) {
            c->done = 1;
            pthread_mutex_unlock(&c->recv_mu);
            break;
        }
        size_t need = cmd == CMD_READ || cmd == CMD_WRITE ? len : 0;
        if (cmd == CMD_WRITE && len > ex->max_request) {
            snprintf(msg, sizeof msg, "write of %u bytes exceeds %u", len, ex->max_request);
            fail(c, msg);
            pthread_mutex_unlock(&c->recv_mu);
            break;
        }
        if (cmd == CMD_READ && len > ex->max_request)
            need = 0; /* refused below */
        if (need > cap) {
            free(buf);
            cap = (need + ALIGN - 1) & ~(size_t)(ALIGN - 1);
            if (posix_memalign((void **)&buf, ALIGN, cap)) {
                buf = NULL;
                cap = 0;
                fail(c, "out of memory");
                pthread_mutex_unlock(&c->recv_mu);
                break;
            }
        }
        if (cmd == CMD_WRITE && readn(c, buf, len) != 1) {
            fail(c, "truncated write payload");
            pthread_mutex_unlock(&c->recv_mu);
            break;
        }
        __atomic_fetch_add(&c->inflight, 1, __ATOMIC_ACQ_REL);
        maybe_spawn(c);
        pthread_mutex_unlock(&c->recv_mu);

        uint32_t err = validate(ex, cmd, flags, off, len);
        if (err) {
            bump(ex, ST_INVALID, 1);
            reply(c, err, handle, NULL, 0);
            __atomic_fetch_sub(&c->inflight, 1, __ATOMIC_ACQ_REL);
            continue;
        }
        msg[0] = 0;
        int streamed = 0;
        switch (cmd) {
        case CMD_READ:
        case CMD_WRITE:
        case CMD_WRITE_ZEROES:
        {
            if (!aio_tried && ex->chunk && len >= 2 * (uint64_t)ex->chunk && cmd != CMD_WRITE_ZEROES) {
                aio_tried = 1;
                if (syscall(SYS_io_setup, MAX_CHUNKS, &aio) < 0)
                    aio = 0; /* no AIO: every request takes the synchronous path */
            }
            int r = -4;
            if (cmd == CMD_READ && len >= SPLICE_MIN && __atomic_load_n(&c->inflight, __ATOMIC_ACQUIRE) > 1)
                r = splice_read(c, &wp, off, len, handle, msg, sizeof msg);
            if (r == -4)
                r = do_io(c, aio, cmd, off, len, buf, handle, msg, sizeof msg);
            streamed = r < 0 ? r : 0;
            err = r > 0 ? (uint32_t)r : 0;
        }
            if (!err && cmd != CMD_READ && (flags & CMDFLAG_FUA) && flush_all(ex)) {
                snprintf(msg, sizeof msg, "flush: %s", strerror(errno));
                bump(ex, ST_IO_ERRORS, 1);
                err = EIO;
            }
            break;
        case CMD_FLUSH:
            if (flush_all(ex)) {
                snprintf(msg, sizeof msg, "flush: %s", strerror(errno));
                bump(ex, ST_IO_ERRORS, 1);
                err = EIO;
            }
            break;
        case CMD_TRIM: /* advisory: the block stays allocated to the VM */
            break;
        }
        if (streamed == -3) {
            /* the connection is ending; nothing more to say */
        } else if (err) {
            char full[256];
            static const char *names[] = {"read", "write", "disc", "flush", "trim", "?", "write_zeroes"};
            snprintf(full, sizeof full, "%s %llu+%u: %s", names[cmd], (unsigned long long)off, len, msg);
            set_error(ex, full);
            reply(c, err, handle, NULL, 0);
        } else {
            static const int counter[] = {ST_READS, ST_WRITES, -1, ST_FLUSHES, ST_TRIMS, -1, ST_ZEROES};
            bump(ex, counter[cmd], 1);
            if (cmd == CMD_READ)
                bump(ex, ST_READ_BYTES, len);
            else if (cmd == CMD_WRITE)
                bump(ex, ST_WRITE_BYTES, len);
            if (!streamed)
                reply(c, 0, handle, cmd == CMD_READ ? buf : NULL, cmd == CMD_READ ? len : 0);
        }
        __atomic_fetch_sub(&c->inflight, 1, __ATOMIC_ACQ_REL);
        if (cap > KEEP_BUFFER) {
            free(buf);
            buf = NULL;
            cap = 0;
        }
    }
    if (aio)
        syscall(SYS_io_destroy, aio);
    wpipe_close(&wp);
    free(buf);
    return NULL;
}

/* Serve the transmission phase of one connection until DISC, EOF or a protocol error.
 * Returns 0 after DISC, -1 otherwise with the reason in why. The socket is not closed. */
int nbdx_serve(struct export *ex, int sock, const unsigned char *prefix, size_t prefix_len, int nthreads,
               char *why, size_t why_len)
{
    struct conn c = {0};
    c.ex = ex;
    c.sock = sock;
    c.rcap = prefix_len > (64u << 10) ? prefix_len : (64u << 10);
    c.rbuf = malloc(c.rcap);
    if (!c.rbuf) {
        if (why && why_len)
            snprintf(why, why_len, "out of memory");
        return -1;
    }
    memcpy(c.rbuf, prefix, prefix_len); /* requests Python read past the handshake */
    c.rlen = prefix_len;
    pthread_mutex_init(&c.recv_mu, NULL);
    pthread_mutex_init(&c.send_mu, NULL);
    c.max_threads = nthreads < 1 ? 1 : nthreads > 65 ? 65 : nthreads;
    c.nthreads = 1; /* this thread */
    worker(&c);
    /* whoever ended the connection set done; wake the workers blocked in recv */
    shutdown(sock, SHUT_RD);
    pthread_mutex_lock(&c.recv_mu); /* no more spawning */
    int started = c.nthreads - 1;
    pthread_mutex_unlock(&c.recv_mu);
    for (int i = 0; i < started; i++)
        pthread_join(c.threads[i], NULL);
    pthread_mutex_destroy(&c.recv_mu);
    pthread_mutex_destroy(&c.send_mu);
    free(c.rbuf);
    if (why && why_len)
        snprintf(why, why_len, "%s", c.why);
    return c.failed ? -1 : 0;
}
