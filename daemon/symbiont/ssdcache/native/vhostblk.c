/* vhost-user-blk: the elastic SSD's data path with no copy through a socket.
 *
 * Why: over NBD every byte of a 1 MiB request crosses a unix socket twice more than on a plain
 * virtio disk (our sendmsg, QEMU's recvmsg in its one I/O thread), so sequential 1 MiB at
 * QD 16 stayed at 0.2-0.5x the plain disk whatever the server did (BENCHMARKS.md). With
 * vhost-user the guest's RAM is shared with us (QEMU's memfd memory backend): we read the
 * virtqueues ourselves and do the pool I/O straight into and out of the guest's buffers, as
 * QEMU does for a plain disk. QEMU keeps only the control plane.
 *
 * Translation, the export's rwlock, the counters and the map are nbdfast.c's (this file
 * includes it: one library, one struct export). A request translates and does its I/O under
 * the shared lock, exactly as an NBD request; an unbacked block fails the whole request with
 * VIRTIO_BLK_S_IOERR and nothing is read or written.
 *
 * The guest is untrusted: every descriptor index, chain length, guest-physical range, header
 * and request size is checked. A request we cannot parse ends the connection (QEMU reconnects
 * and the guest sees an I/O error at worst); the host's memory outside the guest's own regions
 * is never touched.
 *
 * Requests in flight survive a crash of the daemon (INFLIGHT_SHMFD): each head taken from the
 * ring is marked in a shared memfd region that QEMU keeps and hands to the next backend after it
 * reconnects, which resubmits the marked heads in the order they were taken and resumes the ring
 * after them (QEMU itself falls back to the guest's used index, which with out-of-order
 * completions would redo finished requests and lose unfinished ones).
 *
 * Scope (the protocol as QEMU 7.2's vhost-user-blk-pci speaks it): one virtqueue (split ring,
 * indirect descriptors, no event index), features SEG_MAX, BLK_SIZE, FLUSH; protocol features
 * CONFIG, REPLY_ACK, INFLIGHT_SHMFD. Not done: multiqueue, discard/write-zeroes.
 */
#include "nbdfast.c"

#include <poll.h>
#include <sys/mman.h>
#include <sys/stat.h>

#define VHU_VERSION 0x1u
#define VHU_REPLY 0x4u
#define VHU_NEED_REPLY 0x8u
#define VHU_MAX_PAYLOAD 4096u
#define VHU_MAX_FDS 8
#define VHU_MAX_REGIONS 8
#define VHU_NOFD 0x100u
#define VQ_MAX 1024u          /* largest ring (QEMU's queue-size at most 1024) */
#define SEG_MAX 254u          /* as QEMU's own virtio-blk for its 256-entry queue: the disk is plugged with queue-size 256 */
#define MAX_SEGS (VQ_MAX + 8) /* iovecs of one request */
#define MAX_WORKERS 32

enum {
    U_GET_FEATURES = 1, U_SET_FEATURES = 2, U_SET_OWNER = 3, U_RESET_OWNER = 4, U_SET_MEM_TABLE = 5,
    U_SET_VRING_NUM = 8, U_SET_VRING_ADDR = 9, U_SET_VRING_BASE = 10, U_GET_VRING_BASE = 11,
    U_SET_VRING_KICK = 12, U_SET_VRING_CALL = 13, U_SET_VRING_ERR = 14, U_GET_PROTOCOL_FEATURES = 15,
    U_SET_PROTOCOL_FEATURES = 16, U_GET_QUEUE_NUM = 17, U_SET_VRING_ENABLE = 18, U_GET_CONFIG = 24,
    U_SET_CONFIG = 25, U_GET_INFLIGHT_FD = 31, U_SET_INFLIGHT_FD = 32,
};

#define F_BLK_SEG_MAX (1ULL << 2)
#define F_BLK_BLK_SIZE (1ULL << 6)
#define F_BLK_FLUSH (1ULL << 9)
#define F_RING_INDIRECT (1ULL << 28)
#define F_PROTOCOL (1ULL << 30)
#define F_VERSION_1 (1ULL << 32)
#define OFFERED (F_BLK_SEG_MAX | F_BLK_BLK_SIZE | F_BLK_FLUSH | F_RING_INDIRECT | F_PROTOCOL | F_VERSION_1)
#define P_REPLY_ACK (1ULL << 3)
#define P_CONFIG (1ULL << 9)
#define P_INFLIGHT (1ULL << 12)
#define P_OFFERED (P_REPLY_ACK | P_CONFIG | P_INFLIGHT)

#define D_NEXT 1
#define D_WRITE 2
#define D_INDIRECT 4
#define AVAIL_NO_INTERRUPT 1

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define S_OK 0
#define S_IOERR 1
#define S_UNSUPP 2

struct vdesc { uint64_t addr; uint32_t len; uint16_t flags, next; };

struct region { uint64_t gpa, size, uva; unsigned char *host; void *map; size_t map_len; };

