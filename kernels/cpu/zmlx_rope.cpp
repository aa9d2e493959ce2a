// rope_decode: the MLA decode step's positional part in one MLX primitive (CPU):
//   q_out = rope(q_pe [* mscale]) * softmax_scale,   k_out = rope(k_pe [* mscale])
// for q_pe [B, H, L, R] and k_pe [B, 1, L, R] (any strides), positions offset..offset+L-1.
// Bit-identity with mlx-lm's chain (YarnRoPE pre-scale, mx.fast.rope, q * scale): MLX's CPU
// rope is its op-composed fallback (mlx/fast.cpp): positions = (arange + offset) * scale in f32,
// inv_freq = exp(arange(0, -R/2, -1) * (log(base) / (R/2))) or 1 / freqs, theta = pos * inv_freq,
// cos/sin in f32 cast to T, then x1*c - x2*s and x1*s + x2*c in T. We evaluate exactly that
// with MLX's own scalar functors (Exp/Cos/Sin/Multiply/...), so every rounding is the same.
#include <cmath>
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

#include "zmlx_common.h"
#include "zmlx_rope.h"

namespace mx = mlx::core;
namespace dt = mlx::core::detail;

namespace {

struct RopeParams {
  int dims;
  bool traditional;
  float base;
  float scale;
  int offset;
  bool has_freqs;
  bool has_mscale;
  float mscale;
  float q_scale;
};

// Element (b, h, t, i) of a 4-D array through its strides.
template <typename T>
T at4(const mx::array& a, int b, int h, int t, int i) {
  auto& st = a.strides();
  return a.data<T>()[b * st[0] + h * st[1] + t * st[2] + i * st[3]];
}

template <typename T>
void rope_rows(const mx::array& x, T* out, const RopeParams& p, const std::vector<float>& inv_freq, bool scale_q) {
  int B = x.shape(0), H = x.shape(1), L = x.shape(2), R = x.shape(3), half = p.dims / 2;
  T ms = static_cast<T>(p.mscale), qs = static_cast<T>(p.q_scale);
  std::vector<T> cs(half), sn(half);
  for (int t = 0; t < L; ++t) {
    zmlx_rope::cos_sin<T>(t, p.offset, p.scale, inv_freq, cs.data(), sn.data());
    for (int b = 0; b < B; ++b)
      for (int h = 0; h < H; ++h) {
        T* o = out + ((size_t(b) * H + h) * L + t) * R;
        for (int i = 0; i < R; ++i) {
          T v = at4<T>(x, b, h, t, i);
          o[i] = p.has_mscale ? dt::Multiply{}(v, ms) : v;
        }
        zmlx_rope::rotate_row<T>(o, p.dims, p.traditional, cs.data(), sn.data());
        if (scale_q)
          for (int i = 0; i < R; ++i) o[i] = dt::Multiply{}(o[i], qs);
      }
  }
}

class RopeDecode : public mx::Primitive {
 public:
  RopeDecode(mx::Stream s, RopeParams p) : mx::Primitive(s), p_(p) {}
  void eval_cpu(const std::vector<mx::array>& in, std::vector<mx::array>& outs) override {
    for (auto& o : outs) o.set_data(mx::allocator::malloc(o.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.dispatch([in, qo = outs[0], ko = outs[1], p = p_]() mutable {
      auto inv = zmlx_rope::inv_freq(p.dims, p.base, p.has_freqs ? in[2].data<float>() : nullptr,
                                     p.has_freqs ? long(in[2].strides()[0]) : 1);
      auto run = [&]<typename T>() {
        rope_rows<T>(in[0], qo.data<T>(), p, inv, true);
        rope_rows<T>(in[1], ko.data<T>(), p, inv, false);
      };
      switch (in[0].dtype()) {
        case mx::float32: run.template operator()<float>(); break;
        case mx::float16: run.template operator()<mx::float16_t>(); break;
        default: run.template operator()<mx::bfloat16_t>(); break;
      }
    });
  }
  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("zmlx rope_decode: CPU-only primitive; GPU backends use the CUDA/Metal kernel");
  }
  const char* name() const override { return "ZmlxRopeDecode"; }
  bool is_equivalent(const mx::Primitive& o) const override {
    auto& r = static_cast<const RopeDecode&>(o).p_;
    return r.dims == p_.dims && r.traditional == p_.traditional && r.base == p_.base && r.scale == p_.scale &&
           r.offset == p_.offset && r.has_freqs == p_.has_freqs && r.has_mscale == p_.has_mscale &&
           r.mscale == p_.mscale && r.q_scale == p_.q_scale;
  }

 private:
  RopeParams p_;
};

}  // namespace

extern "C" int zmlx_cpu_rope_decode(mlx_array* q_out, mlx_array* k_out, const mlx_array q, const mlx_array k,
                                    const mlx_array freqs, bool has_freqs, int dims, bool traditional, float base,
                                    float scale, int offset, bool has_mscale, float mscale, float q_scale,
                                    const mlx_stream s) {
  return zmlx_cpu::guarded([&] {
    auto& st = mlx_stream_get_(s);
    auto& q0 = mlx_array_get_(q);
    auto& k0 = mlx_array_get_(k);
    if (q0.ndim() != 4 || k0.ndim() != 4 || q0.dtype() != k0.dtype() || q0.shape(0) != k0.shape(0) ||
        q0.shape(2) != k0.shape(2) || q0.shape(3) != k0.shape(3))
      throw std::invalid_argument("zmlx rope_decode: expected q_pe [B, H, L, R] and k_pe [B, Hk, L, R] of one dtype");
    if (q0.dtype() != mx::float32 && q0.dtype() != mx::float16 && q0.dtype() != mx::bfloat16)
      throw std::invalid_argument("zmlx rope_decode: expected float32, float16 or bfloat16 inputs");
    if (dims <= 0 || dims % 2 != 0 || dims > q0.shape(3))
      throw std::invalid_argument("zmlx rope_decode: dims must be even, positive and at most the head size");
    std::vector<mx::array> ins = {q0, k0};
    if (has_freqs) {
      auto f = mx::astype(mlx_array_get_(freqs), mx::float32, st);
      if (f.ndim() != 1 || f.shape(0) != dims / 2)
        throw std::invalid_argument("zmlx rope_decode: freqs must be [dims / 2]");
      ins.push_back(f);
    }
    RopeParams p{dims, traditional, base, scale, offset, has_freqs, has_mscale, mscale, q_scale};
    auto outs = mx::array::make_arrays({q0.shape(), k0.shape()}, {q0.dtype(), k0.dtype()},
                                       std::make_shared<RopeDecode>(st, p), ins);
    mlx_array_set_(*q_out, outs[0]);
    mlx_array_set_(*k_out, outs[1]);
  });
}
