// sigmoid_router (CUDA body): DeepSeek-V3 / Kimi-K2 / GLM group_expert_select, one warp per
// row of E gate logits, all in float: orig = sigmoid(g); s = orig + bias; group score = sum of
// the group's top-2 s; the NG-TG lowest groups (ties: lower index) get s = 0.0; top-K by s
// (descending, ties -> lower index: MLX's CUDA argpartition is a stable sort); w = orig[idx],
// renormalised (+eps) and times rsf. The warp selects (zmlx_warp_top_k; NaN scores sort last,
// as in MLX's sort); the renormalising sum is MLX's row reduction (4-element chunks per lane,
// then cg::reduce).
// inputs: logits [R, E] (T), bias [E + 2] (float: bias, then eps, rsf);
// outputs: indices [R, K] (uint32), weights [R, K] (float); template: T, E, K, NG, TG, NORM, HAS_EPS.
auto warp = cg::tiled_partition<32>(cg::this_thread_block());
const int lane = threadIdx.x;
const long long r = blockIdx.x;
__shared__ float orig[E];
__shared__ float s[E];
__shared__ float sw[K];
__shared__ unsigned int si[K];
const T* g = logits + r * E;
for (int e = lane; e < E; e += 32) { orig[e] = Sigmoid{}((float)g[e]); s[e] = orig[e] + bias[e]; }
__syncwarp();
if (NG > 1) {
  constexpr int per = E / NG;
  __shared__ float gs[NG];
  __shared__ bool dropped[NG];
  // Each group's top-2 sum by one lane, in index order (the sequential scan's operands).
  for (int q = lane; q < NG; q += 32) {
    float a = -INFINITY, b = -INFINITY;
    for (int j = 0; j < per; ++j) { float v = s[q * per + j]; if (v > a) { b = a; a = v; } else if (v > b) { b = v; } }
    gs[q] = b + a;
    dropped[q] = false;
  }
  __syncwarp();
  if (lane == 0) {
    for (int n = 0; n < NG - TG; ++n) {
      int lo = -1;
      for (int q = 0; q < NG; ++q) if (!dropped[q] && (lo < 0 || gs[q] < gs[lo])) lo = q;
      dropped[lo] = true;
    }
  }
  __syncwarp();
  for (int e = lane; e < E; e += 32) if (dropped[e / per]) s[e] = 0.0f;
  __syncwarp();
}
zmlx_warp_top_k<E, K>(s, lane, ZmlxTopDesc{}, si, false);
for (int j = lane; j < K; j += 32) sw[j] = orig[si[j]];
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
