"""Does llama.cpp generate what mlx-lm/zmlx generate on a converted GGUF?

1. Tokenization: `llama-tokenize --ids` of the prompt vs the checkpoint's tokenizer.json (HF
   `tokenizers`, as mlx-lm and zmlx tokenize).
2. Greedy tokens: `llama-simple -n N` (greedy sampler, stops at EOS) on the prompt; its text after
   the echoed prompt is compared with the decoded reference ids token by token: the count of
   leading reference tokens whose decoded text is a prefix of llama.cpp's output.
   Reference: mlx-lm's greedy ids from bench.sh's raw.jsonl (`--ref-raw`, first mlx_lm line of the
   family/quant), or `--ref-ids 1,2,3`.
Expect q4_1 (same weights) to agree for a while and then drift: llama.cpp quantizes activations
to 8 bits (Q8_1) for its Q4_1 dot products, where MLX/zmlx keep them in f32.

usage: python greedy_check.py --simple BIN --tokenize BIN --gguf G --ckpt DIR --prompt-file F
        (--ref-raw RAW.jsonl --family F --quant Q | --ref-ids IDS) [--n 32]
Prints one JSON object.
"""
import argparse
import json
import subprocess

from tokenizers import Tokenizer


def main():
    ap = argparse.ArgumentParser()
    for k in ("simple", "tokenize", "gguf", "ckpt", "prompt-file"):
        ap.add_argument(f"--{k}", required=True)
    for k in ("ref-raw", "family", "quant", "ref-ids"):
        ap.add_argument(f"--{k}")
    ap.add_argument("--n", type=int, default=32)
    a = ap.parse_args()
    text = open(a.prompt_file).read()
    tok = Tokenizer.from_file(a.ckpt + "/tokenizer.json")
    hf_ids = tok.encode(text, add_special_tokens=False).ids
    r = subprocess.run([a.tokenize, "-m", a.gguf, "-p", text, "--ids", "--log-disable"], capture_output=True, text=True)
    try:
        ll_ids = json.loads(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        ll_ids = None
    if a.ref_ids:
        ref = [int(x) for x in a.ref_ids.split(",")]
    else:
        ref = next(json.loads(l)["token_ids"] for l in open(a.ref_raw)
                   if l.strip() and json.loads(l).get("side") == "mlx_lm"
                   and json.loads(l).get("family") == a.family and str(json.loads(l).get("quant")) == str(a.quant))
    ref = ref[: a.n]
    eos = tok.token_to_id("<|endoftext|>")
    cut = ref.index(eos) if eos in ref else len(ref)
    r = subprocess.run([a.simple, "-m", a.gguf, "-n", str(a.n), text], capture_output=True)
    out = r.stdout.decode("utf-8", errors="replace")
    echoed = out.startswith(text)
    gen = out[len(text):] if echoed else out
    gen = gen[:-1] if gen.endswith("\n") else gen
    k = 0
    while k < cut and gen.startswith(tok.decode(ref[: k + 1], skip_special_tokens=False)):
        k += 1
    print(json.dumps({
        "gguf": a.gguf, "prompt_tokens": len(hf_ids),
        "prompt_ids_equal": ll_ids == hf_ids, "llama_prompt_tokens": None if ll_ids is None else len(ll_ids),
        "simple_exit": r.returncode, "prompt_echoed": echoed,
        "compared_tokens": cut, "matching_tokens": k, "reference": "mlx-lm greedy ids (f32 activations)",
        "reference_stops_at_eos": cut < len(ref),
        "llama_text": gen[:300], "reference_text": tok.decode(ref[:cut], skip_special_tokens=False)[:300],
    }))


if __name__ == "__main__":
    main()
