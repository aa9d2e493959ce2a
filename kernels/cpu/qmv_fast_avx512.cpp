// The `fast` row kernels for AVX-512 (16 floats per vector, FMA). x86-64 only.
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,fma")
#include <immintrin.h>

#include <cstdint>
#define ZMLX_ISA avx512
#define ZMLX_LANES 16
#define ZMLX_HAVE_UNPACK
namespace {
typedef uint32_t vu __attribute__((vector_size(64)));
__attribute__((always_inline)) inline vu zmlx_unpack_u8(const uint8_t* p) {
  return (vu)_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
}  // namespace
#include "qmv_fast.inc"
#endif
