// CPU implementations of zmlx's fused kernels, as MLX primitives: each runs as ONE node of the
// lazy MLX graph on the CPU backend. Bit-identity with the stock op chain comes from calling
// MLX's own scalar functors (detail::Sigmoid, Multiply, Add from the wheel's headers) in the
// same order and dtype the chain rounds in; on x86 MLX's CPU ops are scalar loops over the same
// functors (simd::max_size<T> == 1). Compiled with -ffp-contract=off: no FMA contraction.
#include <algorithm>
#include <numeric>
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

#include "zmlx_common.h"

namespace mx = mlx::core;
namespace dt = mlx::core::detail;

namespace {

// Runs `f.template operator()<T>()` for the float dtypes MLX models use.
template <class F>
void dispatch_float(mx::Dtype d, const char* op, F&& f) {
  switch (d) {
    case mx::float32: f.template operator()<float>(); break;
    case mx::float16: f.template operator()<mx::float16_t>(); break;
    case mx::bfloat16: f.template operator()<mx::bfloat16_t>(); break;
    default: throw std::invalid_argument(std::string(op) + ": expected float32, float16 or bfloat16 inputs");
  }
}

// silu(gate) * up with silu(g) = g * sigmoid(g): three roundings to T, as the stock chain.
class SwiGlu : public mx::UnaryPrimitive {
 public:
  explicit SwiGlu(mx::Stream s) : mx::UnaryPrimitive(s) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    size_t n = out.size();
    dispatch_float(out.dtype(), "zmlx swiglu", [&]<typename T>() {
      enc.dispatch([g = in[0].data<T>(), u = in[1].data<T>(), o = out.data<T>(), n]() {
        for (size_t i = 0; i < n; ++i) {
          T s = dt::Sigmoid{}(g[i]);
          T a = dt::Multiply{}(g[i], s);
          o[i] = dt::Multiply{}(a, u[i]);
        }
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("zmlx swiglu: this primitive is CPU-only; GPU backends use the CUDA/Metal kernel");
  }
  const char* name() const override { return "ZmlxSwiGlu"; }
  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

// out[r, d] = sum_j y[r, j, d] * w[r, j], accumulated in T from 0 in slot order j = 0..k-1
// (MLX's strided sum over axis -2), each product rounded to T first (a separate multiply).
// T = promote(y, w); inputs are cast to T beforehand, exactly as MLX's binary op would.
class MoeCombine : public mx::UnaryPrimitive {
 public:
  MoeCombine(mx::Stream s, int k, int d) : mx::UnaryPrimitive(s), k_(k), d_(d) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    size_t rows = out.size() / d_;
    dispatch_float(out.dtype(), "zmlx moe_combine", [&]<typename T>() {
      enc.dispatch([y = in[0].data<T>(), w = in[1].data<T>(), o = out.data<T>(), rows, k = k_, d = d_]() {
        for (size_t r = 0; r < rows; ++r) {
          const T* yr = y + r * size_t(k) * d;
          const T* wr = w + r * size_t(k);
          T* orow = o + r * size_t(d);
          for (int c = 0; c < d; ++c) orow[c] = T(0);
          for (int j = 0; j < k; ++j)
            for (int c = 0; c < d; ++c)
              orow[c] = dt::Add{}(orow[c], dt::Multiply{}(yr[size_t(j) * d + c], wr[j]));
        }
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("zmlx moe_combine: this primitive is CPU-only; GPU backends use the CUDA/Metal kernel");
  }
  const char* name() const override { return "ZmlxMoeCombine"; }
  bool is_equivalent(const mx::Primitive& o) const override {
    auto& c = static_cast<const MoeCombine&>(o);
    return c.k_ == k_ && c.d_ == d_;
  }

 private:
  int k_, d_;
};


// ---------------------------------------------------------------- moe_router
// Softmax-family routing in one node: what mlx-lm's op chain computes, row by row.
//   kind 0 (Mixtral): top-k of the logits (argpartition(-g, k-1)[:k]), softmax(precise) over them
//   kind 1 (Qwen3):   p = softmax(g, precise); argpartition(p, -k)[-k:]; optional w / sum(w)
//   kind 2 (Qwen2):   p = softmax(g, precise); argpartition(-p, k-1)[:k]; no renormalisation
// Softmax mirrors MLX's CPU kernel with simd width 1 (max, exp(x - max) with MLX's simd::exp,
// sequential sum, x * (1 / sum)); the selection is MLX's argpartition: iota + std::nth_element
// with the comparator (v1 < v2 || (v1 == v2 && a < b)), NaNs last, so the k slot order is the same.

// softmax(precise=True) of n values of T, written to out (T).
template <typename T>
void softmax_row(const T* in, T* out, int n, float* scratch) {
  namespace sd = mx::simd;
  sd::Simd<float, 1> vmax(-std::numeric_limits<float>::infinity());
  for (int i = 0; i < n; ++i) vmax = sd::maximum(sd::Simd<float, 1>(static_cast<float>(in[i])), vmax);
  float maximum = vmax.value;
  sd::Simd<float, 1> norm(0.0f);
  for (int i = 0; i < n; ++i) {
    sd::Simd<float, 1> e = sd::exp(sd::Simd<float, 1>(static_cast<float>(in[i])) - maximum);
    scratch[i] = e.value;
    norm = norm + e;
  }
  float inv = 1 / norm.value;
  for (int i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      // Same-type path: the stored exp is scaled in place.
      out[i] = scratch[i] * inv;
    } else {
      sd::Simd<float, 1> e = sd::exp(sd::Simd<float, 1>(static_cast<float>(in[i])) - maximum) * inv;
      out[i] = static_cast<T>(e.value);
    }
  }
}

// MLX's argpartition of one row: returns the permutation after nth_element at kth.
template <typename T>
void argpartition_row(const T* v, uint32_t* idx, int n, int kth) {
  std::iota(idx, idx + n, uint32_t(0));
  std::nth_element(idx, idx + kth, idx + n, [v](uint32_t a, uint32_t b) {
    auto v1 = v[a];
    auto v2 = v[b];
    if (std::isnan(static_cast<float>(v1))) return false;
    if (std::isnan(static_cast<float>(v2))) return true;
    return v1 < v2 || (v1 == v2 && a < b);
  });
}

class MoeRouter : public mx::Primitive {
 public:
  MoeRouter(mx::Stream s, int kind, int k, bool norm) : mx::Primitive(s), kind_(kind), k_(k), norm_(norm) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) override {
    auto& idx_out = outs[0];
    auto& w_out = outs[1];
    idx_out.set_data(mx::allocator::malloc(idx_out.nbytes()));
    w_out.set_data(mx::allocator::malloc(w_out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    int e = in[0].shape(-1);
    size_t rows = in[0].size() / e;
    dispatch_float(in[0].dtype(), "zmlx moe_router", [&]<typename T>() {
      enc.dispatch([g = in[0].data<T>(), ids = idx_out.data<uint32_t>(), ws = w_out.data<T>(), rows, e,
                    k = k_, kind = kind_, norm = norm_]() {
        std::vector<T> probs(e), keyed(e), sel(k);
        std::vector<float> scratch(e);
        std::vector<uint32_t> perm(e);
        for (size_t r = 0; r < rows; ++r) {
          const T* row = g + r * e;
          uint32_t* ri = ids + r * k;
          T* rw = ws + r * k;
          if (kind == 0) {
            for (int i = 0; i < e; ++i) keyed[i] = dt::Negative{}(row[i]);
            argpartition_row(keyed.data(), perm.data(), e, k - 1);
            for (int j = 0; j < k; ++j) { ri[j] = perm[j]; sel[j] = row[perm[j]]; }
            softmax_row(sel.data(), rw, k, scratch.data());
            continue;
          }
          softmax_row(row, probs.data(), e, scratch.data());
          if (kind == 1) {
            argpartition_row(probs.data(), perm.data(), e, e - k);
            for (int j = 0; j < k; ++j) { ri[j] = perm[e - k + j]; rw[j] = probs[ri[j]]; }
            if (norm) {
              T total = T(0);
              for (int j = 0; j < k; ++j) total = dt::Add{}(total, rw[j]);
              for (int j = 0; j < k; ++j) rw[j] = dt::Divide{}(rw[j], total);
            }
          } else {
            for (int i = 0; i < e; ++i) keyed[i] = dt::Negative{}(probs[i]);
            argpartition_row(keyed.data(), perm.data(), e, k - 1);
            for (int j = 0; j < k; ++j) { ri[j] = perm[j]; rw[j] = probs[perm[j]]; }
          }
        }
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("zmlx moe_router: this primitive is CPU-only; GPU backends use the CUDA/Metal kernel");
  }
  const char* name() const override { return "ZmlxMoeRouter"; }
  bool is_equivalent(const mx::Primitive& o) const override {
    auto& r = static_cast<const MoeRouter&>(o);
    return r.kind_ == kind_ && r.k_ == k_ && r.norm_ == norm_;
  }

 private:
  int kind_, k_;
  bool norm_;
};

// ---------------------------------------------------------------- sigmoid_router
// DeepSeek-V3 / Kimi-K2 / GLM group_expert_select on gate logits, row by row:
//   orig = sigmoid(f32(g)); s = orig + bias; if n_group > 1: group score = sum of its top-2 s,
//   the (n_group - topk_group) lowest groups (ties: lower index first) get s = 0.0;
//   inds = argpartition(-s, k-1)[:k] (MLX's nth_element order); w = orig[inds];
//   if k > 1 and norm: w /= (sum(w) [+ eps]); w *= rsf. All in f32 with MLX's functors.
class SigmoidRouter : public mx::Primitive {
 public:
  SigmoidRouter(mx::Stream s, int k, int n_group, int topk_group, bool norm, float eps, bool has_eps, float rsf)
      : mx::Primitive(s), k_(k), ng_(n_group), tg_(topk_group), norm_(norm), eps_(eps), has_eps_(has_eps), rsf_(rsf) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) override {
    auto& idx_out = outs[0];
    auto& w_out = outs[1];
    idx_out.set_data(mx::allocator::malloc(idx_out.nbytes()));
    w_out.set_data(mx::allocator::malloc(w_out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    int e = in[0].shape(-1);
    size_t rows = in[0].size() / e;
    dispatch_float(in[0].dtype(), "zmlx sigmoid_router", [&]<typename T>() {
      enc.dispatch([g = in[0].data<T>(), bias = in[1].data<float>(), ids = idx_out.data<uint32_t>(), ws = w_out.data<float>(),
                    rows, e, k = k_, ng = ng_, tg = tg_, norm = norm_, eps = eps_, has_eps = has_eps_, rsf = rsf_]() {
        std::vector<float> orig(e), s(e), neg(e), gscore(ng);
        std::vector<uint32_t> perm(e), gperm(ng);
        int per = e / ng;
        for (size_t r = 0; r < rows; ++r) {
          const T* row = g + r * e;
          for (int i = 0; i < e; ++i) {
            orig[i] = dt::Sigmoid{}(static_cast<float>(row[i]));
            s[i] = dt::Add{}(orig[i], bias[i]);
          }
          if (ng > 1) {
            for (int gi = 0; gi < ng; ++gi) {
              // topk(.., 2) then sum: the two largest values (duplicates count twice), 0 + a + b.
              float a = -std::numeric_limits<float>::infinity(), b = a;
              for (int j = 0; j < per; ++j) {
                float v = s[gi * per + j];
                if (v > a) { b = a; a = v; } else if (v > b) { b = v; }
              }
              gscore[gi] = dt::Add{}(dt::Add{}(0.0f, b), a);
            }
            int drop = ng - tg;
            if (drop > 0) {
              argpartition_row(gscore.data(), gperm.data(), ng, drop - 1);
              for (int d = 0; d < drop; ++d)
                for (int j = 0; j < per; ++j) s[gperm[d] * per + j] = 0.0f;
            }
          }
          for (int i = 0; i < e; ++i) neg[i] = dt::Negative{}(s[i]);
          argpartition_row(neg.data(), perm.data(), e, k - 1);
          uint32_t* ri = ids + r * k;
          float* rw = ws + r * k;
          for (int j = 0; j < k; ++j) { ri[j] = perm[j]; rw[j] = orig[perm[j]]; }
          if (k > 1 && norm) {
            float den = 0.0f;
            for (int j = 0; j < k; ++j) den = dt::Add{}(den, rw[j]);
            if (has_eps) den = dt::Add{}(den, eps);
            for (int j = 0; j < k; ++j) rw[j] = dt::Divide{}(rw[j], den);
          }
          for (int j = 0; j < k; ++j) rw[j] = dt::Multiply{}(rw[j], rsf);
        }
      });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("zmlx sigmoid_router: this primitive is CPU-only; GPU backends use the CUDA/Metal kernel");
  }
  const char* name() const override { return "ZmlxSigmoidRouter"; }
  bool is_equivalent(const mx::Primitive& o) const override {
    auto& r = static_cast<const SigmoidRouter&>(o);
    return r.k_ == k_ && r.ng_ == ng_ && r.tg_ == tg_ && r.norm_ == norm_ && r.eps_ == eps_ && r.has_eps_ == has_eps_ && r.rsf_ == rsf_;
  }

 private:
  int k_, ng_, tg_;
  bool norm_;
  float eps_;
  bool has_eps_;
  float rsf_;
};

}  // namespace

extern "C" int zmlx_cpu_swiglu(mlx_array* res, const mlx_array gate, const mlx_array up, const mlx_stream s) {
  return zmlx_cpu::guarded([&] {
    auto& st = mlx_stream_get_(s);
    auto& g0 = mlx_array_get_(gate);
    auto& u0 = mlx_array_get_(up);
    if (g0.shape() != u0.shape() || g0.dtype() != u0.dtype())
      throw std::invalid_argument("zmlx swiglu: gate and up must have the same shape and dtype");
    auto g = mx::contiguous(g0, false, st);
    auto u = mx::contiguous(u0, false, st);
    mlx_array_set_(*res, mx::array(g.shape(), g.dtype(), std::make_shared<SwiGlu>(st), {g, u}));
  });
}

extern "C" int zmlx_cpu_moe_combine(mlx_array* res, const mlx_array y, const mlx_array w, const mlx_stream s) {
  return zmlx_cpu::guarded([&] {
    auto& st = mlx_stream_get_(s);
    auto& y0 = mlx_array_get_(y);
    auto& w0 = mlx_array_get_(w);
    if (y0.ndim() < 2 || w0.ndim() != y0.ndim() - 1)
      throw std::invalid_argument("zmlx moe_combine: expected y [..., k, D] and weights [..., k]");
    for (int i = 0; i < w0.ndim(); ++i)
      if (w0.shape(i) != y0.shape(i))
        throw std::invalid_argument("zmlx moe_combine: weights shape must equal y's shape without the last axis");
    auto t = mx::promote_types(y0.dtype(), w0.dtype());
    auto yc = mx::contiguous(mx::astype(y0, t, st), false, st);
    auto wc = mx::contiguous(mx::astype(w0, t, st), false, st);
    int k = y0.shape(-2), d = y0.shape(-1);
    auto shape = y0.shape();
    shape.erase(shape.end() - 2);
    mlx_array_set_(*res, mx::array(shape, t, std::make_shared<MoeCombine>(st, k, d), {yc, wc}));
  });
}

extern "C" int zmlx_cpu_moe_router(mlx_array* indices, mlx_array* weights, const mlx_array logits, int kind, int k,
                                   bool norm, const mlx_stream s) {
  return zmlx_cpu::guarded([&] {
    auto& st = mlx_stream_get_(s);
    auto g = mx::contiguous(mlx_array_get_(logits), false, st);
    int e = g.ndim() > 0 ? g.shape(-1) : 0;
    if (kind < 0 || kind > 2) throw std::invalid_argument("zmlx moe_router: unknown router kind");
    if (k < 1 || k > e) throw std::invalid_argument("zmlx moe_router: k must be in [1, number of experts]");
    auto shape = g.shape();
    shape.back() = k;
    auto outs = mx::array::make_arrays({shape, shape}, {mx::uint32, g.dtype()},
                                       std::make_shared<MoeRouter>(st, kind, k, norm), {g});
    mlx_array_set_(*indices, outs[0]);
    mlx_array_set_(*weights, outs[1]);
  });
}

extern "C" int zmlx_cpu_sigmoid_router(mlx_array* indices, mlx_array* weights, const mlx_array logits, const mlx_array bias,
                                       int k, int n_group, int topk_group, bool norm, float eps, bool has_eps, float rsf,
                                       const mlx_stream s) {
  return zmlx_cpu::guarded([&] {
    auto& st = mlx_stream_get_(s);
    auto g = mx::contiguous(mlx_array_get_(logits), false, st);
    auto b = mx::contiguous(mx::astype(mlx_array_get_(bias), mx::float32, st), false, st);
    int e = g.ndim() > 0 ? g.shape(-1) : 0;
    if (b.ndim() != 1 || b.shape(0) != e) throw std::invalid_argument("zmlx sigmoid_router: bias must be [E]");
    if (k < 1 || k > e) throw std::invalid_argument("zmlx sigmoid_router: k must be in [1, E]");
    if (n_group < 1 || e % n_group != 0 || topk_group < 1 || topk_group > n_group)
      throw std::invalid_argument("zmlx sigmoid_router: need n_group | E and 1 <= topk_group <= n_group");
    auto shape = g.shape();
    shape.back() = k;
    auto outs = mx::array::make_arrays({shape, shape}, {mx::uint32, mx::float32},
        std::make_shared<SigmoidRouter>(st, k, n_group, topk_group, norm, eps, has_eps, rsf), {g, b});
    mlx_array_set_(*indices, outs[0]);
    mlx_array_set_(*weights, outs[1]);
  });
}
