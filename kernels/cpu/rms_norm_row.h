// MLX 0.32's CPU rms_norm (a fallback of ordinary ops at simd width 1) on one row, bit for bit:
//   x * rsqrt(mean(x^2) + eps) * w, in f32,
// the mean a sequential sum of squares from 0 times (float)(1.0 / d) (docs/mlx-numerics.md).
// Shared by the layer norms (zmlx_rms_norm.cpp) and the per-head q/k norms (zmlx_attention.cpp).
// Built without FMA contraction, like every exact kernel.
#pragma once
#include "mlx/backend/cpu/binary_ops.h"
#include "mlx/backend/cpu/unary_ops.h"

namespace zmlx_norm {

// y[0..d) = rms_norm(x[0..d)) * w[0..d); y may alias x.
inline void rms_norm_row(const float* x, const float* w, int d, float eps, float* y) {
  namespace dt = mlx::core::detail;
  float s = 0.0f;
  for (int i = 0; i < d; ++i) s = dt::Add{}(s, dt::Square{}(x[i]));
  float inv_n = static_cast<float>(1.0 / d);
  float r = dt::Rsqrt{}(dt::Add{}(dt::Multiply{}(s, inv_n), eps));
  for (int i = 0; i < d; ++i) y[i] = dt::Multiply{}(dt::Multiply{}(x[i], r), w[i]);
}

}  // namespace zmlx_norm
