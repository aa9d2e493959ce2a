#!/usr/bin/env bash
# Full-size CPU comparison (issue #14): a Qwen3-30B-A3B-shaped 4-bit (group 64) checkpoint, every
# engine in its own process, one after the other on the same prompt and thread count:
#   mlx-lm (benchmarks/mlx_lm_bench.py), zmlx `--patterns safe`, zmlx `--patterns fast`
#   (`zmlx generate --json`: prefill/decode tok/s, load seconds, peak RSS), `zmlx run --patterns
#   fast` (fast vs unpatched in one process: token identity + teacher-forced logit max-abs/KL, a
#   ledger line), and llama.cpp on the same weights (GGUF Q4_1 = MLX 4-bit g64 exactly; built by
#   benchmarks/llamacpp/build.sh, `llama-bench` with the same threads, PROMPT_TOKENS prefill and
#   GEN_TOKENS decode at that depth). Tokens of safe/fast are compared with mlx-lm's.
# Writes repro_capsules/full-cpu-<family>-<stamp>/ (raw JSON per side, /usr/bin/time -v, table.md).
# Page cache: zmlx maps the safetensors files, so a side that starts after mlx-lm (whose 19 GB
# of copies evict the cache on a 23 GB machine) would time disk reads; the files are read once
# before each zmlx side (`cat > /dev/null`), so the zmlx rows time the kernels, not the disk.
#   env: CKPT (target/zmlx-full/qwen3_moe-q4; synthesized with `zmlx synth --preset full` when
#   missing: ~17 GB, ~70 s), PROMPT_TOKENS (32), GEN_TOKENS (16), THREADS (`nproc`), LLAMACPP (1),
#   MLXLM (1; 0 skips mlx-lm, ~2 min at 0.3 tok/s), LEDGER (benchmarks/matrix-cpu.jsonl).
# Needs ~17 GB of disk for the checkpoint and as much again for the GGUF (written through a temp
# file, not held in memory); about 20 min on the 2-core VM with llama.cpp already built.
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=${CKPT:-target/zmlx-full/qwen3_moe-q4}
PROMPT_TOKENS=${PROMPT_TOKENS:-32}
GEN_TOKENS=${GEN_TOKENS:-16}
THREADS=${THREADS:-$(nproc)}
LLAMACPP=${LLAMACPP:-1}
MLXLM=${MLXLM:-1}
LEDGER=${LEDGER:-benchmarks/matrix-cpu.jsonl}
export THREADS ZMLX_CPU_THREADS=$THREADS OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS
PY=${ZMLX_ORACLE_PYTHON:-.mlx/oracle-venv/bin/python}
Z=target/release/zmlx
[ -x "$PY" ] || bash scripts/setup.sh --oracle
cargo build --release --quiet
if [ ! -f "$CKPT/config.json" ]; then
  echo "[full] synthesizing $CKPT (zmlx synth --preset full --family qwen3_moe --quantize 4)"
  $Z synth --family qwen3_moe --preset full --quantize 4 --out "$CKPT"
fi
FAM=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['model_type'])" "$CKPT/config.json")
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
CAP=${CAPSULE_DIR:-repro_capsules/full-cpu-$FAM-$STAMP}
mkdir -p "$CAP"
RAW="$CAP/raw.jsonl"
: > "$RAW"
{ grep -m1 "model name" /proc/cpuinfo; nproc; free -g | head -2; git rev-parse HEAD; } > "$CAP/machine.txt" 2>/dev/null || true
TEXT=$(printf 'The quick brown fox jumps over the lazy dog while the network routes packets between servers. %.0s' $(seq 1 50))
read -r IDS PTXT < <("$PY" - "$CKPT" "$PROMPT_TOKENS" "$TEXT" <<'PY'
import json, sys
from tokenizers import Tokenizer
t = Tokenizer.from_file(sys.argv[1] + "/tokenizer.json")
ids = t.encode(sys.argv[3], add_special_tokens=False).ids[: int(sys.argv[2])]
text = t.decode(ids)
print(",".join(map(str, t.encode(text, add_special_tokens=False).ids)), json.dumps(text))
PY
)
printf '%s' "$PTXT" | "$PY" -c 'import json,sys; sys.stdout.write(json.loads(sys.stdin.read()))' > "$CAP/prompt.txt"
echo "[full] $CKPT ($FAM): prompt $(echo "$IDS" | tr ',' '\n' | wc -l) tokens, $GEN_TOKENS generated (EOS ignored), threads $THREADS"
side() { # name json-file: appends {"side": name, ...file} to raw.jsonl
  "$PY" -c "import json,sys; r=json.load(open(sys.argv[2])); r['side']=sys.argv[1]; print(json.dumps(r))" "$1" "$2" >> "$RAW"
}
if [ "$MLXLM" = 1 ]; then
  echo "[full] mlx-lm"
  /usr/bin/time -v -o "$CAP/mlx_lm.time" "$PY" benchmarks/mlx_lm_bench.py --model "$CKPT" --prompt-ids "$IDS" \
    --max-tokens "$GEN_TOKENS" --warmup 0 2>/dev/null > "$CAP/mlx_lm.json"
  side mlx_lm "$CAP/mlx_lm.json"
