// qmv_grouped (CUDA body): the prefill form of the quantized expert dots — qmv_swiglu's gate/up
// (GLU 1) and qmv_combine's down projection (GLU 0, its slot sum is qmv_slot_sum.cu). The
// (token, slot) pairs come sorted by expert (`order`); a warp takes TB consecutive sorted pairs
// and one output row, so an expert's row is read once per chunk and each word's unpacked weights
// serve every pair of that expert in the chunk (the decode bodies read a row once per pair).
// Each (pair, row) is the same sequence of operations as in the decode bodies
// (zmlx_qdot2_lane / zmlx_qdot_lane, then zmlx_warp_sum): a pair's result does not depend on the
// path, the chunking, the order or the token count (deterministic, batch-invariant, prefill =
// decode); not bit-identical to gather_qmm (class validated).
// GLU 1: x [T, K], row t = pair / KSEL; out [T, KSEL, N] = swiglu(T(gate dot), T(up dot)).
// GLU 0: x [T, KSEL, K], row = pair; out [T, KSEL, N] = T(dot) (wb/sb/bb: pass wa/sa/ba, unread).
// Launch: 32 threads per (chunk, row), blocks of 256; consecutive warps take consecutive rows.
// E = 1 is a dense projection (qmv_linear): pair p = row p; idx and order may be any uint32 array.
// inputs: x, idx [T, KSEL] (uint32), order [T * KSEL] (uint32), wa/wb [E, N, K*BITS/32] (uint32),
// sa/ba/sb/bb [E, N, K/GS] (T); template: T, K, N, KSEL, GS, BITS, E, TB, GLU.
const int lane = threadIdx.x & 31;
const long long o = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
const long long P = (long long)x_shape[0] * KSEL;  // x: [T, K] or [T, KSEL, K]
const long long chunks = (P + TB - 1) / TB;
if (o >= chunks * N) return;  // whole warps only
const int r = (int)(o % N);
const long long c0 = (o / N) * TB;
const int np = (int)min((long long)TB, P - c0);
constexpr int PW = 32 / BITS;
constexpr int KW = K / PW;
constexpr int G = K / GS;
constexpr unsigned int MASK = (1u << BITS) - 1u;
unsigned int pr[TB], ex[TB];
float acc_a[TB], acc_b[TB];
#pragma unroll
for (int p = 0; p < TB; ++p) {
  // E = 1 (a dense projection): the pairs in order, all on expert 0; idx/order are not read.
  pr[p] = p < np ? (E == 1 ? (unsigned int)(c0 + p) : order[c0 + p]) : 0u;
  ex[p] = p < np ? (E == 1 ? 0u : idx[pr[p]]) : 0xffffffffu;  // >= E: skipped (padding or an invalid expert)
  acc_a[p] = 0.0f;
  acc_b[p] = 0.0f;
}
#pragma unroll 2
for (int w = lane; w < KW; w += 32) {
  const int grp = (w * PW) / GS;
  float qa[PW], qb[PW];
  float s_a = 0.0f, b_a = 0.0f, s_b = 0.0f, b_b = 0.0f;
#pragma unroll
  for (int p = 0; p < TB; ++p) {
    if (ex[p] >= (unsigned int)E) continue;  // uniform across the warp
    if (p == 0 || ex[p] != ex[p - 1]) {
      const long long row = (long long)ex[p] * N + r;
      const unsigned int ua = wa[row * KW + w];
#pragma unroll
      for (int i = 0; i < PW; ++i) qa[i] = (float)((ua >> (BITS * i)) & MASK);
      s_a = (float)sa[row * G + grp];
      b_a = (float)ba[row * G + grp];
      if (GLU) {
        const unsigned int ub = wb[row * KW + w];
#pragma unroll
        for (int i = 0; i < PW; ++i) qb[i] = (float)((ub >> (BITS * i)) & MASK);
        s_b = (float)sb[row * G + grp];
        b_b = (float)bb[row * G + grp];
      }
    }
    const T* xr = x + (long long)(GLU ? pr[p] / KSEL : pr[p]) * K;
    const bool vec = (reinterpret_cast<size_t>(xr) & 15) == 0;
    float xv[PW];
    zmlx_load_word_x<PW>(xr + w * PW, vec, xv);
    float da = 0.0f, db = 0.0f, xs = 0.0f;
#pragma unroll
    for (int i = 0; i < PW; ++i) {
      da = fmaf(xv[i], qa[i], da);
      if (GLU) db = fmaf(xv[i], qb[i], db);
      xs += xv[i];
    }
    acc_a[p] = fmaf(s_a, da, acc_a[p]);
    acc_a[p] = fmaf(b_a, xs, acc_a[p]);
    if (GLU) {
      acc_b[p] = fmaf(s_b, db, acc_b[p]);
      acc_b[p] = fmaf(b_b, xs, acc_b[p]);
    }
  }
}
#pragma unroll
for (int p = 0; p < TB; ++p) {
  if (p >= np) break;
  const float a = zmlx_warp_sum(acc_a[p]);
  const float b = GLU ? zmlx_warp_sum(acc_b[p]) : 0.0f;
  if (lane != 0) continue;
  const long long oi = (long long)pr[p] * N + r;
  if (ex[p] >= (unsigned int)E) {
    out[oi] = T(NAN);
  } else if (GLU) {
    const T gt = T(a);
    out[oi] = Multiply{}(Multiply{}(gt, Sigmoid{}(gt)), T(b));
  } else {
    out[oi] = T(a);
  }
}
