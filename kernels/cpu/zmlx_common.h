// Helpers shared by zmlx's CPU primitives.
#pragma once
#include <cstdint>
#include <exception>
#include <vector>

#include "mlx/array.h"
#include "mlx/c/error.h"

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

}  // namespace zmlx_cpu
