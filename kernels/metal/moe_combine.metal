// moe_combine (Metal body): same algorithm, slot order and MODEs as kernels/cuda/moe_combine.cu.
// MODE 2 relies on the kernel being compiled without fast-math contraction of `acc + p`.
// inputs: y [R, K, D] (T), w [R, K] (T); output: out [R, D] (T); template: T, K, D, MODE.
uint total = 1;
for (int d = 0; d < w_ndim; ++d) total *= w_shape[d];
total = total / K * D;
uint i = thread_position_in_grid.x;
if (i >= total) return;
uint r = i / D;
uint c = i % D;
if (MODE == 0) {
  T acc = T(0);
  for (int j = 0; j < K; ++j) { T p = y[(r * K + j) * D + c] * w[r * K + j]; acc = acc + p; }
  out[i] = acc;
} else {
  float acc = 0.0f;
  for (int j = 0; j < K; ++j) { float p = float(y[(r * K + j) * D + c]) * float(w[r * K + j]); acc = acc + p; }
  out[i] = T(acc);
}
