/*
 * lmkiln's decode kernels: one generated token per row, on CPUs, in fp32.
 *
 *   linear     y = x @ w.T + bias for a few rows of x (a GEMV per row);
 *   attention  one layer's attention step: RoPE, the new key and value written into the KV cache,
 *              softmax(q k^T / sqrt(D)) v over the cache, masked for padding or a sliding window.
 *
 * At one token per step a GEMM reads every weight once for two FLOPs, so its speed is the memory
 * bandwidth. On the 2-core development VM this GEMV reads a token's weights 1.6x as fast as
 * oneDNN's M=1 path and 2.4x as fast as MKL's (benchmarks/decode_gemv.py). It is simple:
 *   - each thread takes a contiguous block of output features (rows of w) and walks it in memory
 *     order, so the hardware prefetcher sees one stream per thread;
 *   - a row is multiplied with every input row while it is in L1 (w is read exactly once);
 *   - rows a few ahead are prefetched with the non-temporal hint, so the stream disturbs the
 *     caches less;
 *   - four independent accumulators hide the FMA latency; GCC vector extensions compile to
 *     AVX-512, AVX2 or SSE (target_clones picks at load time on x86) and to NEON on ARM.
 * The attention step replaces ~25 small torch ops per layer (split, transposes, cache writes and
 * slices, SDPA), whose dispatch cost more than their arithmetic; its threads take (row, K/V head)
 * pairs. Results differ from torch's by summation order only (~1e-6 relative).
 *
 * Threads: the caller plus a pool of workers made on first use. A worker spins briefly after each
 * job (the next call of a decode step comes within microseconds), then sleeps on a condition
 * variable. The pool assumes it has the cores to itself: lmkiln sets torch to one thread while it
 * decodes (decode.decoding), since torch's OpenMP workers also spin between parallel regions and
 * two spinning pools on the same cores starve each other. Calls are serialized by a mutex, and a
 * forked child starts with no workers (pthread_atfork), making its own on first use.
 *
 * The Python side (decode.py) checks dtype, device, contiguity and shapes and passes data
 * pointers; this module trusts them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define MAX_THREADS 64
#define PREFETCH_ROWS 4    /* rows of w prefetched ahead of the one being multiplied */
#define SPIN_ROUNDS 100000 /* a worker's busy-wait for the next job before it sleeps (~ms) */

typedef float vec __attribute__((vector_size(64), aligned(4), may_alias)); /* 16 floats; unaligned, aliases float */
typedef float half_vec __attribute__((vector_size(32)));
typedef float quarter_vec __attribute__((vector_size(16)));
#define LANES 16

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

/* Sum of a vector's lanes by halving (3 vector adds and 3 scalar ones, not 15 scalar adds). */
static inline float lane_sum(vec v)
{
    half_vec lo, hi;
    memcpy(&lo, &v, sizeof lo);
    memcpy(&hi, (char *)&v + sizeof lo, sizeof hi);
    half_vec h = lo + hi;
    quarter_vec a, b;
    memcpy(&a, &h, sizeof a);
    memcpy(&b, (char *)&h + sizeof a, sizeof b);
    quarter_vec q = a + b;
    return (q[0] + q[2]) + (q[1] + q[3]);
}

/* ------------------------------------------------------------------------------------------ */
/* The pool. A job is published by bumping job_seq; each of its `parts` threads runs
   task(args, part, parts). */

typedef void (*Task)(const void *args, int part, int parts);

static struct {
    Task task;
    const void *args;
    int parts;
} job;
static atomic_ulong job_seq;
static atomic_int pending; /* workers that have not yet acknowledged the current job */
static atomic_int sleepers;
static int n_workers;
static pthread_mutex_t call_lock = PTHREAD_MUTEX_INITIALIZER; /* one job at a time */
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;

typedef struct {
    int part;
    unsigned long seen; /* job_seq when the worker was made: it waits for the next job */
} WorkerStart;

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void *worker(void *arg)
{
    WorkerStart start = *(WorkerStart *)arg;
    PyMem_RawFree(arg);
    unsigned long seen = start.seen;
    for (;;) {
        unsigned long now;
        int spins = 0;
        while ((now = atomic_load_explicit(&job_seq, memory_order_acquire)) == seen && spins++ < SPIN_ROUNDS)
            cpu_relax();
        if (now == seen) {
            /* No lost wakeup: the caller bumps job_seq before reading sleepers, and this thread
               counts itself a sleeper before reading job_seq (both sequentially consistent). */
            pthread_mutex_lock(&sleep_lock);
            atomic_fetch_add(&sleepers, 1);
            while ((now = atomic_load(&job_seq)) == seen)
                pthread_cond_wait(&wake, &sleep_lock);
            atomic_fetch_sub(&sleepers, 1);
            pthread_mutex_unlock(&sleep_lock);
        }
        seen = now;
        if (start.part < job.parts)
            job.task(job.args, start.part, job.parts);
        atomic_fetch_sub_explicit(&pending, 1, memory_order_release);
    }
    return NULL;
}

