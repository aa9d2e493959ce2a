"""Paired (interleaved) zmlx vs llama.cpp measurement for `benchmarks/bench.sh` (LLAMACPP=1).

Why: this VM's speed drifts by up to ~1.5x within minutes (shared caches), and bench.sh's main
table measures each engine minutes apart, so one run's zmlx/llama.cpp ratio carries that drift
(0.44x-0.68x for the same binaries on 2026-11-30). Here the engines run back to back, ROUNDS
times, the order rotated every round (so no engine always runs first or after the same one), and
each round's ratio compares runs seconds apart; the summary is the median of the per-round ratios.

Per round, every engine once:
  zmlx <patterns>  `zmlx generate --patterns P --warmup W --ignore-eos --json`: the bench prompt,
                   GEN tokens; prefill = prompt tok/s, decode = generation tok/s
  llama.cpp <type> `llama-bench -r 1` twice: pp PROMPT (empty context) and tg GEN at depth PROMPT
                   (llama-bench adds its own warm-up run to each)
Same threads on both sides (ZMLX_CPU_THREADS / -t), same weights (Q4_1 is exactly MLX 4-bit g64's
weights; Q4_0 is what a llama.cpp user would run), same prompt and generated token counts.

Prints one raw.jsonl line: side "paired", every round's numbers, per-round ratios and medians.

usage: python paired.py --zmlx BIN --model DIR --prompt-file F --prompt-tokens P --gen N
         --threads T --rounds R --warmup W --patterns "safe fast" --bench LLAMA_BENCH
         --gguf q4_0=PATH [--gguf q4_1=PATH] --family F --quant Q
"""
import argparse
import json
import os
import statistics as st
import subprocess
import sys
import time
import types

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "llamacpp"))
from bench_llamacpp import llama_bench  # noqa: E402


def run_zmlx(a, patterns, prompt):
    cmd = [a.zmlx, "generate", "--model", a.model, "--prompt", prompt, "--max-tokens", str(a.gen), "--ignore-eos",
           "--json", "--warmup", str(a.warmup), "--patterns", patterns]
    env = dict(os.environ, ZMLX_CPU_THREADS=str(a.threads))
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"zmlx generate failed ({r.returncode}): {' '.join(cmd[:4])} ...\n{r.stderr[-2000:]}")
    s = json.loads(r.stdout)["stats"]
    if s["generation_tokens"] != a.gen:
        raise SystemExit(f"zmlx generated {s['generation_tokens']} tokens, expected {a.gen}")
    return {"prefill_tps": s["prompt_tps"], "decode_tps": s["generation_tps"], "prompt_tokens": s["prompt_tokens"]}


def run_llama(a, gguf):
    """bench_llamacpp.py's two llama-bench runs (pp at depth 0, tg at depth PROMPT), one repetition."""
    b = types.SimpleNamespace(bench=a.bench, gguf=gguf, threads=a.threads, reps=1)
    _, pp = llama_bench(b, a.prompt_tokens, 0, 0)
    _, tg = llama_bench(b, 0, a.gen, a.prompt_tokens)
    return {"prefill_tps": pp[0]["avg_ts"], "decode_tps": tg[0]["avg_ts"]}


def main():
    ap = argparse.ArgumentParser()
    for k in ("zmlx", "model", "prompt-file", "bench", "family", "quant"):
        ap.add_argument(f"--{k}", required=True)
    for k in ("prompt-tokens", "gen", "threads", "rounds", "warmup"):
        ap.add_argument(f"--{k}", type=int, required=True)
    ap.add_argument("--patterns", default="safe fast")
    ap.add_argument("--gguf", action="append", required=True, help="TYPE=PATH, e.g. q4_0=model.q4_0.gguf")
    a = ap.parse_args()
    if a.rounds < 1:
        raise SystemExit("--rounds must be at least 1")
    prompt = open(a.prompt_file).read()
    engines = [(f"zmlx_{p}", lambda p=p: run_zmlx(a, p, prompt)) for p in a.patterns.split()]
    for g in a.gguf:
        t, _, path = g.partition("=")
        if not path or not os.path.exists(path):
            raise SystemExit(f"--gguf {g}: expected TYPE=PATH of an existing GGUF file")
        engines.append((f"llamacpp_{t}", lambda path=path: run_llama(a, path)))
    rounds = []
    for i in range(a.rounds):
        k = i % len(engines)
        order = engines[k:] + engines[:k]
        rec = {"round": i, "order": [n for n, _ in order], "loadavg": os.getloadavg()}
        for name, fn in order:
            t0 = time.time()
            rec[name] = fn()
            rec[name]["wall_s"] = round(time.time() - t0, 2)
        rounds.append(rec)
        print(f"[paired] round {i + 1}/{a.rounds}: " + ", ".join(
            f"{n} {rec[n]['prefill_tps']:.1f}/{rec[n]['decode_tps']:.1f}" for n, _ in engines), file=sys.stderr)
    names = [n for n, _ in engines]
    med = {n: {m: st.median(r[n][m] for r in rounds) for m in ("prefill_tps", "decode_tps")} for n in names}
    ratios = {}
    for z in (n for n in names if n.startswith("zmlx_")):
        for l in (n for n in names if n.startswith("llamacpp_")):
            for m in ("prefill_tps", "decode_tps"):
                per = [r[z][m] / r[l][m] for r in rounds]
                ratios[f"{z}/{l}/{m.split('_')[0]}"] = {"median": st.median(per), "min": min(per), "max": max(per),
                                                        "per_round": per}
    print(json.dumps({"side": "paired", "family": a.family, "quant": a.quant, "rounds": rounds, "medians": med,
                      "ratios": ratios, "threads": a.threads, "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen,
                      "zmlx_warmup": a.warmup, "engines": names,
                      "method": "engines back to back per round, order rotated each round; ratio = median over "
                                "rounds of the same-round ratio"}))


if __name__ == "__main__":
    main()
