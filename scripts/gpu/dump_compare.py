"""Issue #15: how far each zmlx prefill dump's layer-0 expert down projection is from MLX's own
result on the same inputs (the dump's SwiGLU output, sorted expert indices, the checkpoint's
down weights via mx.load, gather_qmm with sorted indices as zmlx calls it, bf16).

usage: python dump_compare.py CKPT_DIR LABEL=DUMP_FILE [LABEL=DUMP_FILE ...]
Prints one JSON line per dump: label, sha of zmlx's result, elements differing from the
recompute, max |diff|, and the differing rows/columns (first few).
"""
import hashlib
import json
import sys

import mlx.core as mx
from ckpt_tensors import quantized
import numpy as np

ckpt = sys.argv[1]
prefix = "model.layers.0.mlp.switch_mlp.down_proj"
w, s, b = quantized(ckpt, prefix)
for arg in sys.argv[2:]:
    label, path = arg.split("=", 1)
    d = mx.load(path)
    h = d["l0.experts_h"].astype(mx.bfloat16)
    idx = d["l0.router_indices"].astype(mx.uint32).flatten()[d["l0.experts_sort_order"].astype(mx.uint32)]
    ref = mx.gather_qmm(h, w, s, b, rhs_indices=idx, transpose=True, group_size=64, bits=4, sorted_indices=True)
    z = np.array(d["l0.experts_down"].astype(mx.float32))
    r = np.array(ref.astype(mx.float32))
    bad = np.argwhere(z != r)
    # The qmm_sm80 race's signature: a late cp.async of x's last K tile lands on the output tile,
    # so a corrupted out[r, n] = x[r, K - 64 + (n % 128 - 64)] (K - 64: the last tile's start).
    hx = np.array(h.astype(mx.float32))
    K = hx.shape[-1]
    sig = [bool(z[tuple(i)] == hx[i[0], 0, K - 64 + (int(i[-1]) % 128 - 64)]) if int(i[-1]) % 128 >= 64 else False
           for i in bad]
    print(json.dumps({"label": label, "zmlx_sha": hashlib.sha256(z.tobytes()).hexdigest()[:16],
                      "ref_sha": hashlib.sha256(r.tobytes()).hexdigest()[:16], "shape": list(z.shape),
                      "differ": int(len(bad)), "max_abs": float(np.max(np.abs(z - r))) if len(bad) else 0.0,
                      "rel_max": float(np.max(np.abs(z - r) / (np.abs(r) + 1e-6))) if len(bad) else 0.0,
                      "race_signature": f"{sum(sig)}/{len(sig)}",
                      "rows": sorted({int(x[0]) for x in bad})[:20], "n_rows": len({int(x[0]) for x in bad}),
                      "cols": sorted({int(x[-1]) for x in bad})[:20],
                      "experts_of_rows": sorted({int(np.array(idx)[int(x[0])]) for x in bad})[:20]}), flush=True)
