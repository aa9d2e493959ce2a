// The row kernels for AVX2 (no FMA: products and sums stay separately rounded). Selected at
// run time only where the CPU has AVX2.
#pragma GCC target("avx2")
#define ZMLX_ISA avx2
#include "qmv_rows.inc"