/* Grow the pool to `want` workers (called with call_lock held); returns how many there are. */
static int ensure_workers(int want)
{
    while (n_workers < want) {
        WorkerStart *start = PyMem_RawMalloc(sizeof(WorkerStart));
        if (!start)
            break;
        start->part = n_workers + 1;
        start->seen = atomic_load(&job_seq);
        pthread_t thread;
        if (pthread_create(&thread, NULL, worker, start) != 0) {
            PyMem_RawFree(start);
            break;
        }
        pthread_detach(thread);
        n_workers++;
    }
    return n_workers;
}

static void forget_workers_in_child(void)
{
    /* fork() copies only the calling thread: the child has no workers, whatever the parent had */
    n_workers = 0;
    atomic_store(&sleepers, 0);
    atomic_store(&pending, 0);
    pthread_mutex_init(&call_lock, NULL);
    pthread_mutex_init(&sleep_lock, NULL);
    pthread_cond_init(&wake, NULL);
}

/* The thread count to use: what was asked, at most the cores there are (spinning workers on
   shared cores would starve each other) and at most `units` of work. */
static long cpus; /* online CPUs, read once at import: sysconf reads /sys on every call */

static int clamp_threads(long threads, Py_ssize_t units)
{
    if (cpus > 0 && threads > cpus)
        threads = cpus;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads > units)
        threads = (long)units;
    return threads < 1 ? 1 : (int)threads;
}

/* Run task on `threads` threads (the caller being one) and wait for all; without the GIL. */
static void run_job(Task task, const void *args, int threads)
{
    pthread_mutex_lock(&call_lock);
    int parts = 1;
    if (threads > 1) {
        int workers = ensure_workers(threads - 1);
        parts = 1 + (workers < threads - 1 ? workers : threads - 1);
    }
    job.task = task;
    job.args = args;
    job.parts = parts;
    if (parts > 1) {
        /* every worker acknowledges the job, taking part or not, so none can still be reading
           `job` when the next call rewrites it */
        atomic_store(&pending, n_workers);
        atomic_fetch_add(&job_seq, 1);
        if (atomic_load(&sleepers) > 0) {
            pthread_mutex_lock(&sleep_lock);
            pthread_cond_broadcast(&wake);
            pthread_mutex_unlock(&sleep_lock);
        }
    }
    task(args, 0, parts);
    while (atomic_load_explicit(&pending, memory_order_acquire) > 0)
        cpu_relax();
    pthread_mutex_unlock(&call_lock);
}

