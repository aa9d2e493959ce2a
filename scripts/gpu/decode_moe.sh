#!/usr/bin/env bash
# Issue #15: zmlx's CUDA decode MoE kernels (qmv_swiglu + qmv_combine), ON the GPU machine after
# scripts/gpu/stage.sh. Phases (results in $OUT as they come, so a timeout still returns them):
#   decode_moe.sh kernels   the kernels alone (decode_moe_kernels.py) -> $OUT/kernels.jsonl,
#                           and `zmlx selftest` with ZMLX_GPU_EXPERIMENTAL=1 -> $OUT/selftest.jsonl
#   decode_moe.sh model     full-size qwen3_moe (issue15.sh synth first): PROCS processes of each
#                           configuration below, GEN greedy tokens (EOS ignored), --warmup 1, the
#                           issue15.sh prompt; token ids, tok/s, pattern calls -> $OUT/model.jsonl;
#                           then a summary (run-to-run identity per configuration, first divergence
#                           of each configuration's run 0 against unpatched zmlx's run 0)
# Configurations: zmlx none (stock, ZMLX_CUDA_QMM's default `deterministic` route); zmlx "$PAT"
# with ZMLX_GPU_EXPERIMENTAL=1; both again with ZMLX_CUDA_QMM=f32 (MLX's naive kernel); mlx-lm.
# none_mlx: stock on MLX's own quantized kernels (ZMLX_CUDA_QMM=mlx, as mlx-lm; qmm_sm80 races).
# Also by name in CONFIGS: sd (swiglu_mlp downproj_combine alone), router (moe_mlp alone), all
# ($PAT + qmv_linear: every quantized matmul on zmlx's kernels, prefill grouped by expert).
#   decode_moe.sh sanitize  compute-sanitizer (racecheck, initcheck, memcheck) over `zmlx generate` with
#                           every zmlx CUDA body (all) on a small 4-bit qwen3_moe, prompt > 8 tokens
#                           (grouped prefill) + decode -> $OUT/sanitize-TOOL.log (a race or an
#                           uninitialised read in our kernels would be run-to-run drift);
#                           SAN_PAT=none sanitizes the stock path
#   decode_moe.sh prefill   the prefill forms alone (prefill_moe_kernels.py) -> $OUT/prefill.jsonl
# env: PROCS (3), GEN (256), PAT (swiglu_mlp downproj_combine moe_mlp), CONFIGS (the five above)
set -u
. /tmp/zmlx-gpu/env.sh || exit 1
export ZMLX_ORACLE_PYTHON=${ZMLX_ORACLE_PYTHON:-python3}
log() { echo "[decode_moe $(date +%H:%M:%S)] $*"; }
PAT=${PAT:-swiglu_mlp downproj_combine moe_mlp}
case $1 in
kernels)
  python3 scripts/gpu/decode_moe_kernels.py ${KARGS:-} > "$OUT/kernels.jsonl" 2>> "$OUT/errors.log"
  log "kernels rc=$?"
  cat "$OUT/kernels.jsonl"
  [ -n "${SELFTEST:-}" ] || { log "selftest skipped (SELFTEST=1 runs it)"; exit 0; }
  ZMLX_GPU_EXPERIMENTAL=1 zmlx selftest > "$OUT/selftest.jsonl" 2>> "$OUT/errors.log"
  log "selftest rc=$?"
  grep -E 'qmv_(swiglu|combine)' "$OUT/selftest.jsonl" | cut -c1-300
  ;;
sanitize)
  CS=${CS:-/usr/local/cuda-13.0/bin/compute-sanitizer}
  # SAN_FAM=glm4_moe_lite: its full shape cut to 2 layers (MLX's CUDA qmm has no
  # transpose=false kernel for the tiny MLA shapes)
  m=/tmp/zmlx-gpu/san-${SAN_FAM:-qwen3_moe}
  if [ ! -f $m/config.json ]; then
    case ${SAN_FAM:-qwen3_moe} in
    qwen3_moe) zmlx synth --family qwen3_moe --quantize 4 --out $m ;;
    *) zmlx synth --family $SAN_FAM --preset full --layers 2 --quantize 4 --out $m ;;
    esac >> "$OUT/errors.log" 2>&1
  fi
  for tool in ${SAN_TOOLS:-racecheck initcheck memcheck}; do
    ZMLX_GPU_EXPERIMENTAL=1 timeout ${SAN_TIMEOUT:-150} $CS --tool $tool --print-limit 20 \
      zmlx generate --model $m --prompt "one two three four five six seven eight nine ten eleven twelve" \
      --max-tokens 4 --ignore-eos --patterns ${SAN_PAT:-$PAT qmv_linear} > "$OUT/sanitize-$tool.log" 2>&1
    log "sanitize $tool rc=$? $(grep -cE 'Error|Hazard|Uninitialized' "$OUT/sanitize-$tool.log") error lines"
    grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|Hazard|Uninitialized|Invalid' "$OUT/sanitize-$tool.log" | sort | uniq -c | head -8
  done
  ;;
prefill)
  python3 scripts/gpu/prefill_moe_kernels.py ${KARGS:-} > "$OUT/prefill.jsonl" 2>> "$OUT/errors.log"
  log "prefill kernels rc=$?"
  cut -c1-400 "$OUT/prefill.jsonl"
  ;;
