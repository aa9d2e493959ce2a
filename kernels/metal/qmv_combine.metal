// qmv_combine (Metal body): same algorithm and order as kernels/cuda/qmv_combine.cu.
// inputs: h [T, KSEL, K] (T), idx [T, KSEL] (uint32), w [T, KSEL] (float), wd [E, N, K*BITS/32]
// (uint32), sd/bd [E, N, K/GS] (T); output out [T, N] (O); template: T, O, K, N, KSEL, GS, BITS, E.
ulong total = ulong(idx_shape[0]) * N;
ulong i = thread_position_in_grid.x;
if (i >= total) return;
int r = int(i % N);
ulong t = i / N;
const int per_word = 32 / BITS;
const uint mask = (1u << BITS) - 1u;
float acc = 0.0f;
for (int j = 0; j < KSEL; ++j) {
  uint e = idx[t * KSEL + j];
  if (e >= uint(E)) { acc = NAN; break; }
  const ulong row = ulong(e) * N + r;
  float y = 0.0f;
  for (int kk = 0; kk < K; kk += per_word) {
    int grp = kk / GS;
    float s = float(sd[row * (K / GS) + grp]), b = float(bd[row * (K / GS) + grp]);
    uint a = wd[row * (K / per_word) + kk / per_word];
    for (int p = 0; p < per_word; ++p) y += float(h[(t * KSEL + j) * K + kk + p]) * (s * float((a >> (BITS * p)) & mask) + b);
  }
  float p = float(T(y)) * w[t * KSEL + j];
  acc = acc + p;
}
out[i] = O(acc);