struct vq {
    uint32_t num;
    struct vdesc *desc;
    volatile uint16_t *avail; /* flags, idx, ring[num] */
    volatile uint16_t *used;  /* flags, idx, then {u32 id, u32 len}[num] */
    uint16_t last_avail, used_idx;
    int kick, call;
    int started, enabled;
    uint64_t addr_desc, addr_avail, addr_used; /* QEMU's addresses, mapped when the ring starts */
};

struct job { uint16_t head; };

/* The inflight region of the one queue (libvhost-user's split layout): QEMU keeps it across
 * reconnects and zeroes it when the guest resets the device. */
struct ifdesc { uint8_t inflight; uint8_t pad[5]; uint16_t next; uint64_t counter; };
struct ifregion {
    uint64_t features;
    uint16_t version, desc_num, last_batch_head, used_idx;
    struct ifdesc desc[];
};

struct vconn {
    struct export *ex;
    int sock;
    char serial[21];
    uint64_t features, pfeatures;
    int proto; /* protocol features negotiated */
    int nreg;
    struct region reg[VHU_MAX_REGIONS];
    struct vq q;
    pthread_mutex_t mu;        /* jobs, inflight, used ring */
    pthread_cond_t work, idle; /* a job queued; inflight fell to 0 */
    struct job *jobs;          /* ring of VQ_MAX pending heads */
    uint32_t jhead, jcount;
    int inflight, quit;
    int nworkers;
    pthread_t workers[MAX_WORKERS];
    int failed;
    char why[200];
    struct ifregion *inf; /* NULL: no inflight tracking */
    size_t inf_len;
    uint32_t inf_cap;     /* descriptor entries the mapping holds: the bound for every index into it */
    uint64_t counter;     /* order in which heads were taken */
};

static void vfail(struct vconn *c, const char *fmt, const char *arg)
{
    if (!c->failed) {
        c->failed = 1;
        snprintf(c->why, sizeof c->why, fmt, arg);
        set_error(c->ex, c->why);
    }
}

/* Guest-physical [gpa, gpa+len) -> host pointer, only if it lies in one region; else NULL. */
static unsigned char *gpa_ptr(struct vconn *c, uint64_t gpa, uint64_t len, uint64_t *contig)
{
    for (int i = 0; i < c->nreg; i++) {
        struct region *r = &c->reg[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size) {
            uint64_t room = r->size - (gpa - r->gpa);
            if (contig)
                *contig = room < len ? room : len;
            else if (len > room)
                return NULL;
            return r->host + (gpa - r->gpa);
        }
    }
    return NULL;
}

/* QEMU's own address (the vring addresses) -> host pointer, whole range in one region. */
static unsigned char *uva_ptr(struct vconn *c, uint64_t uva, uint64_t len)
{
    for (int i = 0; i < c->nreg; i++) {
        struct region *r = &c->reg[i];
        if (uva >= r->uva && uva - r->uva < r->size && len <= r->size - (uva - r->uva))
            return r->host + (uva - r->uva);
    }
    return NULL;
}

static void unmap_regions(struct vconn *c)
{
    for (int i = 0; i < c->nreg; i++)
        munmap(c->reg[i].map, c->reg[i].map_len);
    c->nreg = 0;
}

/* Append the guest range [gpa, gpa+len) to iov (split where it crosses regions). */
static int add_range(struct vconn *c, uint64_t gpa, uint64_t len, struct iovec *iov, int *n)
{
    while (len) {
        uint64_t k = 0;
        unsigned char *p = gpa_ptr(c, gpa, len, &k);
        if (!p || *n >= (int)MAX_SEGS)
            return -1;
        iov[(*n)++] = (struct iovec){p, (size_t)k};
        gpa += k;
        len -= k;
    }
    return 0;
}

/* Walk one descriptor chain into readable (out) and writable (in) iovecs; -1 on anything a
 * well-behaved driver never does (bad index, loop, range outside guest RAM, nested indirect). */
static int walk(struct vconn *c, uint16_t head, struct iovec *out, int *nout, struct iovec *in, int *nin)
{
    struct vq *q = &c->q;
    const struct vdesc *table = q->desc;
    uint32_t size = q->num, idx = head, seen = 0;
    int indirect = 0;
    *nout = *nin = 0;
    for (;;) {
        if (idx >= size || ++seen > size)
            return -1;
        struct vdesc d = table[idx];
        if (d.flags & D_INDIRECT) {
            if (indirect || (d.flags & D_NEXT) || d.len == 0 || d.len % sizeof(struct vdesc) ||
                d.len / sizeof(struct vdesc) > VQ_MAX)
                return -1;
            table = (const struct vdesc *)gpa_ptr(c, d.addr, d.len, NULL);
            if (!table)
                return -1;
            size = d.len / sizeof(struct vdesc);
            idx = 0;
            seen = 0;
            indirect = 1;
            continue;
        }
        if (d.flags & D_WRITE) {
            if (add_range(c, d.addr, d.len, in, nin) < 0)
                return -1;
        } else {
            if (*nin) /* readable after writable */
                return -1;
            if (add_range(c, d.addr, d.len, out, nout) < 0)
                return -1;
        }
        if (!(d.flags & D_NEXT))
            return 0;
        idx = d.next;
    }
}

