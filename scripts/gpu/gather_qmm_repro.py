"""Pure-MLX reproduction for issue #15's run-to-run drift: layer 0's expert down projection of a
zmlx prefill dump (ZMLX_DUMP_DIR; its router indices, sort order and SwiGLU output), recomputed
with mx.gather_qmm(sorted_indices=True) on the checkpoint's own weights (mx.load), in bf16 and
f32, with the SwiGLU input materialized and (`lazy`) computed in the same graph from the dumped
gate/up, as zmlx runs it. Also compares the down projection's parameters as zmlx held them (the
dump's experts_down_*) with the file's. Prints one JSON line of hashes; run it in several
processes and compare: differing hashes with identical inputs reproduce the drift without zmlx.

usage: python gather_qmm_repro.py CKPT_DIR DUMP_FILE [LAYER_PREFIX]
"""
import hashlib
import json
import sys

import mlx.core as mx
from ckpt_tensors import quantized
import numpy as np

ckpt, dump = sys.argv[1], sys.argv[2]
prefix = sys.argv[3] if len(sys.argv) > 3 else "model.layers.0.mlp.switch_mlp.down_proj"
w, s, b = quantized(ckpt, prefix)
d = mx.load(dump)
h = d["l0.experts_h"]
idx = d["l0.router_indices"].astype(mx.uint32).flatten()[d["l0.experts_sort_order"].astype(mx.uint32)]


def digest(a):
    a = a.astype(mx.float32)
    mx.eval(a)
    return hashlib.sha256(np.array(a).tobytes()).hexdigest()[:16]


out = {"inputs": {"h": digest(h), "idx": digest(idx), "w": hashlib.sha256(np.array(w).tobytes()).hexdigest()[:16]},
       "zmlx_down": digest(d["l0.experts_down"])}
for name, dt in (("bf16", mx.bfloat16), ("f32", mx.float32)):
    x = h.astype(dt)
    ys = [mx.gather_qmm(x, w, s, b, rhs_indices=idx, transpose=True, group_size=64, bits=4, sorted_indices=True)
          for _ in range(3)]
    out[name] = [digest(y) for y in ys]
    # unsorted path on the same rows, as a control
    out[name + "_unsorted"] = digest(mx.gather_qmm(x, w, s, b, rhs_indices=idx, transpose=True, group_size=64,
                                                   bits=4, sorted_indices=False))
# The SwiGLU computed in the same graph as the projection (zmlx's op chain: silu(gate) * up).
gate = d["l0.experts_gate"].astype(mx.bfloat16)
up = d["l0.experts_up"].astype(mx.bfloat16)
mx.eval(gate, up)
lazy = []
for _ in range(3):
    hl = (gate * mx.sigmoid(gate)) * up
    lazy.append(digest(mx.gather_qmm(hl, w, s, b, rhs_indices=idx, transpose=True, group_size=64, bits=4,
                                     sorted_indices=True)))
out["bf16_lazy_swiglu"] = lazy
# The whole expert chain in one graph from the dumped sorted input, as zmlx builds it: gathered
# up/gate projections, SwiGLU, gathered down projection (does the drift need the lazy producers?).
if "l0.experts_x_sorted" in d:
    base = prefix.rsplit(".", 1)[0]
    (uw, us, ub), (gw, gs_, gb) = quantized(ckpt, f"{base}.up_proj"), quantized(ckpt, f"{base}.gate_proj")
    xs = d["l0.experts_x_sorted"].astype(mx.bfloat16)
    mx.eval(xs)
    chain, chain_up = [], []
    for _ in range(3):
        u = mx.gather_qmm(xs, uw, us, ub, rhs_indices=idx, transpose=True, group_size=64, bits=4, sorted_indices=True)
        g = mx.gather_qmm(xs, gw, gs_, gb, rhs_indices=idx, transpose=True, group_size=64, bits=4, sorted_indices=True)
        hh = (g * mx.sigmoid(g)) * u
        chain.append(digest(mx.gather_qmm(hh, w, s, b, rhs_indices=idx, transpose=True, group_size=64, bits=4,
                                          sorted_indices=True)))
        chain_up.append(digest(u))
    out["bf16_full_chain"] = chain
    # The same chain with the expert order computed in the graph too (argsort of the router's
    # indices, as zmlx and mlx-lm do at prefill): indices produced by a kernel still in flight.
    ri = d["l0.router_indices"].astype(mx.uint32)
    mx.eval(ri)
    for sorted_flag in (True, False):
        lazy_idx = []
        for _ in range(5):
            flat = ri.flatten()
            order = mx.argsort(flat)
            li = flat[order]
            u = mx.gather_qmm(xs, uw, us, ub, rhs_indices=li, transpose=True, group_size=64, bits=4,
                              sorted_indices=sorted_flag)
            g = mx.gather_qmm(xs, gw, gs_, gb, rhs_indices=li, transpose=True, group_size=64, bits=4,
                              sorted_indices=sorted_flag)
            hh = (g * mx.sigmoid(g)) * u
            lazy_idx.append(digest(mx.gather_qmm(hh, w, s, b, rhs_indices=li, transpose=True, group_size=64,
                                                 bits=4, sorted_indices=sorted_flag)))
        out["bf16_lazy_idx_chain" + ("" if sorted_flag else "_unsorted")] = lazy_idx
    out["bf16_full_chain_up"] = chain_up
    out["zmlx_up"] = digest(d["l0.experts_up"])
if "l0.experts_down_w_u16" in d:
    zw = d["l0.experts_down_w_u16"].astype(mx.uint16)
    out["zmlx_params_equal_file"] = {
        "weight": bool(mx.array_equal(zw, w.view(mx.uint16)).item()),
        "scales": bool(mx.array_equal(d["l0.experts_down_scales"], s.astype(mx.float32)).item()),
        "biases": bool(mx.array_equal(d["l0.experts_down_biases"], b.astype(mx.float32)).item()),
    }
print(json.dumps(out), flush=True)
