// qmv_combine (CUDA body): out[t, r] = sum_j T(dot(h[t, j], Wd[e_j] row r)) * w[t, j],
// e_j = idx[t, j]. One block per output (t, r), no atomics: warp v of the block's NW takes slots
// j = v, v + NW, ...; per slot the lanes stride the row's packed words (zmlx_qdot_lane,
// header.cuh: per word scale * sum(h * q) + bias * sum(h), float FMA accumulation), then a fixed
// xor-butterfly warp sum; the slot dots meet in shared memory and thread 0 adds them in slot
// order j = 0..KSEL-1, each rounded to T (as gather_qmm's output) times its weight, in float;
// cast to O once. The [KSEL, N] expert outputs are never stored. Each output is the same sequence
// of operations in every run, for every T and every block size (deterministic,
// batch-invariant); not bit-identical to gather_qmm + the weighted sum (class validated).
// Launch: one block of 32 * NW threads per output (NW = KSEL rounded up to a power of two, <= 8).
// inputs: h [T, KSEL, K] (T), idx [T, KSEL] (uint32), w [T, KSEL] (O), wd [E, N, K*BITS/32]
// (uint32), sd/bd [E, N, K/GS] (T); output out [T, N] (O); template: T, O, K, N, KSEL, GS, BITS, E.
const int lane = threadIdx.x & 31;
const int nw = blockDim.x >> 5;
const long long o = blockIdx.x;
if (o >= (long long)idx_shape[0] * N) return;  // whole blocks only
const int r = (int)(o % N);
const long long t = o / N;
constexpr int KW = K * BITS / 32;
constexpr int G = K / GS;
__shared__ float ys[KSEL];
for (int j = threadIdx.x >> 5; j < KSEL; j += nw) {
  const unsigned int e = idx[t * KSEL + j];
  float y = NAN;
  if (e < (unsigned int)E) {
    const long long row = (long long)e * N + r;
    const T* hr = h + (t * KSEL + j) * K;
    const bool vec = (reinterpret_cast<size_t>(hr) & 15) == 0;
    y = zmlx_warp_sum(zmlx_qdot_lane<K, GS, BITS>(wd + row * KW, sd + row * G, bd + row * G, hr, vec, lane));
  }
  if (lane == 0) ys[j] = y;
}
__syncthreads();
if (threadIdx.x == 0) {
  float acc = 0.0f;
#pragma unroll
  for (int j = 0; j < KSEL; ++j) acc = __fadd_rn(acc, __fmul_rn((float)T(ys[j]), (float)w[t * KSEL + j]));
  out[o] = O(acc);
}
