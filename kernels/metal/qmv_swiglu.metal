// qmv_swiglu (Metal body): same algorithm and order as kernels/cuda/qmv_swiglu.cu.
// inputs: x [T, K] (T), idx [T, KSEL] (uint32), wg/wu [E, N, K*BITS/32] (uint32),
// sg/bg/su/bu [E, N, K/GS] (T); output h [T, KSEL, N] (T); template: T, K, N, KSEL, GS, BITS, E.
ulong total = ulong(idx_shape[0]) * KSEL * N;
ulong i = thread_position_in_grid.x;
if (i >= total) return;
int r = int(i % N);
ulong tj = i / N;
ulong t = tj / KSEL;
uint e = idx[tj];
if (e >= uint(E)) { out[i] = T(NAN); return; }
const int per_word = 32 / BITS;
const uint mask = (1u << BITS) - 1u;
const ulong row = ulong(e) * N + r;
float g = 0.0f, u = 0.0f;
for (int kk = 0; kk < K; kk += per_word) {
  int grp = kk / GS;
  float sgv = float(sg[row * (K / GS) + grp]), bgv = float(bg[row * (K / GS) + grp]);
  float suv = float(su[row * (K / GS) + grp]), buv = float(bu[row * (K / GS) + grp]);
  uint a = wg[row * (K / per_word) + kk / per_word], b = wu[row * (K / per_word) + kk / per_word];
  for (int p = 0; p < per_word; ++p) {
    float xv = float(x[t * K + kk + p]);
    g += xv * (sgv * float((a >> (BITS * p)) & mask) + bgv);
    u += xv * (suv * float((b >> (BITS * p)) & mask) + buv);
  }
}
T gt = T(g);
T y = T(1) / (T(1) + metal::exp(metal::abs(gt)));
T sig = gt < T(0) ? y : T(1) - y;
T a2 = gt * sig;
out[i] = a2 * T(u);
