"""C source of the CPU helper kernels (built by ``cpu_native.py`` with the machine's C compiler).

Kept as a Python string so it ships inside the package like any module. Every function repeats
the float arithmetic of a pure-torch reference operation by operation (IEEE division, round half
to even, no FMA contraction: built with ``-ffp-contract=off`` and without ``-ffast-math``), so
its results equal the reference's bit for bit. One exception, by design: the QUIK epilogue's
outlier-column dot product (explicit fused multiply-adds, in column order; the reference's BLAS
GEMM sums in an order of its own, so the two agree to float32 rounding). AVX-512 paths are compiled when the compiler
targets AVX-512 (``-march=native``); plain C loops otherwise.

dtype codes: 0 float32, 1 bfloat16, 2 float16.
"""

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>
#include <omp.h>
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define QC_AVX512 1
#endif
#if defined(QC_AVX512) && defined(__AVX512VNNI__)
#define QC_VNNI 1
#endif

#define F32 0
#define BF16 1
#define F16 2

int qc_features(void) {
    int f = 0;
#ifdef QC_AVX512
    f |= 1;
#endif
#ifdef QC_VNNI
    f |= 2;
#endif
    return f;
}

/* ------------------------------------------------------------------ scalar conversions (torch's) */
static inline float bf16_to_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f32_to_bf16(float f) {  /* c10::BFloat16: round to nearest even, NaN -> 0x7FC0 */
    uint32_t u; memcpy(&u, &f, 4);
    if (f != f) return 0x7FC0;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float f16_to_f32(uint16_t h) { _Float16 v; memcpy(&v, &h, 2); return (float)v; }
static inline uint16_t f32_to_f16(float f) { _Float16 v = (_Float16)f; uint16_t h; memcpy(&h, &v, 2); return h; }

static inline float load1(const void* p, int dt, int64_t i) {
    if (dt == F32) return ((const float*)p)[i];
    if (dt == BF16) return bf16_to_f32(((const uint16_t*)p)[i]);
    return f16_to_f32(((const uint16_t*)p)[i]);
}
static inline void store1(void* p, int dt, int64_t i, float v) {
    if (dt == F32) ((float*)p)[i] = v;
    else if (dt == BF16) ((uint16_t*)p)[i] = f32_to_bf16(v);
    else ((uint16_t*)p)[i] = f32_to_f16(v);
}

#ifdef QC_AVX512
/* 16 lanes from element i on, n (< 16 for a tail) valid, 0 elsewhere */
static inline __m512 load16(const void* p, int dt, int64_t i, int n) {
    __mmask16 m = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
    if (dt == F32) return _mm512_maskz_loadu_ps(m, (const float*)p + i);
    __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t*)p + i);
    if (dt == BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}
