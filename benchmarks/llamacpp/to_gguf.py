"""Convert a zmlx-synthesized checkpoint (mlx-community layout: stacked `switch_mlp` experts, MLX
affine quantization, bf16 scales/biases) into a GGUF that llama.cpp runs, with the same tokenizer.

usage: python to_gguf.py CKPT_DIR OUT.gguf --type q4_1|q4_0|f16 [--verify] [--verify-json FILE] [--temp-file]

Families: qwen3_moe (GGUF arch `qwen3moe`) and mixtral (arch `llama` with experts; q/k rows
permuted to llama.cpp's interleaved RoPE, as convert_hf_to_gguf.py does).

Weight encodings (see README.md next to this file):
  q4_1  the SAME weights: an MLX affine 4-bit group-64 row (w = scale*q + bias per 64 values) is
        two llama.cpp Q4_1 blocks of 32 with d = scale, m = bias stored as f16, q repacked from
        MLX's nibble order (element i of a little-endian uint32 in bits 4i..4i+3) to Q4_1's
        (qs[j] = q[j] | q[j+16] << 4). bf16 -> f16 is exact for values in f16's normal range;
        the converter counts the ones that are not (reported, never silently).
  q4_0  the dequantized weights (f32) re-quantized with llama.cpp's Q4_0 (gguf-py's numpy port
        of quantize_row_q4_0_ref, which llama-quantize uses without an imatrix): what a llama.cpp
        user would run, 4.5 bits per weight like MLX 4-bit g64.
  f16   the dequantized weights as f16.
Always: 1-D tensors (norms) as F32; the MoE router (ffn_gate_inp, 8-bit in the qwen3_moe synth)
as F32 from MLX's dequantization (exact; llama-quantize never quantizes ffn_gate_inp either);
other quantized tensors that are not 4-bit (none in the bench checkpoints): F32 in q4_1 mode.

--verify reads the GGUF back with gguf-py, dequantizes every tensor with gguf-py's dequantize and
compares it with MLX's own `mx.dequantize` of the safetensors with float32 scales/biases (what
zmlx and the bench's mlx-lm run on the CPU): q4_1 and F32 tensors must be bit-identical in f32;
q4_0/f16 report their max-abs error. Needs `mlx` (run it with the oracle venv's python).

gguf-py: $GGUF_PY, else the one vendored in .mlx/llama.cpp/src/llama.cpp/gguf-py (build.sh).
"""
import argparse
import json
import os
import struct
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.environ.get("GGUF_PY") or os.path.join(ROOT, ".mlx/llama.cpp/src/llama.cpp/gguf-py"))
import gguf  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402

ST_DTYPES = {"U32": np.uint32, "U8": np.uint8, "BF16": np.uint16, "F16": np.float16, "F32": np.float32}


def load_safetensors(d):
    """name -> (safetensors dtype string, numpy array; bf16 kept as its raw uint16 bits)."""
    idx = os.path.join(d, "model.safetensors.index.json")
    files = sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
    out = {}
    for f in files:
        buf = np.memmap(os.path.join(d, f), dtype=np.uint8, mode="r")
        n = struct.unpack("<Q", bytes(buf[:8]))[0]
        header = json.loads(bytes(buf[8:8 + n]))
        base = 8 + n
        for k, v in header.items():
            if k == "__metadata__":
                continue
            if v["dtype"] not in ST_DTYPES:
                raise SystemExit(f"{k}: safetensors dtype {v['dtype']} not handled")
            a, b = v["data_offsets"]
            out[k] = (v["dtype"], np.frombuffer(buf[base + a: base + b], dtype=ST_DTYPES[v["dtype"]]).reshape(v["shape"]))
    return out


