// Quantized expert kernels for the CPU backend, as MLX primitives (one graph node each); decode
// runs one token's k experts, prefill groups the (token, slot) pairs by expert:
//   qmv_swiglu:  h[t, j, :] = silu(W_gate[e] x_t) * (W_up[e] x_t),      e = idx[t, j]
//   qmv_combine: out[t, :]  = sum_j  (W_down[e] h[t, j]) * w[t, j]        (never materialises [k, D])
// W is MLX affine-quantized (bits 2/4/8, any group size) with float32, bfloat16 or float16
// scales/biases (as stored; widened exactly per group) and float32 activations — MLX's default CPU
// compute dtype here.
//
// Bit-identity: MLX 0.32's CPU quantized matmul (`_qmm_t`, simd width 1 on Linux) computes every
// output row as ONE sequential float sum   sum = sum + x[k] * (scale * q[k] + bias)   over k.
// We keep exactly that per-row op sequence (on x86-64 no FMA: -ffp-contract=off, and no fma
// target; on aarch64 the two fused multiply-adds libmlx was compiled to, see qmv_rows.inc) but run
// 8 rows per vector lane-wise, 2–4 vectors interleaved to hide the add latency, on several threads.
// The combine then accumulates y * w from 0 in slot order j = 0..k-1 (MLX's strided sum over
// axis -2); the activation uses MLX's own scalar functors. So the result is bit-identical to
// gather_qmm -> swiglu -> gather_qmm -> (y * w).sum(-2), which tests/kernels.rs checks.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <thread>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/backend/cpu/unary_ops.h"
#include "mlx/backend/cpu/binary_ops.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

#include "mlx/c/error.h"
#include "mlx/c/private/array.h"
#include "mlx/c/private/stream.h"

#include "zmlx_common.h"

#include "attend_fast.h"
#include "qmv_fast.h"
#include "qmv_rows.h"
#include "zmlx_pool.h"

namespace mx = mlx::core;
namespace dt = mlx::core::detail;

