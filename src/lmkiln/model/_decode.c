/*
 * y = x @ w.T + bias for a few rows of x (generating a token per row): lmkiln's decode GEMV.
 *
 * At one token per step a GEMM is a matrix-vector product: every weight is read once from memory
 * for two FLOPs, so its speed is the memory bandwidth. On the 2-core development VM oneDNN's
 * M=1 path streamed 24-35 GB/s and MKL's 16 GB/s; this loop streams 47-70 GB/s on the same
 * shapes (README, "Performance"). It is deliberately simple:
 *   - each thread takes a contiguous block of output features (rows of w) and walks the rows in
 *     memory order, so the hardware prefetcher sees one stream per thread;
 *   - a row is multiplied with every input row while it is in L1 (w is read exactly once);
 *   - rows a few ahead are prefetched with the non-temporal hint, so the stream disturbs the
 *     caches less;
 *   - four independent accumulators hide the FMA latency; GCC vector extensions compile to
 *     AVX-512, AVX2 or SSE (target_clones picks at load time on x86) and to NEON on ARM.
 * Results differ from torch's by summation order only (~1e-6 relative).
 *
 * Threads: the caller plus a pool of workers made on first use. A worker spins briefly after each
 * job (the next GEMV of a decode step comes within microseconds), then sleeps on a condition
 * variable. The pool assumes it has the cores to itself: lmkiln sets torch to one thread while it
 * decodes (kernels.decoding), since torch's OpenMP workers also spin between parallel regions and
 * two spinning pools on the same cores starve each other. Calls are serialized by a mutex, and a
 * forked child starts with no workers (pthread_atfork), making its own on first use.
 *
 * The Python side (kernels.py) passes data pointers and checks dtype, device, contiguity and shapes
 * before calling; this module trusts them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <math.h>
#include <string.h>
#include <unistd.h>

#define MAX_THREADS 64
#define PREFETCH_ROWS 4 /* rows of w prefetched ahead of the one being multiplied */
#define SPIN_ROUNDS 100000 /* a worker's busy-wait for the next job before it sleeps (~ms) */

typedef float vec __attribute__((vector_size(64), aligned(4))); /* 16 floats, unaligned loads */
#define LANES 16

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