def to_f32(dt, a):
    if dt == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def unpack(wq, bits):
    """MLX packing: element i of each little-endian uint32 word in bits [bits*i, bits*(i+1))."""
    if 32 % bits:
        raise SystemExit(f"{bits}-bit MLX packing (crosses words) is not handled")
    per = 32 // bits
    shifts = (np.arange(per, dtype=np.uint32) * bits).reshape((1,) * wq.ndim + (per,))
    q = (wq[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return q.reshape(wq.shape[:-1] + (wq.shape[-1] * per,)).astype(np.uint8)


def dequant_f32(q, s, b, gs):
    """w = scale*q + bias in f32 (scale*q is exact for bf16 scales and q < 2^8: one rounding)."""
    sh = q.shape
    g = q.reshape(sh[:-1] + (sh[-1] // gs, gs)).astype(np.float32)
    return (g * s[..., None] + b[..., None]).reshape(sh)


def q4_1_exact(q, s_f32, b_f32, gs, stats):
    """Q4_1 bytes [..., rows, nblk*20] holding exactly w = scale*q + bias."""
    if gs % 32:
        raise SystemExit(f"group size {gs} is not a multiple of Q4_1's block of 32")
    d16, m16 = s_f32.astype(np.float16), b_f32.astype(np.float16)
    for name, x, x16 in (("scales", s_f32, d16), ("biases", b_f32, m16)):
        bad = x16.astype(np.float32) != x
        stats[f"{name}_total"] = stats.get(f"{name}_total", 0) + x.size
        stats[f"{name}_not_exact_in_f16"] = stats.get(f"{name}_not_exact_in_f16", 0) + int(bad.sum())
        if bad.any():
            err = float(np.abs(x16.astype(np.float32) - x)[bad].max())
            stats[f"{name}_max_abs_err"] = max(stats.get(f"{name}_max_abs_err", 0.0), err)
        sub = (x != 0) & (np.abs(x) < np.float32(6.103515625e-05))
        stats[f"{name}_f16_subnormal"] = stats.get(f"{name}_f16_subnormal", 0) + int(sub.sum())
    rep = gs // 32
    d16 = np.repeat(d16, rep, axis=-1)[..., None].view(np.uint8)  # [..., nblk, 2]
    m16 = np.repeat(m16, rep, axis=-1)[..., None].view(np.uint8)
    blk = q.reshape(q.shape[:-1] + (q.shape[-1] // 32, 32))
    qs = blk[..., :16] | (blk[..., 16:] << np.uint8(4))
    out = np.concatenate([d16, m16, qs], axis=-1)  # [..., nblk, 20]
    return np.ascontiguousarray(out.reshape(q.shape[:-1] + (-1,)))


def llama_permute(w, n_head):
    """convert_hf_to_gguf.py LlamaModel.permute (rows only: works on packed rows and scales)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


FAMILIES = {
    "qwen3_moe": {"arch": gguf.MODEL_ARCH.QWEN3MOE, "block": "mlp",
                  "experts": {"gate_proj": "experts.gate_proj", "up_proj": "experts.up_proj", "down_proj": "experts.down_proj"}},
    "mixtral": {"arch": gguf.MODEL_ARCH.LLAMA, "block": "block_sparse_moe",
                "experts": {"gate_proj": "experts.w1", "up_proj": "experts.w3", "down_proj": "experts.w2"}},
}


def hf_name(base, fam):
    """MLX name (without .weight) -> the HF name gguf-py's tensor map knows."""
    f = FAMILIES[fam]
    for ours, hf in f["experts"].items():
        base = base.replace(f"{f['block']}.switch_mlp.{ours}", f"{f['block']}.{hf}")
    return base


def write_tokenizer(w, d, vocab_size):
    tj = json.load(open(os.path.join(d, "tokenizer.json")))
    tc = json.load(open(os.path.join(d, "tokenizer_config.json"))) if os.path.exists(os.path.join(d, "tokenizer_config.json")) else {}
    m = tj["model"]
    if m.get("type") != "BPE":
        raise SystemExit(f"tokenizer model {m.get('type')}: only byte-level BPE is handled")
    pre = json.dumps(tj.get("pre_tokenizer"))
    if "ByteLevel" not in pre:
        raise SystemExit("tokenizer pre_tokenizer is not ByteLevel: the 'gpt-2' pre-tokenizer would not match")
    tokens = [None] * vocab_size
    types = [gguf.TokenType.NORMAL] * vocab_size
    for t, i in m["vocab"].items():
        tokens[i] = t
    for a in tj.get("added_tokens", []):
        tokens[a["id"]] = a["content"]
        types[a["id"]] = gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i], types[i] = f"[PAD{i}]", gguf.TokenType.UNUSED
    merges = [mm if isinstance(mm, str) else " ".join(mm) for mm in m["merges"]]
    eos = next(a["id"] for a in tj["added_tokens"] if a["content"] == tc.get("eos_token", "<|endoftext|>"))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")  # GPT-2 split regex = tokenizers' ByteLevel(use_regex=True)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(eos)
    w.add_bos_token_id(eos)  # HF has none; never added (add_bos false)
    w.add_pad_token_id(eos)
    w.add_add_bos_token(bool(tc.get("add_bos_token", False)))
    w.add_add_eos_token(bool(tc.get("add_eos_token", False)))
    if tc.get("chat_template"):
        w.add_chat_template(tc["chat_template"])
    return {"vocab": vocab_size, "merges": len(merges), "eos": eos,
            "control": sum(t == gguf.TokenType.CONTROL for t in types)}


def convert(a):
    t0 = time.time()
    cfg = json.load(open(os.path.join(a.ckpt, "config.json")))
    fam = cfg["model_type"]
    if fam not in FAMILIES:
        raise SystemExit(f"model_type {fam}: to_gguf.py handles {', '.join(FAMILIES)}")
    F = FAMILIES[fam]
    st = load_safetensors(a.ckpt)
    quant = cfg.get("quantization") or {}
    L = cfg["num_hidden_layers"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg["hidden_size"]
    hd = cfg.get("head_dim") or d // nh
    tmap = gguf.get_tensor_name_map(F["arch"], L)
    arch_name = gguf.MODEL_ARCH_NAMES[F["arch"]]
    w = gguf.GGUFWriter(a.out, arch_name, use_temp_file=a.temp_file)
    w.add_name(f"zmlx synth {fam} ({(cfg.get('zmlx_synth') or {}).get('preset', '?')}) {a.type}")
    w.add_context_length(cfg.get("max_position_embeddings", 32768))
    w.add_embedding_length(d)
    w.add_block_count(L)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    w.add_vocab_size(cfg["vocab_size"])
    if fam == "qwen3_moe":
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_expert_count(cfg["num_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            raise SystemExit(f"qwen3_moe with dense layers (mlp_only_layers {cfg.get('mlp_only_layers')}, decoder_sparse_step "
                             f"{cfg.get('decoder_sparse_step')}): llama.cpp's qwen3moe has experts in every layer")
        if not cfg.get("norm_topk_prob", True):
            raise SystemExit("qwen3_moe with norm_topk_prob false: llama.cpp's qwen3moe always normalizes")
    else:
        w.add_feed_forward_length(cfg["intermediate_size"])
        w.add_expert_count(cfg["num_local_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_file_type({"q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
                     "f16": gguf.LlamaFileType.MOSTLY_F16}[a.type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tok = write_tokenizer(w, a.ckpt, cfg["vocab_size"])

    stats, kinds, plan = {}, {}, []
    bases = [k[: -len(".weight")] for k in st if k.endswith(".weight")]
    extra = sorted(set(k for k in st if not k.endswith((".weight", ".scales", ".biases"))))
    if extra:
        raise SystemExit(f"tensors not handled: {extra[:5]}")
    for base in bases:
        if base == "model.embed_tokens":
            gname = "token_embd"
        elif base == "lm_head":
            gname = "output"
        elif base == "model.norm":
            gname = "output_norm"
        else:
            gname = tmap.get_name(hf_name(base, fam))
            if gname is None:
                raise SystemExit(f"no GGUF name for {base} ({hf_name(base, fam)})")
        dt, wt = st[base + ".weight"]
        quantized = base + ".scales" in st
        perm = None
        if fam == "mixtral" and base.endswith("self_attn.q_proj"):
            perm = nh
        elif fam == "mixtral" and base.endswith("self_attn.k_proj"):
            perm = nkv
        P = (lambda x: llama_permute(x, perm)) if perm else (lambda x: x)
        if quantized:
            qc = quant.get(base, quant)
            bits, gs = qc["bits"], qc["group_size"]
            sdt, s = st[base + ".scales"]
            bdt, b = st[base + ".biases"]
            q = P(unpack(wt, bits))
            s32, b32 = P(to_f32(sdt, s)), P(to_f32(bdt, b))
        else:
            w32 = P(to_f32(dt, wt))
        router = gname.endswith("ffn_gate_inp")
        if wt.ndim == 1 or router or (quantized and bits != 4 and a.type == "q4_1"):
            kind = "F32"
            data = dequant_f32(q, s32, b32, gs) if quantized else w32
            w.add_tensor(gname + ".weight", np.ascontiguousarray(data, dtype=np.float32))
        elif a.type == "q4_1" and quantized:
            kind = "Q4_1 (exact)"
            w.add_tensor(gname + ".weight", q4_1_exact(q, s32, b32, gs, stats), raw_dtype=QT.Q4_1)
        else:
            data = dequant_f32(q, s32, b32, gs) if quantized else w32
            qt = {"q4_0": QT.Q4_0, "q4_1": QT.Q4_1, "f16": QT.F16}[a.type]
            kind = f"{qt.name} ({'re-quantized' if quantized and qt != QT.F16 else 'from f32'})"
            if qt == QT.F16:
                w.add_tensor(gname + ".weight", data.astype(np.float16))
            else:
                w.add_tensor(gname + ".weight", gguf.quants.quantize(data, qt), raw_dtype=qt)
        kinds[kind] = kinds.get(kind, 0) + 1
        plan.append({"mlx": base, "gguf": gname + ".weight", "kind": kind, "perm": perm,
                     "bits": bits if quantized else None, "group_size": gs if quantized else None})
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    rep = {"ckpt": a.ckpt, "out": a.out, "type": a.type, "family": fam, "arch": arch_name,
           "gguf_py": os.path.dirname(gguf.__file__), "tensors": len(plan), "kinds": kinds,
           "bf16_to_f16": stats, "tokenizer": tok, "bytes": os.path.getsize(a.out),
           "seconds": round(time.time() - t0, 1)}
    return rep, plan, st


def verify(a, plan, st):
    """Every tensor: gguf-py dequantize of the GGUF vs MLX's dequantize (f32 scales/biases)."""
    import mlx.core as mx
    r = gguf.GGUFReader(a.out)
    tens = {t.name: t for t in r.tensors}
    res = []
    for p in plan:
        t = tens[p["gguf"]]
        got = gguf.quants.dequantize(np.array(t.data), t.tensor_type).astype(np.float32)
        base = p["mlx"]
        if p["bits"]:
            ref = mx.dequantize(mx.array(st[base + ".weight"][1]),
                                mx.array(to_f32(*st[base + ".scales"])), mx.array(to_f32(*st[base + ".biases"])),
                                group_size=p["group_size"], bits=p["bits"])
        else:
            ref = mx.array(to_f32(*st[base + ".weight"]))
        ref = np.array(ref.astype(mx.float32))
        if p["perm"]:
            ref = llama_permute(ref, p["perm"])
        got = got.reshape(ref.shape)
        bit_equal = bool(np.array_equal(got.view(np.uint32), ref.view(np.uint32)))
        err = float(np.abs(got - ref).max())
        res.append({"gguf": p["gguf"], "type": t.tensor_type.name, "kind": p["kind"], "bit_identical_f32": bit_equal,
                    "max_abs_err": err, "max_abs_ref": float(np.abs(ref).max()),
                    "rms_err": float(np.sqrt(np.mean((got.astype(np.float64) - ref) ** 2)))})
    must = [x for x in res if x["type"] in ("Q4_1", "F32") and ("exact" in x["kind"] or x["type"] == "F32")]
    summary = {"tensors": len(res), "must_be_exact": len(must),
               "exact_ok": sum(x["bit_identical_f32"] for x in must),
               "bit_identical_total": sum(x["bit_identical_f32"] for x in res),
               "max_abs_err_all": max(x["max_abs_err"] for x in res),
               "max_abs_err_by_type": {ty: max(x["max_abs_err"] for x in res if x["type"] == ty)
                                       for ty in sorted({x["type"] for x in res})},
               "max_rel_err_by_type": {ty: max(x["max_abs_err"] / (x["max_abs_ref"] or 1) for x in res if x["type"] == ty)
                                       for ty in sorted({x["type"] for x in res})}}
    return summary, res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--type", required=True, choices=["q4_0", "q4_1", "f16"])
    ap.add_argument("--verify", action="store_true", help="dequantize every tensor back and compare with MLX's")
    ap.add_argument("--verify-json", help="write the per-tensor comparison here")
    ap.add_argument("--temp-file", action="store_true",
                    help="spool tensor data through a temp file (in $TMPDIR) instead of memory: full-size checkpoints")
    a = ap.parse_args()
    rep, plan, st = convert(a)
    if a.verify:
        summary, res = verify(a, plan, st)
        rep["verify"] = summary
        if a.verify_json:
            json.dump({"report": rep, "tensors": res}, open(a.verify_json, "w"), indent=1)
    print(json.dumps(rep))
    if a.verify and rep["verify"]["exact_ok"] != rep["verify"]["must_be_exact"]:
        print("to_gguf: tensors meant to be exact differ from MLX's dequantization", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
