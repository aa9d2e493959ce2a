// The baseline row kernels, compiled on every architecture: 8 rows per GCC vector where the
// target's baseline has a vector unit (SSE2 on x86-64, NEON/Advanced SIMD on aarch64), one row
// per lane (scalar code, 4 rows interleaved) elsewhere. On aarch64 this is the scalar
// fallback (ZMLX_CPU_ISA=base); qmv_neon.cpp is the default there.
#define ZMLX_ISA base
#if !defined(__x86_64__)
#define ZMLX_LANES 1
#endif
#include "qmv_rows.inc"
