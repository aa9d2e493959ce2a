// The `fast` row kernels for AVX2 + FMA (every AVX2 CPU zmlx selects this for also has FMA;
// the dispatcher checks both). x86-64 only.
#if defined(__x86_64__)
#pragma GCC target("avx2,fma")
#include <immintrin.h>

#include <cstdint>
#define ZMLX_ISA avx2
// vpmovzxbd: GCC does not find it for a vector-extension convert of 8 bytes.
#define ZMLX_HAVE_UNPACK
namespace {
typedef uint32_t vu __attribute__((vector_size(32)));
__attribute__((always_inline)) inline vu zmlx_unpack_u8(const uint8_t* p) {
  return (vu)_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
}  // namespace
#include "qmv_fast.inc"
#endif
