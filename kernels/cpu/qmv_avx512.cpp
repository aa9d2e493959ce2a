// The row kernels for AVX-512 (16 rows per vector; no FMA: -ffp-contract=off keeps products
// and sums separately rounded). Selected at run time only where the CPU has AVX-512F/BW.
// x86-64 only (build.rs compiles it only there).
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl")
#define ZMLX_ISA avx512
#define ZMLX_LANES 16
#include "qmv_rows.inc"
#endif