fi
warm_cache() { cat "$CKPT"/*.safetensors > /dev/null; }
for p in safe fast; do
  echo "[full] zmlx --patterns $p"
  warm_cache
  /usr/bin/time -v -o "$CAP/generate-$p.time" $Z generate --model "$CKPT" --prompt "$(cat "$CAP/prompt.txt")" \
    --max-tokens "$GEN_TOKENS" --ignore-eos --json --patterns "$p" > "$CAP/generate-$p.json"
  side "zmlx_$p" "$CAP/generate-$p.json"
done
echo "[full] zmlx run --patterns fast (vs unpatched in one process; ledger line)"
warm_cache
set +e
$Z run "$CKPT" --patterns fast --runs 1 --max-tokens "$GEN_TOKENS" --ignore-eos --warmup 0 \
  --prompt-file "$CAP/prompt.txt" --notes "full_size.sh: full-size $FAM 4-bit, $GEN_TOKENS tokens, threads $THREADS" \
  --ledger "$LEDGER" --capsule "$CAP" --json > "$CAP/run-fast.json"
rc=$?
set -e
echo "{\"side\":\"zmlx_run_fast_exit\",\"exit\":$rc}" >> "$RAW"
if [ "$LLAMACPP" = 1 ]; then
  bash benchmarks/llamacpp/build.sh | tee "$CAP/llamacpp_build.txt"
  LLAMACPP_BIN=$(sed -n 's/^LLAMACPP_BIN=//p' "$CAP/llamacpp_build.txt")
  export GGUF_PY=$(sed -n 's/^GGUF_PY=//p' "$CAP/llamacpp_build.txt")
  g=$CKPT.q4_1.gguf
  if [ ! -f "$g" ] || [ "$CKPT/config.json" -nt "$g" ]; then
    echo "[full] converting to $g (Q4_1: the same weights; spooled through a temp file in $(dirname "$g"))"
    TMPDIR=$(dirname "$g") "$PY" benchmarks/llamacpp/to_gguf.py "$CKPT" "$g" --type q4_1 --temp-file > "$g.json"
  fi
  cp "$g.json" "$CAP/gguf-q4_1.json"
  echo "[full] llama-bench -t $THREADS -p $PROMPT_TOKENS, -n $GEN_TOKENS -d $PROMPT_TOKENS"
  "$PY" benchmarks/llamacpp/bench_llamacpp.py --bench "$LLAMACPP_BIN/llama-bench" --gguf "$g" --type q4_1 \
    --threads "$THREADS" --prompt "$PROMPT_TOKENS" --gen "$GEN_TOKENS" --reps 1 --family "$FAM" --quant 4 \
    --ckpt "$CKPT" --convert-json "$g.json" --ledger "$LEDGER" --capsule "$CAP" \
    --notes "full_size.sh: full-size $FAM" >> "$RAW"
fi
"$PY" - "$RAW" "$IDS" <<'PY' | tee "$CAP/table.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
by = {r["side"]: r for r in rows}
ref = by.get("mlx_lm", {}).get("ids") or by.get("mlx_lm", {}).get("token_ids")
print("| engine | prefill tok/s | decode tok/s | load s | peak RSS GB | tokens vs mlx-lm |")
print("|---|---|---|---|---|---|")
def line(name, pre, dec, load, rss, same):
    f = lambda v, d=2: "-" if v is None else f"{v:.{d}f}"
    print(f"| {name} | {f(pre)} | {f(dec)} | {f(load, 3)} | {f(rss / 1e9 if rss else None, 1)} | {same} |")
m = by.get("mlx_lm")
if m:
    line("mlx-lm 0.32.0", m.get("prompt_tps"), m.get("generation_tps"), m.get("load_seconds"), m.get("peak_rss_bytes"), "-")
for p in ("safe", "fast"):
    r = by.get(f"zmlx_{p}")
    if r:
        s, ids = r["stats"], r.get("token_ids")
        same = "-" if not ref else ("identical" if ids == ref[: len(ids)] else "DIFFER")
        line(f"zmlx {p}", s["prompt_tps"], s["generation_tps"], r.get("load_seconds"), r.get("peak_rss_bytes"), same)
for r in rows:
    if r["side"].startswith("llamacpp"):
        line(f"llama.cpp {r['side'][9:].upper()}", r.get("prefill_tps"), r.get("decode_tps"), None, None, "-")
PY
echo "[full] capsule: $CAP  ledger: $LEDGER"
