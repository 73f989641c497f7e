"""C source of the CPU prefill attention kernel (built with ``cpu_native_src.SOURCE`` into one library).

A flash-attention forward for bfloat16 query/key/value on AVX-512 BF16 CPUs: per (batch, head,
block of 64 query rows) the scores against blocks of 64 keys (``vdpbf16ps``, float32 sums), an
online softmax in float32 (base-2 exponent with a polynomial, relative error about 1e-7), the
probabilities rounded to bfloat16 for the value product (``vdpbf16ps`` again, float32 output
accumulators), and the rows divided by their softmax sums at the end. Causal masking skips the key
blocks above the diagonal. Key and value heads are shared by ``H / Hkv`` query heads (GQA); key
and value are first laid out once per call in the pair-interleaved tiles ``vdpbf16ps`` reads. On
CPUs with AMX (``qc_amx_on``, head size a multiple of 32) both products run on bf16 tiles instead
(``qc_amx_scores`` / ``qc_amx_values`` in ``cpu_amx_src``: the same layouts are AMX B tiles), the
softmax between them unchanged.

Unlike the other helpers this one is not bit for bit equal to a torch operation: SDPA sums in an
order (and a precision for the probabilities) of its own. It agrees with float32 attention to
bfloat16 rounding; tests/test_cpu_attention.py holds it to that.
"""

