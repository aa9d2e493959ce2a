#!/usr/bin/env python3
"""Greedy-decoding oracle for zmlx: runs mlx-lm's own loader and generator.

Pinned truth: mlx-lm 0.32.0 on MLX 0.32.2 (CPU backend).

Usage:
  python mlx_lm_oracle.py --model DIR --prompt TEXT [--prompt TEXT ...] \
      --max-tokens N [--dtype f32|bf16|f16|native] [--ignore-eos] [--logits]
  python mlx_lm_oracle.py --model DIR --describe [--dtype ...]
  Extra: --prompt-ids 1,2,3 (repeatable; skips tokenization, "prompt" is
  null in the output), --prefill-step-size K (mlx-lm default 2048).
  Prompts run in order (--prompt ones first), each with a fresh KV cache.

Exactly one JSON object is written to stdout; everything else (mlx-lm and
transformers chatter, warnings, errors) goes to stderr.  Exit status is 0 on
success, non-zero (with a traceback on stderr) on failure.

Output (generation mode):
  {"mlx_version", "mlx_lm_version", "device", "dtype", "model",
   "max_tokens", "ignore_eos", "eos_token_ids", "prefill_step_size",
   "results": [{"prompt", "prompt_ids", "token_ids", "text",
                "finish_reason": "stop"|"length", "eos_hit": bool,
                "stop_token_id": int|null, "seconds": float,
                ["logits": [{"token", "logit", "logprob", "gap"}, ...],
                 "stop_logits": {...} (only when EOS was hit)]}]}
Output (--describe): the same header plus "model_type", "quantization",
  "parameters": [{"name", "shape", "dtype" (after --dtype cast),
  "loaded_dtype" (as loaded by mlx-lm)}], "modules": [{"path", "type",
  ["group_size", "bits", "mode"], ["eps"]}] (leaf modules).

  token_ids never contains the EOS token that stopped generation; when EOS
  was hit, it is reported as stop_token_id (finish_reason "stop").  With
  --ignore-eos, token_ids always has exactly N entries (EOS ids included as
  ordinary tokens).  "logits" (with --logits) has one entry per token_ids
  entry: the raw logit of the chosen token, its logprob as mlx-lm computes it
  (logits - logsumexp(logits)), and gap = chosen logit - best other logit
  (a small gap flags a knife-edge step).

--model must be a local directory (HF_HUB_OFFLINE=1 is set by default).
The greedy sampler is mlx-lm's greedy_sampler (argmax over logprobs).
"""

import argparse
import json
import os
import sys
import time
import traceback

# --- keep stdout clean -------------------------------------------------------
# Everything printed by libraries (Python or C level) must go to stderr; only
# our final JSON goes to the real stdout.  Duplicate fd 1, then point fd 1 and
# sys.stdout at stderr.
_REAL_STDOUT_FD = os.dup(1)
os.dup2(2, 1)
sys.stdout = sys.stderr
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _emit(obj):
    data = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
    with os.fdopen(_REAL_STDOUT_FD, "wb") as f:
        f.write(data)
        f.flush()


import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
from mlx.utils import tree_flatten, tree_map_with_path  # noqa: E402

import mlx_lm  # noqa: E402
from mlx_lm.generate import generate_step, stream_generate  # noqa: E402
from mlx_lm.sample_utils import greedy_sampler  # noqa: E402
from mlx_lm.utils import load  # noqa: E402

DTYPES = {"f32": mx.float32, "bf16": mx.bfloat16, "f16": mx.float16, "native": None}


