#!/usr/bin/env bash
# The validation suite behind the `validated` class (issue #14): the family `fast` preset vs the
# unpatched model, 4 prompts x 256 greedy tokens (EOS ignored, so every position is compared),
# on every family's 4-bit bench checkpoint and on any full-size checkpoint given in FULL
# (space-separated directories, e.g. written by `zmlx synth --preset full`). Each run appends a
# ledger line with the verdict and the teacher-forced logit max-abs / KL (`zmlx run`, validated
# patterns always record them) and a capsule. Exit 1 if any run is not PASS.
#   env: FAMILIES (all six), TOKENS (256), FULL (""), LEDGER (benchmarks/matrix-cpu.jsonl),
#   ZMLX_BIN (a built zmlx to use as is, e.g. a copy while the tree is being rebuilt)
# Time on the 2-core VM: ~5 min per bench family (mostly the unpatched side), ~1 h per full-size
# checkpoint. Not part of scripts/test.sh (tests/fast_fidelity.rs is its small-shape version).
set -euo pipefail
cd "$(dirname "$0")/.."
FAMILIES=${FAMILIES:-"mixtral qwen2_moe qwen3_moe glm4_moe glm4_moe_lite deepseek_v3"}
TOKENS=${TOKENS:-256}
LEDGER=${LEDGER:-benchmarks/matrix-cpu.jsonl}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
CAP=${CAPSULE_DIR:-repro_capsules/validate-fast-$STAMP}
WORK=target/zmlx-bench
if [ -n "${ZMLX_BIN:-}" ]; then
  Z=$ZMLX_BIN
else
  Z=target/release/zmlx
  cargo build --release --quiet
fi
mkdir -p "$WORK" "$CAP"
PROMPTS=(
  "Explain the key differences between TCP and UDP, with examples of protocols built on each."
  "Write a short story about a lighthouse keeper who discovers a message in a bottle."
  "def merge_sort(xs):\n    # Sort a list of integers and explain the complexity of each step"
  "Summarise the causes of the French Revolution and its effects on European politics in the 19th century."
)
fail=0
run_one() { # dir label
  local d=$1 label=$2 i=0
  for p in "${PROMPTS[@]}"; do
    i=$((i + 1))
    printf '%b' "$p" > "$WORK/validate-prompt.txt"
    set +e
    $Z run "$d" --patterns fast --runs 1 --max-tokens "$TOKENS" --ignore-eos --warmup 0 \
      --prompt-file "$WORK/validate-prompt.txt" --notes "validate_fast.sh: $label prompt $i/4, $TOKENS tokens" \
      --ledger "$LEDGER" --capsule "$CAP" --json > "$CAP/$label-p$i.json"
    rc=$?
    set -e
    python3 - "$CAP/$label-p$i.json" "$label" "$i" "$rc" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["report"]; l = r.get("logit_stats") or {}
print(f"[validate_fast] {sys.argv[2]} prompt {sys.argv[3]}: {r['fidelity']['verdict']} "
      f"{r['fidelity']['matched']}/{r['fidelity']['total']}  logit max|diff| {l.get('max_abs', float('nan')):.3e} "
      f"KL max {l.get('kl_max', float('nan')):.3e}  min margin {l.get('min_margin', float('nan')):.3f}  exit {sys.argv[4]}")
PY
    [ "$rc" = 0 ] || fail=1
  done
}
for fam in $FAMILIES; do
  d=$WORK/$fam-4
  [ -f "$d/config.json" ] || $Z synth --family "$fam" --preset bench --out "$d" --quantize 4 >/dev/null
  run_one "$d" "$fam-bench-q4"
done
for d in ${FULL:-}; do
  run_one "$d" "$(basename "$d")"
done
echo "[validate_fast] capsule: $CAP  ledger: $LEDGER"
exit $fail
