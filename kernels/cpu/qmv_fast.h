// Interface of the `fast` (validated) quantized mat-vec row kernels (qmv_fast.inc).
#pragma once
#include "qmv_rows.h"


// Activation prepared for the fast kernels: xp[K] = x permuted into packed order per group
// (qmv_fast.inc explains the layout), xs[K / gs] = the sum of x over each group.
void zmlx_qmv_fast_prep(const float* x, int K, int gs, int bits, float* xp, float* xs);

// out[t * ldo + (r - r0)] = dot(x_t, dequant(row r)) for r in [r0, r1), t in [0, T), with x_t's
// prepared activation at xp + t * ldx (and xs + t * K / gs). False if bits / group size are not
// supported by the ISA's vector width (then callers use the exact kernel).
bool zmlx_qmv_fast_rows_base(int bits, const float* xp, const float* xs, int T, long ldx, ZmlxQMat m, int r0, int r1,
                             int K, int gs, float* out, long ldo);
#if defined(__x86_64__)
bool zmlx_qmv_fast_rows_avx2(int bits, const float* xp, const float* xs, int T, long ldx, ZmlxQMat m, int r0, int r1,
                             int K, int gs, float* out, long ldo);
bool zmlx_qmv_fast_rows_avx512(int bits, const float* xp, const float* xs, int T, long ldx, ZmlxQMat m, int r0,
                               int r1, int K, int gs, float* out, long ldo);
#endif
#if defined(__aarch64__)
bool zmlx_qmv_fast_rows_neon(int bits, const float* xp, const float* xs, int T, long ldx, ZmlxQMat m, int r0, int r1,
                             int K, int gs, float* out, long ldo);
#endif
