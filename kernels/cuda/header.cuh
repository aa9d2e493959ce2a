// Shared header for zmlx's CUDA kernel bodies: MLX's device functors (Sigmoid, Multiply, Add)
// so the kernels round exactly like MLX's own CUDA ops, and cooperative-groups reductions so the
// routers reduce in the same tree order as MLX's softmax and row-sum kernels; and the row-dot
// helpers of the quantized expert kernels (qmv_swiglu, qmv_combine), below.
#include "mlx/backend/cuda/device/binary_ops.cuh"
#include "mlx/backend/cuda/device/unary_ops.cuh"
#include <cooperative_groups/reduce.h>

// Plain `a + b` in the operand type: the functor MLX's row reductions hand to cg::reduce.
struct ZmlxSum {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const { return a + b; }
};

// The quantized expert kernels (qmv_swiglu, qmv_combine): one packed weight word's activations
// as floats. PW values of T start at `p`; `vec` says `p`'s row is 16-byte aligned (uniform per
// warp), so the PW * sizeof(T) bytes load as 16- or 8-byte vectors (aligned for every word of
// the row, since each word's values start at a multiple of PW).
template <int PW, typename T>
__device__ __forceinline__ void zmlx_load_word_x(const T* p, bool vec, float (&v)[PW]) {
  constexpr int NB = PW * (int)sizeof(T);
  if (vec && NB % 16 == 0) {
    alignas(16) T tmp[PW];
#pragma unroll
    for (int c = 0; c < NB / 16; ++c) reinterpret_cast<uint4*>(tmp)[c] = reinterpret_cast<const uint4*>(p)[c];
#pragma unroll
    for (int i = 0; i < PW; ++i) v[i] = (float)tmp[i];
  } else if (vec && NB % 8 == 0) {
    alignas(8) T tmp[PW];
#pragma unroll
    for (int c = 0; c < NB / 8; ++c) reinterpret_cast<uint2*>(tmp)[c] = reinterpret_cast<const uint2*>(p)[c];
#pragma unroll
    for (int i = 0; i < PW; ++i) v[i] = (float)tmp[i];
  } else {
#pragma unroll
    for (int i = 0; i < PW; ++i) v[i] = (float)p[i];
  }
}

// One lane's share of a quantized row dot product: the lane takes the packed words w = lane,
// lane + 32, ... of the row (a warp reads 128 contiguous bytes per step) and, per word,
// scale * sum(x * q) + bias * sum(x) with its group's scale and bias, in float with FMA, words
// in ascending order. Fixed sequence per (row, lane): independent of the launch's token count.
template <int K, int GS, int BITS, typename T>
__device__ __forceinline__ float zmlx_qdot_lane(const unsigned int* wr, const T* sr, const T* br, const T* xr,
                                                bool vec, int lane) {
  constexpr int PW = 32 / BITS;
  constexpr int KW = K / PW;
  constexpr unsigned int MASK = (1u << BITS) - 1u;
  float acc = 0.0f;
#pragma unroll 4
  for (int w = lane; w < KW; w += 32) {
    const unsigned int q = wr[w];
    const int grp = (w * PW) / GS;
    float xv[PW];
    zmlx_load_word_x<PW>(xr + w * PW, vec, xv);
    float d = 0.0f, xs = 0.0f;
#pragma unroll
    for (int i = 0; i < PW; ++i) {
      d = fmaf(xv[i], (float)((q >> (BITS * i)) & MASK), d);
      xs += xv[i];
    }
    acc = fmaf((float)sr[grp], d, acc);
    acc = fmaf((float)br[grp], xs, acc);
  }
  return acc;
}