static inline void store16(void* p, int dt, int64_t i, __m512 v, int n) {
    __mmask16 m = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
    if (dt == F32) { _mm512_mask_storeu_ps((float*)p + i, m, v); return; }
    __m256i h;
    if (dt == BF16) {  /* integer round-to-nearest-even, as c10::BFloat16 (keeps denormals) */
        __m512i u = _mm512_castps_si512(v);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
        __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
        h = _mm512_cvtepi32_epi16(r);
    } else {
        h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    }
    _mm256_mask_storeu_epi16((uint16_t*)p + i, m, h);
}
static inline __m512 rne(__m512 v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* int32 lanes -> int8 (values already in range), stored with an added offset (0 or 128 as uint8) */
static inline void store16_i8(void* q, int64_t i, __m512i v, int off, int n) {
    __mmask16 m = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
    if (off) v = _mm512_add_epi32(v, _mm512_set1_epi32(off));
    _mm_mask_storeu_epi8((int8_t*)q + i, m, _mm512_cvtepi32_epi8(v));
}
#endif

/* ------------------------------------------------------------------ activation quantization
 * Symmetric int8, as w8a8_linear_reference: dynamic per token (static_scale <= 0):
 *   s = max(absmax / 127, 1e-8), q = round(x / s);
 * static per tensor: q = clamp(round(x / static_scale), -128, 127).
 * q is stored as int8, or as uint8 q + 128 when offset = 128 (the VNNI GEMV's operand). */
void qc_quant_sym(const void* x, int dt, int64_t M, int64_t K, int64_t ldx, void* q, int64_t ldq,
                  float* scale, float static_scale, int offset, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if(M * K > 32768)
    for (int64_t m = 0; m < M; ++m) {
        const char* xr = (const char*)x + m * ldx * (dt == F32 ? 4 : 2);
        int8_t* qr = (int8_t*)q + m * ldq;
        float s;
        int dynamic = !(static_scale > 0.0f);
        if (dynamic) {
            float amax = 0.0f;
            int64_t k = 0;
#ifdef QC_AVX512
            __m512 va = _mm512_setzero_ps();
            for (; k < K; k += 16) {
                int n = K - k < 16 ? (int)(K - k) : 16;
                va = _mm512_max_ps(va, _mm512_abs_ps(load16(xr, dt, k, n)));
            }
            amax = _mm512_reduce_max_ps(va);
#endif
            for (; k < K; ++k) { float a = fabsf(load1(xr, dt, k)); amax = a > amax ? a : amax; }
            s = amax / 127.0f;
            s = s < 1e-8f ? 1e-8f : s;
            scale[m] = s;
        } else {
            s = static_scale;
            if (scale) scale[m] = s;
        }
        int64_t k = 0;
#ifdef QC_AVX512
        __m512 vs = _mm512_set1_ps(s), lo = _mm512_set1_ps(-128.0f), hi = _mm512_set1_ps(127.0f);
        for (; k < K; k += 16) {
            int n = K - k < 16 ? (int)(K - k) : 16;
            __m512 v = rne(_mm512_div_ps(load16(xr, dt, k, n), vs));
            if (!dynamic) v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
            store16_i8(qr, k, _mm512_cvtps_epi32(v), offset, n);
        }
#endif
        for (; k < K; ++k) {
            float v = nearbyintf(load1(xr, dt, k) / s);
            if (!dynamic) v = v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v);
            qr[k] = (int8_t)((int)v + offset);
        }
    }
}

/* Asymmetric per token, as quantize_per_token_reference(symmetric=False):
 *   lo = min, hi = max, s = max((hi - lo) / levels, 1e-8), q = clamp(round((x - lo) / s), 0, levels) - half
 * stored as int8 (or uint8 q + 128 when offset = 128). */
void qc_quant_asym(const void* x, int dt, int64_t M, int64_t K, int64_t ldx, void* q, int64_t ldq,
                   float* scale, float* minv, int bits, int offset, int nthreads) {
    const float levels = (float)((1 << bits) - 1);
    const int half = 1 << (bits - 1);
    #pragma omp parallel for num_threads(nthreads) schedule(static) if(M * K > 32768)
    for (int64_t m = 0; m < M; ++m) {
        const char* xr = (const char*)x + m * ldx * (dt == F32 ? 4 : 2);
        int8_t* qr = (int8_t*)q + m * ldq;
        float lo = INFINITY, hi = -INFINITY;
        int64_t k = 0;
#ifdef QC_AVX512
        __m512 vlo = _mm512_set1_ps(INFINITY), vhi = _mm512_set1_ps(-INFINITY);
        for (; k + 16 <= K; k += 16) {
            __m512 v = load16(xr, dt, k, 16);
            vlo = _mm512_min_ps(vlo, v);
            vhi = _mm512_max_ps(vhi, v);
        }
        lo = _mm512_reduce_min_ps(vlo);
        hi = _mm512_reduce_max_ps(vhi);
#endif
        for (; k < K; ++k) { float v = load1(xr, dt, k); lo = v < lo ? v : lo; hi = v > hi ? v : hi; }
        float s = (hi - lo) / levels;
        s = s < 1e-8f ? 1e-8f : s;
        scale[m] = s;
        minv[m] = lo;
        k = 0;
#ifdef QC_AVX512
        __m512 vs = _mm512_set1_ps(s), vl = _mm512_set1_ps(lo), zero = _mm512_setzero_ps(), top = _mm512_set1_ps(levels);
        __m512i vh = _mm512_set1_epi32(half);
        for (; k < K; k += 16) {
            int n = K - k < 16 ? (int)(K - k) : 16;
            __m512 v = rne(_mm512_div_ps(_mm512_sub_ps(load16(xr, dt, k, n), vl), vs));
            v = _mm512_min_ps(_mm512_max_ps(v, zero), top);
            store16_i8(qr, k, _mm512_sub_epi32(_mm512_cvtps_epi32(v), vh), offset, n);
        }
#endif
        for (; k < K; ++k) {
            float v = nearbyintf((load1(xr, dt, k) - lo) / s);
            v = v < 0.0f ? 0.0f : (v > levels ? levels : v);
            qr[k] = (int8_t)((int)v - half + offset);
        }
    }
}