def cast_model(model, name):
    """Set the compute dtype of the loaded model.

    f32: exactly ``model.set_dtype(mx.float32)`` (mlx.nn.Module.set_dtype):
      every parameter whose dtype is floating (mx.issubdtype(dt, mx.floating))
      is cast with ``astype`` -- this includes the frozen ``scales`` and
      ``biases`` of QuantizedLinear / QuantizedEmbedding /
      QuantizedSwitchLinear (set_dtype maps over ``parameters()``, which keeps
      frozen arrays; only keys starting with "_" are skipped).  Packed uint32
      ``weight`` of quantized layers (and uint8 mx/nvfp scales) are not
      floating and stay as they are.  ``e_score_correction_bias`` (DS/GLM) is
      cast too; it is stored fp32 by mlx_lm.convert (cast_predicate exempts
      it), so for f32 this is a no-op, and bf16/f16 -> f32 is exact anyway.
      Net effect for affine quantized layers: dequantization
      (w = q * scale + bias) and all matmuls run in f32 with scales/biases
      that are the exact f32 images of the stored fp16/bf16 values.
      f32 is required on the CPU backend for unquantized MoE experts:
      GatherMM::eval only supports float32 there (gather_qmm runs in any
      float dtype).

    bf16/f16: mirror mlx_lm.convert's dtype step (convert.py: convert):
      cast floating params except those the model's ``cast_predicate``
      exempts (e.g. e_score_correction_bias stays fp32).

    native: no cast; parameters keep the dtype they were stored with.
    """
    dtype = DTYPES[name]
    if dtype is None:
        return
    if dtype == mx.float32:
        model.set_dtype(mx.float32)
    else:
        cast_predicate = getattr(model, "cast_predicate", lambda _: True)

        def _cast(k, v):
            if cast_predicate(k) and mx.issubdtype(v.dtype, mx.floating):
                return v.astype(dtype)
            return v

        model.update(tree_map_with_path(_cast, model.parameters()))
    mx.eval(model.parameters())


def encode_prompt(tokenizer, prompt):
    """Tokenize a raw prompt exactly as mlx_lm.generate.stream_generate does
    for a ``str`` prompt (no chat template): special tokens are added
    (tokenizer's own add_special_tokens=True behaviour, e.g. a BOS if the
    tokenizer has one) unless the text already starts with the BOS string."""
    add_special_tokens = tokenizer.bos_token is None or not prompt.startswith(
        tokenizer.bos_token
    )
    return list(tokenizer.encode(prompt, add_special_tokens=add_special_tokens))


class LogitsCapture:
    """A logits processor that records the last-position logits of every
    step and returns them unchanged (identity: numerics are not touched)."""

    def __init__(self):
        self.steps = []

    def __call__(self, tokens, logits):
        self.steps.append(logits)
        return logits


def logits_report(capture, logprobs, token_ids):
    """One entry per generated token.  ``logprobs`` are generate_step's own
    (logits - logsumexp(logits), in the logits' dtype), the greedy sampler's
    input.  capture.steps has one extra trailing entry (generate_step computes
    step n+1 asynchronously before yielding step n); zip drops it."""
    out = []
    for logits, lp, tok in zip(capture.steps, logprobs, token_ids):
        lg = logits.squeeze(0)
        top2 = mx.topk(lg, 2)
        mx.eval(lg, lp, top2)
        chosen = lg[tok].item()
        others = sorted(top2.tolist(), reverse=True)
        best_other = others[1] if others[0] == chosen else others[0]
        out.append(
            {
                "token": tok,
                "logit": chosen,
                "logprob": lp[tok].item(),
                "gap": chosen - best_other,
            }
        )
    return out