static uint64_t iov_total(const struct iovec *iov, int n)
{
    uint64_t t = 0;
    for (int i = 0; i < n; i++)
        t += iov[i].iov_len;
    return t;
}

/* Copy n bytes from the start of iov into dst (across segments); -1 if iov is shorter. */
static int iov_read(const struct iovec *iov, int n, void *dst, size_t len)
{
    unsigned char *o = dst;
    for (int i = 0; i < n && len; i++) {
        size_t k = iov[i].iov_len < len ? iov[i].iov_len : len;
        memcpy(o, iov[i].iov_base, k);
        o += k;
        len -= k;
    }
    return len ? -1 : 0;
}

/* The sub-vector [skip, skip+len) of iov into sub (at most max entries); count or -1. */
static int iov_slice(const struct iovec *iov, int n, uint64_t skip, uint64_t len, struct iovec *sub, int max)
{
    int m = 0;
    for (int i = 0; i < n && len; i++) {
        if (skip >= iov[i].iov_len) {
            skip -= iov[i].iov_len;
            continue;
        }
        uint64_t k = iov[i].iov_len - skip < len ? iov[i].iov_len - skip : len;
        if (m == max)
            return -1;
        sub[m++] = (struct iovec){(unsigned char *)iov[i].iov_base + skip, (size_t)k};
        skip = 0;
        len -= k;
    }
    return len ? -1 : m;
}

static int iov_aligned(const struct iovec *v, int n)
{
    for (int i = 0; i < n; i++)
        if ((uintptr_t)v[i].iov_base % 512 || v[i].iov_len % 512)
            return 0;
    return 1;
}

/* IN/OUT of len bytes at byte off, the data in iov; VIRTIO_BLK_S_*. */
static int blk_rw(struct vconn *c, int write, uint64_t off, const struct iovec *iov, int n, uint64_t len)
{
    struct export *ex = c->ex;
    char msg[160] = "";
    if (len == 0)
        return S_OK;
    if (len % 512 || len > ex->max_request || len > ex->size || off > ex->size - len) {
        bump(ex, ST_INVALID, 1);
        return S_IOERR;
    }
    if (write && ex->read_only)
        return S_IOERR;
    struct piece p[MAX_PIECES];
    int np = 0;
    int64_t bad = 0;
    int rc = S_OK;
    pthread_rwlock_rdlock(&ex->lock);
    if (translate(ex, off, len, p, &np, &bad) < 0) {
        pthread_rwlock_unlock(&ex->lock);
        bump(ex, ST_UNBACKED, 1);
        unbacked_msg(bad, msg, sizeof msg);
        set_error(ex, msg);
        return S_IOERR;
    }
    struct iovec sub[MAX_SEGS];
    for (int i = 0; i < np && rc == S_OK; i++) {
        int m = iov_slice(iov, n, p[i].boff, p[i].len, sub, MAX_SEGS);
        if (m < 0) {
            rc = S_IOERR;
            break;
        }
        int fd = ex->dfd >= 0 && p[i].phys % 512 == 0 && iov_aligned(sub, m) ? ex->dfd : ex->fd;
        uint64_t pos = p[i].phys, left = p[i].len;
        struct iovec *v = sub;
        size_t nv = (size_t)m;
        while (left) {
            ssize_t r = write ? pwritev(fd, v, (int)nv, (off_t)pos) : preadv(fd, v, (int)nv, (off_t)pos);
            if (r < 0 && errno == EINTR)
                continue;
            if (r <= 0) {
                snprintf(msg, sizeof msg, "%s at %llu: %s", write ? "write" : "read", (unsigned long long)pos,
                         r < 0 ? strerror(errno) : "short");
                set_error(ex, msg);
                rc = S_IOERR;
                break;
            }
            left -= (uint64_t)r;
            pos += (uint64_t)r;
            iov_advance(&v, &nv, (size_t)r); /* a short transfer: go on after what was done */
        }
    }
    if (rc == S_OK)
        touch(ex, off, len);
    pthread_rwlock_unlock(&ex->lock);
    if (rc != S_OK)
        bump(ex, ST_IO_ERRORS, 1);
    else {
        bump(ex, write ? ST_WRITES : ST_READS, 1);
        bump(ex, write ? ST_WRITE_BYTES : ST_READ_BYTES, len);
    }
    return rc;
}

