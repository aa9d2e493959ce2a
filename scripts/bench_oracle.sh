#!/usr/bin/env bash
# Oracle check on the bench presets (real per-layer shapes; too slow for the test command on
# 2 cores): for each FAMILY and QUANT given, synthesize the bench checkpoint, run zmlx and
# mlx-lm greedy for TOKENS tokens, compare ids, append one JSON line to $OUT (default
# target/bench_oracle.jsonl), delete the checkpoint.
#   usage: scripts/bench_oracle.sh [TOKENS] "FAMILY:QUANT ..."   (QUANT = none | 4 | 8)
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENS=${1:-64}
CASES=${2:-"mixtral:4 qwen2_moe:4 qwen3_moe:4 glm4_moe:4 glm4_moe_lite:4 deepseek_v3:4"}
OUT=${OUT:-target/bench_oracle.jsonl}
Z=target/release/zmlx
PY=${ZMLX_ORACLE_PYTHON:-.mlx/oracle-venv/bin/python}
cargo build --release --quiet
PROMPT="Explain the key differences between TCP and UDP."
for c in $CASES; do
  fam=${c%%:*}; q=${c##*:}; d=target/bench-oracle/$fam-$q; qa=(); [ "$q" = none ] || qa=(--quantize "$q")
  echo "[bench-oracle] $fam q=$q: synth"
  $Z synth --family "$fam" --preset bench --out "$d" "${qa[@]}"
  t0=$(date +%s)
  ours=$($Z generate --model "$d" --prompt "$PROMPT" --max-tokens "$TOKENS" --ignore-eos --json)
  t1=$(date +%s)
  theirs=$($PY tests/oracle/mlx_lm_oracle.py --model "$d" --prompt "$PROMPT" --max-tokens "$TOKENS" --ignore-eos --dtype f32 2>/dev/null)
  t2=$(date +%s)
  python3 - "$fam" "$q" "$ours" "$theirs" $((t1 - t0)) $((t2 - t1)) >> "$OUT" <<'PY'
import json, sys
fam, q, ours, theirs, tz, tm = sys.argv[1:7]
a = json.loads(ours); b = json.loads(theirs)["results"][0]
x, y = a["token_ids"], b["token_ids"]
div = next((i for i in range(max(len(x), len(y))) if x[i:i+1] != y[i:i+1]), None)
print(json.dumps({"family": fam, "quant": q, "preset": "bench", "tokens": len(x), "match": x == y, "first_divergence": div,
                  "zmlx_decode_tps": round(a["stats"]["generation_tps"], 2), "zmlx_seconds": int(tz), "mlx_lm_seconds": int(tm)}))
PY
  tail -1 "$OUT"
  rm -rf "$d"
done
