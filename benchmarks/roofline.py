"""Roofline helpers for `benchmarks/bench.sh`.

  python roofline.py triad                 -> {"triad_gbs": ...}  STREAM-like a = b + s*c (numpy,
                                              float64, 3 x 8 bytes per element moved)
  python roofline.py bytes DIR CTX         -> bytes read per decoded token at context CTX: every
      non-expert tensor once, expert tensors x k/E (only the routed experts are read), one row of
      the input embedding, float tensors at float32 (zmlx/mlx-lm CPU compute dtype), packed
      weights as stored, plus the KV cache read by attention (CTX positions, float32).
"""
import json
import os
import struct
import sys
import time

import numpy as np

SIZES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "U8": 1, "F64": 8, "I64": 8}


def triad():
    n = 20_000_000
    b, c = np.ones(n), np.full(n, 2.0)
    a = np.empty(n)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        np.multiply(c, 3.0, out=a)
        np.add(a, b, out=a)
        dt = time.perf_counter() - t
        # multiply reads c writes a; add reads a, b writes a: 5 x 8 bytes per element moved.
        best = max(best, 5 * 8 * n / dt / 1e9)
    return {"triad_gbs": round(best, 2), "method": "numpy a = 3c; a += b, float64, best of 5"}


def tensors(d):
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with open(os.path.join(d, f), "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                hdr = json.loads(fh.read(n))
            for k, v in hdr.items():
                if k != "__metadata__":
                    yield k, v["dtype"], v["shape"]


def bytes_per_token(d, ctx):
    cfg = json.load(open(os.path.join(d, "config.json")))
    e = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts")
    k = cfg["num_experts_per_tok"]
    total = 0.0
    for name, dt, shape in tensors(d):
        n = 1
        for s in shape:
            n *= s
        size = n * (SIZES[dt] if dt in ("U32", "I32", "U8") else 4)
        if "embed_tokens" in name:
            size /= shape[0]  # one row is gathered
        elif ".experts." in name or "switch_mlp" in name or "block_sparse_moe.experts" in name:
            size *= k / e
        total += size
    layers = cfg["num_hidden_layers"]
    if cfg.get("kv_lora_rank"):
        per_pos = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    else:
        hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        per_pos = 2 * cfg["num_key_value_heads"] * hd
    kv = layers * per_pos * 4 * ctx
    return {"weights_bytes": int(total), "kv_bytes": int(kv), "bytes_per_token": int(total + kv), "experts": e, "k": k}


if __name__ == "__main__":
    if sys.argv[1] == "triad":
        print(json.dumps(triad()))
    else:
        print(json.dumps(bytes_per_token(sys.argv[2], int(sys.argv[3]))))
