// The row kernels for baseline x86-64 (SSE2).
#define ZMLX_ISA base
#include "qmv_rows.inc"
