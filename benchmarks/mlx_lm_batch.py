"""One mlx-lm `batch_generate` timing run for `benchmarks/batch.py`: load, warm up (one small
batch), then generate for every prompt (token ids, one line each of a JSON list file) with
`completion_batch_size` = BATCH, exactly MAX_TOKENS tokens each (EOS ignored: the tokenizer's
EOS set is emptied, as `zmlx generate --ignore-eos`); prints one JSON object: mlx-lm's own
prompt / generation tok/s (all sequences), peak memory, wall seconds and the token ids.

usage: python mlx_lm_batch.py --model DIR --prompts-json FILE --batch-size B --max-tokens N [--dtype f32|native]
"""
import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mlx.core as mx  # noqa: E402
import mlx_lm  # noqa: E402
from mlx_lm.generate import batch_generate  # noqa: E402


class NoEos:
    """The tokenizer batch_generate needs (EOS ids, decode), with no EOS: every sequence runs
    to max_tokens, like `zmlx generate --ignore-eos`."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_token_ids = []

    def decode(self, ids):
        return self.tok.decode(ids)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts-json", required=True)
    ap.add_argument("--batch-size", type=int, required=True)
    ap.add_argument("--max-tokens", type=int, required=True)
    ap.add_argument("--dtype", default="f32", choices=["f32", "native"])
    a = ap.parse_args()
    prompts = json.load(open(a.prompts_json))
    model, tok = mlx_lm.load(a.model)
    if a.dtype == "f32":
        # zmlx's CPU default (as mlx_lm_bench.py): every float parameter, scales included, in
        # float32; the checkpoint's bf16 would run MLX's ~10x slower bf16 CPU kernels.
        model.set_dtype(mx.float32)
    no_eos = NoEos(tok)
    batch_generate(model, no_eos, prompts[: min(2, len(prompts))], max_tokens=4, completion_batch_size=a.batch_size)
    mx.reset_peak_memory()
    t = time.perf_counter()
    r = batch_generate(model, no_eos, prompts, max_tokens=a.max_tokens, completion_batch_size=a.batch_size,
                       return_token_ids=True)
    wall = time.perf_counter() - t
    s = r.stats
    print(json.dumps({
        "prompt_tps": s.prompt_tps, "generation_tps": s.generation_tps, "generation_tokens": s.generation_tokens,
        "prompt_tokens": s.prompt_tokens, "peak_memory_gb": s.peak_memory, "wall_seconds": wall,
        "token_ids": r.token_ids, "mlx_version": mx.__version__, "dtype": a.dtype,
    }))


if __name__ == "__main__":
    main()
