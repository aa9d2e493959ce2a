// The row kernels for AVX2 (no FMA: products and sums stay separately rounded). Selected at
// run time only where the CPU has AVX2. x86-64 only (build.rs compiles it only there; the guard
// keeps a stray compilation for another target empty).
#if defined(__x86_64__)
#pragma GCC target("avx2")
#define ZMLX_ISA avx2
#include "qmv_rows.inc"
#endif