static void complete(struct vconn *c, uint16_t head, uint32_t written)
{
    struct vq *q = &c->q;
    pthread_mutex_lock(&c->mu);
    volatile uint32_t *ring = (volatile uint32_t *)(q->used + 2);
    uint16_t u = q->used_idx;
    if (c->inf)
        c->inf->last_batch_head = head;
    ring[2 * (u % q->num)] = head;
    ring[2 * (u % q->num) + 1] = written;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    q->used_idx = (uint16_t)(u + 1);
    __atomic_store_n(&q->used[1], q->used_idx, __ATOMIC_RELEASE);
    if (c->inf && head < c->inf_cap) { /* after the used index: a crash in between is repaired at start */
        __atomic_store_n(&c->inf->desc[head].inflight, 0, __ATOMIC_RELEASE);
        c->inf->used_idx = q->used_idx;
    }
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int call = q->call, quiet = __atomic_load_n(&q->avail[0], __ATOMIC_ACQUIRE) & AVAIL_NO_INTERRUPT;
    if (!quiet && call >= 0) {
        uint64_t one = 1;
        ssize_t r = write(call, &one, sizeof one);
        (void)r;
    }
    if (--c->inflight == 0)
        pthread_cond_broadcast(&c->idle);
    pthread_mutex_unlock(&c->mu);
}

/* One request: parse, do, complete. 0, or -1 when the chain is malformed (connection ends). */
static int handle(struct vconn *c, uint16_t head)
{
    static __thread struct iovec out[MAX_SEGS], in[MAX_SEGS];
    int nout, nin;
    if (walk(c, head, out, &nout, in, &nin) < 0) {
        bump(c->ex, ST_INVALID, 1);
        return -1;
    }
    struct { uint32_t type, ioprio; uint64_t sector; } hdr;
    uint64_t inlen = iov_total(in, nin);
    if (iov_read(out, nout, &hdr, sizeof hdr) < 0 || inlen < 1) {
        bump(c->ex, ST_INVALID, 1);
        return -1;
    }
    /* the status byte is the last writable byte; data is what lies between */
    struct iovec *last = &in[nin - 1];
    while (nin && last->iov_len == 0)
        last = &in[--nin - 1];
    unsigned char *status = (unsigned char *)last->iov_base + last->iov_len - 1;
    last->iov_len--;
    uint64_t datalen = inlen - 1, written = 1;
    int st;
    if (hdr.sector > UINT64_MAX / 512) {
        st = S_IOERR;
    } else if (hdr.type == T_IN) {
        st = blk_rw(c, 0, hdr.sector * 512, in, nin, datalen);
        if (st == S_OK)
            written += datalen;
    } else if (hdr.type == T_OUT) {
        struct iovec data[MAX_SEGS];
        uint64_t outlen = iov_total(out, nout);
        int m = iov_slice(out, nout, sizeof hdr, outlen - sizeof hdr, data, MAX_SEGS);
        st = m < 0 ? S_IOERR : blk_rw(c, 1, hdr.sector * 512, data, m, outlen - sizeof hdr);
    } else if (hdr.type == T_FLUSH) {
        st = flush_all(c->ex) ? S_IOERR : S_OK;
        bump(c->ex, ST_FLUSHES, 1);
    } else if (hdr.type == T_GET_ID) {
        unsigned char id[20] = {0};
        memcpy(id, c->serial, strnlen(c->serial, 20));
        uint64_t k = datalen < 20 ? datalen : 20, done = 0;
        for (int i = 0; i < nin && done < k; i++) {
            uint64_t n = in[i].iov_len < k - done ? in[i].iov_len : k - done;
            memcpy(in[i].iov_base, id + done, n);
            done += n;
        }
        written += done;
        st = S_OK;
    } else {
        st = S_UNSUPP;
    }
    *status = (unsigned char)st;
    complete(c, head, (uint32_t)written);
    return 0;
}

static void *vworker(void *arg)
{
    struct vconn *c = arg;
    pthread_mutex_lock(&c->mu);
    for (;;) {
        while (!c->quit && c->jcount == 0)
            pthread_cond_wait(&c->work, &c->mu);
        if (c->quit)
            break;
        uint16_t head = c->jobs[c->jhead].head;
        c->jhead = (c->jhead + 1) % VQ_MAX;
        c->jcount--;
        pthread_mutex_unlock(&c->mu);
        int r = handle(c, head);
        pthread_mutex_lock(&c->mu);
        if (r < 0) {
            vfail(c, "%s", "malformed descriptor chain from the guest");
            c->quit = 1;
            pthread_cond_broadcast(&c->work);
            --c->inflight;
            pthread_cond_broadcast(&c->idle); /* a drain in progress gives up (quit) */
            shutdown(c->sock, SHUT_RDWR); /* ends the control loop's poll */
        }
    }
    pthread_mutex_unlock(&c->mu);
    return NULL;
}

/* Hand one head to the workers (under c->mu). */
static void queue_head(struct vconn *c, uint16_t head)
{
    c->jobs[(c->jhead + c->jcount) % VQ_MAX].head = head;
    c->jcount++;
    c->inflight++;
    pthread_cond_signal(&c->work);
}

