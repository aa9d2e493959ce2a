// rope_decode (Metal body): same algorithm and rounding order as kernels/cuda/rope_decode.cu.
// inputs: q [B, H, L, R], k [B, Hk, L, R] (T), inv_freq [DIMS/2] (float), params [4] (float:
// scale, mscale, q_scale, offset); outputs q_out, k_out; template: T, DIMS, TRAD, HAS_MSCALE.
const int R = q_shape[3], L = q_shape[2], half = DIMS / 2;
const ulong q_rows = ulong(q_shape[0]) * q_shape[1] * L;
const ulong k_rows = ulong(k_shape[0]) * k_shape[1] * L;
ulong i = thread_position_in_grid.x;
if (i >= (q_rows + k_rows) * R) return;
bool is_q = i < q_rows * R;
ulong j = is_q ? i : i - q_rows * R;
ulong row = j / R;
int c = int(j % R);
int t = int(row % L);
T ms = T(params[1]);
T v;
if (c >= DIMS) {
  v = is_q ? q[row * R + c] : k[row * R + c];
  if (HAS_MSCALE) v = v * ms;
} else {
  int p = TRAD ? c / 2 : (c < half ? c : c - half);
  int e1 = TRAD ? 2 * p : p, e2 = TRAD ? 2 * p + 1 : p + half;
  float pos = float(t + int(params[3])) * params[0];
  float theta = pos * inv_freq[p];
  T cs = T(metal::precise::cos(theta)), sn = T(metal::precise::sin(theta));
  T x1 = is_q ? q[row * R + e1] : k[row * R + e1];
  T x2 = is_q ? q[row * R + e2] : k[row * R + e2];
  if (HAS_MSCALE) { x1 = x1 * ms; x2 = x2 * ms; }
  if (c == e1) { T a = x1 * cs; T b = x2 * sn; v = a - b; } else { T a = x1 * sn; T b = x2 * cs; v = a + b; }
}
if (is_q) q_out[row * R + c] = v * T(params[2]); else k_out[row * R + c] = v;
