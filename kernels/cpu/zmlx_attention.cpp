// gqa_attention: a GQA layer's attention core as three MLX primitives (CPU), decode and prefill:
//   ZmlxKvWrite (keys):   cache_k' = cache_k with rope(norm(k)) at positions offset..offset+L-1
//   ZmlxKvWrite (values): cache_v' = cache_v with v at those positions
//   ZmlxGqaAttend:        o = softmax(scale * rope(norm(q)) . K^T  [causal when L > 1]) . V
// with the per-head RMSNorm optional (Qwen3) and o laid out [B, L, Hq * D] for o_proj. They
// replace ~60 MLX ops per layer (the CPU fallbacks of rms_norm, rope and SDPA, the cache's slice
// updates, transposes and copies) and read the cache where it lies instead of copying K and V
// for every token. The writes are single-output primitives so that MLX can donate the cache
// buffer (a multi-output primitive's inputs are held once per output, never donatable): the
// cache is then updated in place, as mlx-lm's slice assignment is.
//
// Bit-identity with the stock chain on MLX 0.32's x86-64 CPU wheel (f32 only):
// - rms_norm's fallback: x * rsqrt(mean(x^2) + eps) * w, the mean a sequential sum from 0 (MLX
//   reduces with simd width 1 here) times (float)(1.0 / D); MLX's own functors below.
// - rope: zmlx_rope.h (MLX's fallback, functor by functor).
// - SDPA's fallback: q * scale, then matmul(q, K^T) and matmul(p, V) through the wheel's
//   reference (netlib) BLAS sgemm: scalar, no FMA, and every output element one sequential sum
//   over the contracted index from 0 whatever the transposition flags; the causal mask is
//   where(q_idx >= k_idx, s, finfo.min); softmax(precise) is MLX's CPU kernel at width 1: running
//   maximum, exp(s - max) with simd::exp, sequential normaliser, p = e * (1 / sum).
// We evaluate exactly those sums in that order; tests/kernels_attention.rs checks the outputs
// and the cache contents bit for bit against the stock chain. Other BLAS builds (Accelerate,
// OpenBLAS) sum differently: `zmlx selftest` shows it on such a machine.
//
// With `fast` (the `gqa_attention_fast` pattern, class validated) ZmlxGqaAttend's scores,
// softmax and weighted sum run attend_fast.inc instead (vector dot products with FMA, a vector
// exp; numerics there); the norms, rotations and cache writes stay exact.
#include <cstring>
#include <optional>
#include <string>
#include <limits>
#include <stdexcept>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/binary_ops.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/backend/cpu/simd/simd.h"
#include "mlx/backend/cpu/unary_ops.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

#include "mlx/c/error.h"
#include "mlx/c/private/array.h"
#include "mlx/c/private/stream.h"

#include "attend_fast.h"
#include "rms_norm_row.h"
#include "zmlx_common.h"
#include "zmlx_pool.h"
#include "zmlx_rope.h"

namespace mx = mlx::core;
namespace dt = mlx::core::detail;
namespace simd = mlx::core::simd;

