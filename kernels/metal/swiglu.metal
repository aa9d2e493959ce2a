// swiglu (Metal body for MLX's metal_kernel): same algorithm and rounding order as
// kernels/cuda/swiglu.cu. sigmoid as MLX's Metal unary op: y = 1 / (1 + exp(-|x|)),
// x < 0 ? y : 1 - y, in T. inputs: gate, up (T); output: out (T); template: T.
uint total = 1;
for (int d = 0; d < gate_ndim; ++d) total *= gate_shape[d];
uint i = thread_position_in_grid.x;
if (i >= total) return;
T g = gate[i];
T y = T(1) / (T(1) + metal::exp(metal::abs(g)));
T s = g < T(0) ? y : T(1) - y;
T a = g * s;
out[i] = a * up[i];