CLONES
static void gemv_rows(const float *w, const float *x, const float *bias, float *y, Py_ssize_t row0,
                      Py_ssize_t row1, Py_ssize_t K, Py_ssize_t M, Py_ssize_t N)
{
    Py_ssize_t k_vec = K - K % (4 * LANES);
    for (Py_ssize_t n = row0; n < row1; n++) {
        const float *w_row = w + n * K;
        if (n + PREFETCH_ROWS < row1) {
            const char *ahead = (const char *)(w + (n + PREFETCH_ROWS) * K);
            for (Py_ssize_t byte = 0; byte < K * (Py_ssize_t)sizeof(float); byte += 64)
                __builtin_prefetch(ahead + byte, 0, 0);
        }
        for (Py_ssize_t m = 0; m < M; m++) {
            const float *x_row = x + m * K;
            vec a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            Py_ssize_t k = 0;
            for (; k < k_vec; k += 4 * LANES) {
                a0 += *(const vec *)(w_row + k) * *(const vec *)(x_row + k);
                a1 += *(const vec *)(w_row + k + LANES) * *(const vec *)(x_row + k + LANES);
                a2 += *(const vec *)(w_row + k + 2 * LANES) * *(const vec *)(x_row + k + 2 * LANES);
                a3 += *(const vec *)(w_row + k + 3 * LANES) * *(const vec *)(x_row + k + 3 * LANES);
            }
            vec total = (a0 + a1) + (a2 + a3);
            float sum = 0.0f;
            for (int lane = 0; lane < LANES; lane++)
                sum += total[lane];
            for (; k < K; k++)
                sum += w_row[k] * x_row[k];
            y[m * N + n] = bias ? sum + bias[n] : sum;
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* The pool. A job is published by bumping job_seq; each of its `parts` threads takes a block. */

typedef struct {
    const float *w, *x, *bias;
    float *y;
    Py_ssize_t K, M, N;
    int parts;
} Job;

static Job job;
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

static void run_part(int part)
{
    /* blocks of whole cache lines of y (16 floats), so two threads never write one line */
    Py_ssize_t per = (job.N + job.parts - 1) / job.parts;
    per = (per + 15) & ~(Py_ssize_t)15;
    Py_ssize_t row0 = part * per, row1 = row0 + per < job.N ? row0 + per : job.N;
    if (row0 < row1)
        gemv_rows(job.w, job.x, job.bias, job.y, row0, row1, job.K, job.M, job.N);
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
            run_part(start.part);
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

static PyObject *linear(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "linear(y_ptr, x_ptr, w_ptr, bias_ptr, M, N, K, threads)");
        return NULL;
    }
    void *ptr[4];
    for (int i = 0; i < 4; i++) {
        ptr[i] = PyLong_AsVoidPtr(args[i]);
        if (PyErr_Occurred())
            return NULL;
    }
    Py_ssize_t M = PyLong_AsSsize_t(args[4]), N = PyLong_AsSsize_t(args[5]), K = PyLong_AsSsize_t(args[6]);
    long threads = PyLong_AsLong(args[7]);
    if (PyErr_Occurred())
        return NULL;
    if (M < 0 || N < 0 || K < 0 || (M > 0 && N > 0 && (!ptr[0] || (K > 0 && (!ptr[1] || !ptr[2]))))) {
        PyErr_SetString(PyExc_ValueError, "linear: negative size or null pointer");
        return NULL;
    }
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    if (cpus > 0 && threads > cpus) /* more threads than cores: spinning workers would starve */
        threads = cpus;
    if (threads > MAX_THREADS)
        threads = MAX_THREADS;
    if (threads < 1 || N < 64) /* too small to be worth waking a worker */
        threads = 1;

    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&call_lock);
    int parts = 1;
    if (threads > 1) {
        int workers = ensure_workers((int)threads - 1);
        parts = 1 + (workers < threads - 1 ? workers : (int)threads - 1);
    }
    job = (Job){ptr[2], ptr[1], ptr[3], ptr[0], K, M, N, parts};
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
    run_part(0);
    while (atomic_load_explicit(&pending, memory_order_acquire) > 0)
        cpu_relax();
    pthread_mutex_unlock(&call_lock);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------ */
/* Attention of one new token per row against the KV cache.                                   */

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
    vec acc = acc0 + acc1;
    float sum = 0.0f;
    for (int lane = 0; lane < LANES; lane++)
        sum += acc[lane];
    for (; i < n; i++)
        sum += a[i] * b[i];
    return sum;
}

/* out[d] += p * v[d] */
CLONES
static void axpy(float *out, float p, const float *v, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + LANES <= n; i += LANES)
        *(vec *)(out + i) += p * *(const vec *)(v + i);
    for (; i < n; i++)
        out[i] += p * v[i];
}

