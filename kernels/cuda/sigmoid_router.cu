// sigmoid_router (CUDA body): DeepSeek-V3 / Kimi-K2 / GLM group_expert_select, one warp per
// row of E gate logits, all in float: orig = sigmoid(g); s = orig + bias; group score = sum of
// the group's top-2 s; the NG-TG lowest groups (ties: lower index) get s = 0.0; top-K by s
// (descending, ties -> lower index: MLX's CUDA argpartition is a stable sort); w = orig[idx],
// renormalised (+eps) and times rsf. Lane 0 selects; the renormalising sum is MLX's row
// reduction (4-element chunks per lane, then cg::reduce), so all 32 lanes take part in it.
// inputs: logits [R, E] (T), bias [E + 2] (float: bias, then eps, rsf);
// outputs: indices [R, K] (uint32), weights [R, K] (float); template: T, E, K, NG, TG, NORM, HAS_EPS.
auto warp = cg::tiled_partition<32>(cg::this_thread_block());
const int lane = threadIdx.x;
const long long r = blockIdx.x;
__shared__ float sw[K];
__shared__ unsigned int si[K];
if (lane == 0) {
const T* g = logits + r * E;
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
for (int j = 0; j < K; ++j) {
  int best = -1;
  for (int e = 0; e < E; ++e) if (!used[e] && (best < 0 || s[e] > s[best])) best = e;
  used[best] = true;
  si[j] = best;
  sw[j] = orig[best];
}
}
__syncwarp();
float den = 0.0f;
if (K > 1 && NORM) {
  ZmlxSum sum_op;
  for (int i = 0; i < 4; ++i) {
    int j = lane * 4 + i;
    den = sum_op(den, j < K ? sw[j] : 0.0f);
  }
  den = cg::reduce(warp, den, sum_op);
  if (HAS_EPS) den = __fadd_rn(den, bias[E]);
}
if (lane == 0) {
  unsigned int* oi = indices + r * K;
  float* ow = weights + r * K;
  const float rsf = bias[E + 1];
  for (int j = 0; j < K; ++j) {
    float w = sw[j];
    if (K > 1 && NORM) w = __fdiv_rn(w, den);
    oi[j] = si[j];
    ow[j] = __fmul_rn(w, rsf);
  }
}
