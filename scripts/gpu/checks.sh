#!/usr/bin/env bash
# Issue #7 checks, run ON the GPU machine after scripts/gpu/stage.sh (see scripts/gpu/README.md).
#   checks.sh correctness  -> $OUT/selftest.jsonl, $OUT/oracle.jsonl, $OUT/matrix.jsonl (fidelity runs)
#                             (env: FAMILIES, SKIP_SELFTEST=1, SKIP_ORACLE=1, SKIP_EXPERIMENTAL=1)
#   checks.sh speed        -> $OUT/matrix.jsonl (bench runs), $OUT/mlx_lm_speed.jsonl, $OUT/roofline.json
# Every result is written as it comes, so a timeout still returns what was done.
set -u
. /tmp/zmlx-gpu/env.sh || exit 1
export ZMLX_ORACLE_PYTHON=${ZMLX_ORACLE_PYTHON:-python3}
W=/tmp/zmlx-gpu/work; mkdir -p "$W" "$OUT/capsules"
LEDGER=$OUT/matrix.jsonl
FAMILIES=${FAMILIES:-"mixtral qwen2_moe qwen3_moe glm4_moe glm4_moe_lite deepseek_v3"}
safe_patterns() { case $1 in glm4_moe|glm4_moe_lite|deepseek_v3) echo "swiglu_mlp moe_mlp deepseek_router";; *) echo "swiglu_mlp moe_mlp";; esac; }
experimental_patterns() { case $1 in glm4_moe_lite|deepseek_v3) echo "swiglu_mlp downproj_combine glm47_rope";; *) echo "swiglu_mlp downproj_combine";; esac; }
log() { echo "[gpu-checks $(date +%H:%M:%S)] $*"; }

correctness() {
  if [ -z "${SKIP_SELFTEST:-}" ]; then
    log "selftest: every CUDA kernel vs its reference"
    zmlx selftest > "$OUT/selftest.jsonl"; log "selftest rc=$?"
  fi
  for fam in $FAMILIES; do
    for q in none 4; do
      d=$W/$fam-tiny-$q; qa=(); [ $q = none ] || qa=(--quantize $q)
      [ -f $d/config.json ] || zmlx synth --family $fam --out $d "${qa[@]}" 2>>"$OUT/errors.log"
      [ -n "${SKIP_ORACLE:-}" ] && continue
      # ZMLX_CUDA_QMM=mlx: MLX's quantized kernels, the op chain mlx-lm runs (zmlx's default CUDA
      # route dequantizes at prefill for determinism, which rounds differently)
      ours=$(ZMLX_CUDA_QMM=mlx zmlx generate --model $d --max-tokens 64 --ignore-eos --json --prompt "Explain the key differences between TCP and UDP." 2>$W/err.txt)
      theirs=$($ZMLX_ORACLE_PYTHON scripts/gpu/oracle_contiguous_rope.py --model $d --max-tokens 64 --ignore-eos --dtype native \
               --prompt "Explain the key differences between TCP and UDP." 2>$W/oerr.txt)
      { echo "== $fam q=$q zmlx"; tail -5 $W/err.txt; echo "== $fam q=$q mlx-lm"; tail -5 $W/oerr.txt; } >> "$OUT/errors.log"
      python3 - "$fam" "$q" "$ours" "$theirs" >> "$OUT/oracle.jsonl" <<'PY'
import json, sys
fam, q, ours, theirs = sys.argv[1:5]
try:
    a = json.loads(ours); b = json.loads(theirs)["results"][0]
    x, y = a["token_ids"], b["token_ids"]
    div = next((i for i in range(max(len(x), len(y))) if x[i:i+1] != y[i:i+1]), None)
    print(json.dumps({"family": fam, "quant": q, "dtype": a["dtype"], "backend": a["backend"], "tokens": len(x),
                      "match": x == y, "first_divergence": div, "zmlx": x, "mlx_lm": y}))
except Exception as e:
    print(json.dumps({"family": fam, "quant": q, "error": repr(e), "ours": ours[-300:], "theirs": theirs[-300:]}))
PY
      log "oracle $fam q=$q: $(tail -1 $OUT/oracle.jsonl | cut -c1-120)"
    done
    for q in none 4; do
      d=$W/$fam-tiny-$q
      zmlx run $d --patterns $(safe_patterns $fam) --runs 2 --max-tokens 64 --ledger $LEDGER \
        --capsule $OUT/capsules/ --notes "GPU fidelity: safe patterns vs stock, tiny q=$q" > $W/run.txt 2>&1
      log "fidelity $fam q=$q: $(grep -E 'FIDELITY|Result|error' $W/run.txt | tr '\n' ' ')"
    done
    [ -n "${SKIP_EXPERIMENTAL:-}" ] && continue
    d=$W/$fam-tiny-4
    # The decode kernels' GPU bodies (opt-in: within tolerance, not claimed bit-exact).
    ZMLX_GPU_EXPERIMENTAL=1 zmlx run $d --patterns $(experimental_patterns $fam) --runs 2 --max-tokens 64 --ledger $LEDGER \
      --notes "GPU fidelity: ZMLX_GPU_EXPERIMENTAL=1 decode kernels vs stock, tiny 4-bit" > $W/run.txt 2>&1
    log "experimental $fam: $(grep -E 'FIDELITY|Result|error' $W/run.txt | tr '\n' ' ')"
  done
  tar czf "$OUT/capsules.tgz" -C "$OUT" capsules && rm -rf "$OUT/capsules"
}

