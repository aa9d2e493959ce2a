// Helpers shared by zmlx's CPU primitives.
#pragma once
#include <exception>

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

}  // namespace zmlx_cpu
