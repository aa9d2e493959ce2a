// qmv_combine (Metal body): same algorithm and order as kernels/cuda/qmv_combine.cu: one
// threadgroup per output (t, r), no atomics; simdgroup v of the NW takes slots j = v, v + NW, ...;
// per slot lane l takes the packed words l, l + 32, ... of the row (per word scale * sum(h * q)
// + bias * sum(h), fma in float), then a fixed xor-butterfly simdgroup sum (16, 8, 4, 2, 1); the
// slot dots meet in threadgroup memory and thread 0 adds them in slot order, each rounded to T
// times its weight, in float; cast to O once. Deterministic and independent of the token count;
// not bit-identical (class validated).
// Launch: one threadgroup of 32 * NW threads per output (NW = KSEL rounded up to a power of two, <= 8).
// inputs: h [T, KSEL, K] (T), idx [T, KSEL] (uint32), w [T, KSEL] (O), wd [E, N, K*BITS/32]
// (uint32), sd/bd [E, N, K/GS] (T); output out [T, N] (O); template: T, O, K, N, KSEL, GS, BITS, E.
const uint lane = thread_index_in_simdgroup;
const uint nw = threads_per_threadgroup.x / 32;
const ulong o = threadgroup_position_in_grid.x;
if (o >= ulong(idx_shape[0]) * N) return;  // whole threadgroups only
const int r = int(o % N);
const ulong t = o / N;
constexpr int PW = 32 / BITS;
constexpr int KW = K / PW;
constexpr int G = K / GS;
const uint mask = (1u << BITS) - 1u;
threadgroup float ys[KSEL];
for (uint j = simdgroup_index_in_threadgroup; j < uint(KSEL); j += nw) {
  const uint e = idx[t * KSEL + j];
  float y = NAN;
  if (e < uint(E)) {
    const ulong row = ulong(e) * N + r;
    const ulong hbase = (t * KSEL + j) * K;
    y = 0.0f;
    for (int w = int(lane); w < KW; w += 32) {
      const uint q = wd[row * KW + w];
      const int grp = (w * PW) / GS;
      float d = 0.0f, xs = 0.0f;
      for (int i = 0; i < PW; ++i) {
        const float hv = float(h[hbase + w * PW + i]);
        d = metal::fma(hv, float((q >> (BITS * i)) & mask), d);
        xs += hv;
      }
      y = metal::fma(float(sd[row * G + grp]), d, y);
      y = metal::fma(float(bd[row * G + grp]), xs, y);
    }
    for (ushort m = 16; m > 0; m >>= 1) y += simd_shuffle_xor(y, m);
  }
  if (lane == 0) ys[j] = y;
}
threadgroup_barrier(mem_flags::mem_threadgroup);
if (thread_index_in_threadgroup == 0) {
  float acc = 0.0f;
  for (int j = 0; j < KSEL; ++j) acc = acc + float(T(ys[j])) * float(w[t * KSEL + j]);
  out[o] = O(acc);
}
