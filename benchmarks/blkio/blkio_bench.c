/*
 * blkio_bench: an independent vhost-user-blk client for benchmarks/block_matrix.py.
 *
 * Why: our own Python driver (frontend/) shares its authors' assumptions with
 * the device; libblkio's virtio-blk-vhost-user driver does not.  This client
 * is deliberately small: one thread per queue, each keeping `qd` requests in
 * flight with blkioq_read/blkioq_write and blkioq_do_io (blocking on the
 * completion, libblkio's default wait), a completion-latency histogram, and
 * one JSON line on stdout at the end.
 *
 *   blkio_bench PATH rw bs qd seconds [jobs]
 *
 * Protocol on stdin/stdout: prints "ready" once connected and waits for a
 * line; then runs and prints the JSON result, and waits for another line
 * before disconnecting (the harness reads the back-end's CPU time in between).
 *     rw: randread | randwrite | read | write   (read/write are sequential)
 *     jobs: queues, one thread each (num-queues of the connection)
 */
#define _GNU_SOURCE
#include <blkio.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BUCKET_NS 100u            /* histogram resolution */
#define BUCKETS (1u << 20)        /* 100 ns .. ~105 ms */

struct job {
    struct blkioq *q;
    char *buf;                    /* qd * bs bytes inside the mapped region */
    int index, qd, bs;
    bool write, random;
    uint64_t capacity, blocks, next_seq, rnd;
    double seconds;
    uint64_t ios, *hist;
    uint64_t *submit_ns;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t xorshift(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13; x ^= x >> 7; x ^= x << 17;
    return *s = x;
}

static void submit(struct job *j, int slot)
{
    uint64_t block;
    if (j->random) {
        block = xorshift(&j->rnd) % j->blocks;
    } else {
        block = j->next_seq;
        j->next_seq = (j->next_seq + 1) % j->blocks;
    }
    void *buf = j->buf + (size_t)slot * j->bs;
    j->submit_ns[slot] = now_ns();
    if (j->write)
        blkioq_write(j->q, block * j->bs, buf, j->bs, (void *)(intptr_t)slot, 0);
    else
        blkioq_read(j->q, block * j->bs, buf, j->bs, (void *)(intptr_t)slot, 0);
}

static void *run(void *arg)
{
    struct job *j = arg;
    struct blkio_completion *c = calloc(j->qd, sizeof(*c));
    if (!c) return (void *)1;
    for (int s = 0; s < j->qd; s++)
        submit(j, s);
    uint64_t end = now_ns() + (uint64_t)(j->seconds * 1e9);
    int inflight = j->qd;
    bool stopping = false;
    while (inflight) {
        int n = blkioq_do_io(j->q, c, 1, j->qd, NULL);
        if (n < 0) {
            fprintf(stderr, "blkioq_do_io: %s: %s\n", strerror(-n), blkio_get_error_msg());
            return (void *)1;
        }
        uint64_t t = now_ns();
        if (t >= end) stopping = true;
        for (int i = 0; i < n; i++) {
            int slot = (int)(intptr_t)c[i].user_data;
            if (c[i].ret != 0) {
                fprintf(stderr, "request failed: %d %s\n", c[i].ret, c[i].error_msg ? c[i].error_msg : "");
                return (void *)1;
            }
            inflight--;
            if (t < end || j->submit_ns[slot] < end) {
                uint64_t b = (t - j->submit_ns[slot]) / BUCKET_NS;
                j->hist[b < BUCKETS ? b : BUCKETS - 1]++;
                j->ios++;
            }
            if (!stopping) {
                submit(j, slot);
                inflight++;
            }
        }
    }
    free(c);
    return NULL;
}

#define CHECK(call) do { int _r = (call); if (_r < 0) { \
    fprintf(stderr, "%s: %s: %s\n", #call, strerror(-_r), blkio_get_error_msg()); return 1; } } while (0)

int main(int argc, char **argv)
{
    if (argc < 6) {
        fprintf(stderr, "usage: %s PATH randread|randwrite|read|write BS QD SECONDS [JOBS]\n", argv[0]);
        return 2;
    }
    const char *path = argv[1], *rw = argv[2];
    int bs = atoi(argv[3]), qd = atoi(argv[4]);
    double seconds = atof(argv[5]);
    int jobs = argc > 6 ? atoi(argv[6]) : 1;
    if (bs <= 0 || bs % 512 || qd <= 0 || qd > 1024 || jobs <= 0 || jobs > 16 || seconds <= 0) {
        fprintf(stderr, "bad bs/qd/seconds/jobs\n");
        return 2;
    }
    bool write = strstr(rw, "write") != NULL, random = strncmp(rw, "rand", 4) == 0;

    struct blkio *b;
    CHECK(blkio_create("virtio-blk-vhost-user", &b));
    CHECK(blkio_set_str(b, "path", path));
    /* The socket file exists from bind() on, a moment before listen(). */
    for (int tries = 0; ; tries++) {
        int r = blkio_connect(b);
        if (r == 0) break;
        if (r != -ECONNREFUSED || tries >= 200) CHECK(r);
        nanosleep(&(struct timespec){.tv_nsec = 10000000}, NULL);
    }
    CHECK(blkio_set_int(b, "num-queues", jobs));
    CHECK(blkio_start(b));
    uint64_t capacity;
    uint64_t align;
    CHECK(blkio_get_uint64(b, "capacity", &capacity));
    CHECK(blkio_get_uint64(b, "mem-region-alignment", &align));
    size_t per_job = (size_t)qd * bs;
    size_t len = per_job * jobs;
    len = (len + align - 1) / align * align;
    struct blkio_mem_region region;
    CHECK(blkio_alloc_mem_region(b, &region, len));
    CHECK(blkio_map_mem_region(b, &region));
    uint64_t seed = 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i + 8 <= len; i += 8)
        memcpy((char *)region.addr + i, &(uint64_t){xorshift(&seed)}, 8);

    struct job *js = calloc(jobs, sizeof(*js));
    pthread_t *th = calloc(jobs, sizeof(*th));
    for (int i = 0; i < jobs; i++) {
        struct job *j = &js[i];
        j->q = blkio_get_queue(b, i);
        j->buf = (char *)region.addr + per_job * i;
        j->index = i; j->qd = qd; j->bs = bs; j->write = write; j->random = random;
        j->capacity = capacity; j->blocks = capacity / bs;
        j->next_seq = j->blocks / jobs * i;
        j->rnd = 0x2545F4914F6CDD1Dull * (i + 1);
        j->seconds = seconds;
        j->hist = calloc(BUCKETS, sizeof(uint64_t));
        j->submit_ns = calloc(qd, sizeof(uint64_t));
        if (!j->q || !j->hist || !j->submit_ns || !j->blocks) {
            fprintf(stderr, "job %d setup failed\n", i);
            return 1;
        }
    }
    /* Handshake: the harness samples the back-end's CPU time between "ready"
     * and the result line, so set-up and tear-down are not counted. */
    char line[16];
    printf("ready\n");
    fflush(stdout);
    if (!fgets(line, sizeof(line), stdin)) return 1;
    uint64_t t0 = now_ns();
    for (int i = 0; i < jobs; i++)
        pthread_create(&th[i], NULL, run, &js[i]);
    int failed = 0;
    for (int i = 0; i < jobs; i++) {
        void *r;
        pthread_join(th[i], &r);
        failed |= r != NULL;
    }
    double elapsed = (now_ns() - t0) / 1e9;
    if (elapsed > seconds) elapsed = seconds;  /* I/Os counted are those started in the window */
    uint64_t ios = 0;
    for (int i = 0; i < jobs; i++)
        ios += js[i].ios;
    /* median and p99 over all jobs' histograms */
    uint64_t want50 = (ios + 1) / 2, want99 = ios - ios / 100, seen = 0;
    double p50 = 0, p99 = 0;
    for (uint32_t k = 0; k < BUCKETS; k++) {
        uint64_t n = 0;
        for (int i = 0; i < jobs; i++)
            n += js[i].hist[k];
        if (!n) continue;
        if (seen < want50 && seen + n >= want50) p50 = (k + 0.5) * BUCKET_NS / 1000.0;
        if (seen < want99 && seen + n >= want99) p99 = (k + 0.5) * BUCKET_NS / 1000.0;
        seen += n;
    }
    printf("{\"ios\": %" PRIu64 ", \"bytes\": %" PRIu64 ", \"seconds\": %.6f, \"lat_p50_us\": %.2f, "
           "\"lat_p99_us\": %.2f, \"capacity\": %" PRIu64 "}\n",
           ios, ios * (uint64_t)bs, elapsed, p50, p99, capacity);
    fflush(stdout);
    if (!fgets(line, sizeof(line), stdin)) { /* harness gone: still disconnect */ }
    blkio_destroy(&b);
    return failed;
}