/* ------------------------------------------------------------------ small-M integer GEMM (VNNI)
 * out[m, n] = sum_k a[m, k] * b[n, k], exact in int32, for a given as uint8 a + 128 (A_u8) and
 * b int8 [N, K] row-major (the stored layout): vpdpbusd sums (a + 128) * b, and
 * 128 * colsum[n] (colsum[n] = sum_k b[n, k], prepared once) is subtracted.
 * Exact while 255 * 128 * K < 2^31 (K < 65793; the caller checks). */
#ifdef QC_VNNI
/* MB rows of A against NB rows of B (both compile-time constants after inlining; MB * NB <= 16
 * accumulators), K in steps of 64 bytes with a masked tail */
static inline __attribute__((always_inline)) void gemv_tile(
        const int MB, const int NB, const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb,
        const int32_t* colsum, int32_t* out, int64_t ldo, int64_t m0, int64_t n0, int nn, int64_t K) {
    __m512i acc[4][8];
    const int8_t* brow[8];
    for (int j = 0; j < NB; ++j) brow[j] = B + (n0 + (j < nn ? j : 0)) * ldb;  /* tail rows re-read row 0 */
    for (int i = 0; i < MB; ++i) for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        __m512i av[4];
        for (int i = 0; i < MB; ++i) av[i] = _mm512_loadu_si512((const void*)(A + (m0 + i) * lda + k));
        for (int j = 0; j < NB; ++j) {
            __m512i bv = _mm512_loadu_si512((const void*)(brow[j] + k));
            for (int i = 0; i < MB; ++i) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], av[i], bv);
        }
    }
    if (k < K) {
        __mmask64 km = (((__mmask64)1 << (K - k)) - 1);
        __m512i av[4];
        for (int i = 0; i < MB; ++i) av[i] = _mm512_maskz_loadu_epi8(km, A + (m0 + i) * lda + k);
        for (int j = 0; j < NB; ++j) {
            __m512i bv = _mm512_maskz_loadu_epi8(km, brow[j] + k);
            for (int i = 0; i < MB; ++i) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], av[i], bv);
        }
    }
    for (int i = 0; i < MB; ++i)
        for (int j = 0; j < nn; ++j)
            out[(m0 + i) * ldo + n0 + j] = _mm512_reduce_add_epi32(acc[i][j]) - 128 * colsum[n0 + j];
}
#endif

void qc_gemv_u8s8(const uint8_t* A, int64_t lda, const int8_t* B, int64_t ldb, const int32_t* colsum,
                  int32_t* out, int64_t ldo, int64_t M, int64_t N, int64_t K, int nthreads) {
#ifdef QC_VNNI
    const int NB = M <= 2 ? 8 : 4;
    int64_t nblocks = (N + NB - 1) / NB;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t bi = 0; bi < nblocks; ++bi) {
        int64_t n0 = bi * NB;
        int nn = (int)(N - n0 < NB ? N - n0 : NB);
        int64_t m0 = 0;
        if (NB == 8) {
            for (; m0 + 2 <= M; m0 += 2) gemv_tile(2, 8, A, lda, B, ldb, colsum, out, ldo, m0, n0, nn, K);
            if (m0 < M) gemv_tile(1, 8, A, lda, B, ldb, colsum, out, ldo, m0, n0, nn, K);
        } else {
            for (; m0 + 4 <= M; m0 += 4) gemv_tile(4, 4, A, lda, B, ldb, colsum, out, ldo, m0, n0, nn, K);
            if (M - m0 == 3) gemv_tile(3, 4, A, lda, B, ldb, colsum, out, ldo, m0, n0, nn, K);
            else if (M - m0 == 2) gemv_tile(2, 4, A, lda, B, ldb, colsum, out, ldo, m0, n0, nn, K);
            else if (M - m0 == 1) gemv_tile(1, 4, A, lda, B, ldb, colsum, out, ldo, m0, n0, nn, K);
        }
    }