def run_prompt(
    model, tokenizer, prompt, ids, max_tokens, ignore_eos, want_logits, prefill
):
    if ids is None:
        ids = encode_prompt(tokenizer, prompt)
    if not ids:
        raise ValueError(f"prompt {prompt!r} encodes to no tokens")
    capture = LogitsCapture() if want_logits else None
    kwargs = {
        "sampler": greedy_sampler,  # == make_sampler(temp=0.0)
        "prefill_step_size": prefill,  # mlx-lm default 2048
    }
    if capture is not None:
        kwargs["logits_processors"] = [capture]

    tic = time.perf_counter()
    if not ignore_eos:
        # mlx-lm's own loop: generate_step + EOS check + detokenizer.
        text = ""
        tokens, logprobs = [], []
        finish = None
        for resp in stream_generate(
            model, tokenizer, mx.array(ids), max_tokens=max_tokens, **kwargs
        ):
            text += resp.text
            tokens.append(resp.token)
            logprobs.append(resp.logprobs)
            finish = resp.finish_reason
        stop_token = None
        if finish == "stop":
            # stream_generate breaks on EOS before adding it to the text; its
            # final response still carries the EOS token.
            stop_token = tokens.pop()
    else:
        # generate_step itself has no EOS logic: take exactly N tokens.
        detok = tokenizer.detokenizer
        text = ""
        tokens, logprobs = [], []
        for tok, lp in generate_step(
            mx.array(ids), model, max_tokens=max_tokens, **kwargs
        ):
            tokens.append(tok)
            logprobs.append(lp)
            detok.add_token(tok)
            text += detok.last_segment
        detok.finalize()
        text += detok.last_segment
        finish, stop_token = "length", None
    seconds = time.perf_counter() - tic

    res = {
        "prompt": prompt,
        "prompt_ids": ids,
        "token_ids": tokens,
        "text": text,
        "finish_reason": finish,
        "eos_hit": stop_token is not None,
        "stop_token_id": stop_token,
        "seconds": round(seconds, 4),
    }
    if capture is not None:
        seq = tokens + ([stop_token] if stop_token is not None else [])
        rep = logits_report(capture, logprobs, seq)
        res["logits"] = rep[: len(tokens)]
        if stop_token is not None:
            res["stop_logits"] = rep[len(tokens)]
    return res


def describe(model, config, loaded_dtypes):
    params = []
    for k, v in tree_flatten(model.parameters()):
        params.append(
            {
                "name": k,
                "shape": list(v.shape),
                "dtype": str(v.dtype).replace("mlx.core.", ""),
                "loaded_dtype": loaded_dtypes.get(k),
            }
        )
    modules = []
    for path, m in tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module):
        entry = {"path": path, "type": type(m).__name__}
        for attr in ("group_size", "bits", "mode"):
            if hasattr(m, attr):
                entry[attr] = getattr(m, attr)
        if hasattr(m, "eps"):
            entry["eps"] = m.eps
        modules.append(entry)
    return {
        "model_type": config.get("model_type"),
        "quantization": config.get("quantization"),
        "parameters": params,
        "modules": modules,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", action="append", default=[])
    p.add_argument(
        "--prompt-ids",
        action="append",
        default=[],
        help="comma-separated token ids, used as-is (no tokenization)",
    )
    p.add_argument("--prefill-step-size", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--dtype", choices=list(DTYPES), default="f32")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--logits", action="store_true")
    p.add_argument("--describe", action="store_true")
    args = p.parse_args()

    model, tokenizer, config = load(args.model, return_config=True)
    loaded_dtypes = {
        k: str(v.dtype).replace("mlx.core.", "")
        for k, v in tree_flatten(model.parameters())
    }
    cast_model(model, args.dtype)

    out = {
        "mlx_version": mx.__version__,
        "mlx_lm_version": mlx_lm.__version__,
        "device": str(mx.default_device()),
        "dtype": args.dtype,
        "model": os.path.abspath(args.model),
    }
    if args.describe:
        out.update(describe(model, config, loaded_dtypes))
        _emit(out)
        return 0

    if not args.prompt and not args.prompt_ids:
        p.error("at least one --prompt/--prompt-ids is required (or --describe)")
    if args.max_tokens < 1:
        p.error("--max-tokens must be >= 1")

    out["max_tokens"] = args.max_tokens
    out["ignore_eos"] = args.ignore_eos
    out["eos_token_ids"] = sorted(tokenizer.eos_token_ids)
    out["prefill_step_size"] = args.prefill_step_size
    jobs = [(prompt, None) for prompt in args.prompt]
    jobs += [(None, [int(t) for t in s.split(",") if t.strip()]) for s in args.prompt_ids]
    out["results"] = [
        run_prompt(
            model,
            tokenizer,
            prompt,
            ids,
            args.max_tokens,
            args.ignore_eos,
            args.logits,
            args.prefill_step_size,
        )
        for prompt, ids in jobs
    ]
    _emit(out)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit:
        raise
    except BaseException as e:
        traceback.print_exc(file=sys.stderr)
        if "GatherMM" in str(e):
            print(
                "hint: MLX's CPU backend runs unquantized MoE experts "
                "(gather_mm) in float32 only; use --dtype f32",
                file=sys.stderr,
            )
        sys.exit(1)