SOURCE = r"""
#if defined(QC_AVX512) && defined(__AVX512BF16__)
#define QC_ATTN 1
#define QA_BQ 64
#define QA_BK 64
#define QA_DMAX 256

int qc_attention_available(void) { return 1; }

/* 2^x for x <= 0 (x = -inf gives 0): n = rne(x), f = x - n in [-0.5, 0.5], e^(f ln2) by its
   degree-6 Taylor polynomial (relative error < 2e-7), scaled by 2^n. */
static inline __m512 qa_exp2(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-200.0f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 y = _mm512_mul_ps(_mm512_sub_ps(x, n), _mm512_set1_ps(0.69314718056f));
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 qa_bcast_pair(const uint16_t* p) { int32_t v; memcpy(&v, p, 4); return _mm512_castsi512_ps(_mm512_set1_epi32(v)); }

/* S[r][c] = sum_d Q[r][d] K[c][d] for the 64 keys of one block; kp: the block's keys as 4 tiles of
   [D/2][16 keys][2], q rows at q + r * sq (rows >= nr repeat the last one, not stored). */
static void qa_scores(const uint16_t* q, int64_t sq, int nr, const uint16_t* kp, int64_t D, float* S) {
    const int64_t dp = D / 2;
    for (int r0 = 0; r0 < nr; r0 += 4) {
        const uint16_t* qr[4];
        for (int i = 0; i < 4; ++i) qr[i] = q + (int64_t)(r0 + i < nr ? r0 + i : nr - 1) * sq;
        __m512 acc[4][4];
        for (int i = 0; i < 4; ++i) for (int t = 0; t < 4; ++t) acc[i][t] = _mm512_setzero_ps();
        for (int64_t p = 0; p < dp; ++p) {
            __m512bh kv[4];
            for (int t = 0; t < 4; ++t) kv[t] = (__m512bh)_mm512_loadu_ps((const float*)(kp + (t * dp + p) * 32));
            for (int i = 0; i < 4; ++i) {
                const __m512bh qb = (__m512bh)qa_bcast_pair(qr[i] + 2 * p);
                for (int t = 0; t < 4; ++t) acc[i][t] = _mm512_dpbf16_ps(acc[i][t], qb, kv[t]);
            }
        }
        for (int i = 0; i < 4 && r0 + i < nr; ++i)
            for (int t = 0; t < 4; ++t) _mm512_storeu_ps(S + (r0 + i) * QA_BK + 16 * t, acc[i][t]);
    }
}

/* rows x 16*tiles outputs of O += P V over one key block (always inlined: constant rows and tiles
   keep the accumulators in registers) */
static inline __attribute__((always_inline)) void qa_values_tile(
        const uint16_t* P, const uint16_t* vp, int64_t D, float* O, int r0, int64_t d0, const int rows, const int tiles) {
    __m512 acc[4][4];
    for (int i = 0; i < rows; ++i)
        for (int t = 0; t < tiles; ++t) acc[i][t] = _mm512_loadu_ps(O + (r0 + i) * D + d0 + 16 * t);
    for (int c = 0; c < QA_BK / 2; ++c) {
        __m512bh vv[4];
        for (int t = 0; t < tiles; ++t) vv[t] = (__m512bh)_mm512_loadu_ps((const float*)(vp + (c * D + d0 + 16 * t) * 2));
        for (int i = 0; i < rows; ++i) {
            const __m512bh pb = (__m512bh)qa_bcast_pair(P + (r0 + i) * QA_BK + 2 * c);
            for (int t = 0; t < tiles; ++t) acc[i][t] = _mm512_dpbf16_ps(acc[i][t], pb, vv[t]);
        }
    }
    for (int i = 0; i < rows; ++i)
        for (int t = 0; t < tiles; ++t) _mm512_storeu_ps(O + (r0 + i) * D + d0 + 16 * t, acc[i][t]);
}

/* O[r][d] += sum_c P[r][c] V[c][d] over one key block; P bf16 [nr][64], vp: [32 key pairs][D][2]. */
static void qa_values(const uint16_t* P, int nr, const uint16_t* vp, int64_t D, float* O) {
    for (int r0 = 0; r0 < nr; r0 += 4) {
        const int rows = nr - r0 < 4 ? nr - r0 : 4;
        for (int64_t d0 = 0; d0 < D; d0 += 64) {
            const int tiles = (int)((D - d0) / 16 < 4 ? (D - d0) / 16 : 4);
            if (rows == 4 && tiles == 4) qa_values_tile(P, vp, D, O, r0, d0, 4, 4);
            else for (int i = 0; i < rows; ++i)
                for (int t = 0; t < tiles; ++t) qa_values_tile(P, vp, D, O, r0 + i, d0 + 16 * t, 1, 1);
        }
    }
}

/* Returns 0, or 1 when a buffer could not be allocated (the output is then incomplete).
   Attention of bf16 q [B, H, Lq, D], k/v [B, Hkv, Lk, D] (element strides: batch, head, token; the
   last dimension contiguous) into bf16 out (same kind of strides, [B, H, Lq, D] indexing). causal:
   query i sees keys j <= i + Lk - Lq (Lq <= Lk). D a multiple of 16, at most 256; H a multiple of Hkv. */
int qc_flash_attention(const uint16_t* q, int64_t qsb, int64_t qsh, int64_t qst,
                        const uint16_t* k, int64_t ksb, int64_t ksh, int64_t kst,
                        const uint16_t* v, int64_t vsb, int64_t vsh, int64_t vst,
                        uint16_t* out, int64_t osb, int64_t osh, int64_t ost,
                        int64_t B, int64_t H, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D,
                        float scale, int causal, int nthreads) {
    const int64_t nkb = (Lk + QA_BK - 1) / QA_BK, lpad = nkb * QA_BK, per = lpad * D;
    uint16_t* kp = (uint16_t*)aligned_alloc(64, (size_t)(B * Hkv * per * 2 * sizeof(uint16_t)));
    if (kp == NULL) return 1;
    uint16_t* vp = kp + B * Hkv * per;
    int failed = 0;
    const int64_t dp = D / 2;
    /* key tiles [Lpad/16][D/2][16][2] and value pairs [Lpad/2][D][2], zero past Lk */
    #pragma omp parallel for num_threads(nthreads) collapse(2) schedule(static)
    for (int64_t bh = 0; bh < B * Hkv; ++bh)
        for (int64_t j = 0; j < lpad; ++j) {
            const int64_t b = bh / Hkv, h = bh % Hkv;
            const uint16_t* kr = k + b * ksb + h * ksh + j * kst;
            const uint16_t* vr = v + b * vsb + h * vsh + j * vst;
            uint16_t* kt = kp + bh * per + (j / 16) * dp * 32 + (j % 16) * 2;
            uint16_t* vt = vp + bh * per + (j / 2) * D * 2 + (j % 2);
            for (int64_t d = 0; d < D; ++d) {
                const uint16_t kv = j < Lk ? kr[d] : 0, vv = j < Lk ? vr[d] : 0;
                kt[(d / 2) * 32 + (d % 2)] = kv;
                vt[d * 2] = vv;
            }
        }
    const int64_t nqb = (Lq + QA_BQ - 1) / QA_BQ, groups = H / Hkv, off = Lk - Lq;
    const float sl2 = scale * 1.44269504089f;  /* scores in base 2 */
    #pragma omp parallel num_threads(nthreads)
    {
        float* S = (float*)aligned_alloc(64, QA_BQ * QA_BK * sizeof(float));
        uint16_t* P = (uint16_t*)aligned_alloc(64, QA_BQ * QA_BK * sizeof(uint16_t));
        float* O = (float*)aligned_alloc(64, QA_BQ * QA_DMAX * sizeof(float));
        float m[QA_BQ];
        __m512 lv[QA_BQ];  /* each row's softmax sum, 16 lanes wide until the end */
        const int tiles = qc_amx_on && D % 32 == 0;  /* AMX tiles for both products (qc_amx_enable ran) */
#ifdef QC_AMX
        if (tiles) qc_amx_config();
#endif
        uint16_t* Qb = tiles ? (uint16_t*)aligned_alloc(64, QA_BQ * QA_DMAX * sizeof(uint16_t)) : NULL;
        const int ok = S != NULL && P != NULL && O != NULL && (!tiles || Qb != NULL);
        if (!ok) {
            #pragma omp atomic write
            failed = 1;
        }
        /* the longest rows (last query blocks) first: dynamic scheduling then balances the tail */
        #pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < B * H * nqb; ++task) {
            if (!ok) continue;  /* no early exit from a worksharing loop; this thread's share is skipped */
            const int64_t qb = nqb - 1 - task % nqb, bh = task / nqb, b = bh / H, h = bh % H;
            const int64_t i0 = qb * QA_BQ, nr = Lq - i0 < QA_BQ ? Lq - i0 : QA_BQ;
            const uint16_t* qr = q + b * qsb + h * qsh + i0 * qst;
            const int64_t kvh = b * Hkv + h / groups;
            const int64_t jend = causal ? (i0 + nr + off < Lk ? i0 + nr + off : Lk) : Lk;
            for (int i = 0; i < nr; ++i) { m[i] = -INFINITY; lv[i] = _mm512_setzero_ps(); }
            memset(O, 0, (size_t)((tiles ? QA_BQ : nr) * D) * sizeof(float));
            if (tiles) {  /* the block's queries, zero-padded to 64 rows (tile loads read whole rows) */
                memset(Qb, 0, (size_t)(QA_BQ * D) * 2);
                for (int i = 0; i < nr; ++i) memcpy(Qb + i * D, qr + i * qst, (size_t)D * 2);
                memset(P, 0, QA_BQ * QA_BK * sizeof(uint16_t));
            }
            for (int64_t j0 = 0; j0 < jend; j0 += QA_BK) {
                if (tiles) qc_amx_scores(Qb, D, kp + kvh * per + (j0 / 16) * dp * 32, S);
                else qa_scores(qr, qst, (int)nr, kp + kvh * per + (j0 / 16) * dp * 32, D, S);
                for (int i = 0; i < nr; ++i) {
                    const float* s = S + i * QA_BK;
                    const int64_t last = causal ? i0 + i + off : Lk - 1;  /* the last key row i sees */
                    const int64_t valid = last - j0 + 1 < QA_BK ? last - j0 + 1 : QA_BK;
                    __m512 x[4], mx = _mm512_set1_ps(-INFINITY);
                    for (int t = 0; t < 4; ++t) {
                        x[t] = _mm512_mul_ps(_mm512_loadu_ps(s + 16 * t), _mm512_set1_ps(sl2));
                        if (valid < QA_BK) {  /* the diagonal block, or the keys' end */
                            const int64_t n = valid - 16 * t;
                            const __mmask16 keep = n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1u);
                            x[t] = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), keep, x[t]);
                        }
                        mx = _mm512_max_ps(mx, x[t]);
                    }
                    const float bmax = _mm512_reduce_max_ps(mx);
                    if (bmax > m[i]) {  /* a new running maximum: rescale the row's sums and output */
                        const __m512 a = m[i] == -INFINITY ? _mm512_setzero_ps()
                                                           : qa_exp2(_mm512_set1_ps(m[i] - bmax));
                        m[i] = bmax;
                        lv[i] = _mm512_mul_ps(lv[i], a);
                        for (int64_t d = 0; d < D; d += 16)
                            _mm512_storeu_ps(O + i * D + d, _mm512_mul_ps(_mm512_loadu_ps(O + i * D + d), a));
                    }
                    const __m512 mv = _mm512_set1_ps(m[i]);
                    __m512 p[4];
                    for (int t = 0; t < 4; ++t) {
                        p[t] = qa_exp2(_mm512_sub_ps(x[t], mv));
                        _mm256_storeu_si256((__m256i*)(P + i * QA_BK + 16 * t), (__m256i)_mm512_cvtneps_pbh(p[t]));
                    }
                    /* a tree, not a chain of four dependent additions */
                    lv[i] = _mm512_add_ps(lv[i], _mm512_add_ps(_mm512_add_ps(p[0], p[1]), _mm512_add_ps(p[2], p[3])));
                }
                if (tiles) qc_amx_values(P, vp + kvh * per + j0 * D, D, O);
                else qa_values(P, (int)nr, vp + kvh * per + j0 * D, D, O);
            }
            uint16_t* orow = out + b * osb + h * osh + i0 * ost;
            for (int i = 0; i < nr; ++i) {
                const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(lv[i]));
                for (int64_t d = 0; d < D; d += 16)
                    store16(orow + i * ost, BF16, d, _mm512_mul_ps(_mm512_loadu_ps(O + i * D + d), inv), 16);
            }
        }
#ifdef QC_AMX
        if (tiles) _tile_release();
#endif
        free(S); free(P); free(O); free(Qb);
    }
    free(kp);
    return failed;
}
#else
int qc_attention_available(void) { return 0; }
int qc_flash_attention(const uint16_t* q, int64_t qsb, int64_t qsh, int64_t qst,
                        const uint16_t* k, int64_t ksb, int64_t ksh, int64_t kst,
                        const uint16_t* v, int64_t vsb, int64_t vsh, int64_t vst,
                        uint16_t* out, int64_t osb, int64_t osh, int64_t ost,
                        int64_t B, int64_t H, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D,
                        float scale, int causal, int nthreads) { (void)q; (void)k; (void)v; (void)out; return 2; }
#endif
"""