static PyObject *attention(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 14) {
        PyErr_SetString(PyExc_TypeError,
                        "attention(out, qkv, keys, values, mask, mask_stride, cos, sin, B, H, KV, D, start, capacity)");
        return NULL;
    }
    void *ptr[8];
    for (int i = 0; i < 8; i++) {
        if (i == 5)
            continue;
        ptr[i] = PyLong_AsVoidPtr(args[i]);
        if (PyErr_Occurred())
            return NULL;
    }
    Py_ssize_t mask_stride = PyLong_AsSsize_t(args[5]);
    Py_ssize_t B = PyLong_AsSsize_t(args[8]), H = PyLong_AsSsize_t(args[9]), KV = PyLong_AsSsize_t(args[10]);
    Py_ssize_t D = PyLong_AsSsize_t(args[11]), start = PyLong_AsSsize_t(args[12]), capacity = PyLong_AsSsize_t(args[13]);
    if (PyErr_Occurred())
        return NULL;
    if (B < 1 || H < 1 || KV < 1 || H % KV || D < 2 || D % 2 || start < 0 || start >= capacity || !ptr[0] || !ptr[1] ||
        !ptr[2] || !ptr[3] || (!ptr[6]) != (!ptr[7])) {
        PyErr_SetString(PyExc_ValueError, "attention: inconsistent sizes or null pointer");
        return NULL;
    }
    float *out = ptr[0], *qkv = ptr[1], *keys = ptr[2], *values = ptr[3];
    const unsigned char *mask = ptr[4];
    const float *cos = ptr[6], *sin = ptr[7];
    Py_ssize_t S = start + 1, width = (H + 2 * KV) * D, group = H / KV;
    float scale = 1.0f / sqrtf((float)D);
    float *scores = PyMem_RawMalloc(S * sizeof(float));
    if (!scores)
        return PyErr_NoMemory();

    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t b = 0; b < B; b++) {
        float *q = qkv + b * width, *k_new = q + H * D, *v_new = k_new + KV * D;
        const unsigned char *allowed = mask ? mask + b * mask_stride : NULL;
        for (Py_ssize_t kv = 0; kv < KV; kv++) {
            float *k_row = keys + ((b * KV + kv) * capacity + start) * D;
            float *v_row = values + ((b * KV + kv) * capacity + start) * D;
            memcpy(k_row, k_new + kv * D, D * sizeof(float));
            memcpy(v_row, v_new + kv * D, D * sizeof(float));
            if (cos)
                rope_in_place(k_row, cos + b * D, sin + b * D, D);
        }
        for (Py_ssize_t h = 0; h < H; h++) {
            float *q_h = q + h * D;
            if (cos)
                rope_in_place(q_h, cos + b * D, sin + b * D, D);
            const float *k_h = keys + (b * KV + h / group) * capacity * D;
            const float *v_h = values + (b * KV + h / group) * capacity * D;
            float top = -INFINITY;
            for (Py_ssize_t j = 0; j < S; j++) {
                scores[j] = allowed && !allowed[j] ? -INFINITY : dot(q_h, k_h + j * D, D) * scale;
                if (scores[j] > top)
                    top = scores[j];
            }
            float total = 0.0f;
            for (Py_ssize_t j = 0; j < S; j++) {
                scores[j] = scores[j] == -INFINITY ? 0.0f : expf(scores[j] - top);
                total += scores[j];
            }
            float *o = out + (b * H + h) * D;
            for (Py_ssize_t d = 0; d < D; d++)
                o[d] = 0.0f;
            for (Py_ssize_t j = 0; j < S; j++)
                if (scores[j] != 0.0f)
                    axpy(o, scores[j] / total, v_h + j * D, D);
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(scores);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"linear", (PyCFunction)(void (*)(void))linear, METH_FASTCALL,
     "linear(y_ptr, x_ptr, w_ptr, bias_ptr, M, N, K, threads): y (M, N) = x (M, K) @ w (N, K).T + bias "
     "(N,) (bias_ptr 0: none), float32, contiguous, on `threads` cores. Pointers are not checked."},
    {"attention", (PyCFunction)(void (*)(void))attention, METH_FASTCALL,
     "attention(out, qkv, keys, values, mask, mask_stride, cos, sin, B, H, KV, D, start, capacity): one decode "
     "step of causal attention. qkv (B, (H+2KV)*D) holds each row's new q|k|v; k (after RoPE, when cos/sin "
     "(B, D) are given) and v are written at position `start` of keys/values (B, KV, capacity, D), then "
     "out (B, H*D) = softmax(q k^T / sqrt(D)) v over positions 0..start, where mask (uint8, row b at "
     "b*mask_stride) allows. The q part of qkv is rotated in place. Pointers are not checked."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_decode", NULL, -1, methods};

PyMODINIT_FUNC PyInit__decode(void)
{
    static int at_fork_registered;
    if (!at_fork_registered) {
        pthread_atfork(NULL, NULL, forget_workers_in_child);
        at_fork_registered = 1;
    }
    return PyModule_Create(&module);
}