speed() {
  python3 - > "$OUT/roofline.json" <<'PY'
import json, torch
x = torch.empty(2 * 1024**3 // 4, dtype=torch.float32, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
torch.cuda.synchronize(); s, e = torch.cuda.Event(True), torch.cuda.Event(True)
s.record()
for _ in range(10): y.copy_(x)
e.record(); torch.cuda.synchronize()
gbs = 10 * 2 * x.numel() * 4 / (s.elapsed_time(e) / 1e3) / 1e9
print(json.dumps({"device": torch.cuda.get_device_name(), "copy_GBps_read_plus_write": round(gbs, 1)}))
PY
  log "bandwidth: $(cat $OUT/roofline.json)"
  for fam in ${SPEED_FAMILIES:-$FAMILIES}; do
    for q in none 4; do
      d=$W/$fam-bench-$q; qa=(); [ $q = none ] || qa=(--quantize $q)
      [ -f $d/config.json ] || zmlx synth --family $fam --preset bench --out $d "${qa[@]}" 2>>"$OUT/errors.log"
      zmlx run $d --patterns $(safe_patterns $fam) --runs 3 --max-tokens 128 --ledger $LEDGER \
        --notes "GPU bench: family preset candidates vs stock, bench $q" > $W/run.txt 2>&1
      log "bench $fam q=$q: $(grep -E 'Result' $W/run.txt)"
      if [ -z "${SKIP_EXPERIMENTAL:-}" ]; then
        ZMLX_GPU_EXPERIMENTAL=1 zmlx run $d --patterns $(experimental_patterns $fam) --runs 3 --max-tokens 128 --ledger $LEDGER \
          --notes "GPU bench: ZMLX_GPU_EXPERIMENTAL=1 decode kernels vs stock, bench $q" > $W/run.txt 2>&1
        log "bench experimental $fam q=$q: $(grep -E 'Result|FIDELITY' $W/run.txt | tr '\n' ' ')"
      fi
      $ZMLX_ORACLE_PYTHON - "$d" "$fam" "$q" >> "$OUT/mlx_lm_speed.jsonl" 2>>$W/speed_err.txt <<'PY'
import json, sys, time
import mlx.core as mx
from mlx_lm import load, stream_generate
d, fam, q = sys.argv[1:4]
model, tok = load(d)
prompt = "Explain the key differences between TCP and UDP."
for _ in stream_generate(model, tok, prompt, max_tokens=5): pass
last = None
for r in stream_generate(model, tok, prompt, max_tokens=128): last = r
print(json.dumps({"family": fam, "quant": q, "prompt_tps": last.prompt_tps, "generation_tps": last.generation_tps,
                  "generation_tokens": last.generation_tokens, "peak_memory_gb": last.peak_memory}))
PY
      log "mlx-lm $fam q=$q: $(tail -1 $OUT/mlx_lm_speed.jsonl)"
      rm -rf "$d"
    done
  done
}

case ${1:-correctness} in
  correctness) correctness ;;
  speed) speed ;;
  *) echo "usage: $0 correctness|speed" >&2; exit 2 ;;
esac
