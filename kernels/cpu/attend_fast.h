// Interface of the `fast` (validated) attention core (attend_fast.inc): softmax attention of one
// KV group for up to `rep` query heads at one position, keys 0..nk-1.
#pragma once

// q: [rep, D] (already normed, rotated and scaled), K, V: [nk, D] rows of the cache (row stride D),
// s: scratch of rep * nk floats, out: [rep, D].
void zmlx_attend_fast_base(const float* q, int rep, int D, const float* K, const float* V, int nk, float* s,
                           float* out);
#if defined(__x86_64__)
void zmlx_attend_fast_avx2(const float* q, int rep, int D, const float* K, const float* V, int nk, float* s,
                           float* out);
#endif
// The widest of the above this CPU runs (ZMLX_CPU_ISA caps it, as for the row kernels).
void zmlx_attend_fast(const float* q, int rep, int D, const float* K, const float* V, int nk, float* s, float* out);
