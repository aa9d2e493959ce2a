// The baseline `fast` attention core, compiled on every architecture (SSE2 on x86-64, NEON via
// GCC vectors on aarch64, scalar lanes elsewhere).
#include <cstdint>
#define ZMLX_ISA base
#include "attend_fast.inc"