namespace {

struct RopeP {
  int dims;
  bool traditional;
  float base;
  float scale;
  bool has_freqs;
  bool operator==(const RopeP& o) const {
    return dims == o.dims && traditional == o.traditional && base == o.base && scale == o.scale &&
           has_freqs == o.has_freqs;
  }
};

struct HeadP {
  int heads, d, offset;
  bool has_norm;
  float eps;
  bool operator==(const HeadP& o) const {
    return heads == o.heads && d == o.d && offset == o.offset && has_norm == o.has_norm && eps == o.eps;
  }
};

// cos/sin of positions offset..offset+L-1, [L, dims/2] each.
struct Angles {
  int half;
  std::vector<float> cs, sn;
  Angles(const RopeP& r, int L, int offset, const mx::array* freqs) : half(r.dims / 2) {
    auto inv = zmlx_rope::inv_freq(r.dims, r.base, freqs ? freqs->data<float>() : nullptr,
                                   freqs ? long(freqs->strides()[0]) : 1);
    cs.resize(size_t(L) * half);
    sn.resize(size_t(L) * half);
    for (int t = 0; t < L; ++t) zmlx_rope::cos_sin<float>(t, offset, r.scale, inv, &cs[size_t(t) * half], &sn[size_t(t) * half]);
  }
  void rotate(float* row, const RopeP& r, int t) const {
    zmlx_rope::rotate_row<float>(row, r.dims, r.traditional, &cs[size_t(t) * half], &sn[size_t(t) * half]);
  }
};

void need_contiguous(const mx::array& a, const char* what) {
  if (!a.flags().row_contiguous)
    throw std::invalid_argument(std::string("zmlx gqa_attention: ") + what + " must be contiguous");
}

// inputs: cache [B, H, cap, D], x [B, L, H*D], norm weight [D] (or a scalar), freqs [dims/2]
// (when rope.has_freqs). output: the cache with x's rows (normed and rotated when `rotate`) at
// positions offset..offset+L-1: the input's buffer when MLX may donate it, else a copy.
class KvWrite : public mx::UnaryPrimitive {
 public:
  KvWrite(mx::Stream s, HeadP h, RopeP r, bool rotate) : mx::UnaryPrimitive(s), h_(h), r_(r), rotate_(rotate) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    const auto& c = in[0];
    need_contiguous(c, "the KV cache");
    if (c.data_size() != c.size()) throw std::invalid_argument("zmlx gqa_attention: the KV cache must be materialised");
    // Donated: the write lands in the previous cache's buffer (no other node holds it). Else the
    // copy of the previous cache happens in the task, on the stream, after the tasks queued
    // before it (the write that filled the previous row may not have run yet when this node is
    // evaluated on the main thread: copying here read a stale cache when the host ran ahead).
    bool donated = c.is_donatable() && c.nbytes() == out.nbytes();
    if (donated) {
      out.copy_shared_buffer(c);
    } else {
      out.set_data(mx::allocator::malloc(out.nbytes()));
    }
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.dispatch([in, out, donated, h = h_, r = r_, rotate = rotate_]() mutable {
      if (!donated) std::memcpy(out.data<void>(), in[0].data<void>(), in[0].nbytes());
      const auto& x = in[1];
      int B = x.shape(0), L = x.shape(1), cap = out.shape(2), D = h.d;
      std::optional<Angles> ang;
      if (rotate) ang.emplace(r, L, h.offset, r.has_freqs ? &in[3] : nullptr);
      std::vector<float> tx, tw;
      const float *src = zmlx_cpu::dense(x, tx), *w = zmlx_cpu::dense(in[2], tw);
      float* dst = out.data<float>();
      zmlx_pool::parallel_items(size_t(B) * L * h.heads, [&](size_t it) {
        int hh = int(it % h.heads), t = int(it / h.heads % L), b = int(it / h.heads / L);
        float* row = dst + ((size_t(b) * h.heads + hh) * cap + h.offset + t) * D;
        std::memcpy(row, src + ((size_t(b) * L + t) * h.heads + hh) * D, D * sizeof(float));
        if (rotate) {
          if (h.has_norm) zmlx_norm::rms_norm_row(row, w, D, h.eps, row);
          ang->rotate(row, r, t);
        }
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("zmlx gqa_attention: CPU-only primitive (MLX's GPU SDPA is already fused)");
  }
  const char* name() const override { return "ZmlxKvWrite"; }
  bool is_equivalent(const mx::Primitive& o) const override {
    auto& k = static_cast<const KvWrite&>(o);
    return k.h_ == h_ && k.r_ == r_ && k.rotate_ == rotate_;
  }

 private:
  HeadP h_;
  RopeP r_;
  bool rotate_;
};

// inputs: q [B, L, Hq*D], cache_k, cache_v [B, Hk, cap, D] (positions < offset + L filled),
// q_norm [D] (or a scalar), freqs. output: o [B, L, Hq*D].
class GqaAttend : public mx::UnaryPrimitive {
 public:
  GqaAttend(mx::Stream s, HeadP h, RopeP r, int hk, float scale, bool fast)
      : mx::UnaryPrimitive(s), h_(h), r_(r), hk_(hk), scale_(scale), fast_(fast) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    // Checked here, not in the dispatched task: an exception there would end the process.
    need_contiguous(in[1], "the KV cache");
    need_contiguous(in[2], "the KV cache");
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.dispatch([in, out, h = h_, r = r_, hk = hk_, scale = scale_, fast = fast_]() mutable {
      const auto& xq = in[0];
      int B = xq.shape(0), L = xq.shape(1), cap = in[1].shape(2), D = h.d, hq = h.heads, rep = hq / hk;
      int kl = h.offset + L;
      bool causal = L > 1;
      Angles ang(r, L, h.offset, r.has_freqs ? &in[4] : nullptr);
      std::vector<float> tq, tw;
      const float *qs = zmlx_cpu::dense(xq, tq), *w = zmlx_cpu::dense(in[3], tw);
      const float *kc = in[1].data<float>(), *vc = in[2].data<float>();
      float* o = out.data<float>();
      const float lowest = std::numeric_limits<float>::lowest();
      // q of one head: norm, rotation and scale exactly as the stock chain (both classes).
      auto prepare_q = [&](float* q, int b, int t, int hh) {
        std::memcpy(q, qs + ((size_t(b) * L + t) * hq + hh) * D, D * sizeof(float));
        if (h.has_norm) zmlx_norm::rms_norm_row(q, w, D, h.eps, q);
        ang.rotate(q, r, t);
        for (int i = 0; i < D; ++i) q[i] = dt::Multiply{}(scale, q[i]);
      };
      if (fast) {
        // The validated core (attend_fast.inc): one item per (batch, position, KV group), the
        // group's K and V rows read once for its rep query heads.
        zmlx_pool::parallel_items(size_t(B) * L * hk, [&](size_t it) {
          int g = int(it % hk), t = int(it / hk % L), b = int(it / hk / L);
          int nk = (causal ? h.offset + t : kl - 1) + 1;
          std::vector<float> q(size_t(rep) * D), s(size_t(rep) * nk);
          for (int j = 0; j < rep; ++j) prepare_q(q.data() + size_t(j) * D, b, t, g * rep + j);
          const float* K = kc + (size_t(b) * hk + g) * cap * D;
          const float* V = vc + (size_t(b) * hk + g) * cap * D;
          zmlx_attend_fast(q.data(), rep, D, K, V, nk, s.data(), o + ((size_t(b) * L + t) * hq + g * rep) * D);
        });
        return;
      }
      zmlx_pool::parallel_items(size_t(B) * L * hq, [&](size_t it) {
        int hh = int(it % hq), t = int(it / hq % L), b = int(it / hq / L), g = hh / rep;
        size_t row = ((size_t(b) * L + t) * hq + hh) * D;
        std::vector<float> q(D), s(kl), acc(D, 0.0f);
        prepare_q(q.data(), b, t, hh);
        const float* K = kc + (size_t(b) * hk + g) * cap * D;
        const float* V = vc + (size_t(b) * hk + g) * cap * D;
        int last = causal ? h.offset + t : kl - 1;  // the last unmasked key
        // Eight keys at a time, one per lane, each its own sequential sum over i (the order of
        // the reference sgemm): vector lanes without reassociating any sum.
        int n = 0;
        for (; n + 8 <= last + 1; n += 8) {
          float dot[8] = {};
          const float* kr = K + size_t(n) * D;
          for (int i = 0; i < D; ++i) {
            float qi = q[i];
            for (int j = 0; j < 8; ++j) dot[j] = dot[j] + kr[size_t(j) * D + i] * qi;
          }
          for (int j = 0; j < 8; ++j) s[n + j] = dot[j];
        }
        for (; n <= last; ++n) {
          const float* kr = K + size_t(n) * D;
          float dot = 0.0f;
          for (int i = 0; i < D; ++i) dot = dot + kr[i] * q[i];
          s[n] = dot;
        }
        for (n = last + 1; n < kl; ++n) s[n] = lowest;  // where(mask, s, finfo.min)
        simd::Simd<float, 1> m(-std::numeric_limits<float>::infinity());
        for (int n = 0; n < kl; ++n) m = simd::maximum(simd::Simd<float, 1>(s[n]), m);
        float norm = 0.0f;
        for (int n = 0; n < kl; ++n) {
          s[n] = simd::exp(simd::Simd<float, 1>(s[n] - m.value)).value;
          norm = norm + s[n];
        }
        norm = 1 / norm;
        for (int n = 0; n < kl; ++n) s[n] = s[n] * norm;
        // Masked keys have p = exp(finfo.min - max) = 0: their terms add +-0 to a sum that
        // already holds the diagonal's, which changes nothing, so they are skipped.
        for (int n = 0; n <= last; ++n) {
          const float* vr = V + size_t(n) * D;
          float pn = s[n];
          for (int i = 0; i < D; ++i) acc[i] = acc[i] + pn * vr[i];
        }
        std::memcpy(o + row, acc.data(), D * sizeof(float));
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("zmlx gqa_attention: CPU-only primitive (MLX's GPU SDPA is already fused)");
  }
  const char* name() const override { return "ZmlxGqaAttend"; }
  bool is_equivalent(const mx::Primitive& o) const override {
    auto& a = static_cast<const GqaAttend&>(o);
    return a.h_ == h_ && a.r_ == r_ && a.hk_ == hk_ && a.scale_ == scale_ && a.fast_ == fast_;
  }

 private:
  HeadP h_;
  RopeP r_;
  int hk_;
  float scale_;
  bool fast_;
};

}  // namespace

extern "C" int zmlx_cpu_gqa_attention(mlx_array* o_out, mlx_array* kc_out, mlx_array* vc_out, const mlx_array q,
                                      const mlx_array k, const mlx_array v, const mlx_array q_norm,
                                      const mlx_array k_norm, const mlx_array kc, const mlx_array vc,
                                      const mlx_array freqs, bool has_norm, bool has_freqs, int n_heads,
                                      int n_kv_heads, int head_dim, float eps, int rope_dims, bool traditional,
                                      float base, float rope_scale, int offset, float scale, bool fast,
                                      const mlx_stream s) {
  return zmlx_cpu::guarded([&] {
    auto& st = mlx_stream_get_(s);
    const auto &q0 = mlx_array_get_(q), &k0 = mlx_array_get_(k), &v0 = mlx_array_get_(v);
    const auto &kc0 = mlx_array_get_(kc), &vc0 = mlx_array_get_(vc);
    auto bad = [](const char* what) { throw std::invalid_argument(std::string("zmlx gqa_attention: ") + what); };
    if (n_heads <= 0 || n_kv_heads <= 0 || head_dim <= 0 || n_heads % n_kv_heads != 0)
      bad("n_heads must be a positive multiple of n_kv_heads, head_dim positive");
    if (q0.ndim() != 3 || k0.ndim() != 3 || v0.ndim() != 3 || kc0.ndim() != 4 || vc0.ndim() != 4)
      bad("expected q, k, v [B, L, H*D] and caches [B, Hk, capacity, D]");
    int B = q0.shape(0), L = q0.shape(1);
    if (L < 1 || q0.shape(2) != n_heads * head_dim || k0.shape() != v0.shape() || k0.shape(0) != B ||
        k0.shape(1) != L || k0.shape(2) != n_kv_heads * head_dim)
      bad("q must be [B, L, n_heads*head_dim], k and v [B, L, n_kv_heads*head_dim], L >= 1");
    if (kc0.shape() != vc0.shape() || kc0.shape(0) != B || kc0.shape(1) != n_kv_heads || kc0.shape(3) != head_dim)
      bad("the caches must be [B, n_kv_heads, capacity, head_dim]");
    if (offset < 0 || offset + L > kc0.shape(2)) bad("offset + L exceeds the cache capacity");
    for (auto* a : {&q0, &k0, &v0, &kc0, &vc0})
      if (a->dtype() != mx::float32) bad("float32 only (the bit-identical path)");
    if (rope_dims <= 0 || rope_dims % 2 != 0 || rope_dims > head_dim) bad("rope dims must be even, in (0, head_dim]");
    auto f32 = [&](const mlx_array a, int n) {
      auto x = mx::astype(mlx_array_get_(a), mx::float32, st);
      if (x.ndim() != 1 || x.shape(0) != n) bad("norm weights must be [head_dim], freqs [rope_dims / 2]");
      return x;
    };
    auto one = mx::array(1.0f);
    RopeP r{rope_dims, traditional, base, rope_scale, has_freqs};
    std::vector<mx::array> fr;
    if (has_freqs) fr.push_back(f32(freqs, rope_dims / 2));
    auto with = [&](std::vector<mx::array> v) {
      v.insert(v.end(), fr.begin(), fr.end());
      return v;
    };
    HeadP kh{n_kv_heads, head_dim, offset, has_norm, eps};
    auto kc1 = mx::array(kc0.shape(), mx::float32, std::make_shared<KvWrite>(st, kh, r, true),
                         with({kc0, k0, has_norm ? f32(k_norm, head_dim) : one}));
    auto vc1 = mx::array(vc0.shape(), mx::float32, std::make_shared<KvWrite>(st, kh, r, false), {vc0, v0, one});
    HeadP qh{n_heads, head_dim, offset, has_norm, eps};
    auto o = mx::array(mx::Shape{B, L, n_heads * head_dim}, mx::float32,
                       std::make_shared<GqaAttend>(st, qh, r, n_kv_heads, scale, fast),
                       with({q0, kc1, vc1, has_norm ? f32(q_norm, head_dim) : one}));
    mlx_array_set_(*o_out, o);
    mlx_array_set_(*kc_out, kc1);
    mlx_array_set_(*vc_out, vc1);
  });
}
