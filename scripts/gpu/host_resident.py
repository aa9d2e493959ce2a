"""Issue #15: is a first prefill slow because the weights' managed-memory pages were written by the
host (zmlx builds each weight from host bytes; mlx.load may not)? mlx-lm's model, first prefill
timed (a) as loaded, (b) in a fresh process after every parameter is replaced by an array built
from host memory. usage: python host_resident.py MODEL IDS MODE(load|host)"""
import json
import sys
import time

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache

model, _ = load(sys.argv[1])
ids = mx.array([int(x) for x in sys.argv[2].split(",")][:-1], dtype=mx.uint32)[None]
t0 = time.perf_counter()
if sys.argv[3] == "host":
    fresh = []
    for k, v in tree_flatten(model.parameters()):
        u = v.view(mx.uint16) if v.dtype == mx.bfloat16 else v
        a = mx.array(np.array(u))
        fresh.append((k, a.view(mx.bfloat16) if v.dtype == mx.bfloat16 else a))
    model.update(tree_unflatten(fresh))
mx.eval(model.parameters())
mx.synchronize()
t_params = time.perf_counter() - t0


def prefill():
    cache = make_prompt_cache(model)
    t = time.perf_counter()
    model(ids, cache=cache)
    mx.eval([c.state for c in cache])
    return (time.perf_counter() - t) * 1e3


first = prefill()
again = [prefill() for _ in range(2)]
print(json.dumps({"mode": sys.argv[3], "params_s": t_params, "first_ms": first, "again_ms": again}), flush=True)
