// sigmoid_router (CUDA body): DeepSeek-V3 / Kimi-K2 / GLM group_expert_select, one thread per
// row of E gate logits, all in float: orig = sigmoid(g); s = orig + bias; group score = sum of
// the group's top-2 s; the NG-TG lowest groups (ties: lower index) get s = 0.0; top-K by s
// (descending, ties -> lower index); w = orig[idx], renormalised (+eps) and times rsf.
// inputs: logits [R, E] (T), bias [E + 2] (float: bias, then eps, rsf);
// outputs: indices [R, K] (uint32), weights [R, K] (float); template: T, E, K, NG, TG, NORM, HAS_EPS.
long long rows = 1;
for (int d = 0; d < logits_ndim - 1; ++d) rows *= logits_shape[d];
long long r = (long long)blockIdx.x * blockDim.x + threadIdx.x;
if (r >= rows) return;
const T* g = logits + r * E;
const float eps = bias[E];
const float rsf = bias[E + 1];
float orig[E], s[E];
for (int e = 0; e < E; ++e) { orig[e] = Sigmoid{}((float)g[e]); s[e] = orig[e] + bias[e]; }
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
unsigned int* oi = indices + r * K;
float* ow = weights + r * K;
for (int j = 0; j < K; ++j) {
  int best = -1;
  for (int e = 0; e < E; ++e) if (!used[e] && (best < 0 || s[e] > s[best])) best = e;
  used[best] = true;
  oi[j] = best;
  ow[j] = orig[best];
}
if (K > 1 && NORM) {
  float den = 0.0f;
  for (int j = 0; j < K; ++j) den = __fadd_rn(den, ow[j]);
  if (HAS_EPS) den = __fadd_rn(den, eps);
  for (int j = 0; j < K; ++j) ow[j] = __fdiv_rn(ow[j], den);
}
for (int j = 0; j < K; ++j) ow[j] = __fmul_rn(ow[j], rsf);
