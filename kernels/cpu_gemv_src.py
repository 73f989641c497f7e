"""C++ source of the weight-only decode GEMV, a real torch operator (``torch.ops.qcompile_cpu.wo_gemv``).

Its head (includes, ``QC_HAVE_BF16``) starts the operator library ``cpu_ops.py`` builds; the weight layout it reads is ``formats.cpu_layout.gemv_layout``.

The arithmetic, for bf16 activations x and unsigned weight levels u with a zero point zp and a
scale s per (output, group): y[n] = sum_g s[n,g] * sum_{k in g} x[k] * (u[n,k] - zp[n,g]).
Levels become bf16 without a conversion instruction: a nibble v (0..15) or'ed into the bits of
128.0 (0x4300) is the bf16 number 128 + v, exactly. So per group the kernel accumulates
A = sum x * (128 + v) with ``vdpbf16ps`` (16 outputs per register, two k per lane, products exact,
float32 sums) and corrects with the group's sum of x: 4-bit levels are one nibble each, so
A = sum x * u + 128 X and y = sum_g s A - c X with c = s (128 + zp); 8-bit levels are two
nibbles, u = 16 hi + lo, accumulated as x * (128 + lo) + (16 x) * (128 + hi) (16 x is exact in
bf16), so A = sum x * u + 2176 X and c = s (2176 + zp). Only the activations' sums X and the
float32 accumulation round: no weight is rounded to bf16, as the reference's dequantized weight is.

One step of the weight stream is 32 bytes: 16 outputs x 2 lanes-halves, byte 2i + p of output i.
4-bit: the low nibble holds k = 4j + p, the high nibble k = 4j + 2 + p (step j covers 4 k).
8-bit: the byte is the level of k = 2j + p, its nibbles split as above (step j covers 2 k).
"""

SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>
#include <immintrin.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define QC_HAVE_BF16 1
#else
#define QC_HAVE_BF16 0
#endif

namespace {

constexpr int kStepBytes = 32;
constexpr int kLanes = 16;
constexpr int kMaxRows = 8;  // activation rows per pass over a weight tile
constexpr int64_t kMinTaskBytes = 32768;  // weight bytes per thread below which a call is not split
#ifndef QC_PREFETCH_STEPS
#define QC_PREFETCH_STEPS 32  // software prefetch distance in steps of 32 bytes (1 KiB)
#endif

#if QC_HAVE_BF16
static inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// rows 0..M-1 of one tile of 16 outputs: acc = sum_g s_g * A_g - c_g * X_g. Each row keeps C
// independent float32 chains (4 for one or two rows, to hide vdpbf16ps's latency; 2 above, to
// stay within the 32 vector registers)
template <int M>
static void tile_rows(const uint8_t* w, int64_t steps, int64_t group_steps, int64_t groups,
                      const uint32_t* lo, const uint32_t* hi, int64_t x_step, int64_t x_row,
                      const float* xsum, const float* sc, const float* cc, __m512* total) {
  constexpr int C = M <= 2 ? 4 : 2;
  const __m512i nibble = _mm512_set1_epi16(0x000F);
  const __m512i magic = _mm512_set1_epi16(0x4300);  // bf16 128.0
  for (int m = 0; m < M; ++m) total[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t s0 = g * group_steps, s1 = std::min(steps, s0 + group_steps);
    __m512 a[M][C];
    for (int m = 0; m < M; ++m)
      for (int c = 0; c < C; ++c) a[m][c] = _mm512_setzero_ps();
    int64_t s = s0;
    for (; s + 2 <= s1; s += 2) {
      _mm_prefetch((const char*)(w + (s + QC_PREFETCH_STEPS) * kStepBytes), _MM_HINT_T0);
      _mm_prefetch((const char*)(w + (s + QC_PREFETCH_STEPS + 1) * kStepBytes), _MM_HINT_T0);
      const __m512i r0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(w + s * kStepBytes)));
      const __m512i r1 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(w + (s + 1) * kStepBytes)));
      const __m512bh l0 = as_bh(_mm512_ternarylogic_epi32(r0, nibble, magic, 0xEA));  // (r & 15) | magic
      const __m512bh h0 = as_bh(_mm512_or_si512(_mm512_srli_epi16(r0, 4), magic));
      const __m512bh l1 = as_bh(_mm512_ternarylogic_epi32(r1, nibble, magic, 0xEA));
      const __m512bh h1 = as_bh(_mm512_or_si512(_mm512_srli_epi16(r1, 4), magic));
      for (int m = 0; m < M; ++m) {
        const uint32_t* lm = lo + m * x_row + s * x_step;
        const uint32_t* hm = hi + m * x_row + s * x_step;
        a[m][0] = _mm512_dpbf16_ps(a[m][0], as_bh(_mm512_set1_epi32((int)lm[0])), l0);
        a[m][1] = _mm512_dpbf16_ps(a[m][1], as_bh(_mm512_set1_epi32((int)hm[0])), h0);
        a[m][C - 2] = _mm512_dpbf16_ps(a[m][C - 2], as_bh(_mm512_set1_epi32((int)lm[x_step])), l1);
        a[m][C - 1] = _mm512_dpbf16_ps(a[m][C - 1], as_bh(_mm512_set1_epi32((int)hm[x_step])), h1);
      }
    }
    if (s < s1) {
      const __m512i r0 = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(w + s * kStepBytes)));
      const __m512bh l0 = as_bh(_mm512_ternarylogic_epi32(r0, nibble, magic, 0xEA));
      const __m512bh h0 = as_bh(_mm512_or_si512(_mm512_srli_epi16(r0, 4), magic));
      for (int m = 0; m < M; ++m) {
        a[m][0] = _mm512_dpbf16_ps(a[m][0], as_bh(_mm512_set1_epi32((int)lo[m * x_row + s * x_step])), l0);
        a[m][1] = _mm512_dpbf16_ps(a[m][1], as_bh(_mm512_set1_epi32((int)hi[m * x_row + s * x_step])), h0);
      }
    }
    const __m512 sg = _mm512_loadu_ps(sc + g * kLanes);
    const __m512 cg = _mm512_loadu_ps(cc + g * kLanes);
    for (int m = 0; m < M; ++m) {
      __m512 sum = _mm512_add_ps(a[m][0], a[m][1]);
      if constexpr (C == 4) sum = _mm512_add_ps(sum, _mm512_add_ps(a[m][2], a[m][3]));
      total[m] = _mm512_fmadd_ps(sg, sum, total[m]);
      total[m] = _mm512_fnmadd_ps(cg, _mm512_set1_ps(xsum[m * groups + g]), total[m]);
    }
  }
}
#endif

