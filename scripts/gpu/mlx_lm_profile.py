"""mlx-lm's side of `zmlx profile --prefill N --json` (issue #15, prefill at ~0.3x mlx-lm on CUDA):
the MLX operations of one prefill graph by primitive (MLX's DOT export of the KV-cache states,
which is what both tools evaluate at prefill) and the unbarriered prefill time, median of RUNS
after one warm-up, for the same prompt ids. Compare `ops_by_primitive` with zmlx's
`stock_prefill.ops_by_primitive` to see which operations differ.

usage: python mlx_lm_profile.py --model DIR --prompt-ids 1,2,3 [--runs 5]
"""
import argparse
import collections
import json
import os
import re
import tempfile
import time

import mlx.core as mx
from mlx_lm import load
from mlx_lm.models.cache import make_prompt_cache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-ids", required=True)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    model, _ = load(a.model)
    mx.eval(model.parameters())
    ids = mx.array([int(x) for x in a.prompt_ids.split(",")][:-1], dtype=mx.uint32)[None]

    def states():
        cache = make_prompt_cache(model)
        model(ids, cache=cache)
        return [s for c in cache for s in c.state if isinstance(s, mx.array)]

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "prefill.dot")
        mx.export_to_dot(path, *states())
        text = open(path).read()
    hist = collections.Counter(re.findall(r'label ="([^"]+)", shape=rectangle', text))

    def once():
        t0 = time.perf_counter()
        mx.eval(states())
        return (time.perf_counter() - t0) * 1e3

    t0 = time.perf_counter()
    mx.eval(states())  # the first prefill of this length in the process, graph building included
    ms_first = (time.perf_counter() - t0) * 1e3
    times = sorted(once() for _ in range(max(1, a.runs)))
    ms = times[len(times) // 2]
    print(json.dumps({"tool": "mlx-lm", "prompt_tokens": ids.shape[1], "ops_total": sum(hist.values()),
                      "ops_by_primitive": dict(sorted(hist.items())), "ms_unbarriered": ms,
                      "tokens_per_second": ids.shape[1] / (ms / 1e3), "runs": max(1, a.runs), "ms_first": ms_first}))


if __name__ == "__main__":
    main()