#else
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n)
        for (int64_t m = 0; m < M; ++m) {
            int32_t s = 0;
            for (int64_t k = 0; k < K; ++k) s += ((int32_t)A[m * lda + k] - 128) * (int32_t)B[n * ldb + k];
            out[m * ldo + n] = s;
        }
#endif
}

/* ------------------------------------------------------------------ epilogues
 * W8A8: y = ((float)acc[m, n] * sx[m]) * sw[n] (+ bias[n]), stored in dt (w8a8_linear_reference).
 * acc is int32, or float32 already holding the exact integers (acc_is_float). */
static inline void qc_w8a8_row_epilogue_of(const void* acc, int acc_is_float, float s, const float* sw,
                                           const float* bias, char* orow, int dt, int64_t N) {
    const int32_t* ai = (const int32_t*)acc;
    const float* af = (const float*)acc;
    int64_t n = 0;
#ifdef QC_AVX512
    __m512 vs = _mm512_set1_ps(s);
    for (; n < N; n += 16) {
        int c = N - n < 16 ? (int)(N - n) : 16;
        __mmask16 km = c >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << c) - 1u);
        __m512 a = acc_is_float ? _mm512_maskz_loadu_ps(km, af + n)
                                : _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(km, ai + n));
        __m512 y = _mm512_mul_ps(_mm512_mul_ps(a, vs), _mm512_maskz_loadu_ps(km, sw + n));
        if (bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(km, bias + n));
        store16(orow, dt, n, y, c);
    }
#endif
    for (; n < N; ++n) {
        float a = acc_is_float ? af[n] : (float)ai[n];
        float y = (a * s) * sw[n];
        if (bias) y = y + bias[n];
        store1(orow, dt, n, y);
    }
}
/* one row of int32 accumulators (the AMX kernel's tiles) */
static inline void qc_w8a8_row_epilogue(const int32_t* acc, float s, const float* sw, const float* bias, char* orow,
                                        int dt, int64_t N) {
    qc_w8a8_row_epilogue_of(acc, 0, s, sw, bias, orow, dt, N);
}

void qc_epilogue_w8a8(const void* acc, int acc_is_float, int64_t lda, const float* sx, const float* sw,
                      const float* bias, void* out, int dt, int64_t ldo, int64_t M, int64_t N, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if(M * N > 32768)
    for (int64_t m = 0; m < M; ++m)
        qc_w8a8_row_epilogue_of((const char*)acc + m * lda * 4, acc_is_float, sx[m], sw, bias,
                                (char*)out + m * ldo * (dt == F32 ? 4 : 2), dt, N);
}

#define QMR 4
/* QUIK: y = ((st[m] * sw[n]) * acc + (mt[m] + half * st[m]) * rs[n]) (+ o[m, n]) (+ bias[n]),
 * stored in dt (w4a4_outlier_linear_reference's order of the terms), where the outlier columns'
 * float product o[m, n] = sum_j xo[m, j] * owt[j, n] is computed here, in float32 fused
 * multiply-adds over j = 0 .. kout-1 in order (the reference's BLAS call sums in its own order: the
 * two agree to float32 rounding of a kout-term dot product). xo: [M, kout] in dt (row stride ldxo
 * elements) or NULL (kout = 0); owt: float32 [kout, N] (the outlier weight transposed, prepared
 * once). acc int32, or float32 holding the exact integers rounded to float32 (acc_is_float).
 * Rows go in blocks of QMR, columns in pairs of 16-lane vectors: each loaded owt vector serves QMR
 * rows, each broadcast x value two vectors. */
#ifdef QC_AVX512
/* o[i][v] = sum_j xs[j * QMR + i] * owt[j, n + 16 v] for MR rows (a compile-time constant after
   inlining) and two 16-lane column vectors, fused multiply-adds over j in order */
