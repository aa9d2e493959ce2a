// Interface of the ISA-specific quantized mat-vec row kernels (qmv_rows.inc).
#pragma once
#include <cstdint>

// Scale/bias storage types of a ZmlxQMat (checkpoints keep them as stored: f32, bf16 or f16).
enum : int { ZMLX_SCALE_F32 = 0, ZMLX_SCALE_BF16 = 1, ZMLX_SCALE_F16 = 2 };

// One quantized matrix [rows, K]: packed bytes (row_bytes per row), scales/biases [rows, groups]
// of type `scale_type` (ZMLX_SCALE_*), both the same type.
struct ZmlxQMat {
  const uint8_t* w;
  const void* scales;
  const void* biases;
  long row_bytes;
  long groups;
  int scale_type;
};

// IEEE half -> float, exact for every input (subnormals, inf; a NaN keeps its payload and is
// quieted, as x86's vcvtph2ps and aarch64's fcvt do). Plain bit manipulation: the baseline
// x86-64 build has no F16C and no library headers are used here.
static __attribute__((always_inline)) inline float zmlx_half_to_float(uint16_t h) {
  uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (mant << 13) | (mant ? 0x00400000u : 0u);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (mant << 13);  // rebias 15 -> 127
  } else if (mant == 0) {
    bits = sign;
  } else {
    // Subnormal: mant * 2^-24; normalise so the leading one lands on bit 10.
    uint32_t e = 113;  // the float exponent field of 2^-14
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --e;
    }
    bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
  }
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// Element i of a scales/biases array of type `scale_type`, widened to float (exact: every bf16
// and f16 value is a float). With a constant `scale_type` the switch folds away. `static`: each
// ISA compilation keeps its own copy (nothing shared between them at link time).
static __attribute__((always_inline)) inline float zmlx_scale(const void* p, long i, int scale_type) {
  if (scale_type == ZMLX_SCALE_F32) return static_cast<const float*>(p)[i];
  uint16_t h = static_cast<const uint16_t*>(p)[i];
  if (scale_type == ZMLX_SCALE_BF16) {
    uint32_t bits = uint32_t(h) << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
  }
  return zmlx_half_to_float(h);
}

// out[r - r0] = dot(x, dequant(row r)) for r in [r0, r1); false if `bits` or `m.scale_type` is unsupported.
// acc[r - r0] = acc[r - r0] + dot(x, dequant(row r)) * w (two roundings, as MLX's multiply then add).
// `base` exists on every architecture (qmv_base.cpp); the others only where their file is built.
bool zmlx_qmv_rows_base(int bits, const float* x, ZmlxQMat m, int r0, int r1, int K, int gs, float* out);
bool zmlx_qmv_accum_base(int bits, const float* x, ZmlxQMat m, int r0, int r1, int K, int gs, float w, float* acc);
#if defined(__x86_64__)
bool zmlx_qmv_rows_avx2(int bits, const float* x, ZmlxQMat m, int r0, int r1, int K, int gs, float* out);
bool zmlx_qmv_rows_avx512(int bits, const float* x, ZmlxQMat m, int r0, int r1, int K, int gs, float* out);
bool zmlx_qmv_accum_avx2(int bits, const float* x, ZmlxQMat m, int r0, int r1, int K, int gs, float w, float* acc);
bool zmlx_qmv_accum_avx512(int bits, const float* x, ZmlxQMat m, int r0, int r1, int K, int gs, float w, float* acc);
#endif
#if defined(__aarch64__)
bool zmlx_qmv_rows_neon(int bits, const float* x, ZmlxQMat m, int r0, int r1, int K, int gs, float* out);
bool zmlx_qmv_accum_neon(int bits, const float* x, ZmlxQMat m, int r0, int r1, int K, int gs, float w, float* acc);
#endif
