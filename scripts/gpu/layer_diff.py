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
def mla_parts(attn, x, mask, cache):
    """mlx-lm's MLA __call__ (prefill branch) up to SDPA, returning the named intermediates."""
    B, L, _ = x.shape
    q = attn.q_proj(x) if attn.q_lora_rank is None else attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    q = q.reshape(B, L, attn.num_heads, attn.q_head_dim).transpose(0, 2, 1, 3)
    q_nope, q_pe = mx.split(q, [attn.qk_nope_head_dim], axis=-1)
    ckv = attn.kv_a_proj_with_mqa(x)
    ckv, k_pe = mx.split(ckv, [attn.kv_lora_rank], axis=-1)
    k_pe = k_pe.reshape(B, L, 1, attn.qk_rope_head_dim).transpose(0, 2, 1, 3)
    kv_latent = mx.expand_dims(attn.kv_a_layernorm(ckv), axis=1)
    q_pe, k_pe = attn.rope(q_pe, 0), attn.rope(k_pe, 0)
    pe = (q_pe * attn.scale) @ k_pe.swapaxes(-1, -2)
    pe = mx.where(mask, pe, mx.array(mx.finfo(pe.dtype).min, pe.dtype))
    k = attn.embed_q(kv_latent, transpose=False)
    v = attn.unembed_out(kv_latent)
    out = mx.fast.scaled_dot_product_attention(q_nope, k, v, scale=attn.scale, mask=pe)
    return {"q_nope": q_nope, "q_pe_scaled": q_pe * attn.scale, "k_pe": k_pe, "kv_latent": kv_latent,
            "pe_scores": pe, "k": k, "v": v, "sdpa": out}


if "l0.sdpa" in ours and hasattr(inner.layers[0].self_attn, "kv_lora_rank"):
    parts = mla_parts(inner.layers[0].self_attn, inner.layers[0].input_layernorm(h), mask, None)
    for k, v in parts.items():
        print(json.dumps({"layer0_mla": k, "shape": list(v.shape), "max_abs": d(v, ours["l0." + k]),
                          "scale": float(mx.max(mx.abs(v.astype(mx.float32))).item())}))
for i, (layer, c) in enumerate(zip(inner.layers, cache)):
    a = layer.self_attn(layer.input_layernorm(h), mask, c)
    hh = h + a
    out = hh + layer.mlp(layer.post_attention_layernorm(hh))
    mx.eval(a, out)
    print(json.dumps({"layer": i, "attn_max_abs": d(a, ours[f"layer{i}.attn"]), "out_max_abs": d(out, ours[f"layer{i}.out"]),
                      "attn_scale": float(mx.max(mx.abs(a)).item())}))
    h = out