static inline __attribute__((always_inline)) void quik_outlier_tile(
        const int MR, const float* xs, const float* owt, int64_t kout, int64_t N, int64_t n,
        const __mmask16* km, __m512 o[][2]) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0, c0 = a0, c1 = a0, d0 = a0, d1 = a0;
    const float* w = owt + n;
    for (int64_t j = 0; j < kout; ++j, w += N) {
        const __m512 w0 = _mm512_maskz_loadu_ps(km[0], w), w1 = _mm512_maskz_loadu_ps(km[1], w + 16);
        const float* x = xs + j * QMR;
        __m512 xv = _mm512_set1_ps(x[0]);
        a0 = _mm512_fmadd_ps(xv, w0, a0); a1 = _mm512_fmadd_ps(xv, w1, a1);
        if (MR > 1) { xv = _mm512_set1_ps(x[1]); b0 = _mm512_fmadd_ps(xv, w0, b0); b1 = _mm512_fmadd_ps(xv, w1, b1); }
        if (MR > 2) { xv = _mm512_set1_ps(x[2]); c0 = _mm512_fmadd_ps(xv, w0, c0); c1 = _mm512_fmadd_ps(xv, w1, c1); }
        if (MR > 3) { xv = _mm512_set1_ps(x[3]); d0 = _mm512_fmadd_ps(xv, w0, d0); d1 = _mm512_fmadd_ps(xv, w1, d1); }
    }
    o[0][0] = a0; o[0][1] = a1; o[1][0] = b0; o[1][1] = b1;
    o[2][0] = c0; o[2][1] = c1; o[3][0] = d0; o[3][1] = d1;
}
#endif
/* One block of mr <= QMR rows and N columns of the QUIK epilogue; row i of acc, out, xo, st, mt is
   i rows after the given pointers; owt's rows are ldow floats apart; xs: QMR * kout floats of scratch.
   opre (or NULL): the outlier columns' product already computed (float32, rows ldop apart; the AMX
   kernel's bf16 tiles), added in its place (kout is then 0). */
static inline void qc_quik_block(const void* acc, int acc_is_float, int64_t lda, const float* st, const float* mt,
                                 const float* sw, const float* rs, float half, const void* xo, int64_t ldxo,
                                 const float* owt, int64_t ldow, int64_t kout, const float* bias, void* out, int dt,
                                 int64_t ldo, int mr, int64_t N, float* xs, const float* opre, int64_t ldop) {
    const int esz = dt == F32 ? 4 : 2;
    for (int i = 0; i < mr; ++i)
        for (int64_t j = 0; j < kout; ++j) xs[j * QMR + i] = load1((const char*)xo + i * ldxo * esz, dt, j);
    int64_t n = 0;
#ifdef QC_AVX512
    for (; n < N; n += 32) {
        __m512 o[QMR][2];
        __mmask16 km[2];
        int cnt[2];
        for (int v = 0; v < 2; ++v) {
            int64_t left = N - n - 16 * v;
            cnt[v] = left <= 0 ? 0 : (left < 16 ? (int)left : 16);
            km[v] = cnt[v] >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << cnt[v]) - 1u);
            for (int i = 0; i < QMR; ++i) o[i][v] = _mm512_setzero_ps();
        }
        if (mr == QMR) quik_outlier_tile(QMR, xs, owt, kout, ldow, n, km, o);
        else if (mr == 3) quik_outlier_tile(3, xs, owt, kout, ldow, n, km, o);
        else if (mr == 2) quik_outlier_tile(2, xs, owt, kout, ldow, n, km, o);
        else quik_outlier_tile(1, xs, owt, kout, ldow, n, km, o);
        if (opre)
            for (int i = 0; i < mr; ++i)
                for (int v = 0; v < 2; ++v) o[i][v] = _mm512_maskz_loadu_ps(km[v], opre + i * ldop + n + 16 * v);
        for (int i = 0; i < mr; ++i) {
            const float s = st[i];
            const __m512 vs = _mm512_set1_ps(s), vc = _mm512_set1_ps(mt[i] + half * s);
            const int32_t* ar = (const int32_t*)acc + i * lda;
            const float* af = (const float*)acc + i * lda;
            char* orow = (char*)out + i * ldo * esz;
            for (int v = 0; v < 2; ++v) {
                if (!cnt[v]) break;
                const int64_t c = n + 16 * v;
                __m512 a = acc_is_float ? _mm512_maskz_loadu_ps(km[v], af + c)
                                        : _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(km[v], ar + c));
                __m512 t1 = _mm512_mul_ps(_mm512_mul_ps(vs, _mm512_maskz_loadu_ps(km[v], sw + c)), a);
                __m512 t2 = _mm512_mul_ps(vc, _mm512_maskz_loadu_ps(km[v], rs + c));
                __m512 y = _mm512_add_ps(t1, t2);
                if (kout || opre) y = _mm512_add_ps(y, o[i][v]);
                if (bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(km[v], bias + c));
                store16(orow, dt, c, y, cnt[v]);
            }
        }
    }
