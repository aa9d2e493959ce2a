#!/usr/bin/env python3
"""Expert offloading benchmark (issue #18): decode tok/s, hit rate, bytes read and stall per token
against the expert cache's size (10/25/50/100 % of each layer's experts) and policy (LRU, LFU,
LRU + prefetch), beside the fully resident run of the same checkpoint, for a near-uniform router
(random weights) and a Zipf-skewed one (`zmlx synth --route-skew zipf:S`, as trained routers
are). Every offloaded run's greedy token ids are compared with the resident run's.

    python3 benchmarks/offload_bench.py [--layers 8] [--skew 1.0] [--max-tokens 64] [--patterns fast]

The checkpoint: the qwen3_moe bench shape (hidden 2048, 64 experts, top-8, 4-bit g64) with
`--layers` decoder layers, synthesized into target/offload-bench/. Writes
repro_capsules/offload-cpu-<UTC>/ (results.json, table.md, run.log) and one ledger line per
offloaded configuration in benchmarks/matrix-cpu.jsonl (baseline = the resident run, patched = the
offloaded run, same patterns; `expert_cache` = the cache's shape and counters).
On this machine the checkpoint fits in the OS page cache, so "bytes read" come from memory at
memcpy speed; with a model larger than RAM they come from disk at its rate.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZMLX = os.path.join(ROOT, "target", "release", "zmlx")
PROMPT = ("Explain the key differences between TCP and UDP protocols, including their use cases, "
          "reliability guarantees, and performance characteristics.")


def log(f, *parts):
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    f.write(line + "\n")
    f.flush()


def synth(out, layers, skew, logf):
    if os.path.exists(os.path.join(out, "config.json")):
        return
    base = out + "-config"
    os.makedirs(base, exist_ok=True)
    subprocess.run([ZMLX, "synth", "--family", "qwen3_moe", "--preset", "bench", "--quantize", "4",
                    "--out", base, "--margins", "off"], check=True, capture_output=True)
    cfg = json.load(open(os.path.join(base, "config.json")))
    cfg.pop("zmlx_synth", None)
    cfg.pop("quantization", None)
    cfg.pop("quantization_config", None)
    cfg["num_hidden_layers"] = layers
    cpath = os.path.join(base, "bench-layers.json")
    json.dump(cfg, open(cpath, "w"))
    cmd = [ZMLX, "synth", "--family", "qwen3_moe", "--config", cpath, "--quantize", "4", "--out", out]
    if skew:
        cmd += ["--route-skew", f"zipf:{skew}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    log(logf, f"synth {out}: rc {r.returncode}", r.stderr.strip().splitlines()[-3:] if r.stderr else "")
    r.check_returncode()


def generate(model, a, extra):
    cmd = [ZMLX, "generate", "--model", model, "--prompt", PROMPT, "--max-tokens", str(a.max_tokens),
           "--ignore-eos", "--json", "--warmup", "1", "--patterns", a.patterns] + extra
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZMLX_")}
    env["ZMLX_CPU_THREADS"] = str(a.threads)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of the skewed checkpoint")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--patterns", default="fast")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fractions", default="0.1,0.25,0.5,1.0")
    ap.add_argument("--ledger", default=os.path.join(ROOT, "benchmarks", "matrix-cpu.jsonl"))
    ap.add_argument("--no-ledger", action="store_true")
    a = ap.parse_args()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    capsule = os.path.join(ROOT, "repro_capsules", f"offload-cpu-{stamp}")
    os.makedirs(capsule)
    logf = open(os.path.join(capsule, "run.log"), "w")
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    log(logf, f"offload_bench {stamp} commit {commit}{' (dirty)' if dirty else ''}; args {vars(a)}")
    work = os.path.join(ROOT, "target", "offload-bench")
    os.makedirs(work, exist_ok=True)
    routings = [("uniform", 0.0), (f"zipf{a.skew:g}", a.skew)]
    results = {"args": vars(a), "commit": commit, "dirty": bool(dirty), "stamp": stamp, "routings": {}}
    for name, skew in routings:
        model = os.path.join(work, f"qwen3_moe-bench-{a.layers}l-{name}")
        synth(model, a.layers, skew, logf)
        cfg = json.load(open(os.path.join(model, "config.json")))
        experts, k = cfg["num_experts"], cfg["num_experts_per_tok"]
        resident = generate(model, a, [])
        log(logf, f"[{name}] resident: decode {resident['stats']['generation_tps']:.2f} tok/s, "
                  f"peak RSS {resident['peak_rss_bytes'] / 1e9:.3f} GB")
        rows = []
        for frac in [float(x) for x in a.fractions.split(",")]:
            slots = max(k, round(frac * experts))
            for policy, prefetch in [("lru", False), ("lfu", False), ("lru", True)]:
                extra = ["--expert-cache-experts", str(slots), "--expert-cache-policy", policy]
                if prefetch:
                    extra.append("--expert-prefetch")
                r = generate(model, a, extra)
                c = r["expert_cache"]
                n = r["stats"]["generation_tokens"] + r["stats"]["prompt_tokens"]
                row = {
                    "fraction": frac, "slots": slots, "policy": policy + ("+prefetch" if prefetch else ""),
                    "decode_tps": r["stats"]["generation_tps"], "prefill_tps": r["stats"]["prompt_tps"],
                    "hit_rate": (c["hits"] / (c["hits"] + c["misses"])) if c["hits"] + c["misses"] else 0.0,
                    "prefetch_hits": c["prefetch_hits"], "prefetch_loads": c["prefetch_loads"],
                    "bytes_read_per_token": c["bytes_read"] / max(n, 1),
                    "stall_ms_per_token": 1e3 * c["stall_seconds"] / max(n, 1),
                    "pool_bytes": c["pool_bytes"], "expert_bytes": c["expert_bytes"],
                    "peak_rss_bytes": r["peak_rss_bytes"],
                    "identical": r["token_ids"] == resident["token_ids"], "expert_cache": c,
                }
                rows.append(row)
                log(logf, f"[{name}] {slots}/{experts} {row['policy']}: decode {row['decode_tps']:.2f} tok/s "
                          f"({row['decode_tps'] / resident['stats']['generation_tps']:.2f}x resident), hit "
                          f"{100 * row['hit_rate']:.1f} %, prefetch hits {row['prefetch_hits']}, "
                          f"{row['bytes_read_per_token'] / 1e6:.1f} MB/token read, stall "
                          f"{row['stall_ms_per_token']:.2f} ms/token, RSS {row['peak_rss_bytes'] / 1e9:.3f} GB, "
                          f"tokens {'identical' if row['identical'] else 'DIFFER'}")
        results["routings"][name] = {"model": os.path.relpath(model, ROOT), "experts": experts, "k": k,
                                     "resident": {"decode_tps": resident["stats"]["generation_tps"],
                                                  "prefill_tps": resident["stats"]["prompt_tps"],
                                                  "peak_rss_bytes": resident["peak_rss_bytes"],
                                                  "token_ids": resident["token_ids"]},
                                     "routing": cfg.get("zmlx_synth", {}).get("routing"), "rows": rows}
    json.dump(results, open(os.path.join(capsule, "results.json"), "w"), indent=1)
    with open(os.path.join(capsule, "table.md"), "w") as t:
        t.write(f"# Expert offloading, CPU, {stamp}\n\nqwen3_moe bench shape, {a.layers} layers, 4-bit; "
                f"--patterns {a.patterns}; {a.max_tokens} greedy tokens (EOS ignored), warm-up 1, threads "
                f"{a.threads}; commit {commit[:7]}{' (dirty)' if dirty else ''}.\n\n")
        for name, r in results["routings"].items():
            res = r["resident"]
            t.write(f"## {name} routing\n\nresident: decode {res['decode_tps']:.2f} tok/s, peak RSS "
                    f"{res['peak_rss_bytes'] / 1e9:.3f} GB\n\n")
            t.write("| cache | policy | decode tok/s | × resident | hit rate | prefetch hits | MB read/token | "
                    "stall ms/token | pool GB | peak RSS GB | tokens = resident |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
            for row in r["rows"]:
                t.write(f"| {row['slots']}/{r['experts']} ({100 * row['slots'] / r['experts']:.1f} %) | {row['policy']} | "
                        f"{row['decode_tps']:.2f} | {row['decode_tps'] / res['decode_tps']:.2f} | "
                        f"{100 * row['hit_rate']:.1f} % | {row['prefetch_hits']} | "
                        f"{row['bytes_read_per_token'] / 1e6:.1f} | {row['stall_ms_per_token']:.2f} | "
                        f"{row['pool_bytes'] / 1e9:.3f} | {row['peak_rss_bytes'] / 1e9:.3f} | "
                        f"{'yes' if row['identical'] else 'NO'} |\n")
            t.write("\n")
    log(logf, f"capsule {os.path.relpath(capsule, ROOT)}")
    if a.no_ledger:
        return
    ver = subprocess.run([ZMLX, "--version"], capture_output=True, text=True).stdout.split()[-1]
    with open(a.ledger, "a") as led:
        for name, r in results["routings"].items():
            res = r["resident"]
            for row in r["rows"]:
                now = datetime.datetime.now(datetime.timezone.utc).isoformat()
                line = {
                    "model_id": r["model"], "model_family": "qwen", "architecture": "moe",
                    "patterns_applied": [a.patterns], "hardware": "cpu",
                    "notes": (f"offload_bench.py: --expert-cache-experts {row['slots']} ({row['policy']}) vs the "
                              f"resident run, {name} routing, {a.max_tokens} greedy tokens, threads {a.threads}; "
                              f"baseline = resident, patched = offloaded"),
                    "macos_version": "", "mlx_version": "0.32.2", "zmlx_version": ver, "zmlx_commit": commit[:7],
                    "python_version": "", "custom_mlx": False, "timestamp": now,
                    "fidelity": "PASS" if row["identical"] else "FAIL",
                    "fidelity_detail": f"{a.max_tokens} greedy tokens {'identical to' if row['identical'] else 'differ from'} the resident run",
                    "modules_patched": 0,
                    "decode_tps_baseline": round(res["decode_tps"], 2), "decode_tps_patched": round(row["decode_tps"], 2),
                    "decode_speedup": round(row["decode_tps"] / res["decode_tps"], 4),
                    "decode_runs_baseline": [round(res["decode_tps"], 2)], "decode_runs_patched": [round(row["decode_tps"], 2)],
                    "prefill_tps_baseline": round(res["prefill_tps"], 2), "prefill_tps_patched": round(row["prefill_tps"], 2),
                    "prefill_change": round(row["prefill_tps"] / res["prefill_tps"] - 1, 4) if res["prefill_tps"] else 0.0,
                    "peak_mem_baseline_gb": 0.0, "peak_mem_patched_gb": 0.0,
                    "max_tokens": a.max_tokens, "gen_tokens": a.max_tokens, "runs": 1, "backend": "cpu",
                    "git_commit": commit, "prompt_source": "benchmarks/offload_bench.py PROMPT",
                    "capsule": os.path.relpath(capsule, ROOT), "threads": a.threads,
                    "peak_rss_bytes": row["peak_rss_bytes"], "batch_size": 1, "expert_cache": row["expert_cache"],
                }
                led.write(json.dumps(line, separators=(",", ":")) + "\n")
    log(logf, f"ledger: {sum(len(r['rows']) for r in results['routings'].values())} lines in {a.ledger}")


if __name__ == "__main__":
    sys.exit(main())