// the activation streams: per row, lo[j] / hi[j] the bf16 pairs each step multiplies, and the
// per-group sums of x (float32, in k order); buffers kept per thread (no allocation per call)
struct Streams {
  std::vector<uint32_t> lo, hi;
  std::vector<float> xsum;
  int64_t x_step = 1, x_row = 0;
};

static inline float bf16_to_float(uint16_t h) {
  const uint32_t bits32 = (uint32_t)h << 16;
  float v;
  std::memcpy(&v, &bits32, 4);
  return v;
}

static Streams& make_streams(const at::Tensor& x2, int64_t bits, int64_t steps, int64_t group_steps,
                             int64_t groups) {
  thread_local Streams st;
  const int64_t m = x2.size(0), k = x2.size(1);
  const int64_t per_step = bits == 4 ? 4 : 2;
  const int64_t k_pad = steps * per_step;
  const int64_t group_k = group_steps * per_step;
  st.x_row = k_pad / 2;  // u32 pairs per row
  st.x_step = bits == 4 ? 2 : 1;
  st.lo.resize(m * st.x_row);
  st.hi.resize(bits == 4 ? 0 : m * st.x_row);
  st.xsum.resize(m * groups);
  const auto* xb = reinterpret_cast<const uint16_t*>(x2.data_ptr<at::BFloat16>());
  const int64_t ld = x2.stride(0);
  for (int64_t r = 0; r < m; ++r) {
    const uint16_t* src = xb + r * ld;
    auto* lo = reinterpret_cast<uint16_t*>(st.lo.data() + r * st.x_row);
    std::memcpy(lo, src, k * sizeof(uint16_t));
    std::memset(lo + k, 0, (k_pad - k) * sizeof(uint16_t));
    float* xs = st.xsum.data() + r * groups;
    for (int64_t g = 0; g < groups; ++g) {
      float acc = 0.0f;
      for (int64_t i = g * group_k, e = std::min(k, (g + 1) * group_k); i < e; ++i) acc += bf16_to_float(src[i]);
      xs[g] = acc;
    }
    if (bits != 4) {  // 16 x: the exponent + 4 (exact; zeros and non-finite values stay what they are)
      auto* hi = reinterpret_cast<uint16_t*>(st.hi.data() + r * st.x_row);
      for (int64_t i = 0; i < k; ++i) {
        const float v16 = bf16_to_float(src[i]) * 16.0f;
        uint32_t b16;
        std::memcpy(&b16, &v16, 4);
        hi[i] = (uint16_t)(b16 >> 16);
      }
      std::memset(hi + k, 0, (k_pad - k) * sizeof(uint16_t));
    }
  }
  return st;
}

