#!/usr/bin/env python3
"""`mlx_lm.server` (mlx-lm 0.32.0), unchanged but for two load-time options that make it run
like with like against `zmlx serve` in benchmarks/serve_compare.py:

  --f32         cast every float parameter (incl. quantization scales) to float32 after loading,
                as zmlx computes on the CPU (the same cast as benchmarks/mlx_lm_bench.py), so
                greedy tokens can be compared exactly
  --ignore-eos  clear the tokenizer's EOS ids, so every request decodes exactly max_tokens
                (zmlx serve honours the request's `ignore_eos`; mlx_lm.server has no such field)

Every other argument goes to mlx_lm.server as given.
"""
import sys

import mlx.core as mx
import mlx_lm.server as server


def main():
    args = sys.argv[1:]
    f32 = "--f32" in args
    ignore_eos = "--ignore-eos" in args
    args = [a for a in args if a not in ("--f32", "--ignore-eos")]
    stock_load = server.load

    def load(*a, **k):
        model, tokenizer = stock_load(*a, **k)
        if f32:
            model.set_dtype(mx.float32)
            mx.eval(model.parameters())
        if ignore_eos:
            tokenizer.eos_token_ids = []
        return model, tokenizer

    server.load = load
    sys.argv = [sys.argv[0]] + args
    server.main()


if __name__ == "__main__":
    main()
