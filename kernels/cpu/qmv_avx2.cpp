// The row kernels for AVX2 (no FMA: products and sums stay separately rounded). Selected at
// run time only where the CPU has AVX2. x86-64 only (build.rs compiles it only there; the guard
// keeps a stray compilation for another target empty).
#if defined(__x86_64__)
#pragma GCC target("avx2")
#include <immintrin.h>

#include <cstdint>
#define ZMLX_ISA avx2
#define ZMLX_HAVE_WORDS_8X8
namespace {
typedef uint32_t zmlx_v8u __attribute__((vector_size(32)));
// out[j] lane l = the 32-bit word j of the row at p + l * stride: an 8x8 transpose of eight
// row loads (unpack 32, unpack 64, swap 128-bit halves).
__attribute__((always_inline)) inline void zmlx_words_8x8(const uint8_t* p, long stride, zmlx_v8u* out) {
  __m256i r[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i * stride));
  __m256i t0 = _mm256_unpacklo_epi32(r[0], r[1]), t1 = _mm256_unpackhi_epi32(r[0], r[1]);
  __m256i t2 = _mm256_unpacklo_epi32(r[2], r[3]), t3 = _mm256_unpackhi_epi32(r[2], r[3]);
  __m256i t4 = _mm256_unpacklo_epi32(r[4], r[5]), t5 = _mm256_unpackhi_epi32(r[4], r[5]);
  __m256i t6 = _mm256_unpacklo_epi32(r[6], r[7]), t7 = _mm256_unpackhi_epi32(r[6], r[7]);
  __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
  __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
  __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
  __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
  out[0] = (zmlx_v8u)_mm256_permute2x128_si256(u0, u4, 0x20);
  out[1] = (zmlx_v8u)_mm256_permute2x128_si256(u1, u5, 0x20);
  out[2] = (zmlx_v8u)_mm256_permute2x128_si256(u2, u6, 0x20);
  out[3] = (zmlx_v8u)_mm256_permute2x128_si256(u3, u7, 0x20);
  out[4] = (zmlx_v8u)_mm256_permute2x128_si256(u0, u4, 0x31);
  out[5] = (zmlx_v8u)_mm256_permute2x128_si256(u1, u5, 0x31);
  out[6] = (zmlx_v8u)_mm256_permute2x128_si256(u2, u6, 0x31);
  out[7] = (zmlx_v8u)_mm256_permute2x128_si256(u3, u7, 0x31);
}
}  // namespace
#include "qmv_rows.inc"
#endif
