// swiglu (CUDA body for MLX's cuda_kernel): out = (gate * sigmoid(gate)) * up, rounding to T after
// each op like the stock MLX chain; MLX's own device functors give its exact sigmoid.
// inputs: gate, up (T, row contiguous); output: out (T); template: T; grid.x = gate.size.
long long total = 1;
for (int d = 0; d < gate_ndim; ++d) total *= gate_shape[d];
long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
if (i >= total) return;
T g = gate[i];
T s = Sigmoid{}(g);
T a = Multiply{}(g, s);
out[i] = Multiply{}(a, up[i]);
