// qmv_combine (CUDA body): out[t, r] = sum_j T(dot(h[t, j], Wd[e] row r)) * w[t, j], e = idx[t, j],
// slot order j = 0..KSEL-1, the product and the sum in float, cast to O once; the [KSEL, N]
// expert outputs are never stored. One thread per output element.
// inputs: h [T, KSEL, K] (T), idx [T, KSEL] (uint32), w [T, KSEL] (float), wd [E, N, K*BITS/32]
// (uint32), sd/bd [E, N, K/GS] (T); output out [T, N] (O); template: T, O, K, N, KSEL, GS, BITS, E.
long long total = (long long)idx_shape[0] * N;
long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
if (i >= total) return;
int r = (int)(i % N);
long long t = i / N;
const int per_word = 32 / BITS;
const unsigned int mask = (1u << BITS) - 1u;
float acc = 0.0f;
for (int j = 0; j < KSEL; ++j) {
  unsigned int e = idx[t * KSEL + j];
  if (e >= (unsigned int)E) { acc = NAN; break; }
  const long long row = (long long)e * N + r;
  const unsigned int* wr = wd + row * (K / per_word);
  const T* ht = h + (t * KSEL + j) * K;
  float y = 0.0f;
  for (int kk = 0; kk < K; kk += per_word) {
    int grp = kk / GS;
    float s = (float)sd[row * (K / GS) + grp], b = (float)bd[row * (K / GS) + grp];
    unsigned int a = wr[kk / per_word];
    for (int p = 0; p < per_word; ++p) y += (float)ht[kk + p] * (s * (float)((a >> (BITS * p)) & mask) + b);
  }
  acc = __fadd_rn(acc, __fmul_rn((float)T(y), w[t * KSEL + j]));
}
out[i] = O(acc);
