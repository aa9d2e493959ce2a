"""Repeatability probe for MLX on the GPU (issue #15): is greedy decode deterministic, and if not,
where do the values first differ? Runs mlx-lm's own model of a checkpoint in one process.

  whole   REPEATS prefills of the same prompt (fresh KV cache each), then DECODE greedy steps;
          each repeat's logits at every prompt position and its decoded tokens are compared
          bitwise with repeat 0's (an "event" = any differing logit).
  layers  the same prefill run layer by layer (each attention and MLP output evaluated and kept),
          so a repeat that differs names the first layer and sub-block (attention or MLP) whose
          output changed; slower, and the extra evaluations change the scheduling.

Prints one JSON object per repeat and a summary line; MLX_CUDA_USE_CUDNN_SDPA etc. are taken from
the environment (the summary records them).

usage: python repeat_prefill.py --model DIR [--mode whole|layers] [--repeats 8] [--prompt-len 132]
                                [--decode 64] [--seed 0]
"""
import argparse
import json
import os
import random
import time

import mlx.core as mx
from mlx_lm import load
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import make_prompt_cache

ENV = ("MLX_CUDA_USE_CUDNN_SDPA", "MLX_USE_CUDA_GRAPHS", "MLX_ENABLE_TF32", "MLX_CUDA_GRAPH_CACHE_SIZE")


def diff(a, b):
    """(number of differing elements, max |a - b|) of two same-shape arrays, bitwise."""
    ne = mx.not_equal(a, b)
    n = int(mx.sum(ne).item())
    m = float(mx.max(mx.abs(a.astype(mx.float32) - b.astype(mx.float32))).item()) if n else 0.0
    return n, m


def whole(model, ids, decode):
    cache = make_prompt_cache(model)
    logits = model(ids[None], cache=cache)[0]
    mx.eval(logits)
    toks = []
    y = mx.argmax(logits[-1], axis=-1)
    for _ in range(decode):
        toks.append(int(y.item()))
        step = model(y.reshape(1, 1), cache=cache)
        y = mx.argmax(step[0, -1], axis=-1)
    return logits, toks


def layers(model, ids):
    """Per layer (attention output, MLP output), each evaluated; returns the list and the logits."""
    inner = model.model
    cache = make_prompt_cache(model)
    h = inner.embed_tokens(ids[None])
    mask = create_attention_mask(h, cache[0])
    outs = []
    for layer, c in zip(inner.layers, cache):
        r = layer.self_attn(layer.input_layernorm(h), mask, c)
        mx.eval(r)
        h = h + r
        m = layer.mlp(layer.post_attention_layernorm(h))
        mx.eval(m)
        h = h + m
        outs.append((r, m))
    hn = inner.norm(h)
    logits = model.lm_head(hn) if hasattr(model, "lm_head") else inner.embed_tokens.as_linear(hn)
    mx.eval(logits)
    return outs, logits[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--mode", choices=["whole", "layers"], default="whole")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=132)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    model, tok = load(a.model)
    mx.eval(model.parameters())
    vocab = model.args.vocab_size if hasattr(model, "args") else 32000
    rng = random.Random(a.seed)
    ids = mx.array([rng.randrange(16, vocab) for _ in range(a.prompt_len)], dtype=mx.uint32)
    events, first = 0, None
    ref = None
    t0 = time.time()
    for r in range(a.repeats):
        if a.mode == "whole":
            logits, toks = whole(model, ids, a.decode)
            if ref is None:
                ref = (logits, toks)
                rec = {"repeat": r, "tokens": toks[:8]}
            else:
                n, m = diff(logits, ref[0])
                div = next((i for i, (x, y) in enumerate(zip(toks, ref[1])) if x != y), None)
                rows = int(mx.sum(mx.any(mx.not_equal(logits, ref[0]), axis=-1)).item()) if n else 0
                rec = {"repeat": r, "logits_differ": n, "positions_differ": rows, "max_abs": m,
                       "tokens_first_divergence": div}
                events += bool(n) or div is not None
        else:
            outs, logits = layers(model, ids)
            if ref is None:
                ref = (outs, logits)
                rec = {"repeat": r}
            else:
                where = None
                for i, ((ra, ma), (rb, mb)) in enumerate(zip(outs, ref[0])):
                    for name, x, y in (("attention", ra, rb), ("mlp", ma, mb)):
                        n, m = diff(x, y)
                        if n and where is None:
                            where = {"layer": i, "block": name, "elements": n, "max_abs": m}
                n, m = diff(logits, ref[1])
                rec = {"repeat": r, "first_difference": where, "logits_differ": n, "max_abs": m}
                events += where is not None or bool(n)
                if where is not None and first is None:
                    first = where
        print(json.dumps(rec), flush=True)
    print(json.dumps({"summary": True, "mode": a.mode, "repeats": a.repeats, "events": events, "first": first,
                      "prompt_len": a.prompt_len, "decode": a.decode, "seconds": round(time.time() - t0, 1),
                      "env": {k: os.environ.get(k) for k in ENV}, "mlx": mx.__version__}), flush=True)


if __name__ == "__main__":
    main()