at::Tensor wo_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, const at::Tensor& corr,
                   const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group_steps, int64_t n) {
  TORCH_CHECK(QC_HAVE_BF16, "qcompile_cpu::wo_gemv: built without AVX-512 BF16");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.device().is_cpu(), "wo_gemv: x must be a bf16 CPU tensor");
  TORCH_CHECK(bits == 4 || bits == 8, "wo_gemv: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(w.dim() == 3 && w.size(2) == kStepBytes && w.scalar_type() == at::kByte && w.is_contiguous(),
              "wo_gemv: w must be a contiguous uint8 [tiles, steps, 32] layout");
  const int64_t tiles = w.size(0), steps = w.size(1);
  TORCH_CHECK(group_steps > 0 && n > 0 && n <= tiles * kLanes && n > (tiles - 1) * kLanes, "wo_gemv: bad n/groups");
  const int64_t groups = (steps + group_steps - 1) / group_steps;
  TORCH_CHECK(scale.sizes() == at::IntArrayRef({tiles, groups, kLanes}) && corr.sizes() == scale.sizes()
              && scale.scalar_type() == at::kFloat && corr.scalar_type() == at::kFloat
              && scale.is_contiguous() && corr.is_contiguous(), "wo_gemv: scale/corr must be float32 [tiles, groups, 16]");
  const int64_t per_step = bits == 4 ? 4 : 2;
  const int64_t k = x.size(-1);
  TORCH_CHECK(k <= steps * per_step && k > (steps - 1) * per_step, "wo_gemv: x has ", k,
              " features, the layout ", steps * per_step);
  const float* b = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n,
                "wo_gemv: bias must be float32 [n]");
    b = bias->data_ptr<float>();
  }
  auto x2 = x.reshape({-1, k});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  const int64_t m = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  at::Tensor out = at::empty(out_shape, x.options());
  if (m == 0) return out;
#if QC_HAVE_BF16
  const Streams& st = make_streams(x2, bits, steps, group_steps, groups);
  const uint32_t* lo = st.lo.data();
  const uint32_t* hi = bits == 4 ? lo + 1 : st.hi.data();
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* cp = corr.data_ptr<float>();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t grain = std::max<int64_t>(1, kMinTaskBytes / (steps * kStepBytes));
  at::parallel_for(0, tiles, grain, [&](int64_t t0, int64_t t1) {
    __m512 total[kMaxRows];
    for (int64_t t = t0; t < t1; ++t) {
      const uint8_t* wt = wp + t * steps * kStepBytes;
      const float* sct = sp + t * groups * kLanes;
      const float* cct = cp + t * groups * kLanes;
      const int64_t valid = std::min<int64_t>(kLanes, n - t * kLanes);
      const __mmask16 mask = (__mmask16)((1u << valid) - 1u);
      const __m512 bv = b ? _mm512_maskz_loadu_ps(mask, b + t * kLanes) : _mm512_setzero_ps();
      for (int64_t r0 = 0; r0 < m; r0 += kMaxRows) {
        const int rows = (int)std::min<int64_t>(kMaxRows, m - r0);
        const uint32_t* lr = lo + r0 * st.x_row;
        const uint32_t* hr = hi + r0 * st.x_row;
        const float* xs = st.xsum.data() + r0 * groups;
        switch (rows) {
#define QC_ROWS(R) case R: tile_rows<R>(wt, steps, group_steps, groups, lr, hr, st.x_step, st.x_row, xs, sct, cct, total); break;
          QC_ROWS(1) QC_ROWS(2) QC_ROWS(3) QC_ROWS(4) QC_ROWS(5) QC_ROWS(6) QC_ROWS(7)
          default: tile_rows<8>(wt, steps, group_steps, groups, lr, hr, st.x_step, st.x_row, xs, sct, cct, total); break;
#undef QC_ROWS
        }
        for (int r = 0; r < rows; ++r) {
          const __m256i y = (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(total[r], bv));
          _mm256_mask_storeu_epi16(op + (r0 + r) * n + t * kLanes, mask, y);
        }
      }
    }
  });
#endif
  return out;
}

}  // namespace
"""
