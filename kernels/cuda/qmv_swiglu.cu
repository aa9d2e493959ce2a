// qmv_swiglu (CUDA body): h[t, j, r] = swiglu(dot(x_t, Wg[e] row r), dot(x_t, Wu[e] row r)),
// e = idx[t, j]; MLX affine dequantisation scale * q + bias, float accumulation in k order, the
// dots rounded to T, then MLX's Sigmoid/Multiply functors. One thread per output element.
// inputs: x [T, K] (T), idx [T, KSEL] (uint32), wg/wu [E, N, K*BITS/32] (uint32),
// sg/bg/su/bu [E, N, K/GS] (T); output h [T, KSEL, N] (T); template: T, K, N, KSEL, GS, BITS, E.
long long total = (long long)idx_shape[0] * KSEL * N;
long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
if (i >= total) return;
int r = (int)(i % N);
long long tj = i / N;
long long t = tj / KSEL;
unsigned int e = idx[tj];
if (e >= (unsigned int)E) { out[i] = T(NAN); return; }
const int per_word = 32 / BITS;
const unsigned int mask = (1u << BITS) - 1u;
const long long row = (long long)e * N + r;
const unsigned int* wgr = wg + row * (K / per_word);
const unsigned int* wur = wu + row * (K / per_word);
const T* xt = x + t * K;
float g = 0.0f, u = 0.0f;
for (int kk = 0; kk < K; kk += per_word) {
  int grp = kk / GS;
  float sgv = (float)sg[row * (K / GS) + grp], bgv = (float)bg[row * (K / GS) + grp];
  float suv = (float)su[row * (K / GS) + grp], buv = (float)bu[row * (K / GS) + grp];
  unsigned int a = wgr[kk / per_word], b = wur[kk / per_word];
  for (int p = 0; p < per_word; ++p) {
    float xv = (float)xt[kk + p];
    g += xv * (sgv * (float)((a >> (BITS * p)) & mask) + bgv);
    u += xv * (suv * (float)((b >> (BITS * p)) & mask) + buv);
  }
}
T gt = T(g);
out[i] = Multiply{}(Multiply{}(gt, Sigmoid{}(gt)), T(u));
