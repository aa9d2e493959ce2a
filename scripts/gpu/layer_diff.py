"""Per-layer comparison of a zmlx prefill with mlx-lm's, on whatever backend MLX runs on.
zmlx writes its prefill's embedding/attention/layer outputs with ZMLX_DUMP_DIR; this script
replays the same prompt ids through mlx-lm's modules one layer at a time and prints, per layer,
max |zmlx - mlx-lm| of the attention output and of the layer output (first large jump = the
culprit). Also feeds mlx-lm's own layer input to each layer, so every row isolates one layer.

usage: python layer_diff.py MODEL_DIR DUMP_DIR PROMPT_IDS(comma-separated) [f32]
"""
import json
import sys

import mlx.core as mx
import mlx_lm
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import make_prompt_cache

model_dir, dump_dir, ids = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")]
model, _ = mlx_lm.load(model_dir)
if sys.argv[4:] == ["f32"]:
    model.set_dtype(mx.float32)
ours = mx.load(dump_dir + "/hidden.safetensors")
inner = model.model
# zmlx (like mlx-lm's generate_step) prefills all but the last prompt token in its first call.
x = mx.array([ids[: ours["embed"].shape[1]]])
h = inner.embed_tokens(x)
cache = make_prompt_cache(model)
mask = create_attention_mask(h, cache[0], return_array=True)
d = lambda a, b: float(mx.max(mx.abs(a.astype(mx.float32) - b)).item())
print(json.dumps({"what": "embed", "max_abs": d(h, ours["embed"])}))
for i, (layer, c) in enumerate(zip(inner.layers, cache)):
    a = layer.self_attn(layer.input_layernorm(h), mask, c)
    hh = h + a
    out = hh + layer.mlp(layer.post_attention_layernorm(hh))
    mx.eval(a, out)
    print(json.dumps({"layer": i, "attn_max_abs": d(a, ours[f"layer{i}.attn"]), "out_max_abs": d(out, ours[f"layer{i}.out"]),
                      "attn_scale": float(mx.max(mx.abs(a)).item())}))
    h = out
