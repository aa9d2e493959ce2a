// sigmoid_router (Metal body): same algorithm, selection order and inputs as
// kernels/cuda/sigmoid_router.cu. Template: T, E, K, NG, TG, NORM, HAS_EPS.
uint rows = 1;
for (int d = 0; d < logits_ndim - 1; ++d) rows *= logits_shape[d];
uint r = thread_position_in_grid.x;
if (r >= rows) return;
const device T* g = logits + r * E;
const float eps = bias[E];
const float rsf = bias[E + 1];
float orig[E], s[E];
for (int e = 0; e < E; ++e) {
  float x = float(g[e]);
  float y = 1.0f / (1.0f + metal::exp(metal::abs(x)));
  orig[e] = x < 0.0f ? y : 1.0f - y;
  s[e] = orig[e] + bias[e];
}
if (NG > 1) {
  const int per = E / NG;
  float gs[NG];
  bool dropped[NG];
  for (int q = 0; q < NG; ++q) {
    float a = -INFINITY, b = -INFINITY;
    for (int j = 0; j < per; ++j) { float v = s[q * per + j]; if (v > a) { b = a; a = v; } else if (v > b) { b = v; } }
    gs[q] = b + a;
    dropped[q] = false;
  }
  for (int n = 0; n < NG - TG; ++n) {
    int lo = -1;
    for (int q = 0; q < NG; ++q) if (!dropped[q] && (lo < 0 || gs[q] < gs[lo])) lo = q;
    dropped[lo] = true;
  }
  for (int q = 0; q < NG; ++q) if (dropped[q]) for (int j = 0; j < per; ++j) s[q * per + j] = 0.0f;
}
bool used[E];
for (int e = 0; e < E; ++e) used[e] = false;
device uint* oi = indices + r * K;
device float* ow = weights + r * K;
for (int j = 0; j < K; ++j) {
  int best = -1;
  for (int e = 0; e < E; ++e) if (!used[e] && (best < 0 || s[e] > s[best])) best = e;
  used[best] = true;
  oi[j] = uint(best);
  ow[j] = orig[best];
}
if (K > 1 && NORM) {
  float den = 0.0f;
  for (int j = 0; j < K; ++j) den = den + ow[j];
  if (HAS_EPS) den = den + eps;
  for (int j = 0; j < K; ++j) ow[j] = ow[j] / den;
}
for (int j = 0; j < K; ++j) ow[j] = ow[j] * rsf;
