// Helpers shared by zmlx's CPU primitives.
#pragma once
#include <cstdint>
#include <exception>
#include <vector>

#include "mlx/array.h"
#include "mlx/c/error.h"
#include "mlx/ops.h"

#include "qmv_rows.h"

namespace zmlx_cpu {

// Runs f; a C++ exception becomes MLX's C error (mlx_error -> the Rust error handler) and 1.
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

// A row-contiguous view of a small, possibly strided input: its own buffer when contiguous,
// else a packed copy in `buf` (no graph op for the rare strided view).
template <typename T>
const T* dense(const mlx::core::array& a, std::vector<T>& buf) {
  if (a.flags().row_contiguous) return a.data<T>();
  buf.resize(a.size());
  std::vector<int> pos(a.ndim(), 0);
  const T* src = a.data<T>();
  for (size_t i = 0; i < a.size(); ++i) {
    int64_t off = 0;
    for (int d = 0; d < a.ndim(); ++d) off += int64_t(pos[d]) * a.strides()[d];
    buf[i] = src[off];
    for (int d = a.ndim() - 1; d >= 0; --d) {
      if (++pos[d] < a.shape(d)) break;
      pos[d] = 0;
    }
  }
  return buf.data();
}

// ZMLX_SCALE_* of a scales/biases dtype; -1 if the row kernels cannot read it.
inline int scale_type(mlx::core::Dtype d) {
  if (d == mlx::core::float32) return ZMLX_SCALE_F32;
  if (d == mlx::core::bfloat16) return ZMLX_SCALE_BF16;
  if (d == mlx::core::float16) return ZMLX_SCALE_F16;
  return -1;
}

// Packed weights/tables must be evaluated row-contiguous buffers: kernels read them in place.
inline mlx::core::array whole(const mlx::core::array& a, const mlx::core::Stream& st) {
  return a.flags().row_contiguous ? a : mlx::core::contiguous(a, false, st);
}

}  // namespace zmlx_cpu
