"""C source of the AMX int8 GEMM (built with ``cpu_native_src.SOURCE`` into one library).

On CPUs with AMX (``amx_tile``/``amx_int8``: Sapphire Rapids and later) the W8A8 layer runs as one
call: per-token quantization of the activation into a zero-padded int8 buffer, then tiles of 32 x 32
int32 accumulators (``tdpbssd``: signed x signed int8, 16 x 16 x 64 per instruction) over the whole
K, each finished at once by the W8A8 epilogue (the same float32 operations in the same order as
``qc_epilogue_w8a8``) into the output. No [M, N] accumulator ever reaches memory, which is what
oneDNN's int8 path spends its time on at prefill sizes here.

The weight is packed once (``formats.cpu_layout.amx_int8_layout``): N padded to 32 and K to 64 with
zeros, as [N/16][K/64][16 quads][16 columns][4] int8, so each 1 KiB is one B tile in the VNNI order
``tdpbssd`` reads. Accumulation is exact in int32 (|sum| <= 127 * 128 * K < 2^31 for K < 132000),
so the result equals ``w8a8_linear_reference`` bit for bit, like the other int8 paths.

Threads split the column blocks; rows go in super-blocks of at most 1 MiB of quantized activation
(kept in L2 while every column block of the thread passes over them). Linux hands a process AMX
tile state only on request (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``):
``qc_amx_enable`` asks once; without it (or without AMX at build time) ``qc_amx_available`` is 0.
"""