#endif
    for (; n < N; ++n)
        for (int i = 0; i < mr; ++i) {
            const float s = st[i], c = mt[i] + half * s;
            const int32_t* ar = (const int32_t*)acc + i * lda;
            const float* af = (const float*)acc + i * lda;
            float y = (s * sw[n]) * (acc_is_float ? af[n] : (float)ar[n]) + c * rs[n];
            if (kout) {
                float o = 0.0f;
                for (int64_t j = 0; j < kout; ++j) o = fmaf(xs[j * QMR + i], owt[j * ldow + n], o);
                y = y + o;
            }
            if (opre) y = y + opre[i * ldop + n];
            if (bias) y = y + bias[n];
            store1((char*)out + i * ldo * esz, dt, n, y);
        }
}

void qc_epilogue_quik(const void* acc, int acc_is_float, int64_t lda, const float* st, const float* mt, const float* sw,
                      const float* rs, float half, const void* xo, int64_t ldxo, const float* owt, int64_t kout,
                      const float* bias, void* out, int dt, int64_t ldo, int64_t M, int64_t N, int nthreads) {
    if (!xo) kout = 0;
    const int64_t nblk = (M + QMR - 1) / QMR;
    const int esz = dt == F32 ? 4 : 2;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if(M * N * (kout + 4) > 131072)
    for (int64_t b = 0; b < nblk; ++b) {
        const int64_t m0 = b * QMR;
        const int mr = (int)(M - m0 < QMR ? M - m0 : QMR);
        float* xs = kout ? (float*)malloc((size_t)(QMR * kout) * sizeof(float)) : 0;
        qc_quik_block((const char*)acc + m0 * lda * 4, acc_is_float, lda, st + m0, mt + m0, sw, rs, half,
                      kout ? (const char*)xo + m0 * ldxo * esz : 0, ldxo, owt, N, kout, bias,
                      (char*)out + m0 * ldo * esz, dt, ldo, mr, N, xs, NULL, 0);
        free(xs);
    }
}

/* ------------------------------------------------------------------ weight dequantization
 * w[n, k] = ((float)q[n, k] - zero[n, g]) * scale[n, g] (no zero: q * scale), g = k / group
 * (group <= 0: one group per row), stored in dt (dequantize_weight, then .to(dtype)).
 * qkind: 0 int8 [N, K], 1 uint8 [N, K], 2 packed signed nibbles, 3 packed unsigned nibbles
 * ([N, ceil(K/2)], column 2j in the low nibble). Rows of w are ldw elements apart. */
