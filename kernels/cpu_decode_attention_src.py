"""C++ source of the one-query attention operator (``torch.ops.qcompile_cpu.decode_attention``).

Built with the weight-only GEMV into one library by ``cpu_ops.py``. A decode step attends one
query row per head to a static KV cache: [B, H, 1, D] bf16 query, [B, Hkv, L, D] bf16 key and
value read in place through their strides (GQA: each key/value head serves H / Hkv query heads),
and SDPA's mask (bool, True = attend, or additive float/bf16), broadcastable to [B, H, 1, L].

Per (batch, key/value head), in float32: the scores q . k_j of its query heads (``vdpbf16ps`` on
the bf16 inputs: exact products, float32 sums), scaled, masked, a softmax (the base-2 exponent
polynomial the prefill attention uses, relative error < 2e-7), and the probabilities times the
value rows (float32 multiply-adds of the values widened from bf16) divided by the softmax sum,
rounded to bf16 once. Equal to float32 attention to float32 rounding before that last rounding;
what it replaces (float32 copies of the whole cache, two bmm calls and a softmax kernel per layer)
computed the same float32 quantities in another order. A row whose keys are all masked gives NaN,
as softmax over nothing does in torch.
"""

from qcompile.kernels.cpu_attention_src import EXP2

SOURCE = r"""
#if QC_HAVE_BF16
namespace {
""" + EXP2 + r"""
constexpr int64_t kMaxHeadDim = 256;
constexpr int kMaxGroup = 16;  // query heads per key/value head on the stack

static inline __m512 widen_bf16(const uint16_t* p) {  // 16 bf16 -> float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

static inline uint16_t round_bf16(float f) {  // round to nearest even (NaN stays NaN)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
}  // namespace
#endif

at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const c10::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(QC_HAVE_BF16, "qcompile_cpu::decode_attention: built without AVX-512 BF16");
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4 && value.sizes() == key.sizes(),
              "decode_attention: query [B, H, 1, D], key/value [B, Hkv, L, D]");
  const int64_t B = query.size(0), H = query.size(1), D = query.size(3);
  const int64_t Hkv = key.size(1), L = key.size(2);
  TORCH_CHECK(query.size(2) == 1 && key.size(0) == B && key.size(3) == D && Hkv > 0 && H % Hkv == 0
              && H / Hkv <= kMaxGroup && D % 32 == 0 && D <= kMaxHeadDim && L > 0,
              "decode_attention: one query row, H a multiple of Hkv (at most ", kMaxGroup, " times), D a "
              "multiple of 32 up to ", kMaxHeadDim, "; got query ", query.sizes(), ", key ", key.sizes());
  for (const at::Tensor* t : {&query, &key, &value})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->device().is_cpu() && t->stride(3) == 1,
                "decode_attention: bf16 CPU tensors with a contiguous last dimension");
  at::Tensor m;
  int mask_kind = 0;  // 0 none, 1 bool (true = attend), 2 float32 additive
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->dim() == 4, "decode_attention: a 4-D mask, got ", mask->sizes());
    m = mask->expand({B, H, 1, L});
    if (m.scalar_type() == at::kBool) {
      mask_kind = 1;
    } else {
      m = m.to(at::kFloat);
      mask_kind = 2;
    }
  }
  at::Tensor out = at::empty({B, 1, H, D}, query.options());
#if QC_HAVE_BF16
  const int64_t G = H / Hkv;
  const float sc = (float)scale;
  const float log2e = 1.4426950408889634f;
  const auto* qp = reinterpret_cast<const uint16_t*>(query.data_ptr<at::BFloat16>());
  const auto* kp = reinterpret_cast<const uint16_t*>(key.data_ptr<at::BFloat16>());
  const auto* vp = reinterpret_cast<const uint16_t*>(value.data_ptr<at::BFloat16>());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const char* mp = mask_kind ? static_cast<const char*>(m.data_ptr()) : nullptr;
  const int64_t msz = mask_kind == 1 ? 1 : 4;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> scores(G * L);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / Hkv, hk = w % Hkv;
      const uint16_t* kb = kp + b * key.stride(0) + hk * key.stride(1);
      const uint16_t* vb = vp + b * value.stride(0) + hk * value.stride(1);
      __m512bh qv[kMaxGroup][kMaxHeadDim / 32];
      for (int64_t g = 0; g < G; ++g) {
        const uint16_t* qr = qp + b * query.stride(0) + (hk * G + g) * query.stride(1);
        for (int64_t c = 0; c < D / 32; ++c) qv[g][c] = (__m512bh)_mm512_loadu_si512((const void*)(qr + 32 * c));
      }
      for (int64_t j = 0; j < L; ++j) {  // scores
        const uint16_t* kr = kb + j * key.stride(2);
        __m512bh kv[kMaxHeadDim / 32];
        for (int64_t c = 0; c < D / 32; ++c) kv[c] = (__m512bh)_mm512_loadu_si512((const void*)(kr + 32 * c));
        for (int64_t g = 0; g < G; ++g) {
          __m512 acc = _mm512_setzero_ps();
          for (int64_t c = 0; c < D / 32; ++c) acc = _mm512_dpbf16_ps(acc, qv[g][c], kv[c]);
          float s = _mm512_reduce_add_ps(acc) * sc;
          if (mask_kind) {
            const int64_t h = hk * G + g;
            const char* e = mp + (b * m.stride(0) + h * m.stride(1) + j * m.stride(3)) * msz;
            if (mask_kind == 1) {
              if (!*reinterpret_cast<const bool*>(e)) s = -INFINITY;
            } else {
              s += *reinterpret_cast<const float*>(e);
            }
          }
          scores[g * L + j] = s;
        }
      }
      for (int64_t g = 0; g < G; ++g) {  // softmax (unnormalized) and the value rows
        float* sg = scores.data() + g * L;
        float mx = -INFINITY;
        for (int64_t j = 0; j < L; ++j) mx = std::max(mx, sg[j]);
        float sum = 0.0f;
        int64_t j = 0;
        const __m512 mxv = _mm512_set1_ps(mx), l2 = _mm512_set1_ps(log2e);
        for (; j + 16 <= L; j += 16) {
          const __m512 p = qa_exp2(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(sg + j), mxv), l2));
          _mm512_storeu_ps(sg + j, p);
          sum += _mm512_reduce_add_ps(p);
        }
        if (j < L) {
          const __mmask16 k = (__mmask16)((1u << (L - j)) - 1u);
          const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, sg + j);
          const __m512 p = _mm512_maskz_mov_ps(k, qa_exp2(_mm512_mul_ps(_mm512_sub_ps(x, mxv), l2)));
          _mm512_mask_storeu_ps(sg + j, k, p);
          sum += _mm512_reduce_add_ps(p);
        }
        __m512 acc[kMaxHeadDim / 16];
        for (int64_t c = 0; c < D / 16; ++c) acc[c] = _mm512_setzero_ps();
        for (int64_t t = 0; t < L; ++t) {
          const __m512 p = _mm512_set1_ps(sg[t]);
          const uint16_t* vr = vb + t * value.stride(2);
          for (int64_t c = 0; c < D / 16; ++c) acc[c] = _mm512_fmadd_ps(p, widen_bf16(vr + 16 * c), acc[c]);
        }
        const float inv = 1.0f / sum;  // mx = -inf (every key masked): 0 * inf -> NaN, as torch
        uint16_t* orow = op + (b * H + hk * G + g) * D;
        for (int64_t c = 0; c < D / 16; ++c) {
          alignas(64) float tmp[16];
          _mm512_store_ps(tmp, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
          for (int e = 0; e < 16; ++e) orow[16 * c + e] = round_bf16(tmp[e]);
        }
      }
    }
  });
#endif
  return out;
}
"""
