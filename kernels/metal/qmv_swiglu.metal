// qmv_swiglu (Metal body): same algorithm and order as kernels/cuda/qmv_swiglu.cu: one
// simdgroup (32 lanes) per output (t, j, r); lane l takes the packed words l, l + 32, ... of
// the gate and up rows, per word scale * sum(x * q) + bias * sum(x) with fma in float, words
// in ascending order; then a fixed xor-butterfly simdgroup sum (16, 8, 4, 2, 1). Deterministic
// and independent of the token count; not bit-identical to gather_qmm (class validated).
// Launch: grid = 32 threads per output, threadgroups of 256.
// inputs: x [T, K] (T), idx [T, KSEL] (uint32), wg/wu [E, N, K*BITS/32] (uint32),
// sg/bg/su/bu [E, N, K/GS] (T); output h [T, KSEL, N] (T); template: T, K, N, KSEL, GS, BITS, E.
const uint lane = thread_index_in_simdgroup;
const ulong o = thread_position_in_grid.x / 32;
if (o >= ulong(idx_shape[0]) * KSEL * N) return;  // whole simdgroups only
const int r = int(o % N);
const ulong tj = o / N;
const ulong t = tj / KSEL;
const uint e = idx[tj];
if (e >= uint(E)) {
  if (lane == 0) out[o] = T(NAN);
  return;
}
constexpr int PW = 32 / BITS;
constexpr int KW = K / PW;
constexpr int G = K / GS;
const uint mask = (1u << BITS) - 1u;
const ulong row = ulong(e) * N + r;
float g = 0.0f, u = 0.0f;
for (int w = int(lane); w < KW; w += 32) {
  const uint qa = wg[row * KW + w], qb = wu[row * KW + w];
  const int grp = (w * PW) / GS;
  float da = 0.0f, db = 0.0f, xs = 0.0f;
  for (int i = 0; i < PW; ++i) {
    const float xv = float(x[t * K + w * PW + i]);
    da = metal::fma(xv, float((qa >> (BITS * i)) & mask), da);
    db = metal::fma(xv, float((qb >> (BITS * i)) & mask), db);
    xs += xv;
  }
  g = metal::fma(float(sg[row * G + grp]), da, g);
  g = metal::fma(float(bg[row * G + grp]), xs, g);
  u = metal::fma(float(su[row * G + grp]), db, u);
  u = metal::fma(float(bu[row * G + grp]), xs, u);
}
for (ushort m = 16; m > 0; m >>= 1) {
  g += simd_shuffle_xor(g, m);
  u += simd_shuffle_xor(u, m);
}
if (lane == 0) {
  T gt = T(g);
  T y = T(1) / (T(1) + metal::exp(metal::abs(gt)));
  T sig = gt < T(0) ? y : T(1) - y;
  T a2 = gt * sig;
  out[o] = a2 * T(u);
}