model)
  d=/tmp/zmlx-gpu/full/${FAM:-qwen3_moe}; o=$OUT/model.jsonl
  eval "$(sed -n '/^PROMPT=/,/per row."$/p' scripts/gpu/issue15.sh)"  # issue15.sh's prompt
  ids=$(zmlx generate --model "$d" --prompt "$PROMPT" --max-tokens 1 --json --patterns none 2>/dev/null |
    python3 -c 'import json,sys; print(",".join(map(str, json.load(sys.stdin)["prompt_ids"])))')
  zrun() { # config-name env... -- patterns...
    local name=$1; shift
    local envs=()
    while [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    env "${envs[@]}" zmlx generate --model "$d" --prompt "$PROMPT" --max-tokens "${GEN:-256}" --ignore-eos --json \
      --warmup 1 --patterns "$@" 2>> "$OUT/errors.log" |
      python3 -c 'import json,sys; r=json.load(sys.stdin); s=r["stats"]; print(json.dumps({"config":sys.argv[1],"tool":"zmlx","ids":r["token_ids"],"prompt_tokens":s["prompt_tokens"],"prefill_tps":s["prompt_tps"],"decode_tps":s["generation_tps"],"load_s":r["load_seconds"],"pattern_calls":r.get("pattern_calls")}))' \
        "$name" >> "$o"
  }
  for i in $(seq "${PROCS:-3}"); do
    for c in ${CONFIGS:-none patched none_f32 patched_f32 mlx_lm}; do
      case $c in
      none) zrun none X=1 -- none ;;
      none_mlx) zrun none_mlx ZMLX_CUDA_QMM=mlx -- none ;;
      patched) zrun patched ZMLX_GPU_EXPERIMENTAL=1 -- $PAT ;;
      sd) zrun sd ZMLX_GPU_EXPERIMENTAL=1 -- swiglu_mlp downproj_combine ;;  # the expert kernels alone
      router) zrun router X=1 -- moe_mlp ;;
      all) zrun all ZMLX_GPU_EXPERIMENTAL=1 -- $PAT qmv_linear ;;
      # every quantized matmul zmlx leaves to MLX (MLA's embed_q/unembed_out) on MLX's naive
      # f32 kernel instead of the racy qmm_sm80
      all_f32) zrun all_f32 ZMLX_GPU_EXPERIMENTAL=1 ZMLX_CUDA_QMM=f32 -- $PAT qmv_linear ;;
      # which MLX setting the remaining run-to-run drift of `all` depends on
      all_nosdpa) zrun all_nosdpa ZMLX_GPU_EXPERIMENTAL=1 MLX_CUDA_USE_CUDNN_SDPA=0 -- $PAT qmv_linear ;;
      all_nographs) zrun all_nographs ZMLX_GPU_EXPERIMENTAL=1 MLX_USE_CUDA_GRAPHS=0 -- $PAT qmv_linear ;;
      all_nopipe) zrun all_nopipe ZMLX_GPU_EXPERIMENTAL=1 ZMLX_DECODE_PIPELINE=0 -- $PAT qmv_linear ;;
      none_nosdpa) zrun none_nosdpa MLX_CUDA_USE_CUDNN_SDPA=0 -- none ;;
      none_f32_nosdpa) zrun none_f32_nosdpa ZMLX_CUDA_QMM=f32 MLX_CUDA_USE_CUDNN_SDPA=0 -- none ;;
      none_f32) zrun none_f32 ZMLX_CUDA_QMM=f32 -- none ;;
      patched_f32) zrun patched_f32 ZMLX_CUDA_QMM=f32 ZMLX_GPU_EXPERIMENTAL=1 -- $PAT ;;
      mlx_lm | mlx_lm_nosdpa)
        [ $c = mlx_lm ] && sd=1 || sd=0
        MLX_CUDA_USE_CUDNN_SDPA=$sd python3 benchmarks/mlx_lm_bench.py --model "$d" --prompt-ids "$ids" --max-tokens "${GEN:-256}" --warmup 1 \
          --dtype native 2>> "$OUT/errors.log" |
          python3 -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps({"config":sys.argv[1],"tool":"mlx-lm","ids":r["token_ids"],"prompt_tokens":r["prompt_tokens"],"prefill_tps":r["prompt_tps"],"decode_tps":r["generation_tps"],"load_s":r["load_seconds"]}))' $c >> "$o"
        ;;
      esac
      log "round $i $c: $(tail -1 "$o" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print(r["config"], round(r["decode_tps"],1), "tok/s decode", round(r["prefill_tps"],1), "prefill", r.get("pattern_calls"))' 2>&1 | cut -c1-400)"
    done
  done
  python3 - "$o" "${BASE:-none}" <<'PY' | tee "$OUT/model-summary.jsonl"
import json, statistics, sys
rs = [json.loads(l) for l in open(sys.argv[1])]
first = lambda a, b: next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
base = next((r["ids"] for r in rs if r["config"] == sys.argv[2]), None)
for c in dict.fromkeys(r["config"] for r in rs):
    runs = [r for r in rs if r["config"] == c]
    divs = [first(runs[0]["ids"], r["ids"]) for r in runs[1:]]
    print(json.dumps({"config": c, "processes": len(runs), "tokens": len(runs[0]["ids"]),
                      "run_to_run_identical": all(d is None for d in divs), "first_divergence_vs_run0": divs,
                      "vs_base_run0_first_divergence": first(base, runs[0]["ids"]) if base else None,
                      "decode_tps": [round(r["decode_tps"], 1) for r in runs],
                      "decode_tps_median": round(statistics.median(r["decode_tps"] for r in runs), 1),
                      "prefill_tps_median": round(statistics.median(r["prefill_tps"] for r in runs), 1)}))
run0 = {c: next(r["ids"] for r in rs if r["config"] == c) for c in dict.fromkeys(r["config"] for r in rs)}
print(json.dumps({"run0_first_divergence": {f"{a} vs {b}": first(run0[a], run0[b]) for a in run0 for b in run0 if a < b}}))
PY
  ;;
esac
