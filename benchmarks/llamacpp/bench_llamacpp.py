"""One llama.cpp configuration for `benchmarks/bench.sh` (LLAMACPP=1): llama-bench on a GGUF made
by to_gguf.py, like the zmlx/mlx-lm sides: THREADS threads, prefill of PROMPT tokens (pp, empty
context) and decode of GEN tokens after PROMPT tokens of context (tg with `-d PROMPT`, as zmlx and
mlx-lm decode after the prompt), REPS repetitions each (llama-bench adds its own warm-up run).
llama-bench feeds random token ids, not the bench prompt: its speed does not depend on them.

Prints one raw.jsonl line (side `llamacpp_<type>`) and appends one ledger line in zmlx's matrix
format (src/ledger.rs MatrixEntry) with patterns_applied ["llama.cpp <type>"], engine
"llama.cpp": decode/prefill "patched" = llama.cpp, "baseline" = unpatched zmlx of the same bench
run (as on zmlx's own lines, so decode_speedup compares like with like), fidelity SKIP.

usage: python bench_llamacpp.py --bench BIN --gguf G --type q4_0 --threads T --prompt P --gen N
        --reps R --family F --quant Q --ckpt DIR [--run-json run.json] [--convert-json conv.json]
        [--tokens-json tokens.json] [--ledger L] [--capsule DIR] [--notes TEXT]
"""
import argparse
import datetime
import json
import os
import subprocess
import sys


