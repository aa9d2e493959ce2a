"""Pure-MLX probe for the MLA mismatch on CUDA: the ops MLA applies to `mx.split` views
(reshape/transpose, rms_norm, rope, matmul, multiply), each compared with the same op on a
contiguous copy of the view, repeated; prints max |difference| per (op, dtype). On a correct
backend every number is 0.

usage: python split_repro.py [REPEATS]
"""
import json
import sys

import mlx.core as mx

reps = int(sys.argv[1]) if len(sys.argv) > 1 else 10
B, L, H, NOPE, ROPE, LORA = 1, 24, 4, 64, 32, 128
for dt in (mx.float32, mx.bfloat16):
    worst = {}
    for r in range(reps):
        mx.random.seed(r)
        xq = mx.random.normal((B, L, H * (NOPE + ROPE))).astype(dt)
        xkv = mx.random.normal((B, L, LORA + ROPE)).astype(dt)
        w = mx.random.normal((LORA,)).astype(dt)
        q = xq.reshape(B, L, H, NOPE + ROPE).transpose(0, 2, 1, 3)
        q_nope, q_pe = mx.split(q, [NOPE], axis=-1)
        ckv, k_pe = mx.split(xkv, [LORA], axis=-1)
        k_pe4 = k_pe.reshape(B, L, 1, ROPE).transpose(0, 2, 1, 3)
        c = mx.contiguous
        x = mx.random.normal((B, L, 256)).astype(dt)
        wq = (mx.random.normal((H * (NOPE + ROPE), 256)) * 0.05).astype(dt)
        y1 = x @ wq.T
        mx.eval(y1)
        y2 = x @ wq.T
        mx.eval(y2)
        ya, _ = mx.split(y1.reshape(B, L, H, NOPE + ROPE).transpose(0, 2, 1, 3), [NOPE], axis=-1)
        yb, _ = mx.split(y2.reshape(B, L, H, NOPE + ROPE).transpose(0, 2, 1, 3), [NOPE], axis=-1)
        cases = {
            "same matmul twice (+split)": (ya * 1, yb * 1),
            "q_nope copy": (q_nope * 1, c(q_nope) * 1),
            "rope(q_pe)": (mx.fast.rope(q_pe, ROPE, traditional=True, base=1e6, scale=1.0, offset=0),
                           mx.fast.rope(c(q_pe), ROPE, traditional=True, base=1e6, scale=1.0, offset=0)),
            "rope(k_pe reshaped)": (mx.fast.rope(k_pe4, ROPE, traditional=True, base=1e6, scale=1.0, offset=0),
                                    mx.fast.rope(c(k_pe4), ROPE, traditional=True, base=1e6, scale=1.0, offset=0)),
            "rms_norm(ckv)": (mx.fast.rms_norm(ckv, w, 1e-6), mx.fast.rms_norm(c(ckv), w, 1e-6)),
            "matmul(q_pe, k_pe^T)": (q_pe @ k_pe4.swapaxes(-1, -2), c(q_pe) @ c(k_pe4).swapaxes(-1, -2)),
        }
        for name, (a, b) in cases.items():
            mx.eval(a, b)
            dlt = float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item())
            worst[name] = max(worst.get(name, 0.0), dlt)
    for name, v in worst.items():
        print(json.dumps({"dtype": str(dt), "op": name, "max_abs_diff_view_vs_contiguous": v, "repeats": reps}))
