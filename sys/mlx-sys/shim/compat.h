// Force-included into every mlx-c translation unit on Linux (see build.rs).
#pragma once
#include <version>
#include <string>
#include <sstream>
#include <utility>

// 1. GCC 12's libstdc++ has no <format>; mlx-c only formats error messages with plain "{}".
#ifndef __cpp_lib_format
namespace std {
inline void zmlx_format_into(std::ostringstream& os, const char* f) { os << f; }
template <class T, class... R>
void zmlx_format_into(std::ostringstream& os, const char* f, T&& v, R&&... rest) {
  for (; *f; ++f) {
    if (f[0] == '{' && f[1] == '}') {
      os << v;
      zmlx_format_into(os, f + 2, std::forward<R>(rest)...);
      return;
    }
    os << *f;
  }
}
template <class... A>
std::string format(const char* f, A&&... args) {
  std::ostringstream os;
  zmlx_format_into(os, f, std::forward<A>(args)...);
  return os.str();
}
} // namespace std
#endif

// 2. mlx-c's half.h declares float16_t/bfloat16_t only on aarch64 (the native __fp16/__bf16,
//    as on macOS); elsewhere mlx-rs still needs the float16/bfloat16 entry points, so give them
//    MLX's own 2-byte types here.
#if !defined(__aarch64__) && !defined(__ARM_FEATURE_FP16_SCALAR_ARITHMETIC) && !defined(__ARM_FEATURE_BF16)
#include "mlx/types/half_types.h"
#define HAS_FLOAT16
#define HAS_BFLOAT16
typedef mlx::core::float16_t float16_t;
typedef mlx::core::bfloat16_t bfloat16_t;
#endif
