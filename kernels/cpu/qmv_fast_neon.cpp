// The `fast` row kernels for aarch64 (NEON: 8 floats per GCC vector = two q registers, fmla).
#if defined(__aarch64__)
#define ZMLX_ISA neon
#include "qmv_fast.inc"
#endif