// zmlx_qdot_lane for two rows of the same shape on the same activations (gate and up): each
// word's activations are loaded once; each row's sum is the same sequence as zmlx_qdot_lane's.
template <int K, int GS, int BITS, typename T>
__device__ __forceinline__ void zmlx_qdot2_lane(const unsigned int* wa, const T* sa, const T* ba,
                                                const unsigned int* wb, const T* sb, const T* bb,
                                                const T* xr, bool vec, int lane, float& acc_a, float& acc_b) {
  constexpr int PW = 32 / BITS;
  constexpr int KW = K / PW;
  constexpr unsigned int MASK = (1u << BITS) - 1u;
  float a = 0.0f, b = 0.0f;
#pragma unroll 4
  for (int w = lane; w < KW; w += 32) {
    const unsigned int qa = wa[w], qb = wb[w];
    const int grp = (w * PW) / GS;
    float xv[PW];
    zmlx_load_word_x<PW>(xr + w * PW, vec, xv);
    float da = 0.0f, db = 0.0f, xs = 0.0f;
#pragma unroll
    for (int i = 0; i < PW; ++i) {
      da = fmaf(xv[i], (float)((qa >> (BITS * i)) & MASK), da);
      db = fmaf(xv[i], (float)((qb >> (BITS * i)) & MASK), db);
      xs += xv[i];
    }
    a = fmaf((float)sa[grp], da, a);
    a = fmaf((float)ba[grp], xs, a);
    b = fmaf((float)sb[grp], db, b);
    b = fmaf((float)bb[grp], xs, b);
  }
  acc_a = a;
  acc_b = b;
}

// The warp's sum of one value per lane, as a fixed xor butterfly (16, 8, 4, 2, 1): the same
// operations on the same operands every run; every lane ends with the same sum (a + b = b + a).
__device__ __forceinline__ float zmlx_warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The routers' top-k order, MLX's CUDA sort (a stable ascending sort, NaN last) read from
// either end. Strict total orders over (value, index): `a` before `b`.
// - descending, ties -> lower index (`argpartition(-v)[:k]`): non-NaN before NaN, then larger;
struct ZmlxTopDesc {
  __device__ __forceinline__ bool operator()(float a, int ia, float b, int ib) const {
    const bool an = isnan(a), bn = isnan(b);
    if (an != bn) return bn;
    if (!an && a != b) return a > b;
    return ia < ib;
  }
};
// - ascending read from the end, ties -> higher index (`argpartition(v)[-k:]`): NaN first, then
//   larger.
struct ZmlxTopAscLast {
  __device__ __forceinline__ bool operator()(float a, int ia, float b, int ib) const {
    const bool an = isnan(a), bn = isnan(b);
    if (an != bn) return an;
    if (!an && a != b) return a > b;
    return ia > ib;
  }
};

// The top K of v[0..E) (any memory the warp can read) in `before` order, by one warp: K rounds
// of a per-lane scan (lane l holds e = l, l + 32, ...) and an xor-butterfly arg-best. `before`
// is a strict total order, so every lane ends each round on the same winner, and the result is
// the sequential selection's (each round: the first element in `before` order among those not
// yet taken). Lane 0 writes round j's winner to sel[j] (sel[K - 1 - j] if `reversed`); the warp
// is synchronised before it returns. E <= 1024 (one 32-bit taken-mask per lane).
template <int E, int K, typename Before>
__device__ __forceinline__ void zmlx_warp_top_k(const float* v, int lane, Before before, unsigned int* sel,
                                                bool reversed) {
  static_assert(E <= 1024, "zmlx_warp_top_k: E > 1024");
  unsigned int taken = 0u;
#pragma unroll 1
  for (int j = 0; j < K; ++j) {
    float bv = 0.0f;
    int bi = -1;
    for (int i = 0; lane + 32 * i < E; ++i) {
      const int e = lane + 32 * i;
      if (taken & (1u << i)) continue;
      const float x = v[e];
      if (bi < 0 || before(x, e, bv, bi)) { bv = x; bi = e; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
      const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
      if (oi >= 0 && (bi < 0 || before(ov, oi, bv, bi))) { bv = ov; bi = oi; }
    }
    if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
    if (lane == 0) sel[reversed ? K - 1 - j : j] = (unsigned int)bi;
  }
  __syncwarp();
}
