// moe_router (CUDA body): one block of BD threads per row of E gate logits. KIND 0: top-k of the
// logits then softmax over them (Mixtral); 1: softmax then top-k, optional renormalisation
// (Qwen3); 2: softmax then top-k, no renormalisation (Qwen2).
// Bit-identity with mlx-lm's op chain on MLX's CUDA backend needs MLX's own arithmetic order:
// - softmax: MLX's online-normalizer kernel (block BD = MLX's choice for the softmax length,
//   NR = 16 / sizeof(T) reads per thread, warp then block cg::reduce, exp via __expf, output
//   exp(x - max) * (1 / normalizer));
// - argpartition is a stable ascending sort on CUDA: `argpartition(-p)[:k]` = descending, ties
//   -> lower index (KIND 0/2); `argpartition(p)[-k:]` = ascending, and at ties the higher
//   indices are the ones kept (KIND 1); NaN sorts last;
// - the renormalising sum is MLX's row reduction: NR-element chunks summed in T per thread, then
//   cg::reduce across threads.
// inputs: logits [R, E] (T); outputs: indices [R, K] (uint32), weights [R, K] (T);
// template: T, E, K, KIND, NORM, BD, NR.
auto block = cg::this_thread_block();
auto warp = cg::tiled_partition<32>(block);
const int tid = threadIdx.x;
const long long r = blockIdx.x;
const T* g = logits + r * E;
__shared__ float p[E];             // the softmax input/output row (values exactly representable in T)
__shared__ unsigned int sel[K];
__shared__ float red_max[32];
__shared__ float red_sum[32];
__shared__ T part[32];

// The top K of v[0..E) into sel, in the slot order of MLX's CUDA argpartition, by warp 0:
// last_k (Qwen3's argpartition(v)[-k:]): ascending, the later index kept at a tie (it sorts
// after the earlier one); else (argpartition(-v)[:k]): descending, ties -> lower index.
auto select_top_k = [&](const float* v, bool last_k) {
  if (warp.meta_group_rank() != 0) return;
  if (last_k) zmlx_warp_top_k<E, K>(v, warp.thread_rank(), ZmlxTopAscLast{}, sel, true);
  else zmlx_warp_top_k<E, K>(v, warp.thread_rank(), ZmlxTopDesc{}, sel, false);
};

for (int e = tid; e < E; e += BD) p[e] = (float)g[e];
block.sync();
if (KIND == 0) {
  // Top-k of the logits, then the softmax runs over the k selected ones.
  select_top_k(p, false);
  block.sync();
  // The selection is done: p[0..k) can take the selected logits.
  for (int j = tid; j < K; j += BD) p[j] = (float)g[sel[j]];
  block.sync();
}

// MLX's softmax over p[0..n).
const int n = (KIND == 0) ? K : E;
{
  cg::greater<float> max_op;
  cg::plus<float> plus_op;
  float prevmax;
  float maxval = Limits<float>::finite_min();
  float normalizer = 0.0f;
  const int rounds = (n + BD * NR - 1) / (BD * NR);
  for (int rr = 0; rr < rounds; rr++) {
    int index = rr * BD + tid;
    float v[NR];
    for (int i = 0; i < NR; ++i) {
      int e = index * NR + i;
      v[i] = e < n ? p[e] : (float)Limits<T>::min();
    }
    prevmax = maxval;
    for (int i = 0; i < NR; ++i) maxval = max_op(maxval, v[i]);
    normalizer = normalizer * __expf(prevmax - maxval);
    for (int i = 0; i < NR; i++) normalizer = normalizer + __expf(v[i] - maxval);
  }
  prevmax = maxval;
  maxval = cg::reduce(warp, maxval, max_op);
  normalizer = normalizer * __expf(prevmax - maxval);
  normalizer = cg::reduce(warp, normalizer, plus_op);
  prevmax = maxval;
  if (warp.thread_rank() == 0) red_max[warp.meta_group_rank()] = maxval;
  block.sync();
  maxval = warp.thread_rank() < warp.meta_group_size() ? red_max[warp.thread_rank()] : Limits<float>::min();
  maxval = cg::reduce(warp, maxval, max_op);
  normalizer = normalizer * __expf(prevmax - maxval);
  if (warp.thread_rank() == 0) red_sum[warp.meta_group_rank()] = normalizer;
  block.sync();
  normalizer = warp.thread_rank() < warp.meta_group_size() ? red_sum[warp.thread_rank()] : 0.0f;
  normalizer = cg::reduce(warp, normalizer, plus_op);
  normalizer = 1 / normalizer;
  // Every thread reads only its own elements above, so they can be overwritten in place.
  for (int rr = 0; rr < rounds; rr++) {
    int index = rr * BD + tid;
    for (int i = 0; i < NR; ++i) {
      int e = index * NR + i;
      if (e < n) p[e] = (float)T(__expf(p[e] - maxval) * normalizer);
    }
  }
}
block.sync();

unsigned int* oi = indices + r * K;
T* ow = weights + r * K;
if (KIND == 0) {
  for (int j = tid; j < K; j += BD) { oi[j] = sel[j]; ow[j] = T(p[j]); }
  return;
}
select_top_k(p, KIND == 1);
block.sync();
if (KIND == 2 || !NORM) {
  for (int j = tid; j < K; j += BD) { oi[j] = sel[j]; ow[j] = T(p[sel[j]]); }
  return;
}
// scores / sum(scores): MLX's row sum = per-thread sums of NR consecutive slots, then cg::reduce.
ZmlxSum sum_op;
T acc = T(0.0f);
if (tid < 32) {
  for (int i = 0; i < NR; ++i) {
    int j = tid * NR + i;
    acc = sum_op(acc, j < K ? T(p[sel[j]]) : T(0.0f));
  }
  acc = cg::reduce(warp, acc, sum_op);
  if (tid == 0) part[0] = acc;
}
block.sync();
for (int j = tid; j < K; j += BD) { oi[j] = sel[j]; ow[j] = Divide{}(T(p[sel[j]]), part[0]); }