/* row n of the dequantized weight (its stored row qr) into orow */
static inline void qc_dequant_row(const uint8_t* qr, int qkind, int64_t n, int64_t K, const float* scale,
                                  const float* zero, int64_t G, int64_t group, char* orow, int dt) {
    {
        int64_t k = 0;
        while (k < K) {
            int64_t g = group > 0 ? k / group : 0;
            int64_t end = group > 0 ? (g + 1) * group : K;
            if (end > K) end = K;
            const float s = scale[n * G + g];
            const float z = zero ? zero[n * G + g] : 0.0f;
#ifdef QC_AVX512
            __m512 vs = _mm512_set1_ps(s), vz = _mm512_set1_ps(z);
            if (qkind <= 1) {
                for (; k + 16 <= end; k += 16) {
                    __m128i b = _mm_loadu_si128((const __m128i*)(qr + k));
                    __m512i i = qkind == 0 ? _mm512_cvtepi8_epi32(b) : _mm512_cvtepu8_epi32(b);
                    __m512 v = _mm512_cvtepi32_ps(i);
                    if (zero) v = _mm512_sub_ps(v, vz);
                    store16(orow, dt, k, _mm512_mul_ps(v, vs), 16);
                }
            } else if ((k & 1) == 0) {
                if (dt == BF16 && end - k >= 64) {
                    /* the 16 levels' bf16 values, computed as below (so the same bits), then looked up:
                       32 columns per vpermw */
                    uint16_t lut[32] = {0};
                    for (int v = 0; v < 16; ++v) {
                        float f = (float)((qkind == 2 && v >= 8) ? v - 16 : v);
                        if (zero) f = f - z;
                        lut[v] = f32_to_bf16(f * s);
                    }
                    const __m512i vl = _mm512_loadu_si512((const void*)lut), nib = _mm512_set1_epi32(0xF);
                    for (; k + 32 <= end; k += 32) {
                        __m512i t = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(qr + k / 2)));
                        __m512i idx = _mm512_or_si512(_mm512_and_si512(t, nib),
                                                      _mm512_slli_epi32(_mm512_srli_epi32(t, 4), 16));
                        _mm512_storeu_si512((void*)((uint16_t*)orow + k), _mm512_permutexvar_epi16(idx, vl));
                    }
                }
                const __m512i perm = _mm512_set_epi32(15, 7, 14, 6, 13, 5, 12, 4, 11, 3, 10, 2, 9, 1, 8, 0);
                for (; k + 16 <= end; k += 16) {
                    __m128i b = _mm_loadl_epi64((const __m128i*)(qr + k / 2));   /* 8 bytes: 16 nibbles */
                    __m512i w = _mm512_cvtepu8_epi32(b);
                    __m512i lo = _mm512_and_si512(w, _mm512_set1_epi32(0xF));
                    __m512i hi = _mm512_srli_epi32(w, 4);
                    /* lanes 0..7 of lo are columns 0,2,..,14; of hi 1,3,..,15: interleave */
                    __m512i both = _mm512_inserti64x4(lo, _mm512_castsi512_si256(hi), 1);
                    __m512i i = _mm512_permutexvar_epi32(perm, both);
                    if (qkind == 2) i = _mm512_sub_epi32(_mm512_xor_si512(i, _mm512_set1_epi32(8)), _mm512_set1_epi32(8));
                    __m512 v = _mm512_cvtepi32_ps(i);
                    if (zero) v = _mm512_sub_ps(v, vz);
                    store16(orow, dt, k, _mm512_mul_ps(v, vs), 16);
                }
            }
#endif
            for (; k < end; ++k) {
                int iv;
                if (qkind == 0) iv = (int8_t)qr[k];
                else if (qkind == 1) iv = qr[k];
                else {
                    int nib = (k & 1) ? (qr[k >> 1] >> 4) : (qr[k >> 1] & 0xF);
                    iv = (qkind == 2 && nib >= 8) ? nib - 16 : nib;
                }
                float v = (float)iv;
                if (zero) v = v - z;
                store1(orow, dt, k, v * s);
            }
        }
    }
}

void qc_dequant(const uint8_t* q, int qkind, int64_t ldq, int64_t N, int64_t K, const float* scale,
                const float* zero, int64_t G, int64_t group, void* out, int64_t ldw, int dt, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; ++n)
        qc_dequant_row(q + n * ldq, qkind, n, K, scale, zero, G, group, (char*)out + n * ldw * (dt == F32 ? 4 : 2), dt);
}

/* ------------------------------------------------------------------ column gather
 * out[m, j] = x[m, idx[j]] for j < n (QUIK's permuted or split activation columns; torch's
 * index_select along the last dimension is several times slower for bf16 rows). */
void qc_gather_cols(const void* x, int dt, int64_t M, int64_t ldx, const int64_t* idx, int64_t n, void* out,
                    int64_t ldo, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if(M * n > 32768)
    for (int64_t m = 0; m < M; ++m) {
        if (dt == F32) {
            const float* xr = (const float*)x + m * ldx;
            float* o = (float*)out + m * ldo;
            for (int64_t j = 0; j < n; ++j) o[j] = xr[idx[j]];
        } else {
            const uint16_t* xr = (const uint16_t*)x + m * ldx;
            uint16_t* o = (uint16_t*)out + m * ldo;
            for (int64_t j = 0; j < n; ++j) o[j] = xr[idx[j]];
        }
    }
}