def llama_bench(a, p, n, depth):
    cmd = [a.bench, "-m", a.gguf, "-t", str(a.threads), "-p", str(p), "-n", str(n), "-r", str(a.reps), "-o", "json"]
    if depth:
        cmd += ["-d", str(depth)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"llama-bench failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return cmd, json.loads(r.stdout)


def git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def main():
    ap = argparse.ArgumentParser()
    for k in ("bench", "gguf", "type", "family", "quant", "ckpt"):
        ap.add_argument(f"--{k}", required=True)
    for k in ("threads", "prompt", "gen", "reps"):
        ap.add_argument(f"--{k}", type=int, required=True)
    for k in ("run-json", "convert-json", "tokens-json", "ledger", "capsule"):
        ap.add_argument(f"--{k}")
    ap.add_argument("--notes", default="")
    a = ap.parse_args()

    load = os.getloadavg()  # the 2-core VM is shared: a busy machine hurts llama.cpp's spinning threads most
    cmd_pp, pp = llama_bench(a, a.prompt, 0, 0)
    cmd_tg, tg = llama_bench(a, 0, a.gen, a.prompt)
    pp, tg = pp[0], tg[0]
    conv = json.load(open(a.convert_json)) if a.convert_json and os.path.exists(a.convert_json) else None
    conv = conv.get("report", conv) if conv else None  # to_gguf.py --verify-json: {report, tensors}
    toks = json.load(open(a.tokens_json)) if a.tokens_json and os.path.exists(a.tokens_json) else None
    side = f"llamacpp_{a.type}"
    build = f"{pp.get('build_commit')} (build {pp.get('build_number')})"
    raw = {"side": side, "family": a.family, "quant": a.quant, "engine": "llama.cpp", "type": a.type,
           "prefill_tps": pp["avg_ts"], "prefill_stddev": pp.get("stddev_ts"), "prefill_runs": pp.get("samples_ts"),
           "decode_tps": tg["avg_ts"], "decode_stddev": tg.get("stddev_ts"), "decode_runs": tg.get("samples_ts"),
           "prompt_tokens": a.prompt, "gen_tokens": a.gen, "decode_depth": a.prompt, "threads": a.threads,
           "reps": a.reps, "loadavg_at_start": load, "build": build, "cpu_info": pp.get("cpu_info"), "backends": pp.get("backends"),
           "model_type": pp.get("model_type"), "model_size": pp.get("model_size"),
           "model_n_params": pp.get("model_n_params"), "gguf": a.gguf, "cmd_pp": cmd_pp, "cmd_tg": cmd_tg,
           "llama_bench": [pp, tg], "conversion": conv and {k: conv.get(k) for k in ("type", "kinds", "bf16_to_f16", "verify", "bytes")},
           "greedy_check": toks}
    print(json.dumps(raw))

    if not a.ledger:
        return
    run = json.load(open(a.run_json)) if a.run_json and os.path.exists(a.run_json) else {}
    rep = run.get("report", run) if isinstance(run, dict) else {}
    zl = run.get("ledger_line") if isinstance(run.get("ledger_line"), dict) else {}
    base = rep.get("baseline") or {}
    # zmlx's own ledger line of this run (rounded as zmlx rounds), else its report.
    b_dec = zl.get("decode_tps_baseline", base.get("median_decode_tps"))
    b_pre = zl.get("prefill_tps_baseline", base.get("median_prompt_tps"))
    b_runs = zl.get("decode_runs_baseline") or [round(r["decode_tps"], 2) for r in base.get("runs", []) if "decode_tps" in r]
    b_mem = zl.get("peak_mem_baseline_gb", base.get("peak_mem_gb")) or 0.0
    nan = float("nan")
    dec, pre = round(tg["avg_ts"], 2), round(pp["avg_ts"], 2)
    weights = ("the same weights as the MLX checkpoint (MLX affine 4-bit g64 = 2 Q4_1 blocks, bit-exact dequantization)"
               if a.type == "q4_1" else
               f"MLX's dequantized weights re-quantized to {a.type.upper()}" if a.type != "f16" else "dequantized, f16")
    detail = "llama.cpp engine: tokens not compared with mlx-lm in the ledger (see the capsule)"
    if toks:
        detail = (f"llama.cpp greedy (llama-simple) vs mlx-lm: first {toks.get('matching_tokens')} of "
                  f"{toks.get('compared_tokens')} generated tokens identical; prompt tokenization "
                  f"{'identical' if toks.get('prompt_ids_equal') else 'differs'}")
    now = datetime.datetime.now(datetime.timezone.utc)
    commit = git("rev-parse", "HEAD")
    line = {
        "model_id": zl.get("model_id") or a.ckpt, "model_family": zl.get("model_family") or a.family,
        "architecture": "moe", "patterns_applied": [f"llama.cpp {a.type}"],
        "hardware": zl.get("hardware") or (pp.get("cpu_info") or ""),
        "notes": (f"engine llama.cpp {build}, llama-bench -t {a.threads} -r {a.reps}: pp{a.prompt} (depth 0), "
                  f"tg{a.gen} at depth {a.prompt}; GGUF {a.type}: {weights}; baseline = unpatched zmlx of the same "
                  f"bench run{'; ' + a.notes if a.notes else ''}"),
        "macos_version": "", "mlx_version": "", "zmlx_version": zl.get("zmlx_version", ""),
        "zmlx_commit": commit[:7], "python_version": "", "custom_mlx": False,
        "timestamp": now.isoformat(),
        "fidelity": "SKIP", "fidelity_detail": detail, "modules_patched": 0,
        "decode_tps_baseline": b_dec if b_dec is not None else nan, "decode_tps_patched": dec,
        "decode_speedup": round(dec / b_dec, 3) if b_dec else nan,
        "decode_runs_baseline": b_runs,
        "decode_runs_patched": [round(x, 2) for x in tg.get("samples_ts") or []],
        "prefill_tps_baseline": b_pre if b_pre is not None else nan, "prefill_tps_patched": pre,
        "prefill_change": round(pre / b_pre - 1, 4) if b_pre else nan,
        "peak_mem_baseline_gb": b_mem, "peak_mem_patched_gb": 0.0,
        "max_tokens": a.gen, "gen_tokens": a.gen, "runs": a.reps,
        "backend": "cpu", "device": zl.get("device") or (pp.get("cpu_info") or ""),
        "git_commit": commit, "prompt_source": "llama-bench (random token ids)",
        "capsule": a.capsule, "threads": a.threads,
        "engine": "llama.cpp", "llamacpp_build": build, "gguf_type": a.type, "gguf": a.gguf,
        "gguf_bytes": conv.get("bytes") if conv else None,
    }
    line = {k: (None if isinstance(v, float) and v != v else v) for k, v in line.items()}
    with open(a.ledger, "a") as f:
        f.write(json.dumps(line, separators=(",", ":")) + "\n")
    print(f"[llamacpp] ledger line appended to {a.ledger}", file=sys.stderr)


if __name__ == "__main__":
    main()