/* Queue every head the guest made available since the last look. */
static int pop_all(struct vconn *c)
{
    struct vq *q = &c->q;
    uint16_t avail_idx = __atomic_load_n(&q->avail[1], __ATOMIC_ACQUIRE);
    if ((uint16_t)(avail_idx - q->last_avail) > q->num) {
        vfail(c, "%s", "the guest's avail index ran past the ring");
        return -1;
    }
    pthread_mutex_lock(&c->mu);
    while (q->last_avail != avail_idx && !c->quit) {
        uint16_t head = q->avail[2 + q->last_avail % q->num];
        if (c->jcount == VQ_MAX)
            break;
        if (c->inf && head < c->inf_cap) {
            c->inf->desc[head].counter = ++c->counter;
            __atomic_store_n(&c->inf->desc[head].inflight, 1, __ATOMIC_RELEASE);
        }
        queue_head(c, head);
        q->last_avail++;
    }
    pthread_mutex_unlock(&c->mu);
    return 0;
}

/* Wait until no request is being served (before the rings or the memory change). Once the
 * connection is failing (quit) the queued requests will never run: stop waiting for them, or a
 * control message in progress (GET_VRING_BASE, which QEMU waits for) would hang for good. */
static void drain(struct vconn *c)
{
    pthread_mutex_lock(&c->mu);
    while (c->inflight > 0 && !c->quit)
        pthread_cond_wait(&c->idle, &c->mu);
    pthread_mutex_unlock(&c->mu);
}

static int by_counter(const void *a, const void *b, void *arg)
{
    const struct ifdesc *d = arg;
    uint64_t x = d[*(const uint16_t *)a].counter, y = d[*(const uint16_t *)b].counter;
    return x < y ? -1 : x > y;
}

/* A previous backend's heads still marked in flight: queue them again, oldest first, and resume
 * the ring after them. Called when the ring starts (no worker runs). */
static int resubmit(struct vconn *c)
{
    struct ifregion *r = c->inf;
    struct vq *q = &c->q;
    if (!r)
        return 0;
    if (q->num > c->inf_cap) { /* a region sized for a smaller ring than this one: no tracking */
        munmap(r, c->inf_len);
        c->inf = NULL;
        return 0;
    }
    if (r->version != 1 || r->desc_num != q->num) { /* fresh, or zeroed by a device reset */
        memset(r, 0, c->inf_len);
        r->version = 1;
        r->desc_num = (uint16_t)q->num;
        r->used_idx = q->used_idx;
        return 0;
    }
    if (r->used_idx != q->used_idx) { /* the crash came between the used index and the flag */
        if (r->last_batch_head < q->num)
            r->desc[r->last_batch_head].inflight = 0;
        r->used_idx = q->used_idx;
    }
    uint16_t heads[VQ_MAX];
    uint32_t n = 0;
    uint64_t top = 0;
    for (uint32_t i = 0; i < q->num; i++) {
        if (r->desc[i].inflight) {
            heads[n++] = (uint16_t)i;
            top = r->desc[i].counter > top ? r->desc[i].counter : top;
        }
    }
    if (!n)
        return 0;
    qsort_r(heads, n, sizeof heads[0], by_counter, r->desc);
    c->counter = top;
    q->last_avail = (uint16_t)(q->used_idx + n);
    pthread_mutex_lock(&c->mu);
    for (uint32_t i = 0; i < n; i++)
        queue_head(c, heads[i]);
    pthread_mutex_unlock(&c->mu);
    return 0;
}

static int start_ring(struct vconn *c)
{
    struct vq *q = &c->q;
    if (q->num == 0 || q->num > VQ_MAX || (q->num & (q->num - 1)))
        return -1;
    q->desc = (struct vdesc *)uva_ptr(c, q->addr_desc, (uint64_t)q->num * 16);
    q->avail = (volatile uint16_t *)uva_ptr(c, q->addr_avail, 6 + 2ULL * q->num);
    q->used = (volatile uint16_t *)uva_ptr(c, q->addr_used, 6 + 8ULL * q->num);
    if (!q->desc || !q->avail || !q->used || ((uintptr_t)q->used % 4) || ((uintptr_t)q->avail % 2))
        return -1;
    q->used_idx = __atomic_load_n(&q->used[1], __ATOMIC_ACQUIRE);
    q->started = 1;
    return resubmit(c);
}

static void stop_ring(struct vconn *c)
{
    drain(c);
    c->q.started = 0;
    if (c->q.kick >= 0)
        close(c->q.kick);
    c->q.kick = -1;
}

static int vreply(struct vconn *c, uint32_t req, const void *payload, uint32_t size)
{
    uint32_t h[3] = {req, VHU_VERSION | VHU_REPLY, size};
    struct iovec iov[2] = {{h, sizeof h}, {(void *)payload, size}};
    return send_iov(c->sock, iov, size ? 2 : 1);
}

static int reply_u64(struct vconn *c, uint32_t req, uint64_t v) { return vreply(c, req, &v, 8); }

