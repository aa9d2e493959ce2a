// rope_decode (CUDA body): RoPE of the MLA decode step's q_pe (times the softmax scale) and k_pe
// in one launch, MLX's rope formula: pos = (t + OFFSET) * scale, theta = pos * inv_freq[i]
// (inv_freq precomputed with MLX ops), cos/sin in float cast to T, x1*c - x2*s, x1*s + x2*c in T.
// One thread per rotated pair of q (first) then k. inputs: q [B, H, L, R], k [B, Hk, L, R] (T),
// inv_freq [DIMS/2] (float), params [4] (float: scale, mscale, q_scale, offset);
// outputs q_out, k_out; template: T, DIMS, TRAD, HAS_MSCALE.
const int R = q_shape[3], L = q_shape[2], half = DIMS / 2;
const long long q_rows = (long long)q_shape[0] * q_shape[1] * L;
const long long k_rows = (long long)k_shape[0] * k_shape[1] * L;
long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
if (i >= (q_rows + k_rows) * R) return;
bool is_q = i < q_rows * R;
long long j = is_q ? i : i - q_rows * R;
long long row = j / R;
int c = (int)(j % R);
const T* x = (is_q ? q : k) + row * R;
T* o = (is_q ? q_out : k_out) + row * R;
int t = (int)(row % L);
T ms = T(params[1]);
auto ld = [&](int e) { return HAS_MSCALE ? Multiply{}(x[e], ms) : x[e]; };
T v;
if (c >= DIMS) {
  v = ld(c);
} else {
  int p = TRAD ? c / 2 : (c < half ? c : c - half);
  int e1 = TRAD ? 2 * p : p, e2 = TRAD ? 2 * p + 1 : p + half;
  float pos = (float)(t + (int)params[3]) * params[0];
  float theta = pos * inv_freq[p];
  T cs = T(cosf(theta)), sn = T(sinf(theta));
  T x1 = ld(e1), x2 = ld(e2);
  bool first = (c == e1);
  v = first ? Subtract{}(Multiply{}(x1, cs), Multiply{}(x2, sn)) : Add{}(Multiply{}(x1, sn), Multiply{}(x2, cs));
}
o[c] = is_q ? Multiply{}(v, T(params[2])) : v;
