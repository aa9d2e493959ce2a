// qmv_swiglu (CUDA body): h[t, j, r] = swiglu(dot(x_t, Wg[e] row r), dot(x_t, Wu[e] row r)),
// e = idx[t, j]. One warp per output (t, j, r): the lanes stride the row's packed words (32-bit
// loads, 128 contiguous bytes per warp step), each word's activations loaded once for both
// rows; per word scale * sum(x * q) + bias * sum(x) (MLX's affine dequantisation, reassociated
// per word), float accumulation with FMA (zmlx_qdot2_lane, header.cuh), then a fixed xor-butterfly
// warp sum. Each output is the same sequence of operations in every run and for every token
// count T (deterministic, batch-invariant); not bit-identical to gather_qmm (class validated).
// The dots are rounded to T, then MLX's Sigmoid/Multiply functors (mlx-lm's swiglu).
// Launch: grid = 32 threads per output, blocks of 256 (8 outputs); consecutive warps take
// consecutive rows of one expert.
// inputs: x [T, K] (T), idx [T, KSEL] (uint32), wg/wu [E, N, K*BITS/32] (uint32),
// sg/bg/su/bu [E, N, K/GS] (T); output h [T, KSEL, N] (T); template: T, K, N, KSEL, GS, BITS, E.
const int lane = threadIdx.x & 31;
const long long o = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
if (o >= (long long)idx_shape[0] * KSEL * N) return;  // whole warps only (grid = 32 per output)
const int r = (int)(o % N);
const long long tj = o / N;
const long long t = tj / KSEL;
const unsigned int e = idx[tj];
if (e >= (unsigned int)E) {
  if (lane == 0) out[o] = T(NAN);
  return;
}
constexpr int KW = K * BITS / 32;
constexpr int G = K / GS;
const long long row = (long long)e * N + r;
const T* xr = x + t * K;
const bool vec = (reinterpret_cast<size_t>(xr) & 15) == 0;
float g, u;
zmlx_qdot2_lane<K, GS, BITS>(wg + row * KW, sg + row * G, bg + row * G, wu + row * KW, su + row * G, bu + row * G,
                             xr, vec, lane, g, u);
g = zmlx_warp_sum(g);
u = zmlx_warp_sum(u);
if (lane == 0) {
  const T gt = T(g);
  out[o] = Multiply{}(Multiply{}(gt, Sigmoid{}(gt)), T(u));
}
