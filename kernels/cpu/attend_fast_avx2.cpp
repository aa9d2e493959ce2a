// The `fast` attention core for AVX2 + FMA (the dispatcher checks both). x86-64 only.
#if defined(__x86_64__)
#pragma GCC target("avx2,fma")
#include <cstdint>
#define ZMLX_ISA avx2
#include "attend_fast.inc"
#endif
