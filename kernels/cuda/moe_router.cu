// moe_router (CUDA body): one thread per row of E gate logits. KIND 0: top-k of the logits then
// softmax over them (Mixtral); 1: softmax then top-k, optional renormalisation (Qwen3); 2:
// softmax then top-k, no renormalisation (Qwen2). Softmax accumulates in float (precise);
// selection is a stable descending scan (ties -> lower index), emitted in descending order for
// KIND 0/2 and ascending for KIND 1 (the slot orders mlx-lm's argpartition gives on Metal).
// inputs: logits [R, E] (T); outputs: indices [R, K] (uint32), weights [R, K] (T);
// template: T, E, K, KIND, NORM.
long long rows = 1;
for (int d = 0; d < logits_ndim - 1; ++d) rows *= logits_shape[d];
long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
if (r >= rows) return;
const T* g = logits + r * E;
float p[E];
float mx = -INFINITY;
for (int e = 0; e < E; ++e) mx = fmaxf(mx, (float)g[e]);
float sum = 0.0f;
for (int e = 0; e < E; ++e) { p[e] = __expf((float)g[e] - mx); sum += p[e]; }
for (int e = 0; e < E; ++e) p[e] = (float)T(p[e] / sum);
const float* key = (KIND == 0) ? nullptr : p;
unsigned int sel[K];
bool used[E];
for (int e = 0; e < E; ++e) used[e] = false;
for (int j = 0; j < K; ++j) {
  int best = -1;
  float bv = -INFINITY;
  for (int e = 0; e < E; ++e) {
    float v = key ? key[e] : (float)g[e];
    if (!used[e] && (best < 0 || v > bv)) { best = e; bv = v; }
  }
  used[best] = true;
  sel[j] = best;
}
unsigned int* oi = indices + r * K;
T* ow = weights + r * K;
if (KIND == 0) {
  float m2 = -INFINITY, s2 = 0.0f;
  for (int j = 0; j < K; ++j) m2 = fmaxf(m2, (float)g[sel[j]]);
  for (int j = 0; j < K; ++j) s2 += __expf((float)g[sel[j]] - m2);
  for (int j = 0; j < K; ++j) { oi[j] = sel[j]; ow[j] = T(__expf((float)g[sel[j]] - m2) / s2); }
} else if (KIND == 1) {
  T total = T(0.0f);
  for (int j = 0; j < K; ++j) { oi[j] = sel[K - 1 - j]; ow[j] = T(p[sel[K - 1 - j]]); total = Add{}(total, ow[j]); }
  if (NORM) for (int j = 0; j < K; ++j) ow[j] = Divide{}(ow[j], total);
} else {
  for (int j = 0; j < K; ++j) { oi[j] = sel[j]; ow[j] = T(p[sel[j]]); }
}
