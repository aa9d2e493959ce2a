// The row kernels for aarch64: 8 rows per GCC vector, i.e. two 128-bit NEON registers (Advanced
// SIMD is part of every ARMv8-A CPU, so no run-time check is needed). aarch64 only (build.rs
// compiles it only there). MLX's aarch64 libmlx contracts its quantized mat-vec into FMAs, so
// qmv_rows.inc uses fused multiply-adds here (see ZMLX_QMV_FMA there).
#if defined(__aarch64__)
#define ZMLX_ISA neon
#include "qmv_rows.inc"
#endif