SOURCE = r"""
#if defined(QC_AVX512) && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__)
#define QC_AMX 1
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} qc_tilecfg;

static int qc_amx_granted = 0;  /* the kernel granted this process AMX tile data */
static int qc_amx_on = 0;       /* ... and the attention kernel multiplies on tiles (qc_amx_attention) */

int qc_amx_enable(void) {  /* 1 once the kernel lets this process use AMX tile data */
    if (!qc_amx_granted) {
        qc_amx_granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
        qc_amx_on = qc_amx_granted;
    }
    return qc_amx_granted;
}

int qc_amx_attention(int on) {  /* the attention kernel on tiles (on = 1, once granted) or on dot products */
    qc_amx_on = on && qc_amx_granted;
    return qc_amx_on;
}

static inline void qc_amx_config(void) {
    qc_tilecfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
    _tile_loadconfig(&cfg);
}

/* acc (32 x 32 int32, row stride 32) = qa[32 rows, Kp] (row stride Kp) x the packed columns
   n0 .. n0 + 31 (two 16-column strips of Bp, Kp / 64 tiles each) */
static inline __attribute__((always_inline)) void qc_amx_block(const int8_t* qa, int64_t Kp, const int8_t* b0,
                                                               const int8_t* b1, int32_t* acc) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t kb = 0; kb < Kp / 64; ++kb) {
        _tile_loadd(4, qa + kb * 64, Kp);
        _tile_loadd(5, qa + 16 * Kp + kb * 64, Kp);
        _tile_loadd(6, b0 + kb * 1024, 64);
        _tile_loadd(7, b1 + kb * 1024, 64);
        _tile_dpbssd(0, 4, 6);
        _tile_dpbssd(1, 4, 7);
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
    }
    _tile_stored(0, acc, 128);
    _tile_stored(1, acc + 16, 128);
    _tile_stored(2, acc + 16 * 32, 128);
    _tile_stored(3, acc + 16 * 32 + 16, 128);
}

/* o (32 x 32 float32, row stride 32) = xo[32 rows, KOp] (bf16, row stride KOp) x (hi + lo) for the
   columns of two 16-column strips of each (bf16 pairs, KOp / 32 tiles per strip): tdpbf16ps products
   of bf16 values are exact in float32, hi + lo is the float16 outlier weight exactly */
static inline __attribute__((always_inline)) void qc_amx_outlier_block(const uint16_t* xo, int64_t KOp,
        const uint16_t* h0, const uint16_t* h1, const uint16_t* l0, const uint16_t* l1, float* o) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t kb = 0; kb < KOp / 32; ++kb) {
        _tile_loadd(4, xo + kb * 32, KOp * 2);
        _tile_loadd(5, xo + 16 * KOp + kb * 32, KOp * 2);
        _tile_loadd(6, h0 + kb * 512, 64);
        _tile_loadd(7, h1 + kb * 512, 64);
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
        _tile_loadd(6, l0 + kb * 512, 64);
        _tile_loadd(7, l1 + kb * 512, 64);
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, o, 128);
    _tile_stored(1, o + 16, 128);
    _tile_stored(2, o + 16 * 32, 128);
    _tile_stored(3, o + 16 * 32 + 16, 128);
}

/* The prefill attention's two products on bf16 tiles (cpu_attention_src calls them when qc_amx_on):
   S [64][64] float32 = Qb [64][D] (bf16, zero rows past the block) x the block's keys (4 strips of
   [D/2][16][2], the layout tdpbf16ps reads as B tiles) */
static void qc_amx_scores(const uint16_t* Qb, int64_t D, const uint16_t* kp, float* S) {
    const int64_t dp = D / 2;
    for (int r = 0; r < 64; r += 32)
        for (int c = 0; c < 64; c += 32) {
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            const uint16_t* k0 = kp + (c / 16) * dp * 32;
            const uint16_t* k1 = k0 + dp * 32;
            for (int64_t d = 0; d < D; d += 32) {
                _tile_loadd(4, Qb + r * D + d, D * 2);
                _tile_loadd(5, Qb + (r + 16) * D + d, D * 2);
                _tile_loadd(6, k0 + d * 16, 64);
                _tile_loadd(7, k1 + d * 16, 64);
                _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, S + r * 64 + c, 256);
            _tile_stored(1, S + r * 64 + c + 16, 256);
            _tile_stored(2, S + (r + 16) * 64 + c, 256);
            _tile_stored(3, S + (r + 16) * 64 + c + 16, 256);
        }
}

/* O [64][D] float32 += P [64][64] (bf16) x the block's values ([32 key pairs][D][2]) */
static void qc_amx_values(const uint16_t* P, const uint16_t* vp, int64_t D, float* O) {
    for (int r = 0; r < 64; r += 32)
        for (int64_t c = 0; c < D; c += 32) {
            _tile_loadd(0, O + r * D + c, D * 4);
            _tile_loadd(1, O + r * D + c + 16, D * 4);
            _tile_loadd(2, O + (r + 16) * D + c, D * 4);
            _tile_loadd(3, O + (r + 16) * D + c + 16, D * 4);
            for (int kb = 0; kb < 64; kb += 32) {
                _tile_loadd(4, P + r * 64 + kb, 128);
                _tile_loadd(5, P + (r + 16) * 64 + kb, 128);
                _tile_loadd(6, vp + ((kb / 2) * D + c) * 2, D * 4);
                _tile_loadd(7, vp + ((kb / 2) * D + c + 16) * 2, D * 4);
                _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, O + r * D + c, D * 4);
            _tile_stored(1, O + r * D + c + 16, D * 4);
            _tile_stored(2, O + (r + 16) * D + c, D * 4);
            _tile_stored(3, O + (r + 16) * D + c + 16, D * 4);
        }
}
#endif

#ifndef QC_AMX  /* stand-ins the attention kernel links against; never called (qc_amx_on is 0) */
static const int qc_amx_on = 0;
int qc_amx_enable(void) { return 0; }
int qc_amx_attention(int on) { (void)on; return 0; }
static void qc_amx_scores(const uint16_t* Qb, int64_t D, const uint16_t* kp, float* S) {
    (void)Qb; (void)D; (void)kp; (void)S;
}
static void qc_amx_values(const uint16_t* P, const uint16_t* vp, int64_t D, float* O) {
    (void)P; (void)vp; (void)D; (void)O;
}
#endif

int qc_amx_available(void) {
#ifdef QC_AMX
    return 1;
#else
    return 0;
#endif
}

/* What finishes a 32 x 32 tile: the W8A8 epilogue (sx: the token scales) or QUIK's (st, mt: the
   token scales and minimums, rs, half, and the outlier columns: xo / owt for float32 fused
   multiply-adds, or xob / obp for bf16 tiles) */
typedef struct {
    int quik;
    const float *sw, *bias, *sx, *st, *mt, *rs, *owt;
    float half;
    const void* xo;
    int64_t ldxo, kout;
    const uint16_t *xob, *obp;   /* bf16 outlier activations [Mp, KOp] and packed weight (hi, lo) */
    int64_t KOp;
} qc_amx_epilogue;

/* The quantized activation qa [Mp, Kp] (Mp = M rounded up to 32, padding zero) times the packed
   weight Bp (Np x Kp), each 32 x 32 tile finished into out [M, N] (dt, row stride ldo). */
static void qc_amx_gemm(const int8_t* qa, int64_t M, int64_t Kp, const int8_t* Bp, int64_t Np,
                        const qc_amx_epilogue* e, void* out, int dt, int64_t ldo, int64_t N, int nthreads) {
#ifdef QC_AMX
    const int64_t Mp = (M + 31) / 32 * 32;
    int64_t rows = ((int64_t)1 << 20) / Kp / 32 * 32;   /* a super-block: <= 1 MiB of activation */
    rows = rows < 32 ? 32 : (rows > Mp ? Mp : rows);
    const int64_t nblocks = Np / 32;
    const int esz = dt == F32 ? 4 : 2;
    #pragma omp parallel num_threads(nthreads)
    {
        const int nt = omp_get_num_threads(), t = omp_get_thread_num();
        const int64_t j0 = nblocks * t / nt, j1 = nblocks * (t + 1) / nt;
        int32_t acc[32 * 32] __attribute__((aligned(64)));
        float ofl[32 * 32] __attribute__((aligned(64)));
        const int64_t obstrip = e->KOp / 32 * 512, obhalf = Np / 16 * obstrip;
        float* xs = e->quik && e->kout ? (float*)malloc((size_t)(QMR * e->kout) * sizeof(float)) : 0;
        qc_amx_config();
        /* this thread's weight columns fit in 1 MiB of L2: row blocks outside, each read from L1
           while the columns pass (SmolLM2's layers: 1.2x faster); else the columns outside */
        const int rows_outside = (j1 - j0) * 32 * Kp <= ((int64_t)1 << 20);
        for (int64_t r0 = 0; r0 < Mp; r0 += rows) {
            const int64_t r1 = r0 + rows < Mp ? r0 + rows : Mp, nm = ((r1 < M ? r1 : M) - r0 + 31) / 32;
            for (int64_t t = 0; t < nm * (j1 - j0); ++t) {
                const int64_t j = j0 + (rows_outside ? t % (j1 - j0) : t / nm);
                const int64_t m0 = r0 + 32 * (rows_outside ? t / (j1 - j0) : t % nm);
                const int8_t* b0 = Bp + (2 * j) * (Kp / 64) * 1024;
                const int8_t* b1 = b0 + (Kp / 64) * 1024;
                const int64_t n0 = 32 * j, nc = N - n0 < 32 ? N - n0 : 32;
                {
                    qc_amx_block(qa + m0 * Kp, Kp, b0, b1, acc);
                    const int64_t mr = M - m0 < 32 ? M - m0 : 32;
                    char* o = (char*)out + (m0 * ldo + n0) * esz;
                    if (!e->quik) {
                        for (int64_t i = 0; i < mr; ++i)
                            qc_w8a8_row_epilogue(acc + i * 32, e->sx[m0 + i], e->sw + n0, e->bias ? e->bias + n0 : NULL,
                                                 o + i * ldo * esz, dt, nc);
                        continue;
                    }
                    if (e->xob) {
                        const uint16_t* h0 = e->obp + 2 * j * obstrip;
                        qc_amx_outlier_block(e->xob + m0 * e->KOp, e->KOp, h0, h0 + obstrip, h0 + obhalf,
                                             h0 + obhalf + obstrip, ofl);
                    }
                    const int64_t kout = e->xob ? 0 : e->kout;
                    for (int64_t i = 0; i < mr; i += QMR) {
                        const int r = (int)(mr - i < QMR ? mr - i : QMR);
                        const int64_t m = m0 + i;
                        qc_quik_block(acc + i * 32, 0, 32, e->st + m, e->mt + m, e->sw + n0, e->rs + n0, e->half,
                                      kout ? (const char*)e->xo + m * e->ldxo * esz : 0, e->ldxo,
                                      kout ? e->owt + n0 : 0, N, kout, e->bias ? e->bias + n0 : NULL,
                                      o + i * ldo * esz, dt, ldo, r, nc, xs, e->xob ? ofl + i * 32 : NULL, 32);
                    }
                }
            }
        }
        _tile_release();
        free(xs);
    }
#endif
}

/* The weight-only linear for bf16 activations on bf16 tiles, for M above the GEMV's rows: C^T = W x^T
   with the weight as the A operand (its rows dequantized, 32 at a time, into a thread's [32][Kp]
   bf16 buffer, as qc_dequant writes them: the reference's bf16 weight) and x as the B operand (laid
   out once per call as pairs, xt [Kp/2][Mp][2], zero-padded); float32 sums (every product of two
   bf16 values is exact), + bias, rounded to bf16. x [M, K] (row stride ldx); q the stored weight
   (qkind as qc_dequant; row stride ldq), scale / zero [N, G]; xt scratch of Kp * Mp bf16 (Kp, Mp:
   K and M rounded up to 32). Returns 0, or 1 when a buffer could not be allocated. */
int qc_wo_amx(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint8_t* q, int qkind, int64_t ldq,
              int64_t N, const float* scale, const float* zero, int64_t G, int64_t group, const float* bias,
              uint16_t* xt, uint16_t* out, int64_t ldo, int nthreads) {
#ifdef QC_AMX
    const int64_t Mp = (M + 31) / 32 * 32, Kp = (K + 31) / 32 * 32;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t p = 0; p < Kp / 2; ++p) {
        uint16_t* row = xt + p * Mp * 2;
        for (int64_t m = 0; m < Mp; ++m) {
            row[2 * m] = m < M && 2 * p < K ? x[m * ldx + 2 * p] : 0;
            row[2 * m + 1] = m < M && 2 * p + 1 < K ? x[m * ldx + 2 * p + 1] : 0;
        }
    }
    const int64_t nblocks = (N + 31) / 32;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        uint16_t* w = (uint16_t*)aligned_alloc(64, (size_t)(32 * Kp) * 2);
        float c[32 * 32] __attribute__((aligned(64)));
        if (w == NULL) {
            #pragma omp atomic write
            failed = 1;
        } else {
            qc_amx_config();
        }
        #pragma omp for schedule(static)
        for (int64_t j = 0; j < nblocks; ++j) {
            if (w == NULL) continue;
            const int64_t n0 = 32 * j, nc = N - n0 < 32 ? N - n0 : 32;
            for (int64_t r = 0; r < nc; ++r) {
                qc_dequant_row(q + (n0 + r) * ldq, qkind, n0 + r, K, scale, zero, G, group, (char*)(w + r * Kp), BF16);
                if (Kp > K) memset(w + r * Kp + K, 0, (size_t)(Kp - K) * 2);
            }
            if (nc < 32) memset(w + nc * Kp, 0, (size_t)((32 - nc) * Kp) * 2);
            for (int64_t m0 = 0; m0 < M; m0 += 32) {
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                for (int64_t k = 0; k < Kp; k += 32) {
                    _tile_loadd(4, w + k, Kp * 2);
                    _tile_loadd(5, w + 16 * Kp + k, Kp * 2);
                    _tile_loadd(6, xt + ((k / 2) * Mp + m0) * 2, Mp * 4);
                    _tile_loadd(7, xt + ((k / 2) * Mp + m0 + 16) * 2, Mp * 4);
                    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
                }
                _tile_stored(0, c, 128);                  /* c[n][m]: weight rows n, tokens m */
                _tile_stored(1, c + 16, 128);
                _tile_stored(2, c + 16 * 32, 128);
                _tile_stored(3, c + 16 * 32 + 16, 128);
                const int64_t mr = M - m0 < 32 ? M - m0 : 32;
                for (int64_t i = 0; i < mr; ++i) {
                    uint16_t* orow = out + (m0 + i) * ldo + n0;
                    for (int64_t n = 0; n < nc; ++n) {
                        float y = c[n * 32 + i];
                        if (bias) y = y + bias[n0 + n];
                        orow[n] = f32_to_bf16(y);
                    }
                }
            }
        }
        if (w != NULL) _tile_release();
        free(w);
    }
    return failed;
#else
    (void)x; (void)M; (void)K; (void)ldx; (void)q; (void)qkind; (void)ldq; (void)N; (void)scale; (void)zero;
    (void)G; (void)group; (void)bias; (void)xt; (void)out; (void)ldo; (void)nthreads;
    return 2;
#endif
}

/* zero the padding of qa [Mp, Kp] around its M x K quantized values */
static void qc_amx_pad(int8_t* qa, int64_t M, int64_t K, int64_t Kp) {
    const int64_t Mp = (M + 31) / 32 * 32;
    if (Kp > K)
        for (int64_t m = 0; m < M; ++m) memset(qa + m * Kp + K, 0, (size_t)(Kp - K));
    if (Mp > M) memset(qa + M * Kp, 0, (size_t)((Mp - M) * Kp));
}

/* The W8A8 linear in one call: x [M, K] in dt (row stride ldx), Bp the packed weight (Np x Kp),
   qa scratch of Mp * Kp bytes, sx scratch of M floats, out [M, N] in dt (row stride ldo). */
void qc_w8a8_amx(const void* x, int dt, int64_t M, int64_t K, int64_t ldx, const int8_t* Bp, int64_t Kp,
                 int64_t Np, const float* sw, const float* bias, float static_scale, int8_t* qa, float* sx,
                 void* out, int64_t ldo, int64_t N, int nthreads) {
    qc_quant_sym(x, dt, M, K, ldx, qa, Kp, sx, static_scale, 0, nthreads);
    qc_amx_pad(qa, M, K, Kp);
    qc_amx_epilogue e = {0};
    e.sw = sw; e.bias = bias; e.sx = sx;
    qc_amx_gemm(qa, M, Kp, Bp, Np, &e, out, dt, ldo, N, nthreads);
}

/* QUIK's linear in one call: xq [M, Kq] the quantized columns in dt (row stride ldx), xo [M, kout]
   the outlier columns (row stride ldxo; NULL when kout = 0), owt float32 [kout, N]; qa scratch of
   Mp * Kp bytes, st and mt scratch of M floats each. With bf16 activations and obp (the outlier
   weight as bf16 hi + lo tiles, KOp = kout rounded up to 32) the outlier product runs on bf16 tiles,
   its activations copied into xob (scratch of Mp * KOp bf16); else obp and xob are NULL. */
void qc_quik_amx(const void* xq, int dt, int64_t M, int64_t Kq, int64_t ldx, const int8_t* Bp, int64_t Kp,
                 int64_t Np, const float* sw, const float* rs, int bits, const void* xo, int64_t ldxo,
                 const float* owt, int64_t kout, const uint16_t* obp, int64_t KOp, uint16_t* xob,
                 const float* bias, int8_t* qa, float* st, float* mt, void* out, int64_t ldo, int64_t N,
                 int nthreads) {
    qc_quant_asym(xq, dt, M, Kq, ldx, qa, Kp, st, mt, bits, 0, nthreads);
    qc_amx_pad(qa, M, Kq, Kp);
    qc_amx_epilogue e = {0};
    e.quik = 1; e.sw = sw; e.bias = bias; e.st = st; e.mt = mt; e.rs = rs; e.half = (float)(1 << (bits - 1));
    e.xo = xo; e.ldxo = ldxo; e.owt = owt; e.kout = xo ? kout : 0;
    if (e.kout && obp && xob && dt == BF16) {
        const int64_t Mp = (M + 31) / 32 * 32;
        memset(xob, 0, (size_t)(Mp * KOp) * 2);
        for (int64_t m = 0; m < M; ++m) memcpy(xob + m * KOp, (const uint16_t*)xo + m * ldxo, (size_t)kout * 2);
        e.xob = xob; e.obp = obp; e.KOp = KOp;
    }
    qc_amx_gemm(qa, M, Kp, Bp, Np, &e, out, dt, ldo, N, nthreads);
}
"""
