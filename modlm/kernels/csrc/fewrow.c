/* Few-row fp32 matrix products for decoding on x86-64 CPUs: y = x @ w^T.
 *
 * Decoding multiplies a handful of rows (one new token per sequence, or the few rows routed
 * into a Mixture-of-Depths block) by every weight matrix. That is a read of the weights with a
 * few multiply-adds per element: memory-bound, so the kernel's job is to stream w once at full
 * bandwidth. General BLAS sgemm paths pack w for cache reuse that a few rows never get (on
 * the AVX2 CPUs we measured they take 1.6-1.9x the time of one row's matrix-vector product
 * for 2-4 rows); here each group of 4 weight rows is read once from memory and reused from L1
 * for every pair of input rows.
 *
 * Built as an optional extension (setup.py): where it does not compile, or the CPU lacks
 * AVX2/FMA, modlm.kernels falls back to torch. The Python side checks shapes, dtypes and
 * contiguity; this file trusts them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FEWROW_X86 1
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define TGT __attribute__((target("avx2,fma")))

static inline TGT float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Rows [n0, n0+4) of w against rows [m, m+2) of x. */
static inline TGT void block_4x2(const float *x, const float *w, float *y, int64_t m, int64_t n0,
                                 int64_t N, int64_t K) {
    const float *w0 = w + n0 * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    const float *x0 = x + m * K, *x1 = x0 + K;
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;
    __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k);
        __m256 v2 = _mm256_loadu_ps(w2 + k), v3 = _mm256_loadu_ps(w3 + k);
        __m256 u0 = _mm256_loadu_ps(x0 + k), u1 = _mm256_loadu_ps(x1 + k);
        a00 = _mm256_fmadd_ps(u0, v0, a00); a01 = _mm256_fmadd_ps(u0, v1, a01);
        a02 = _mm256_fmadd_ps(u0, v2, a02); a03 = _mm256_fmadd_ps(u0, v3, a03);
        a10 = _mm256_fmadd_ps(u1, v0, a10); a11 = _mm256_fmadd_ps(u1, v1, a11);
        a12 = _mm256_fmadd_ps(u1, v2, a12); a13 = _mm256_fmadd_ps(u1, v3, a13);
    }
    float r[8] = {hsum(a00), hsum(a01), hsum(a02), hsum(a03), hsum(a10), hsum(a11), hsum(a12), hsum(a13)};
    for (; k < K; k++) {  /* K not a multiple of 8 */
        r[0] += x0[k] * w0[k]; r[1] += x0[k] * w1[k]; r[2] += x0[k] * w2[k]; r[3] += x0[k] * w3[k];
        r[4] += x1[k] * w0[k]; r[5] += x1[k] * w1[k]; r[6] += x1[k] * w2[k]; r[7] += x1[k] * w3[k];
    }
    float *y0 = y + m * N + n0, *y1 = y0 + N;
    y0[0] = r[0]; y0[1] = r[1]; y0[2] = r[2]; y0[3] = r[3];
    y1[0] = r[4]; y1[1] = r[5]; y1[2] = r[6]; y1[3] = r[7];
}

