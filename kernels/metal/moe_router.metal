// moe_router (Metal body): same algorithm, selection order and KINDs as kernels/cuda/moe_router.cu.
// inputs: logits [R, E] (T); outputs: indices [R, K] (uint32), weights [R, K] (T);
// template: T, E, K, KIND, NORM.
uint rows = 1;
for (int d = 0; d < logits_ndim - 1; ++d) rows *= logits_shape[d];
uint r = thread_position_in_grid.x;
if (r >= rows) return;
const device T* g = logits + r * E;
float p[E];
float mx = -INFINITY;
for (int e = 0; e < E; ++e) mx = metal::fmax(mx, float(g[e]));
float sum = 0.0f;
for (int e = 0; e < E; ++e) { p[e] = metal::exp(float(g[e]) - mx); sum += p[e]; }
for (int e = 0; e < E; ++e) p[e] = float(T(p[e] / sum));
uint sel[K];
bool used[E];
for (int e = 0; e < E; ++e) used[e] = false;
for (int j = 0; j < K; ++j) {
  int best = -1;
  float bv = -INFINITY;
  for (int e = 0; e < E; ++e) {
    float v = (KIND == 0) ? float(g[e]) : p[e];
    if (!used[e] && (best < 0 || v > bv)) { best = e; bv = v; }
  }
  used[best] = true;
  sel[j] = uint(best);
}
device uint* oi = indices + r * K;
device T* ow = weights + r * K;
if (KIND == 0) {
  float m2 = -INFINITY, s2 = 0.0f;
  for (int j = 0; j < K; ++j) m2 = metal::fmax(m2, float(g[sel[j]]));
  for (int j = 0; j < K; ++j) s2 += metal::exp(float(g[sel[j]]) - m2);
  for (int j = 0; j < K; ++j) { oi[j] = sel[j]; ow[j] = T(metal::exp(float(g[sel[j]]) - m2) / s2); }
} else if (KIND == 1) {
  T total = T(0);
  for (int j = 0; j < K; ++j) { oi[j] = sel[K - 1 - j]; ow[j] = T(p[sel[K - 1 - j]]); total = total + ow[j]; }
  if (NORM) for (int j = 0; j < K; ++j) ow[j] = ow[j] / total;
} else {
  for (int j = 0; j < K; ++j) { oi[j] = sel[j]; ow[j] = T(p[sel[j]]); }
}
