// moe_combine (CUDA body): out[r, c] = sum_j y[r, j, c] * w[r, j], slot order j = 0..K-1, one
// thread per output element. MODE 0 (act): product rounded to T, accumulate in T (MLX 0.32.2 CPU
// stock); MODE 1 (f32): product and sum in float, FMA allowed; MODE 2 (f32_no_fma): product
// rounded to float, then added (__fmul_rn/__fadd_rn forbid contraction).
// inputs: y [R, K, D] (T), w [R, K] (T); output: out [R, D] (T); template: T, K, D, MODE, ACC.
long long total = 1;
for (int d = 0; d < w_ndim; ++d) total *= w_shape[d];
total = total / K * D;
if (ACC == 2) {
  // Probe (K <= 32, one warp per output element, lane j = slot j): the products rounded to T,
  // then one cg::reduce over the warp in T, as MLX's looped column reduction combines rows.
  auto warp = cg::tiled_partition<32>(cg::this_thread_block());
  long long o = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
  int lane = threadIdx.x % 32;
  if (o >= total) return;
  long long ro = o / D;
  int co = (int)(o % D);
  T v = lane < K ? Multiply{}(y[ro * K * D + (long long)lane * D + co], w[ro * K + lane]) : T(0.0f);
  v = cg::reduce(warp, v, ZmlxSum{});
  if (lane == 0) out[o] = v;
  return;
}
long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
if (i >= total) return;
long long r = i / D;
int c = (int)(i % D);
const T* yr = y + r * K * D + c;
const T* wr = w + r * K;
if (MODE == 0) {
  // MLX runs the multiply and the sum as separate kernels: for float the product must not be
  // contracted into an FMA with the add (nvcc contracts by default), hence the _rn intrinsics.
  // ACC 1 (half types; a probe, see zmlx selftest): the product rounded to T, the running sum
  // kept in float and rounded once.
  if (ACC == 1 && sizeof(T) < 4) {
    float acc = 0.0f;
    for (int j = 0; j < K; ++j) acc = __fadd_rn(acc, (float)Multiply{}(yr[(long long)j * D], wr[j]));
    out[i] = T(acc);
    return;
  }
  T acc = T(0.0f);
  for (int j = 0; j < K; ++j) {
    if constexpr (sizeof(T) == 4) acc = __fadd_rn(acc, __fmul_rn(yr[(long long)j * D], wr[j]));
    else acc = Add{}(acc, Multiply{}(yr[(long long)j * D], wr[j]));
  }
  out[i] = acc;
} else if (MODE == 1) {
  float acc = 0.0f;
  for (int j = 0; j < K; ++j) acc += (float)yr[(long long)j * D] * (float)wr[j];
  out[i] = T(acc);
} else {
  float acc = 0.0f;
  for (int j = 0; j < K; ++j) acc = __fadd_rn(acc, __fmul_rn((float)yr[(long long)j * D], (float)wr[j]));
  out[i] = T(acc);
}
