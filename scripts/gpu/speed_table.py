"""Speed table for the GPU checks (issue #7): zmlx stock vs patched vs mlx-lm per bench checkpoint,
with the bytes-per-token roofline against the measured copy bandwidth.

usage: speed_table.py CAPSULE_DIR   (reads matrix-*.jsonl, mlx_lm_speed-*.jsonl, roofline.json,
bytes_per_token.jsonl; the newest line per (family, quant) wins) -> markdown on stdout
"""
import glob
import json
import os
import sys

cap = sys.argv[1]


def lines(pattern):
    for f in sorted(glob.glob(os.path.join(cap, pattern))):
        for line in open(f):
            if line.strip():
                yield json.loads(line)


bench = {}
for r in lines("matrix-*.jsonl"):
    if "bench" not in r["model_id"] or not r.get("notes", "").startswith("GPU bench: family preset"):
        continue
    fam, q = os.path.basename(r["model_id"]).rsplit("-bench-", 1)
    bench[(fam, q)] = r
mlx = {(r["family"], r["quant"]): r for r in lines("mlx_lm_speed-*.jsonl")}
nbytes = {(r["family"], r["quant"]): r["bytes_per_token"] for r in lines("bytes_per_token.jsonl")}
bw = json.load(open(os.path.join(cap, "roofline.json")))
gbs = bw["copy_GBps_read_plus_write"]

print(f"Device: {bw['device']}; copy bandwidth {gbs} GB/s (read + write), used as the roofline.\n")
print("| family | ckpt | mlx-lm dec | zmlx dec | patched dec | zmlx/mlx-lm | patched/zmlx | fidelity | prefill mlx-lm / zmlx | peak GB mlx-lm / zmlx | MB/token | roofline tok/s | zmlx % roof |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for fam in ["mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe", "glm4_moe_lite", "deepseek_v3"]:
    for q in ["none", "4"]:
        z, m, b = bench.get((fam, q)), mlx.get((fam, q)), nbytes.get((fam, q))
        name = "bf16" if q == "none" else f"{q}-bit"
        if z is None:
            print(f"| {fam} | {name} | - | - | - | - | - | not run | - | - | - | - | - |")
            continue
        md = m["generation_tps"] if m else None
        roof = gbs * 1e9 / b if b else None
        f = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"
        print(
            f"| {fam} | {name} | {f(md)} | {f(z['decode_tps_baseline'])} | {f(z['decode_tps_patched'])} | "
            f"{f(z['decode_tps_baseline'] / md if md else None, 2)} | {f(z['decode_speedup'], 2)} | "
            f"{z['fidelity']} ({z['fidelity_detail'].split(' ')[0]}) | {f(m['prompt_tps'] if m else None, 0)} / {f(z['prefill_tps_baseline'], 0)} | "
            f"{f(m['peak_memory_gb'] if m else None, 2)} / {f(z['peak_mem_baseline_gb'], 2)} | {f(b / 1e6 if b else None, 0)} | "
            f"{f(roof, 0)} | {f(100 * z['decode_tps_baseline'] / roof if roof else None, 1)} |"
        )
