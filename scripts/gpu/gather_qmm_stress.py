"""Issue #15: repeat layer 0's sorted gather_qmm down projection (inputs from a zmlx prefill dump,
weights via mx.load) N times in one process, alone and with other GPU work queued around it, and
count results that differ from the first. usage: python gather_qmm_stress.py CKPT DUMP [N]"""
import json
import sys

import mlx.core as mx
from ckpt_tensors import quantized

ckpt, dump = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 200
prefix = "model.layers.0.mlp.switch_mlp.down_proj"
w, s, b = quantized(ckpt, prefix)
d = mx.load(dump)
h = d["l0.experts_h"].astype(mx.bfloat16)
idx = d["l0.router_indices"].astype(mx.uint32).flatten()[d["l0.experts_sort_order"].astype(mx.uint32)]
mx.eval(h, idx)


def f(x):
    return mx.gather_qmm(x, w, s, b, rhs_indices=idx, transpose=True, group_size=64, bits=4, sorted_indices=True)


ref = f(h)
mx.eval(ref)
out = {}
for mode in ("alone", "batched", "with_noise"):
    bad = 0
    for i in range(n // 10):
        if mode == "alone":
            ys = [f(h) for _ in range(10)]
            for y in ys:
                mx.eval(y)
        elif mode == "batched":  # ten in one graph
            ys = [f(h) for _ in range(10)]
            mx.eval(*ys)
        else:  # other kernels in the same graph, each call on a freshly computed copy of h
            ys = [f((h * 1.0 + 0.0).astype(mx.bfloat16)) for _ in range(10)]
            mx.eval(*ys, *[mx.matmul(h[:, 0, :], h[:, 0, :].T) for _ in range(4)])
        bad += sum(int(not mx.array_equal(y, ref).item()) for y in ys)
    out[mode] = {"runs": (n // 10) * 10, "differ_from_first": bad}
print(json.dumps(out), flush=True)