namespace {

using zmlx_pool::parallel_items;

// f(begin, end) over [0, n) in contiguous ranges, one per worker.
template <class F>
void parallel_for(size_t n, F&& f) {
  zmlx_pool::parallel_ranges(n, std::forward<F>(f));
}

// The widest row kernel this CPU runs; ZMLX_CPU_ISA caps it (tests run each):
//   x86-64:  base (SSE2) | avx2 | avx512   (chosen at run time with __builtin_cpu_supports)
//   aarch64: base (scalar) | neon          (NEON is in every ARMv8-A CPU: no run-time check)
//   others:  base (scalar)
// A name this architecture lacks (e.g. avx2 on aarch64) falls back to the widest, with a warning
// only for names no architecture has, so one test harness runs everywhere.
enum class Isa { Base, Avx2, Avx512, Neon };
Isa isa() {
  static Isa v = [] {
#if defined(__x86_64__)
    Isa best = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") ? Isa::Avx512
               : __builtin_cpu_supports("avx2")                                       ? Isa::Avx2
                                                                                       : Isa::Base;
#elif defined(__aarch64__)
    Isa best = Isa::Neon;
#else
    Isa best = Isa::Base;
#endif
    const char* e = std::getenv("ZMLX_CPU_ISA");
    if (!e) return best;
    std::string s(e);
    if (s == "base") return Isa::Base;
#if defined(__x86_64__)
    if (s == "avx2") return std::min(best, Isa::Avx2);
    if (s == "avx512") return best;
#elif defined(__aarch64__)
    if (s == "neon") return best;
#endif
    if (s != "avx2" && s != "avx512" && s != "neon")
      std::fprintf(stderr,
                   "[zmlx] ZMLX_CPU_ISA=%s: expected base, avx2 or avx512 (x86-64), base or neon (aarch64); "
                   "using the widest this CPU has\n",
                   e);
    return best;
  }();
  return v;
}

bool qmv_rows(int bits, const float* x, const ZmlxQMat& m, int r0, int r1, int K, int gs, float* out) {
  switch (isa()) {
#if defined(__x86_64__)
    case Isa::Avx512: return zmlx_qmv_rows_avx512(bits, x, m, r0, r1, K, gs, out);
    case Isa::Avx2: return zmlx_qmv_rows_avx2(bits, x, m, r0, r1, K, gs, out);
#endif
#if defined(__aarch64__)
    case Isa::Neon: return zmlx_qmv_rows_neon(bits, x, m, r0, r1, K, gs, out);
#endif
    default: return zmlx_qmv_rows_base(bits, x, m, r0, r1, K, gs, out);
  }
}

bool qmv_accum(int bits, const float* x, const ZmlxQMat& m, int r0, int r1, int K, int gs, float w, float* acc) {
  switch (isa()) {
#if defined(__x86_64__)
    case Isa::Avx512: return zmlx_qmv_accum_avx512(bits, x, m, r0, r1, K, gs, w, acc);
    case Isa::Avx2: return zmlx_qmv_accum_avx2(bits, x, m, r0, r1, K, gs, w, acc);
#endif
#if defined(__aarch64__)
    case Isa::Neon: return zmlx_qmv_accum_neon(bits, x, m, r0, r1, K, gs, w, acc);
#endif
    default: return zmlx_qmv_accum_base(bits, x, m, r0, r1, K, gs, w, acc);
  }
}

// The `fast` (validated) kernels: same ISA choice; AVX2 also needs FMA for them.
int fast_lanes() { return isa() == Isa::Avx512 ? 16 : 8; }

bool qmv_fast_rows(int bits, const float* xp, const float* xs, int T, long ldx, const ZmlxQMat& m, int r0, int r1,
                   int K, int gs, float* out, long ldo) {
  switch (isa()) {
#if defined(__x86_64__)
    case Isa::Avx512: return zmlx_qmv_fast_rows_avx512(bits, xp, xs, T, ldx, m, r0, r1, K, gs, out, ldo);
    case Isa::Avx2:
      if (__builtin_cpu_supports("fma")) return zmlx_qmv_fast_rows_avx2(bits, xp, xs, T, ldx, m, r0, r1, K, gs, out, ldo);
      return zmlx_qmv_fast_rows_base(bits, xp, xs, T, ldx, m, r0, r1, K, gs, out, ldo);
#endif
#if defined(__aarch64__)
    case Isa::Neon: return zmlx_qmv_fast_rows_neon(bits, xp, xs, T, ldx, m, r0, r1, K, gs, out, ldo);
#endif
    default: return zmlx_qmv_fast_rows_base(bits, xp, xs, T, ldx, m, r0, r1, K, gs, out, ldo);
  }
}

// Whether the fast kernels take this shape (whole vectors of packed bytes per group); the
// primitives run the exact kernels otherwise.
bool fast_supported(int bits, int gs) {
  return (bits == 2 || bits == 4 || bits == 8) && gs % (8 / bits) == 0 && (gs * bits / 8) % fast_lanes() == 0;
}

// Rows per work item: a multiple of 32 so the interleaved path does the bulk.
constexpr int CHUNK = 64;

using zmlx_cpu::scale_type;
using zmlx_cpu::whole;

// Stacked expert matrices [E, rows, K] (packed), scales/biases [E, rows, K / gs] (f32/bf16/f16, as stored).
struct ExpertMats {
  const uint8_t* w;
  const uint8_t* s;
  const uint8_t* b;
  long rows, row_bytes, groups, experts;
  int stype;
  long ssize;  // bytes per scale
  ZmlxQMat at(uint32_t e) const {
    long so = long(e) * rows * groups * ssize;
    return ZmlxQMat{w + long(e) * rows * row_bytes, s + so, b + so, row_bytes, groups, stype};
  }
};

ExpertMats expert_mats(const mx::array& w, const mx::array& s, const mx::array& b) {
  return ExpertMats{w.data<uint8_t>(), s.data<uint8_t>(), b.data<uint8_t>(), w.shape(1), long(w.shape(2)) * 4,
                    s.shape(2),          w.shape(0),        scale_type(s.dtype()), long(s.itemsize())};
}

// Tokens whose indices are all in range; others produce NaN rows (MLX itself does not check).
bool indices_ok(const uint32_t* idx, int k, long experts) {
  for (int j = 0; j < k; ++j)
    if (idx[j] >= uint64_t(experts)) return false;
  return true;
}

// The (t, j) slots of tokens whose indices are all in range, grouped by expert (slot order
// kept within a group), so each expert's weights are read once per row chunk for all its tokens.
struct ExpertGroups {
  std::vector<uint32_t> slots;  // t * k + j, grouped
  std::vector<size_t> begin;    // group g is slots[begin[g], begin[g + 1])
  std::vector<uint32_t> expert;
};

ExpertGroups group_by_expert(const uint32_t* idx, int tokens, int k, long experts) {
  ExpertGroups g;
  for (int t = 0; t < tokens; ++t)
    if (indices_ok(idx + size_t(t) * k, k, experts))
      for (int j = 0; j < k; ++j) g.slots.push_back(uint32_t(t * k + j));
  std::stable_sort(g.slots.begin(), g.slots.end(), [&](uint32_t a, uint32_t b) { return idx[a] < idx[b]; });
  for (size_t s = 0; s < g.slots.size(); ++s)
    if (s == 0 || idx[g.slots[s]] != idx[g.slots[s - 1]]) {
      g.begin.push_back(s);
      g.expert.push_back(idx[g.slots[s]]);
    }
  g.begin.push_back(g.slots.size());
  return g;
}

// Rows of tokens with an out-of-range index: NaN (MLX itself does not check).
void nan_bad_tokens(const uint32_t* idx, float* out, int tokens, int k, long experts, size_t row_len, int slots_per_token) {
  for (int t = 0; t < tokens; ++t)
    if (!indices_ok(idx + size_t(t) * k, k, experts))
      std::fill(out + size_t(t) * slots_per_token * row_len, out + size_t(t + 1) * slots_per_token * row_len,
                std::numeric_limits<float>::quiet_NaN());
}

// dst[tj] rows [r0, r1) = W[expert] h[tj] for every slot tj of every group.
template <class RowOp>
void for_groups_and_chunks(const ExpertGroups& g, int n, RowOp&& op) {
  int chunks = (n + CHUNK - 1) / CHUNK;
  size_t groups = g.expert.size();
  parallel_items(groups * chunks, [&](size_t it) {
    size_t gi = it / chunks;
    int r0 = int(it % chunks) * CHUNK, r1 = std::min(n, r0 + CHUNK);
    for (size_t s = g.begin[gi]; s < g.begin[gi + 1]; ++s) op(g.expert[gi], g.slots[s], r0, r1);
  });
}

void run_swiglu(int bits, const float* x, const uint32_t* idx, float* out, int tokens, int k, int K, int gs,
                const ExpertMats& gate, const ExpertMats& up) {
  int n = int(gate.rows);
  nan_bad_tokens(idx, out, tokens, k, gate.experts, n, k);
  ExpertGroups g = group_by_expert(idx, tokens, k, gate.experts);
  for_groups_and_chunks(g, n, [&](uint32_t e, uint32_t tj, int r0, int r1) {
    float gv[CHUNK], uv[CHUNK];
    const float* xt = x + size_t(tj / k) * K;
    qmv_rows(bits, xt, gate.at(e), r0, r1, K, gs, gv);
    qmv_rows(bits, xt, up.at(e), r0, r1, K, gs, uv);
    // mlx-lm's swiglu: (g * sigmoid(g)) * u, each step rounded, with MLX's own functors.
    float* o = out + size_t(tj) * n;
    for (int r = r0; r < r1; ++r) o[r] = dt::Multiply{}(dt::Multiply{}(gv[r - r0], dt::Sigmoid{}(gv[r - r0])), uv[r - r0]);
  });
}

// Prefill combine of the expert rows y[t, j, :] (exact and fast paths share it; this file is
// built without FMA contraction): per token o = o + y * w from 0 in slot order, product rounded
// before the add — MLX's (y * w).sum(-2); NaN rows for tokens with an out-of-range index.
void combine_rows(const float* y, const uint32_t* idx, const float* wts, float* out, int tokens, int k, int n,
                  long experts) {
  parallel_items(size_t(tokens), [&](size_t t) {
    float* o = out + t * n;
    if (!indices_ok(idx + t * k, k, experts)) {
      std::fill(o, o + n, std::numeric_limits<float>::quiet_NaN());
      return;
    }
    std::fill(o, o + n, 0.0f);
    for (int j = 0; j < k; ++j) {
      const float* yj = y + (t * k + j) * n;
      float w = wts[t * k + j];
      for (int r = 0; r < n; ++r) o[r] = o[r] + yj[r] * w;
    }
  });
}

void run_combine(int bits, const float* h, const uint32_t* idx, const float* wts, float* out, int tokens, int k, int K,
                 int gs, const ExpertMats& down) {
  int n = int(down.rows);
  int chunks = (n + CHUNK - 1) / CHUNK;
  if (tokens == 1) {
    // Decode: accumulate straight into the output, never materialising the k expert rows.
    parallel_for(size_t(chunks), [&](size_t i0, size_t i1) {
      for (size_t c = i0; c < i1; ++c) {
        int r0 = int(c) * CHUNK, r1 = std::min(n, r0 + CHUNK);
        float* o = out + r0;
        bool ok = indices_ok(idx, k, down.experts);
        for (int r = r0; r < r1; ++r) o[r - r0] = ok ? 0.0f : std::numeric_limits<float>::quiet_NaN();
        if (!ok) continue;
        // (y * w).sum(-2): from 0, in slot order, product rounded before the add.
        for (int j = 0; j < k; ++j) qmv_accum(bits, h + size_t(j) * K, down.at(idx[j]), r0, r1, K, gs, wts[j], o);
      }
    });
    return;
  }
  // Prefill: the expert rows y[t, j] grouped by expert (weights read once per chunk), then the
  // same slot-order combine per token: o = o + y * w, two roundings as in qmv_accum.
  std::vector<float> y(size_t(tokens) * k * n);
  ExpertGroups g = group_by_expert(idx, tokens, k, down.experts);
  for_groups_and_chunks(g, n, [&](uint32_t e, uint32_t tj, int r0, int r1) {
    qmv_rows(bits, h + size_t(tj) * K, down.at(e), r0, r1, K, gs, y.data() + size_t(tj) * n + r0);
  });
  combine_rows(y.data(), idx, wts, out, tokens, k, n, down.experts);
}

// ---- fast (validated) paths: the same work split, rows from qmv_fast_rows ----

// Prepared activations (qmv_fast.h) of `n` rows of length K; row i is the activation src(i).
struct Prepared {
  std::vector<float> xp, xs;
  int K = 0, G = 0;
  const float* p(size_t i) const { return xp.data() + i * K; }
  const float* s(size_t i) const { return xs.data() + i * G; }
};

template <class Src>
Prepared prepare(size_t n, int K, int gs, int bits, Src&& src) {
  Prepared pr;
  pr.K = K;
  pr.G = K / gs;
  pr.xp.resize(n * K);
  pr.xs.resize(n * pr.G);
  auto one = [&](size_t i) { zmlx_qmv_fast_prep(src(i), K, gs, bits, pr.xp.data() + i * K, pr.xs.data() + i * pr.G); };
  if (n >= 16) parallel_items(n, one);
  else for (size_t i = 0; i < n; ++i) one(i);
  return pr;
}

// Per-thread scratch for row blocks (grows to the largest group seen).
float* scratch(size_t n, int which) {
  thread_local std::vector<float> buf[2];
  if (buf[which].size() < n) buf[which].resize(n);
  return buf[which].data();
}

void run_swiglu_fast(int bits, const float* x, const uint32_t* idx, float* out, int tokens, int k, int K, int gs,
                     const ExpertMats& gate, const ExpertMats& up) {
  int n = int(gate.rows);
  nan_bad_tokens(idx, out, tokens, k, gate.experts, n, k);
  ExpertGroups g = group_by_expert(idx, tokens, k, gate.experts);
  // One prepared activation per grouped slot, so each expert's tokens are contiguous.
  Prepared pr = prepare(g.slots.size(), K, gs, bits, [&](size_t s) { return x + size_t(g.slots[s] / k) * K; });
  int chunks = (n + CHUNK - 1) / CHUNK;
  parallel_items(g.expert.size() * chunks, [&](size_t it) {
    size_t gi = it / chunks, b = g.begin[gi], cnt = g.begin[gi + 1] - b;
    int r0 = int(it % chunks) * CHUNK, r1 = std::min(n, r0 + CHUNK);
    float* gv = scratch(cnt * CHUNK, 0);
    float* uv = scratch(cnt * CHUNK, 1);
    qmv_fast_rows(bits, pr.p(b), pr.s(b), int(cnt), K, gate.at(g.expert[gi]), r0, r1, K, gs, gv, CHUNK);
    qmv_fast_rows(bits, pr.p(b), pr.s(b), int(cnt), K, up.at(g.expert[gi]), r0, r1, K, gs, uv, CHUNK);
    for (size_t i = 0; i < cnt; ++i) {
      float* o = out + size_t(g.slots[b + i]) * n;
      const float* gr = gv + i * CHUNK;
      const float* ur = uv + i * CHUNK;
      for (int r = r0; r < r1; ++r)
        o[r] = dt::Multiply{}(dt::Multiply{}(gr[r - r0], dt::Sigmoid{}(gr[r - r0])), ur[r - r0]);
    }
  });
}

void run_combine_fast(int bits, const float* h, const uint32_t* idx, const float* wts, float* out, int tokens, int k,
                      int K, int gs, const ExpertMats& down) {
  int n = int(down.rows);
  int chunks = (n + CHUNK - 1) / CHUNK;
  if (tokens == 1) {
    bool ok = indices_ok(idx, k, down.experts);
    if (!ok) {
      std::fill(out, out + n, std::numeric_limits<float>::quiet_NaN());
      return;
    }
    Prepared pr = prepare(size_t(k), K, gs, bits, [&](size_t j) { return h + j * K; });
    parallel_for(size_t(chunks), [&](size_t i0, size_t i1) {
      float y[CHUNK];
      for (size_t c = i0; c < i1; ++c) {
        int r0 = int(c) * CHUNK, r1 = std::min(n, r0 + CHUNK);
        float* o = out + r0;
        std::fill(o, o + (r1 - r0), 0.0f);
        for (int j = 0; j < k; ++j) {
          qmv_fast_rows(bits, pr.p(j), pr.s(j), 1, K, down.at(idx[j]), r0, r1, K, gs, y, CHUNK);
          for (int r = 0; r < r1 - r0; ++r) o[r] += y[r] * wts[j];
        }
      }
    });
    return;
  }
  std::vector<float> y(size_t(tokens) * k * n);
  ExpertGroups g = group_by_expert(idx, tokens, k, down.experts);
  Prepared pr = prepare(g.slots.size(), K, gs, bits, [&](size_t s) { return h + size_t(g.slots[s]) * K; });
  parallel_items(g.expert.size() * chunks, [&](size_t it) {
    size_t gi = it / chunks, b = g.begin[gi], cnt = g.begin[gi + 1] - b;
    int r0 = int(it % chunks) * CHUNK, r1 = std::min(n, r0 + CHUNK);
    float* yv = scratch(cnt * CHUNK, 0);
    qmv_fast_rows(bits, pr.p(b), pr.s(b), int(cnt), K, down.at(g.expert[gi]), r0, r1, K, gs, yv, CHUNK);
    for (size_t i = 0; i < cnt; ++i)
      std::copy(yv + i * CHUNK, yv + i * CHUNK + (r1 - r0), y.data() + size_t(g.slots[b + i]) * n + r0);
  });
  combine_rows(y.data(), idx, wts, out, tokens, k, n, down.experts);
}

void run_linear_fast(int bits, const float* x, const ZmlxQMat& m, float* o, int tokens, int K, int n, int gs) {
  Prepared pr = prepare(size_t(tokens), K, gs, bits, [&](size_t t) { return x + t * K; });
  int chunks = (n + CHUNK - 1) / CHUNK;
  parallel_items(size_t(chunks), [&](size_t c) {
    int r0 = int(c) * CHUNK, r1 = std::min(n, r0 + CHUNK);
    qmv_fast_rows(bits, pr.p(0), pr.s(0), tokens, K, m, r0, r1, K, gs, o + r0, n);
  });
}

using zmlx_cpu::dense;

// inputs: x [T, K] f32, idx [T, k] u32, wg, sg, bg, wu, su, bu  ->  h [T, k, N] f32
class QmvSwiglu : public mx::UnaryPrimitive {
 public:
  QmvSwiglu(mx::Stream s, int gs, int bits, bool fast = false)
      : mx::UnaryPrimitive(s), gs_(gs), bits_(bits), fast_(fast && fast_supported(bits, gs)) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.dispatch([in, o = out.data<float>(), gs = gs_, bits = bits_, fast = fast_]() {
      std::vector<float> xb;
      std::vector<uint32_t> ib;
      const float* x = dense(in[0], xb);
      const uint32_t* idx = dense(in[1], ib);
      int tokens = in[1].shape(0), k = in[1].shape(1), K = in[0].shape(1);
      auto run = fast ? run_swiglu_fast : run_swiglu;
      run(bits, x, idx, o, tokens, k, K, gs, expert_mats(in[2], in[3], in[4]), expert_mats(in[5], in[6], in[7]));
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("zmlx qmv_swiglu: CPU-only primitive; GPU backends use the CUDA/Metal kernel");
  }
  const char* name() const override { return fast_ ? "ZmlxQmvSwigluFast" : "ZmlxQmvSwiglu"; }
  bool is_equivalent(const mx::Primitive& o) const override {
    auto& p = static_cast<const QmvSwiglu&>(o);
    return p.gs_ == gs_ && p.bits_ == bits_ && p.fast_ == fast_;
  }

 private:
  int gs_, bits_;
  bool fast_;
};

// inputs: h [T, k, K] f32, idx [T, k] u32, w [T, k] f32, wd, sd, bd  ->  out [T, N] f32
class QmvCombine : public mx::UnaryPrimitive {
 public:
  QmvCombine(mx::Stream s, int gs, int bits, bool fast = false)
      : mx::UnaryPrimitive(s), gs_(gs), bits_(bits), fast_(fast && fast_supported(bits, gs)) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.dispatch([in, o = out.data<float>(), gs = gs_, bits = bits_, fast = fast_]() {
      std::vector<float> hb, wb;
      std::vector<uint32_t> ib;
      const float* h = dense(in[0], hb);
      const uint32_t* idx = dense(in[1], ib);
      const float* w = dense(in[2], wb);
      int tokens = in[1].shape(0), k = in[1].shape(1), K = in[0].shape(2);
      auto run = fast ? run_combine_fast : run_combine;
      run(bits, h, idx, w, o, tokens, k, K, gs, expert_mats(in[3], in[4], in[5]));
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("zmlx qmv_combine: CPU-only primitive; GPU backends use the CUDA/Metal kernel");
  }
  const char* name() const override { return fast_ ? "ZmlxQmvCombineFast" : "ZmlxQmvCombine"; }
  bool is_equivalent(const mx::Primitive& o) const override {
    auto& p = static_cast<const QmvCombine&>(o);
    return p.gs_ == gs_ && p.bits_ == bits_ && p.fast_ == fast_;
  }

 private:
  int gs_, bits_;
  bool fast_;
};

// inputs: x [..., K] f32 (T rows), w [N, K*bits/32] u32, s, b [N, K/gs] f32  ->  out [..., N] f32
// (quantized_matmul(x, w, transpose=true) for a few rows: each row is `_qmm_t`'s sum). Any rank,
// so the caller needs no reshape nodes around it.
class QmvLinear : public mx::UnaryPrimitive {
 public:
  QmvLinear(mx::Stream s, int gs, int bits, bool fast = false)
      : mx::UnaryPrimitive(s), gs_(gs), bits_(bits), fast_(fast && fast_supported(bits, gs)) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.dispatch([in, o = out.data<float>(), gs = gs_, bits = bits_, fast = fast_]() {
      std::vector<float> xb;
      const float* x = dense(in[0], xb);
      int K = in[0].shape(-1), n = in[1].shape(0), tokens = int(in[0].size() / size_t(K));
      ZmlxQMat m{in[1].data<uint8_t>(), in[2].data<void>(),  in[3].data<void>(), long(in[1].shape(1)) * 4,
                 long(in[2].shape(1)),    scale_type(in[2].dtype())};
      if (fast) return run_linear_fast(bits, x, m, o, tokens, K, n, gs);
      // Chunk-major: a chunk's rows stay in cache while every token (prefill) runs over them.
      int chunks = (n + CHUNK - 1) / CHUNK;
      parallel_items(size_t(chunks), [&](size_t c) {
        int r0 = int(c) * CHUNK, r1 = std::min(n, r0 + CHUNK);
        for (int t = 0; t < tokens; ++t) qmv_rows(bits, x + size_t(t) * K, m, r0, r1, K, gs, o + size_t(t) * n + r0);
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("zmlx qmv_linear: CPU-only primitive");
  }
  const char* name() const override { return fast_ ? "ZmlxQmvLinearFast" : "ZmlxQmvLinear"; }
  bool is_equivalent(const mx::Primitive& o) const override {
    auto& p = static_cast<const QmvLinear&>(o);
    return p.gs_ == gs_ && p.bits_ == bits_ && p.fast_ == fast_;
  }

 private:
  int gs_, bits_;
  bool fast_;
};


void check_expert(const char* op, const mx::array& w, const mx::array& s, const mx::array& b, int K, int gs, int bits) {
  if (w.ndim() != 3 || w.dtype() != mx::uint32 || s.ndim() != 3 || b.shape() != s.shape())
    throw std::invalid_argument(std::string(op) + ": expected packed uint32 weights [E, N, K*bits/32] with scales/biases [E, N, K/group]");
  if (scale_type(s.dtype()) < 0 || b.dtype() != s.dtype())
    throw std::invalid_argument(std::string(op) + ": scales and biases must be float32, bfloat16 or float16, both the same");
  if (gs <= 0 || K % gs != 0 || gs % (32 / bits) != 0 || w.shape(2) * 32 != K * bits || s.shape(2) != K / gs ||
      s.shape(0) != w.shape(0) || s.shape(1) != w.shape(1))
    throw std::invalid_argument(std::string(op) + ": weight shapes do not match K, group size and bits");
}

}  // namespace

// The `fast` attention core (attend_fast.inc), declared in attend_fast.h: the same ISA choice
// as the row kernels (its AVX2 build needs FMA too; AVX-512 CPUs run the AVX2 one).
void zmlx_attend_fast(const float* q, int rep, int D, const float* K, const float* V, int nk, float* s, float* out) {
#if defined(__x86_64__)
  if ((isa() == Isa::Avx2 || isa() == Isa::Avx512) && __builtin_cpu_supports("fma"))
    return zmlx_attend_fast_avx2(q, rep, D, K, V, nk, s, out);
#endif
  zmlx_attend_fast_base(q, rep, D, K, V, nk, s, out);
}

// The worker count the row kernels use (recorded in ledger lines and capsules).
extern "C" int zmlx_cpu_threads() { return zmlx_pool::threads(); }

extern "C" int zmlx_cpu_qmv_swiglu(mlx_array* res, const mlx_array x, const mlx_array idx, const mlx_array wg,
                                   const mlx_array sg, const mlx_array bg, const mlx_array wu, const mlx_array su,
                                   const mlx_array bu, int group_size, int bits, const mlx_stream s) {
  return zmlx_cpu::guarded([&] {
    auto& st = mlx_stream_get_(s);
    auto& x0 = mlx_array_get_(x);
    auto& i0 = mlx_array_get_(idx);
    if (bits != 2 && bits != 4 && bits != 8) throw std::invalid_argument("zmlx qmv_swiglu: bits must be 2, 4 or 8");
    if (x0.ndim() != 2 || x0.dtype() != mx::float32) throw std::invalid_argument("zmlx qmv_swiglu: x must be float32 [T, K]");
    if (i0.ndim() != 2 || i0.dtype() != mx::uint32 || i0.shape(0) != x0.shape(0))
      throw std::invalid_argument("zmlx qmv_swiglu: indices must be uint32 [T, k]");
    int K = x0.shape(1);
    auto& g = mlx_array_get_(wg);
    auto& u = mlx_array_get_(wu);
    check_expert("zmlx qmv_swiglu (gate)", g, mlx_array_get_(sg), mlx_array_get_(bg), K, group_size, bits);
    check_expert("zmlx qmv_swiglu (up)", u, mlx_array_get_(su), mlx_array_get_(bu), K, group_size, bits);
    if (g.shape() != u.shape()) throw std::invalid_argument("zmlx qmv_swiglu: gate and up weights differ in shape");
    std::vector<mx::array> ins = {x0, i0};
    for (auto a : {wg, sg, bg, wu, su, bu}) ins.push_back(whole(mlx_array_get_(a), st));
    mx::Shape shape = {x0.shape(0), i0.shape(1), g.shape(1)};
    mlx_array_set_(*res, mx::array(shape, mx::float32, std::make_shared<QmvSwiglu>(st, group_size, bits), ins));
  });
}

extern "C" int zmlx_cpu_qmv_combine(mlx_array* res, const mlx_array h, const mlx_array idx, const mlx_array w,
                                    const mlx_array wd, const mlx_array sd, const mlx_array bd, int group_size, int bits,
                                    const mlx_stream s) {
  return zmlx_cpu::guarded([&] {
    auto& st = mlx_stream_get_(s);
    auto& h0 = mlx_array_get_(h);
    auto& i0 = mlx_array_get_(idx);
    auto& w0 = mlx_array_get_(w);
    if (bits != 2 && bits != 4 && bits != 8) throw std::invalid_argument("zmlx qmv_combine: bits must be 2, 4 or 8");
    if (h0.ndim() != 3 || h0.dtype() != mx::float32) throw std::invalid_argument("zmlx qmv_combine: h must be float32 [T, k, K]");
    if (i0.ndim() != 2 || i0.dtype() != mx::uint32 || i0.shape(0) != h0.shape(0) || i0.shape(1) != h0.shape(1))
      throw std::invalid_argument("zmlx qmv_combine: indices must be uint32 [T, k] matching h");
    if (w0.shape() != i0.shape() || w0.dtype() != mx::float32)
      throw std::invalid_argument("zmlx qmv_combine: combine weights must be float32 [T, k]");
    auto& d = mlx_array_get_(wd);
    check_expert("zmlx qmv_combine (down)", d, mlx_array_get_(sd), mlx_array_get_(bd), h0.shape(2), group_size, bits);
    std::vector<mx::array> ins = {h0, i0, w0};
    for (auto a : {wd, sd, bd}) ins.push_back(whole(mlx_array_get_(a), st));
    mx::Shape shape = {h0.shape(0), d.shape(1)};
    mlx_array_set_(*res, mx::array(shape, mx::float32, std::make_shared<QmvCombine>(st, group_size, bits), ins));
  });
}

extern "C" int zmlx_cpu_qmv_linear(mlx_array* res, const mlx_array x, const mlx_array w, const mlx_array sc,
                                   const mlx_array bi, int group_size, int bits, const mlx_stream s) {
  return zmlx_cpu::guarded([&] {
    auto& st = mlx_stream_get_(s);
    auto& x0 = mlx_array_get_(x);
    auto& w0 = mlx_array_get_(w);
    auto& s0 = mlx_array_get_(sc);
    auto& b0 = mlx_array_get_(bi);
    if (bits != 2 && bits != 4 && bits != 8) throw std::invalid_argument("zmlx qmv_linear: bits must be 2, 4 or 8");
    if (x0.ndim() < 1 || x0.dtype() != mx::float32 || x0.shape(-1) < 1)
      throw std::invalid_argument("zmlx qmv_linear: x must be float32 [..., K]");
    int K = x0.shape(-1);
    if (w0.ndim() != 2 || w0.dtype() != mx::uint32 || s0.ndim() != 2 || b0.shape() != s0.shape() ||
        scale_type(s0.dtype()) < 0 || b0.dtype() != s0.dtype() || group_size <= 0 || K % group_size != 0 ||
        w0.shape(1) * 32 != K * bits || s0.shape(1) != K / group_size || s0.shape(0) != w0.shape(0))
      throw std::invalid_argument(
          "zmlx qmv_linear: weight [N, K*bits/32] uint32 with float32/bfloat16/float16 scales/biases [N, K/group] "
          "(one dtype) expected");
    std::vector<mx::array> ins = {x0, whole(w0, st), whole(s0, st), whole(b0, st)};
    mx::Shape shape = x0.shape();
    shape.back() = w0.shape(0);
    mlx_array_set_(*res, mx::array(shape, mx::float32, std::make_shared<QmvLinear>(st, group_size, bits), ins));
  });
}

// The `fast` (validated) variants: the same checks and inputs (the exact entry point builds the
// node), then the node's primitive is swapped for the fast one. Shapes the fast kernels do not
// take (fast_supported) run the exact kernels.
namespace {
template <class Prim>
int make_fast(mlx_array* res, const mlx_stream s, int group_size, int bits) {
  return zmlx_cpu::guarded([&] {
    auto& a = mlx_array_get_(*res);
    auto prim = std::make_shared<Prim>(mlx_stream_get_(s), group_size, bits, true);
    mlx_array_set_(*res, mx::array(a.shape(), a.dtype(), prim, a.inputs()));
  });
}
}  // namespace

extern "C" int zmlx_cpu_qmv_fast_supported(int bits, int group_size) { return fast_supported(bits, group_size); }

extern "C" int zmlx_cpu_qmv_swiglu_fast(mlx_array* res, const mlx_array x, const mlx_array idx, const mlx_array wg,
                                        const mlx_array sg, const mlx_array bg, const mlx_array wu, const mlx_array su,
                                        const mlx_array bu, int group_size, int bits, const mlx_stream s) {
  if (int rc = zmlx_cpu_qmv_swiglu(res, x, idx, wg, sg, bg, wu, su, bu, group_size, bits, s)) return rc;
  return make_fast<QmvSwiglu>(res, s, group_size, bits);
}

extern "C" int zmlx_cpu_qmv_combine_fast(mlx_array* res, const mlx_array h, const mlx_array idx, const mlx_array w,
                                         const mlx_array wd, const mlx_array sd, const mlx_array bd, int group_size,
                                         int bits, const mlx_stream s) {
  if (int rc = zmlx_cpu_qmv_combine(res, h, idx, w, wd, sd, bd, group_size, bits, s)) return rc;
  return make_fast<QmvCombine>(res, s, group_size, bits);
}

extern "C" int zmlx_cpu_qmv_linear_fast(mlx_array* res, const mlx_array x, const mlx_array w, const mlx_array sc,
                                        const mlx_array bi, int group_size, int bits, const mlx_stream s) {
  if (int rc = zmlx_cpu_qmv_linear(res, x, w, sc, bi, group_size, bits, s)) return rc;
  return make_fast<QmvLinear>(res, s, group_size, bits);
}
