// The baseline `fast` row kernels, compiled on every architecture (SSE2 on x86-64, 8 floats per
// GCC vector; scalar lanes elsewhere), and the activation preparation they share.
#define ZMLX_ISA base
#if !defined(__x86_64__) && !defined(__aarch64__)
#define ZMLX_LANES 4
#endif
#include "qmv_fast.inc"

void zmlx_qmv_fast_prep(const float* x, int K, int gs, int bits, float* xp, float* xs) {
  const int P = 8 / bits, per = gs / P;
  for (int g = 0; g < K / gs; ++g) {
    const float* xg = x + long(g) * gs;
    float* o = xp + long(g) * gs;
    float s = 0.0f;
    for (int p = 0; p < P; ++p)
      for (int j = 0; j < per; ++j) o[p * per + j] = xg[j * P + p];
    for (int k = 0; k < gs; ++k) s += xg[k];
    xs[g] = s;
  }
}