/* A reply carrying one file descriptor (GET_INFLIGHT_FD). */
static int vreply_fd(struct vconn *c, uint32_t req, const void *payload, uint32_t size, int fd)
{
    unsigned char msg[12 + 64];
    uint32_t h[3] = {req, VHU_VERSION | VHU_REPLY, size};
    memcpy(msg, h, 12);
    memcpy(msg + 12, payload, size);
    union { char buf[CMSG_SPACE(sizeof(int))]; struct cmsghdr align; } u;
    struct iovec iov = {msg, 12 + size};
    struct msghdr m = {0};
    m.msg_iov = &iov;
    m.msg_iovlen = 1;
    m.msg_control = u.buf;
    m.msg_controllen = sizeof u.buf;
    struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(cm), &fd, sizeof fd);
    ssize_t r;
    do
        r = sendmsg(c->sock, &m, MSG_NOSIGNAL);
    while (r < 0 && errno == EINTR);
    if (r < 0)
        return -1;
    struct iovec *rest = &iov;
    size_t nrest = 1;
    iov_advance(&rest, &nrest, (size_t)r);
    return nrest ? send_iov(c->sock, rest, 1) : 0;
}

/* Read one message (header, payload, fds). 1: one read, 0: EOF, -1: error. */
static int recv_msg(struct vconn *c, uint32_t *h, unsigned char *payload, int *fds, int *nfds)
{
    union { char buf[CMSG_SPACE(VHU_MAX_FDS * sizeof(int))]; struct cmsghdr align; } u;
    size_t got = 0;
    *nfds = 0;
    while (got < 12) {
        struct iovec iov = {(unsigned char *)h + got, 12 - got};
        struct msghdr m = {0};
        m.msg_iov = &iov;
        m.msg_iovlen = 1;
        m.msg_control = u.buf;
        m.msg_controllen = sizeof u.buf;
        ssize_t r = recvmsg(c->sock, &m, MSG_CMSG_CLOEXEC);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return got == 0 && r == 0 ? 0 : -1;
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&m); cm; cm = CMSG_NXTHDR(&m, cm)) {
            if (cm->cmsg_level == SOL_SOCKET && cm->cmsg_type == SCM_RIGHTS) {
                int k = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
                for (int i = 0; i < k; i++) {
                    int fd;
                    memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof fd);
                    if (*nfds < VHU_MAX_FDS)
                        fds[(*nfds)++] = fd;
                    else
                        close(fd);
                }
            }
        }
        got += (size_t)r;
    }
    if (h[2] > VHU_MAX_PAYLOAD)
        return -1;
    got = 0;
    while (got < h[2]) {
        ssize_t r = recv(c->sock, payload + got, h[2] - got, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        got += (size_t)r;
    }
    return 1;
}

/* The file behind fd has at least n bytes (what is about to be mapped from it). */
static int fd_holds(int fd, size_t n)
{
    struct stat st;
    return fstat(fd, &st) == 0 && st.st_size >= 0 && (uint64_t)st.st_size >= n;
}

static int set_mem_table(struct vconn *c, const unsigned char *p, uint32_t size, int *fds, int nfds)
{
    uint32_t n;
    memcpy(&n, p, 4);
    if (n == 0 || n > VHU_MAX_REGIONS || (int)n != nfds || size < 8 + 32 * n)
        return -1;
    drain(c); /* the rings' pointers go with the old mappings: no request may use them */
    int was = c->q.started;
    c->q.started = 0;
    unmap_regions(c);
    for (uint32_t i = 0; i < n; i++) {
        uint64_t v[4]; /* gpa, size, uva, mmap offset */
        memcpy(v, p + 8 + 32 * i, 32);
        if (v[1] == 0 || v[3] > UINT64_MAX - v[1])
            return -1;
        size_t len = (size_t)(v[1] + v[3]);
        if (!fd_holds(fds[i], len)) /* a page past the file's end would be SIGBUS, not an error */
            return -1;
        void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fds[i], 0);
        if (m == MAP_FAILED)
            return -1;
        c->reg[c->nreg++] = (struct region){v[0], v[1], v[2], (unsigned char *)m + v[3], m, len};
    }
    return was ? start_ring(c) : 0;
}

static void close_fds(int *fds, int n)
{
    for (int i = 0; i < n; i++)
        if (fds[i] >= 0)
            close(fds[i]);
}

