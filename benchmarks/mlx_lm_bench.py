"""One mlx-lm timing run for `benchmarks/bench.sh`: load, prefill PROMPT_IDS, greedy-decode N
tokens with mlx-lm's own stream_generate; prints one JSON object (load seconds, prompt and
generation tok/s, peak memory, token ids) to stdout.

usage: python mlx_lm_bench.py --model DIR --prompt-ids 1,2,3 --max-tokens N [--dtype f32|native]
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mlx.core as mx  # noqa: E402
import mlx_lm  # noqa: E402
from mlx_lm.generate import stream_generate  # noqa: E402
from mlx_lm.sample_utils import greedy_sampler  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-ids", required=True)
    ap.add_argument("--max-tokens", type=int, required=True)
    ap.add_argument("--dtype", default="f32", choices=["f32", "native"])
    a = ap.parse_args()
    t0 = time.perf_counter()
    model, tok = mlx_lm.load(a.model)
    if a.dtype == "f32":
        # zmlx's CPU default: every float parameter (incl. quantization scales) in float32.
        model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    load_s = time.perf_counter() - t0
    ids = [int(x) for x in a.prompt_ids.split(",")]
    # Fixed-length decode (as zmlx --ignore-eos): no EOS stop.
    tok._eos_token_ids = set()
    mx.reset_peak_memory()
    last, out = None, []
    for r in stream_generate(model, tok, ids, max_tokens=a.max_tokens, sampler=greedy_sampler):
        out.append(int(r.token))
        last = r
    print(json.dumps({
        "load_seconds": load_s, "prompt_tokens": last.prompt_tokens, "prompt_tps": last.prompt_tps,
        "generation_tokens": last.generation_tokens, "generation_tps": last.generation_tps,
        "peak_memory_gb": last.peak_memory, "token_ids": out,
    }))


if __name__ == "__main__":
    sys.exit(main())
