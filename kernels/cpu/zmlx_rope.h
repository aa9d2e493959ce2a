// MLX 0.32's CPU RoPE, evaluated with MLX's own scalar functors so every rounding matches its
// op-composed fallback (mlx/fast.cpp): positions = (arange + offset) * scale in f32,
// inv_freq = exp(arange(0, -R/2, -1) * (log(base) / (R/2))) or 1 / freqs, theta = pos * inv_freq,
// cos/sin in f32 cast to T, then x1*c - x2*s and x1*s + x2*c in T. Shared by rope_decode (MLA)
// and gqa_attention. Built with -ffp-contract=off (build.rs), so no step is fused.
#pragma once
#include <cmath>
#include <vector>

#include "mlx/backend/cpu/binary_ops.h"
#include "mlx/backend/cpu/unary_ops.h"

namespace zmlx_rope {

namespace dt = mlx::core::detail;

// inv_freq[i], i < dims / 2: from `freqs` (f32, element stride `fstride`) or from `base`.
inline std::vector<float> inv_freq(int dims, float base, const float* freqs, long fstride) {
  int half = dims / 2;
  std::vector<float> inv(half);
  if (freqs) {
    for (int i = 0; i < half; ++i) inv[i] = dt::Divide{}(1.0f, freqs[i * fstride]);
  } else {
    float c = std::log(base) / half;
    for (int i = 0; i < half; ++i) inv[i] = dt::Exp{}(dt::Multiply{}(static_cast<float>(-i), c));
  }
  return inv;
}

// cos/sin of position `t + offset` (scaled), cast to T as the fallback's astype does.
template <typename T>
void cos_sin(int t, int offset, float scale, const std::vector<float>& inv, T* cs, T* sn) {
  float pos = dt::Multiply{}(dt::Add{}(static_cast<float>(t), static_cast<float>(offset)), scale);
  for (size_t i = 0; i < inv.size(); ++i) {
    float theta = dt::Multiply{}(pos, inv[i]);
    cs[i] = static_cast<T>(dt::Cos{}(theta));
    sn[i] = static_cast<T>(dt::Sin{}(theta));
  }
}

// Rotates one head row of R values in place: the first `dims` features (pairs (2i, 2i+1) when
// traditional, (i, i + dims/2) otherwise); features past `dims` pass through.
template <typename T>
void rotate_row(T* row, int dims, bool traditional, const T* cs, const T* sn) {
  int half = dims / 2;
  for (int i = 0; i < half; ++i) {
    int i1 = traditional ? 2 * i : i, i2 = traditional ? 2 * i + 1 : i + half;
    T x1 = row[i1], x2 = row[i2];
    row[i1] = dt::Subtract{}(dt::Multiply{}(x1, cs[i]), dt::Multiply{}(x2, sn[i]));
    row[i2] = dt::Add{}(dt::Multiply{}(x1, sn[i]), dt::Multiply{}(x2, cs[i]));
  }
}

}  // namespace zmlx_rope