/* One control message; -1 ends the connection (with why). */
static int control(struct vconn *c, uint32_t *h, unsigned char *p, int *fds, int nfds)
{
    uint32_t req = h[0], size = h[2];
    int need_ack = (h[1] & VHU_NEED_REPLY) && (c->pfeatures & P_REPLY_ACK);
    int rc = 0, replied = 0;
    uint64_t u64 = 0;
    uint32_t st[2] = {0, 0}; /* vhost_vring_state: index, num (the same 8 bytes) */
    if (size >= 8) {
        memcpy(&u64, p, 8);
        memcpy(st, p, 8);
    }
    switch (req) {
    case U_GET_FEATURES:
        rc = reply_u64(c, req, OFFERED);
        replied = 1;
        break;
    case U_SET_FEATURES:
        if (size < 8)
            rc = -1;
        else
            c->features = u64 & OFFERED;
        break;
    case U_GET_PROTOCOL_FEATURES:
        rc = reply_u64(c, req, P_OFFERED);
        replied = 1;
        break;
    case U_SET_PROTOCOL_FEATURES:
        if (size < 8)
            rc = -1;
        else {
            c->pfeatures = u64 & P_OFFERED;
            c->proto = 1; /* rings now start disabled until SET_VRING_ENABLE */
        }
        break;
    case U_GET_QUEUE_NUM:
        rc = reply_u64(c, req, 1);
        replied = 1;
        break;
    case U_SET_OWNER:
    case U_RESET_OWNER:
        break;
    case U_SET_MEM_TABLE:
        rc = set_mem_table(c, p, size, fds, nfds);
        close_fds(fds, nfds); /* the mappings keep the memory; the fds are not needed */
        nfds = 0;
        break;
    case U_SET_VRING_NUM:
    case U_SET_VRING_BASE:
    case U_SET_VRING_ENABLE:
        if (size < 8 || st[0] != 0) {
            rc = -1;
            break;
        }
        if (req == U_SET_VRING_NUM)
            c->q.num = st[1];
        else if (req == U_SET_VRING_BASE)
            c->q.last_avail = (uint16_t)st[1];
        else
            c->q.enabled = st[1] != 0;
        break;
    case U_SET_VRING_ADDR: {
        uint64_t a[5]; /* index+flags, desc, used, avail, log */
        if (size < 40) {
            rc = -1;
            break;
        }
        memcpy(a, p, 40);
        if ((uint32_t)a[0] != 0) {
            rc = -1;
            break;
        }
        c->q.addr_desc = a[1];
        c->q.addr_used = a[2];
        c->q.addr_avail = a[3];
        break;
    }
    case U_GET_VRING_BASE:
        if (size < 8 || st[0] != 0) {
            rc = -1;
            break;
        }
        stop_ring(c);
        st[1] = c->q.last_avail;
        rc = vreply(c, req, st, 8);
        replied = 1;
        break;
    case U_SET_VRING_KICK:
    case U_SET_VRING_CALL:
    case U_SET_VRING_ERR: {
        if (size < 8 || (u64 & 0xff) != 0) {
            rc = -1;
            break;
        }
        int fd = -1;
        if (!(u64 & VHU_NOFD)) {
            if (nfds != 1) {
                rc = -1;
                break;
            }
            fd = fds[0];
            nfds = 0;
        }
        if (req == U_SET_VRING_KICK) {
            if (fd < 0) { /* polling mode: not offered */
                rc = -1;
                break;
            }
            stop_ring(c);
            c->q.kick = fd;
            if (start_ring(c) < 0) {
                vfail(c, "%s", "vring addresses outside the guest's memory");
                rc = -1;
            }
        } else if (req == U_SET_VRING_CALL) {
            pthread_mutex_lock(&c->mu);
            if (c->q.call >= 0)
                close(c->q.call);
            c->q.call = fd;
            pthread_mutex_unlock(&c->mu);
        } else if (fd >= 0) {
            close(fd);
        }
        break;
    }
    case U_GET_CONFIG: {
        unsigned char cfg[256] = {0}, out[12 + 256];
        uint32_t off, len;
        if (size < 12) {
            rc = -1;
            break;
        }
        memcpy(&off, p, 4);
        memcpy(&len, p + 4, 4);
        if (off > sizeof cfg || len > sizeof cfg - off || size < 12 + len) {
            rc = -1;
            break;
        }
        uint64_t cap = c->ex->size / 512;
        uint32_t seg_max = SEG_MAX, blk = 512;
        uint16_t nq = 1;
        memcpy(cfg + 0, &cap, 8);
        memcpy(cfg + 12, &seg_max, 4);
        memcpy(cfg + 20, &blk, 4);
        memcpy(cfg + 34, &nq, 2);
        memcpy(out, p, 12);
        memcpy(out + 12, cfg + off, len);
        rc = vreply(c, req, out, 12 + len);
        replied = 1;
        break;
    }
    case U_SET_CONFIG:
        break; /* writeback toggles: every write goes to the pool, flush does fsync */
    case U_GET_INFLIGHT_FD:
    case U_SET_INFLIGHT_FD: {
        uint64_t v[2]; /* mmap size, mmap offset */
        uint16_t nq, qs;
        if (size < 20) {
            rc = -1;
            break;
        }
        memcpy(v, p, 16);
        memcpy(&nq, p + 16, 2);
        memcpy(&qs, p + 18, 2);
        size_t need = sizeof(struct ifregion) + (size_t)qs * sizeof(struct ifdesc);
        need = (need + 63) & ~(size_t)63;
        int fd = -1;
        if (req == U_GET_INFLIGHT_FD) {
            if (nq != 1 || qs == 0 || qs > VQ_MAX) {
                rc = -1;
                break;
            }
            fd = memfd_create("symbiont-vhost-inflight", MFD_CLOEXEC);
            if (fd < 0 || ftruncate(fd, (off_t)need) < 0) {
                rc = -1;
                if (fd >= 0)
                    close(fd);
                break;
            }
            v[0] = need;
            v[1] = 0;
        } else {
            if (nfds != 1 || v[1] != 0 || nq != 1 || qs == 0 || qs > VQ_MAX || v[0] < need || v[0] > (1u << 20)) {
                rc = -1;
                break;
            }
            fd = fds[0];
            nfds = 0;
            need = v[0];
            if (!fd_holds(fd, need)) {
                close(fd);
                rc = -1;
                break;
            }
        }
        void *m = mmap(NULL, need, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (m == MAP_FAILED) {
            close(fd);
            rc = -1;
            break;
        }
        drain(c);
        if (c->inf)
            munmap(c->inf, c->inf_len);
        c->inf = m;
        c->inf_len = need;
        c->inf_cap = (uint32_t)((need - sizeof(struct ifregion)) / sizeof(struct ifdesc));
        if (req == U_GET_INFLIGHT_FD) {
            unsigned char out[24] = {0}; /* VhostUserInflight, padded to 8 bytes as QEMU sizes it */
            memcpy(out, v, 16);
            memcpy(out + 16, &nq, 2);
            memcpy(out + 18, &qs, 2);
            rc = vreply_fd(c, req, out, sizeof out, fd);
            replied = 1;
        }
        close(fd);
        break;
    }
    default:
        snprintf(c->why, sizeof c->why, "vhost-user request %u not supported", req);
        rc = -1;
    }
    close_fds(fds, nfds);
    if (rc == 0 && need_ack && !replied)
        rc = reply_u64(c, req, 0);
    if (rc < 0 && !c->failed) {
        char m[64];
        snprintf(m, sizeof m, "bad vhost-user request %u", req);
        vfail(c, "%s", c->why[0] ? c->why : m);
    }
    return rc;
}

/* The ring may be served: started (kick fd, mapped) and enabled (always, without protocol features). */
static int ring_live(const struct vconn *c) { return c->q.started && (c->q.enabled || !c->proto); }

/* Serve one vhost-user connection (QEMU's) until it closes or misbehaves. 0 on a clean close,
 * -1 with the reason in why. The socket is not closed. */
int vhbx_serve(struct export *ex, int sock, const char *serial, int nworkers, char *why, size_t why_len)
{
    struct vconn *c = calloc(1, sizeof *c);
    if (!c)
        return -1;
    c->jobs = calloc(VQ_MAX, sizeof *c->jobs);
    unsigned char *payload = malloc(VHU_MAX_PAYLOAD);
    if (!c->jobs || !payload) {
        free(c->jobs);
        free(payload);
        free(c);
        if (why && why_len)
            snprintf(why, why_len, "out of memory");
        return -1;
    }
    c->ex = ex;
    c->sock = sock;
    snprintf(c->serial, sizeof c->serial, "%s", serial ? serial : "");
    c->q.kick = c->q.call = -1;
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->work, NULL);
    pthread_cond_init(&c->idle, NULL);
    c->nworkers = nworkers < 1 ? 1 : nworkers > MAX_WORKERS ? MAX_WORKERS : nworkers;
    int started = 0;
    for (; started < c->nworkers; started++)
        if (pthread_create(&c->workers[started], NULL, vworker, c))
            break;
    while (!c->failed) {
        struct pollfd pf[2] = {{sock, POLLIN, 0}, {c->q.started ? c->q.kick : -1, POLLIN, 0}};
        int r = poll(pf, 2, -1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            break;
        if (pf[1].revents & POLLIN) {
            uint64_t n;
            ssize_t k = read(c->q.kick, &n, sizeof n);
            (void)k;
            if (ring_live(c) && pop_all(c) < 0)
                break;
        }
        if (pf[0].revents & (POLLIN | POLLHUP | POLLERR)) {
            uint32_t h[3];
            int fds[VHU_MAX_FDS], nfds = 0;
            int m = recv_msg(c, h, payload, fds, &nfds);
            if (m <= 0) {
                close_fds(fds, nfds);
                if (m < 0)
                    vfail(c, "%s", "truncated vhost-user message");
                break;
            }
            if (control(c, h, payload, fds, nfds) < 0)
                break;
            /* a ring (re)enabled with requests already waiting: the guest will not kick again */
            if (ring_live(c) && pop_all(c) < 0)
                break;
        }
    }
    pthread_mutex_lock(&c->mu);
    c->quit = 1;
    c->jcount = 0; /* queued, not started: the guest sees them again after QEMU reconnects */
    pthread_cond_broadcast(&c->work);
    pthread_mutex_unlock(&c->mu);
    for (int i = 0; i < started; i++)
        pthread_join(c->workers[i], NULL);
    if (c->q.kick >= 0)
        close(c->q.kick);
    if (c->q.call >= 0)
        close(c->q.call);
    unmap_regions(c);
    if (c->inf)
        munmap(c->inf, c->inf_len);
    int failed = c->failed;
    if (why && why_len)
        snprintf(why, why_len, "%s", c->why);
    pthread_mutex_destroy(&c->mu);
    pthread_cond_destroy(&c->work);
    pthread_cond_destroy(&c->idle);
    free(c->jobs);
    free(payload);
    free(c);
    return failed ? -1 : 0;
}