/* Parse the first `n_pointers` arguments as pointers (int addresses) and the rest as sizes. */
static int parse_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected, const char *usage,
                      int n_pointers, void **pointers, Py_ssize_t *sizes)
{
    if (nargs != expected) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    for (int i = 0; i < n_pointers; i++)
        pointers[i] = PyLong_AsVoidPtr(args[i]);
    for (Py_ssize_t i = n_pointers; i < expected; i++)
        sizes[i - n_pointers] = PyLong_AsSsize_t(args[i]);
    return PyErr_Occurred() ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------ */
/* GEMV */

typedef struct {
    const float *w, *x, *bias;
    float *y;
    Py_ssize_t K, M, N;
} Gemv;

CLONES
static void gemv_rows(const Gemv *g, Py_ssize_t row0, Py_ssize_t row1)
{
    const Py_ssize_t K = g->K, M = g->M, N = g->N;
    const Py_ssize_t k_vec = K - K % (4 * LANES);
    for (Py_ssize_t n = row0; n < row1; n++) {
        const float *w_row = g->w + n * K;
        if (n + PREFETCH_ROWS < row1) {
            const char *ahead = (const char *)(g->w + (n + PREFETCH_ROWS) * K);
            for (Py_ssize_t byte = 0; byte < K * (Py_ssize_t)sizeof(float); byte += 64)
                __builtin_prefetch(ahead + byte, 0, 0);
        }
        for (Py_ssize_t m = 0; m < M; m++) {
            const float *x_row = g->x + m * K;
            vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            Py_ssize_t k = 0;
            for (; k < k_vec; k += 4 * LANES) {
                a0 += *(const vec *)(w_row + k) * *(const vec *)(x_row + k);
                a1 += *(const vec *)(w_row + k + LANES) * *(const vec *)(x_row + k + LANES);
                a2 += *(const vec *)(w_row + k + 2 * LANES) * *(const vec *)(x_row + k + 2 * LANES);
                a3 += *(const vec *)(w_row + k + 3 * LANES) * *(const vec *)(x_row + k + 3 * LANES);
            }
            float sum = lane_sum((a0 + a1) + (a2 + a3));
            for (; k < K; k++)
                sum += w_row[k] * x_row[k];
            g->y[m * N + n] = g->bias ? sum + g->bias[n] : sum;
        }
    }
}

static void gemv_part(const void *args, int part, int parts)
{
    const Gemv *g = args;
    /* blocks of whole cache lines of y (16 floats), so two threads never write one line */
    Py_ssize_t per = (g->N + parts - 1) / parts;
    per = (per + 15) & ~(Py_ssize_t)15;
    Py_ssize_t row0 = part * per, row1 = row0 + per < g->N ? row0 + per : g->N;
    if (row0 < row1)
        gemv_rows(g, row0, row1);
}

static PyObject *linear(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    void *ptr[4];
    Py_ssize_t size[4];
    if (parse_args(args, nargs, 8, "linear(y, x, w, bias, M, N, K, threads)", 4, ptr, size) < 0)
        return NULL;
    Gemv g = {ptr[2], ptr[1], ptr[3], ptr[0], size[2], size[0], size[1]};
    if (g.M < 0 || g.N < 0 || g.K < 0 || (g.M > 0 && g.N > 0 && (!g.y || (g.K > 0 && (!g.x || !g.w))))) {
        PyErr_SetString(PyExc_ValueError, "linear: negative size or null pointer");
        return NULL;
    }
    int threads = clamp_threads(size[3], g.N / 64); /* under 64 rows a worker costs more than it saves */
    Py_BEGIN_ALLOW_THREADS
    run_job(gemv_part, &g, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------ */
/* Attention of one new token per row against the KV cache */

typedef struct {
    float *out, *qkv, *keys, *values, *scores; /* scores: one buffer of S floats per thread */
    const unsigned char *mask;
    const float *cos, *sin;
    Py_ssize_t mask_stride, B, H, KV, D, start, capacity;
} Attention;

/* Rotate-half RoPE in place: x[i] * cos[i] + (i < D/2 ? -x[i + D/2] : x[i - D/2]) * sin[i]. */
static void rope_in_place(float *x, const float *cos, const float *sin, Py_ssize_t D)
{
    Py_ssize_t half = D / 2;
    for (Py_ssize_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

CLONES
static float dot(const float *a, const float *b, Py_ssize_t n)
{
    vec acc0 = {0}, acc1 = {0};
    Py_ssize_t i = 0;
    for (; i + 2 * LANES <= n; i += 2 * LANES) {
        acc0 += *(const vec *)(a + i) * *(const vec *)(b + i);
        acc1 += *(const vec *)(a + i + LANES) * *(const vec *)(b + i + LANES);
    }
    float sum = lane_sum(acc0 + acc1);
    for (; i < n; i++)
        sum += a[i] * b[i];
    return sum;
}

/* out[i] += p * v[i] */
CLONES
static void axpy(float *out, float p, const float *v, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + LANES <= n; i += LANES)
        *(vec *)(out + i) += p * *(const vec *)(v + i);
    for (; i < n; i++)
        out[i] += p * v[i];
}

/* Row b, K/V head kv: store the new key (rotated) and value, then attend for the query heads
   that share them (one without grouped-query attention). */
static void attend_group(const Attention *a, Py_ssize_t b, Py_ssize_t kv, float *scores)
{
    const Py_ssize_t D = a->D, S = a->start + 1, group = a->H / a->KV;
    float *q = a->qkv + b * (a->H + 2 * a->KV) * D; /* this row's q | k | v */
    const float *k_new = q + (a->H + kv) * D, *v_new = q + (a->H + a->KV + kv) * D;
    const float *cos = a->cos ? a->cos + b * D : NULL, *sin = a->sin ? a->sin + b * D : NULL;
    float *k_cache = a->keys + (b * a->KV + kv) * a->capacity * D;
    float *v_cache = a->values + (b * a->KV + kv) * a->capacity * D;
    memcpy(k_cache + a->start * D, k_new, D * sizeof(float));
    memcpy(v_cache + a->start * D, v_new, D * sizeof(float));
    if (cos)
        rope_in_place(k_cache + a->start * D, cos, sin, D);
    const unsigned char *allowed = a->mask ? a->mask + b * a->mask_stride : NULL;
    const float scale = 1.0f / sqrtf((float)D);
    for (Py_ssize_t h = kv * group; h < (kv + 1) * group; h++) {
        float *q_h = q + h * D;
        if (cos)
            rope_in_place(q_h, cos, sin, D);
        float top = -INFINITY;
        for (Py_ssize_t j = 0; j < S; j++) {
            scores[j] = allowed && !allowed[j] ? -INFINITY : dot(q_h, k_cache + j * D, D) * scale;
            if (scores[j] > top)
                top = scores[j];
        }
        float total = 0.0f;
        for (Py_ssize_t j = 0; j < S; j++) {
            scores[j] = scores[j] == -INFINITY ? 0.0f : expf(scores[j] - top);
            total += scores[j];
        }
        float *o = a->out + (b * a->H + h) * D;
        memset(o, 0, D * sizeof(float));
        for (Py_ssize_t j = 0; j < S; j++)
            if (scores[j] != 0.0f)
                axpy(o, scores[j] / total, v_cache + j * D, D);
    }
}

static void attention_part(const void *args, int part, int parts)
{
    const Attention *a = args;
    float *scores = a->scores + part * (a->start + 1);
    for (Py_ssize_t unit = part; unit < a->B * a->KV; unit += parts)
        attend_group(a, unit / a->KV, unit % a->KV, scores);
}

static PyObject *attention(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    void *ptr[7];
    Py_ssize_t size[8];
    if (parse_args(args, nargs, 15,
                   "attention(out, qkv, keys, values, mask, cos, sin, mask_stride, B, H, KV, D, start, capacity, threads)",
                   7, ptr, size) < 0)
        return NULL;
    Attention a = {ptr[0], ptr[1], ptr[2], ptr[3], NULL, ptr[4], ptr[5], ptr[6],
                   size[0], size[1], size[2], size[3], size[4], size[5], size[6]};
    if (a.B < 1 || a.H < 1 || a.KV < 1 || a.H % a.KV || a.D < 2 || a.D % 2 || a.start < 0 ||
        a.start >= a.capacity || !a.out || !a.qkv || !a.keys || !a.values || !a.cos != !a.sin) {
        PyErr_SetString(PyExc_ValueError, "attention: inconsistent sizes or null pointer");
        return NULL;
    }
    int threads = clamp_threads(size[7], a.B * a.KV);
    a.scores = PyMem_RawMalloc((size_t)threads * (a.start + 1) * sizeof(float));
    if (!a.scores)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    run_job(attention_part, &a, threads);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(a.scores);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------ */

static PyMethodDef methods[] = {
    {"linear", (PyCFunction)(void (*)(void))linear, METH_FASTCALL,
     "linear(y, x, w, bias, M, N, K, threads): y (M, N) = x (M, K) @ w (N, K).T + bias (N,) (bias 0: "
     "none); float32, contiguous, pointers as ints, not checked."},
    {"attention", (PyCFunction)(void (*)(void))attention, METH_FASTCALL,
     "attention(out, qkv, keys, values, mask, cos, sin, mask_stride, B, H, KV, D, start, capacity, threads): "
     "one decode step of causal attention. qkv (B, (H+2KV)*D) holds each row's new q|k|v; k (rotated "
     "when cos/sin (B, D) are given) and v are written at position `start` of keys/values (B, KV, "
     "capacity, D), then out (B, H*D) = softmax(q k^T / sqrt(D)) v over positions 0..start where mask "
     "(uint8, row b at b*mask_stride; 0: none) allows. q is rotated in place in qkv. Pointers are not "
     "checked."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_decode", NULL, -1, methods};

PyMODINIT_FUNC PyInit__decode(void)
{
    static int at_fork_registered;
    cpus = sysconf(_SC_NPROCESSORS_ONLN);
    if (!at_fork_registered) {
        pthread_atfork(NULL, NULL, forget_workers_in_child);
        at_fork_registered = 1;
    }
    return PyModule_Create(&module);
}
