// Interface of the ISA-specific quantized mat-vec row kernels (qmv_rows.inc).
#pragma once
#include <cstdint>

// One quantized matrix [rows, K]: packed bytes (row_bytes per row), f32 scales/biases [rows, groups].
struct ZmlxQMat {
  const uint8_t* w;
  const float* scales;
  const float* biases;
  long row_bytes;
  long groups;
};

// out[r - r0] = dot(x, dequant(row r)) for r in [r0, r1); false if `bits` is unsupported.
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
