// qmv_slot_sum (CUDA body): the slot sum of qmv_combine's prefill form: out[t, r] =
// sum_j y[t, j, r] * w[t, j] in float, slots in order j = 0..KSEL-1, cast to O once — the
// decode body's (qmv_combine.cu) final sum on the same T-rounded expert dots, so a token's
// output does not depend on the path. One thread per (t, r).
// inputs: y [T, KSEL, N] (T), w [T, KSEL] (O); output out [T, N] (O); template: T, O, N, KSEL.
const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
if (i >= (long long)w_shape[0] * N) return;
const long long t = i / N;
const int r = (int)(i % N);
float acc = 0.0f;
#pragma unroll
for (int j = 0; j < KSEL; ++j) acc = __fadd_rn(acc, __fmul_rn((float)y[(t * KSEL + j) * N + r], (float)w[t * KSEL + j]));
out[i] = O(acc);
