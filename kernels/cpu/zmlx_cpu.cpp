// CPU implementations of zmlx's fused kernels, as MLX primitives: each runs as ONE node of the
// lazy MLX graph on the CPU backend. Bit-identity with the stock op chain comes from calling
// MLX's own scalar functors (detail::Sigmoid, Multiply, Add from the wheel's headers) in the
// same order and dtype the chain rounds in; on x86 MLX's CPU ops are scalar loops over the same
// functors (simd::max_size<T> == 1). Compiled with -ffp-contract=off: no FMA contraction.
#include <stdexcept>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/binary_ops.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/backend/cpu/unary_ops.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

#include "mlx/c/error.h"
#include "mlx/c/private/array.h"
#include "mlx/c/private/stream.h"

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

template <class F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (std::exception& e) {
    mlx_error("%s", e.what());
    return 1;
  }
}

}  // namespace

extern "C" int zmlx_cpu_swiglu(mlx_array* res, const mlx_array gate, const mlx_array up, const mlx_stream s) {
  return guarded([&] {
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
  return guarded([&] {
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
