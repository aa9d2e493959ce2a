"""Batched decode throughput (issue #16): zmlx `fast` and `safe` presets, zmlx unpatched and
mlx-lm's `batch_generate` on each family's 4-bit bench checkpoint, for batch sizes B, one batch
of B different prompts per run, GEN_TOKENS tokens each (EOS ignored on both sides), same
threads; the engines run back to back per B. Prints a table and writes a capsule (raw.jsonl,
table.md, triad.json) plus ledger lines (`zmlx run --batch-size` for the fast preset vs
unpatched at LEDGER_BATCHES).

Total decode tok/s is each tool's own count: all sequences' generated tokens / decode time
(zmlx: time in decode steps, `batch_stats.generation_tps`; mlx-lm: BatchGenerator's
`generation_tps`). The roofline per B is B x triad bandwidth / bytes per decode step
(roofline.py bytes-batch: expected distinct experts of B tokens, uniform routing).

usage: python benchmarks/batch.py   (run from the repository root; env below)
  FAMILIES (qwen3_moe)  BATCHES (1 2 4 8 16 32)  GEN_TOKENS (32)  THREADS (nproc)
  PEER_BATCHES (1 8: where unpatched zmlx and mlx-lm run; they are ~20x slower)
  LEDGER_BATCHES (1 8)  LEDGER (benchmarks/matrix-cpu.jsonl)  SKIP_BUILD=1 (use the built binary)
  ZMLX_BIN (a built zmlx to run as is, e.g. a copy while the tree is rebuilt; implies SKIP_BUILD)
"""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(ROOT)
PY = sys.executable
Z = os.environ.get("ZMLX_BIN") or "target/release/zmlx"
ENV = lambda k, d: os.environ.get(k) or d  # noqa: E731
FAMILIES = ENV("FAMILIES", "qwen3_moe").split()
BATCHES = [int(b) for b in ENV("BATCHES", "1 2 4 8 16 32").split()]
PEER_BATCHES = [int(b) for b in ENV("PEER_BATCHES", "1 8").split()]
LEDGER_BATCHES = [int(b) for b in ENV("LEDGER_BATCHES", "1 8").split()]
GEN = int(ENV("GEN_TOKENS", "32"))
THREADS = int(ENV("THREADS", str(len(os.sched_getaffinity(0)))))
LEDGER = ENV("LEDGER", "benchmarks/matrix-cpu.jsonl")
for k in ("ZMLX_CPU_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[k] = str(THREADS)
STAMP = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
CAP = ENV("CAPSULE_DIR", f"repro_capsules/batch-cpu-{STAMP}")
WORK = "target/zmlx-bench"

SOURCE = (
    "The quick brown fox jumps over the lazy dog while the network routes packets between servers. "
    "In a distributed system, a client sends requests over the network to many servers; each server keeps "
    "a log of operations, and the cluster elects a leader that orders every write. Once upon a time, in a "
    "kitchen full of bread, a baker explained the key differences between TCP and UDP protocols to a cat. "
) * 8


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def prompts_for(d, n):
    """n different prompts of 16..64 tokens: slices of SOURCE at different offsets, decoded and
    re-encoded so that zmlx (text) and mlx-lm (ids) see the same ids."""
    from tokenizers import Tokenizer
    t = Tokenizer.from_file(f"{d}/tokenizer.json")
    ids = t.encode(SOURCE, add_special_tokens=False).ids
    texts, id_lists = [], []
    for i in range(n):
        length = 16 + (i * 13) % 49
        text = t.decode(ids[i * 7: i * 7 + length]).replace("\n", " ").strip()
        texts.append(text)
        id_lists.append(t.encode(text, add_special_tokens=False).ids)
    return texts, id_lists


def zmlx_batch(d, patterns, texts, b):
    pf = f"{WORK}/batch_prompts.txt"
    open(pf, "w").write("\n".join(texts[:b]) + "\n")
    out = sh([Z, "generate", "--model", d, "--prompts-file", pf, "--batch-size", str(b), "--max-tokens", str(GEN),
              "--ignore-eos", "--json", "--warmup", "1", "--patterns", patterns])
    lines = [json.loads(l) for l in out.splitlines() if l.strip()]
    st = lines[-1]["batch_stats"]
    return {"generation_tps": st["generation_tps"], "prompt_tps": st["prompt_tps"],
            "peak_memory_gb": st["peak_memory_gb"], "wall_seconds": st["wall_seconds"],
            "peak_rss_bytes": lines[-1].get("peak_rss_bytes"), "token_ids": [l["token_ids"] for l in lines[:-1]]}


def mlx_lm_batch(d, ids, b):
    pj = f"{WORK}/batch_prompts.json"
    json.dump(ids[:b], open(pj, "w"))
    out = sh([PY, "benchmarks/mlx_lm_batch.py", "--model", d, "--prompts-json", pj, "--batch-size", str(b),
              "--max-tokens", str(GEN)])
    return json.loads(out.splitlines()[-1])


def main():
    os.makedirs(CAP, exist_ok=True)
    os.makedirs(WORK, exist_ok=True)
    if not (os.environ.get("SKIP_BUILD") or os.environ.get("ZMLX_BIN")):
        subprocess.run(["cargo", "build", "--release", "--quiet"], check=True)
    triad = json.loads(sh([PY, "benchmarks/roofline.py", "triad", str(THREADS)]))
    triad["loadavg_at_start"] = os.getloadavg()
    json.dump(triad, open(f"{CAP}/triad.json", "w"))
    raw = open(f"{CAP}/raw.jsonl", "w")
    rows = []
    for fam in FAMILIES:
        d = f"{WORK}/{fam}-4"
        if not os.path.exists(f"{d}/config.json"):
            sh([Z, "synth", "--family", fam, "--preset", "bench", "--quantize", "4", "--out", d])
        texts, ids = prompts_for(d, max(BATCHES))
        for b in BATCHES:
            ctx = sum(len(x) for x in ids[:b]) // b + GEN // 2
            roof = json.loads(sh([PY, "benchmarks/roofline.py", "bytes-batch", d, str(ctx), str(b)]))
            row = {"family": fam, "batch": b, "roofline_tps": b * triad["triad_gbs"] * 1e9 / roof["bytes_per_step"],
                   "bytes_per_step": roof["bytes_per_step"]}
            sides = [("fast", lambda: zmlx_batch(d, "fast", texts, b)), ("safe", lambda: zmlx_batch(d, "safe", texts, b))]
            if b in PEER_BATCHES:
                sides += [("unpatched", lambda: zmlx_batch(d, "none", texts, b)), ("mlx_lm", lambda: mlx_lm_batch(d, ids, b))]
            for name, f in sides:
                r = f()
                r.update(side=name, family=fam, batch=b, gen_tokens=GEN, threads=THREADS)
                raw.write(json.dumps(r) + "\n")
                raw.flush()
                row[name] = r
                print(f"[batch] {fam} B={b} {name}: {r['generation_tps']:.1f} tok/s total", flush=True)
            if "mlx_lm" in row:
                for name in ("fast", "safe", "unpatched"):
                    same = sum(a == m for a, m in zip(row[name]["token_ids"], row["mlx_lm"]["token_ids"]))
                    row[name]["same_as_mlx_lm"] = f"{same}/{b}"
            rows.append(row)
        for b in LEDGER_BATCHES:
            pf = f"{WORK}/batch_ledger_prompt.txt"
            open(pf, "w").write(texts[3])
            subprocess.run([Z, "run", d, "--patterns", "fast", "--batch-size", str(b), "--runs", "1", "--warmup", "1",
                            "--max-tokens", str(GEN), "--ignore-eos", "--prompt-file", pf, "--ledger", LEDGER,
                            "--capsule", CAP, "--notes",
                            f"batch.py: {b} copies of a {len(ids[3])}-token prompt decoded together, gen {GEN} (EOS "
                            f"ignored), threads {THREADS}, fast preset vs unpatched"], check=False)
    table = render(rows, triad)
    open(f"{CAP}/table.md", "w").write(table)
    print(table)


def render(rows, triad):
    out = [f"Batched decode, total tok/s (all sequences; per sequence = total / B), {GEN} tokens each, "
           f"{THREADS} threads, triad {triad['triad_gbs']} GB/s, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
           "| family | B | fast | safe | unpatched | mlx-lm batch_generate | fast / fast B=1 | fast / mlx-lm | roofline |",
           "|---|---|---|---|---|---|---|---|---|"]
    base = {}
    for r in rows:
        f = r["fast"]["generation_tps"]
        base.setdefault(r["family"], f)
        cell = lambda k: f"{r[k]['generation_tps']:.1f}" + (f" ({r[k]['same_as_mlx_lm']} = mlx-lm)" if "same_as_mlx_lm" in r[k] else "") if k in r else "–"  # noqa: E731
        vs = f"{f / r['mlx_lm']['generation_tps']:.1f}×" if "mlx_lm" in r else "–"
        out.append(f"| {r['family']} | {r['batch']} | {cell('fast')} | {cell('safe')} | {cell('unpatched')} | "
                   f"{cell('mlx_lm')} | {f / base[r['family']]:.2f}× | {vs} | {r['roofline_tps']:.0f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