/* Rows [n0, n0+4) of w against row m of x (the odd row); two accumulators per weight row. */
static inline TGT void block_4x1(const float *x, const float *w, float *y, int64_t m, int64_t n0,
                                 int64_t N, int64_t K) {
    const float *w0 = w + n0 * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
    const float *x0 = x + m * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 u0 = _mm256_loadu_ps(x0 + k), u1 = _mm256_loadu_ps(x0 + k + 8);
        a0 = _mm256_fmadd_ps(u0, _mm256_loadu_ps(w0 + k), a0); a1 = _mm256_fmadd_ps(u0, _mm256_loadu_ps(w1 + k), a1);
        a2 = _mm256_fmadd_ps(u0, _mm256_loadu_ps(w2 + k), a2); a3 = _mm256_fmadd_ps(u0, _mm256_loadu_ps(w3 + k), a3);
        b0 = _mm256_fmadd_ps(u1, _mm256_loadu_ps(w0 + k + 8), b0); b1 = _mm256_fmadd_ps(u1, _mm256_loadu_ps(w1 + k + 8), b1);
        b2 = _mm256_fmadd_ps(u1, _mm256_loadu_ps(w2 + k + 8), b2); b3 = _mm256_fmadd_ps(u1, _mm256_loadu_ps(w3 + k + 8), b3);
    }
    for (; k + 8 <= K; k += 8) {
        __m256 u0 = _mm256_loadu_ps(x0 + k);
        a0 = _mm256_fmadd_ps(u0, _mm256_loadu_ps(w0 + k), a0); a1 = _mm256_fmadd_ps(u0, _mm256_loadu_ps(w1 + k), a1);
        a2 = _mm256_fmadd_ps(u0, _mm256_loadu_ps(w2 + k), a2); a3 = _mm256_fmadd_ps(u0, _mm256_loadu_ps(w3 + k), a3);
    }
    float r[4] = {hsum(_mm256_add_ps(a0, b0)), hsum(_mm256_add_ps(a1, b1)),
                  hsum(_mm256_add_ps(a2, b2)), hsum(_mm256_add_ps(a3, b3))};
    for (; k < K; k++) {
        r[0] += x0[k] * w0[k]; r[1] += x0[k] * w1[k]; r[2] += x0[k] * w2[k]; r[3] += x0[k] * w3[k];
    }
    float *y0 = y + m * N + n0;
    y0[0] = r[0]; y0[1] = r[1]; y0[2] = r[2]; y0[3] = r[3];
}

/* One weight row (the N % 4 tail) against every row of x. */
static inline TGT void row_tail(const float *x, const float *w, float *y, int64_t M, int64_t n,
                                int64_t N, int64_t K) {
    const float *wn = w + n * K;
    for (int64_t m = 0; m < M; m++) {
        const float *xm = x + m * K;
        __m256 a = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= K; k += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(xm + k), _mm256_loadu_ps(wn + k), a);
        float r = hsum(a);
        for (; k < K; k++) r += xm[k] * wn[k];
        y[m * N + n] = r;
    }
}

static TGT void sgemm_nt(const float *x, const float *w, float *y, int64_t M, int64_t N, int64_t K, int threads) {
    int64_t nb = N / 4;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
#endif
    for (int64_t b = 0; b < nb; b++) {
        int64_t m = 0;
        for (; m + 2 <= M; m += 2) block_4x2(x, w, y, m, 4 * b, N, K);
        if (m < M) block_4x1(x, w, y, m, 4 * b, N, K);
    }
    for (int64_t n = 4 * nb; n < N; n++) row_tail(x, w, y, M, n, N, K);
}
#endif /* FEWROW_X86 */

static int cpu_ok(void) {
#ifdef FEWROW_X86
    static int ok = -1;  /* probed once: every product checks it */
    if (ok < 0) {
        __builtin_cpu_init();
        ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    return ok;
#else
    return 0;
#endif
}

static PyObject *py_available(PyObject *self, PyObject *args) {
    (void)self; (void)args;
    return PyBool_FromLong(cpu_ok());
}

static PyObject *py_sgemm_nt(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long px, pw, py;
    long long M, N, K;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKLLLi", &px, &pw, &py, &M, &N, &K, &threads)) return NULL;
#ifdef FEWROW_X86
    if (!cpu_ok()) {
        PyErr_SetString(PyExc_RuntimeError, "fewrow: this CPU lacks AVX2/FMA");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    sgemm_nt((const float *)(uintptr_t)px, (const float *)(uintptr_t)pw, (float *)(uintptr_t)py, M, N, K, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
#else
    (void)px; (void)pw; (void)py; (void)M; (void)N; (void)K; (void)threads;
    PyErr_SetString(PyExc_RuntimeError, "fewrow: built without x86-64 kernels");
    return NULL;
#endif
}

static PyMethodDef methods[] = {
    {"available", py_available, METH_NOARGS, "True if this CPU can run the kernels (AVX2 and FMA)."},
    {"sgemm_nt", py_sgemm_nt, METH_VARARGS,
     "sgemm_nt(x_ptr, w_ptr, y_ptr, M, N, K, threads): y[M,N] = x[M,K] @ w[N,K]^T, fp32, contiguous."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fewrow", "Few-row fp32 matrix products.", -1, methods};

PyMODINIT_FUNC PyInit__fewrow(void) { return PyModule_Create(&module); }