/* ------------------------------------------------------------------ small M in one call
 * The decode path without round trips through Python: quantize, VNNI GEMV, epilogue (the
 * functions above, in the same order, on scratch buffers). */
void qc_w8a8_small(const void* x, int dt, int64_t M, int64_t K, int64_t ldx, const int8_t* B, int64_t ldb,
                   const int32_t* colsum, const float* sw, const float* bias, float static_scale,
                   void* out, int64_t N, int nthreads) {
    uint8_t* qa = (uint8_t*)malloc((size_t)(M * K));
    float* sx = (float*)malloc((size_t)M * sizeof(float));
    int32_t* acc = (int32_t*)malloc((size_t)(M * N) * sizeof(int32_t));
    qc_quant_sym(x, dt, M, K, ldx, qa, K, sx, static_scale, 128, 1);
    qc_gemv_u8s8(qa, K, B, ldb, colsum, acc, N, M, N, K, nthreads);
    qc_epilogue_w8a8(acc, 0, N, sx, sw, bias, out, dt, N, M, N, 1);
    free(qa); free(sx); free(acc);
}

void qc_quik_small(const void* xq, int dt, int64_t M, int64_t Kq, int64_t ldx, const int8_t* B, int64_t ldb,
                   const int32_t* colsum, const float* sw, const float* rs, int bits, const void* xo, int64_t ldxo,
                   const float* owt, int64_t kout, const float* bias, void* out, int64_t N, int nthreads) {
    uint8_t* qa = (uint8_t*)malloc((size_t)(M * Kq));
    float* st = (float*)malloc((size_t)M * sizeof(float));
    float* mt = (float*)malloc((size_t)M * sizeof(float));
    int32_t* acc = (int32_t*)malloc((size_t)(M * N) * sizeof(int32_t));
    qc_quant_asym(xq, dt, M, Kq, ldx, qa, Kq, st, mt, bits, 128, 1);
    qc_gemv_u8s8(qa, Kq, B, ldb, colsum, acc, N, M, N, Kq, nthreads);
    qc_epilogue_quik(acc, 0, N, st, mt, sw, rs, (float)(1 << (bits - 1)), xo, ldxo, owt, kout, bias, out, dt, N, M, N, 1);
    free(qa); free(st); free(mt); free(acc);
}

/* GPTQ's column loop over columns [c0, c1) of one block (qcompile.gptq_math._gptq_blocks), rows in
   parallel (GPTQ's rows are independent). w [N, B] (row stride ldw) is updated in place; hinv [B, B]
   (row stride ldh) is the block of the upper Cholesky factor of H^-1; column c's scale and zero are
   scale/zero[r * G + group[c]]. The same float32 operations in the same order as the torch loop:
   q = clamp(rne(w / s) + z, lo, hi); e = (w - (q - z) * s) / hinv[c][c]; w[j] -= e * hinv[c][j]
   for j >= c (a product then a difference: no fused multiply-add). q goes to q[r * ldq + qoff + c],
   e to err[r * lde + c]. */
void qc_gptq_columns(float* w, int64_t ldw, int64_t N, const float* hinv, int64_t ldh, int64_t B,
                     int64_t c0, int64_t c1, const int64_t* group, const float* scale, const float* zero,
                     int64_t G, float lo, float hi, float* q, int64_t ldq, int64_t qoff, float* err,
                     int64_t lde, int nthreads) {
    #pragma omp parallel for num_threads(nthreads) schedule(static) if(N * (c1 - c0) * (B - c0) > 65536)
    for (int64_t r = 0; r < N; ++r) {
        float* wr = w + r * ldw;
        for (int64_t c = c0; c < c1; ++c) {
            const float s = scale[r * G + group[c]], z = zero[r * G + group[c]];
            const float wc = wr[c];
            float qi = nearbyintf(wc / s) + z;
            qi = qi < lo ? lo : qi;
            qi = qi > hi ? hi : qi;
            q[r * ldq + qoff + c] = qi;
            const float e = (wc - (qi - z) * s) / hinv[c * ldh + c];
            err[r * lde + c] = e;
            const float* hr = hinv + c * ldh;
            for (int64_t j = c; j < B; ++j) {
                const float t = e * hr[j];
                wr[j] = wr[j] - t;
            }
        }
    }
}
"""
