#!/usr/bin/env bash
# Issue #15 runs ON the GPU machine after scripts/gpu/stage.sh (scripts/gpu/README.md). Phases, in
# the order one call should run them; every result line is written as it comes, so a timeout
# still returns what was done:
#   issue15.sh synth FAMILY...  full-size 4-bit checkpoints -> /tmp/zmlx-gpu/full/FAMILY (zmlx synth
#                               --preset full --quantize 4; skipped when present); $OUT/synth.log
#   issue15.sh repeat FAMILY    mlx-lm's model in one process (repeat_prefill.py): REPEATS prefills
#                               + 64 decode steps, cuDNN SDPA on and off, then the layer-by-layer
#                               mode -> $OUT/repeat-FAMILY.jsonl
#   issue15.sh procs FAMILY     PROCS separate processes each of zmlx (PATTERNS, default none) and
#                               mlx-lm, TOKENS greedy tokens (EOS ignored) on the same prompt ids;
#                               token ids compared -> $OUT/procs-FAMILY.jsonl
#   issue15.sh diag FAMILY      which setting changes zmlx's run-to-run results: PROCS processes of
#                               zmlx (TOKENS, default 32) per configuration (default; cuDNN SDPA
#                               off; CUDA graphs off; decode pipeline off), mlx-lm alike, and two
#                               prefill dumps (ZMLX_DUMP_DIR) compared -> $OUT/diag-FAMILY.jsonl
#   issue15.sh prefill FAMILY   the prefill side by side: `zmlx profile --prefill 3 --json` (ops by
#                               primitive, barriered ms per slot, unbarriered ms) and
#                               mlx_lm_profile.py (mlx-lm's ops and ms, same ids) -> $OUT/prefill-FAMILY.jsonl
#   issue15.sh dumps FAMILY     DUMPS prefill dumps per MLX setting (default, CUDA graphs off, cuDNN SDPA
#                               off), each's layer-0 down projection against MLX's own on the dump's
#                               inputs (dump_compare.py) -> $OUT/dumps-FAMILY.jsonl
#   issue15.sh ttft FAMILY      generate's prefill / first-token seconds (decode pipeline on, off) and
#                               mlx-lm's prompt tok/s, 16 tokens -> $OUT/ttft-FAMILY.jsonl
#   issue15.sh speed FAMILY     zmlx (PATTERNS) and mlx-lm interleaved, ROUNDS rounds, one warm-up
#                               generation each, prefill + decode tok/s -> $OUT/speed-FAMILY.jsonl
# env: REPEATS (8), PROCS (3), TOKENS (512), ROUNDS (2), GEN (256), PATTERNS (none), SDPA_ENV
# (extra env for the zmlx/mlx-lm processes, e.g. "MLX_CUDA_USE_CUDNN_SDPA=0"), DUMPS (2: prefill dumps
# in diag), DUMPS_ONLY (diag: only the dumps), ZMLX_ONLY (procs: zmlx processes only)
set -u
. /tmp/zmlx-gpu/env.sh || exit 1
export ZMLX_ORACLE_PYTHON=${ZMLX_ORACLE_PYTHON:-python3}
FULL=/tmp/zmlx-gpu/full
mkdir -p "$FULL"
log() { echo "[issue15 $(date +%H:%M:%S)] $*"; }
PROMPT="Explain the key differences between TCP and UDP, with examples of protocols built on each. \
Then describe how congestion control works in TCP, why UDP leaves it to the application, and what \
QUIC changes about both. Finish with a short table that compares latency, reliability, ordering and \
head-of-line blocking for TCP, UDP and QUIC, and say which one a video call, a file download and a \
DNS lookup would use and why. Keep every answer concrete and give one real protocol per row."
phase=$1
shift

prompt_ids() { # model -> comma-separated ids of PROMPT, as zmlx tokenizes it
  zmlx generate --model "$1" --prompt "$PROMPT" --max-tokens 1 --json --patterns none 2>/dev/null |
    python3 -c 'import json,sys; print(",".join(map(str, json.load(sys.stdin)["prompt_ids"])))'
}

case $phase in
synth)
  for fam in "$@"; do
    d=$FULL/$fam
    [ -f "$d/config.json" ] && continue
    t0=$(date +%s)
    zmlx synth --family "$fam" --preset full --quantize 4 --out "$d" >> "$OUT/synth.log" 2>&1
    log "synth $fam rc=$? $(( $(date +%s) - t0 )) s, $(du -sh "$d" | cut -f1)" | tee -a "$OUT/synth.log"
  done
  ;;
repeat)
  fam=$1; d=$FULL/$fam; o=$OUT/repeat-$fam.jsonl
  for sdpa in 1 0; do
    log "repeat $fam whole, MLX_CUDA_USE_CUDNN_SDPA=$sdpa"
    MLX_CUDA_USE_CUDNN_SDPA=$sdpa python3 scripts/gpu/repeat_prefill.py --model "$d" --repeats "${REPEATS:-8}" \
      --decode 64 >> "$o" 2>> "$OUT/errors.log"
    tail -1 "$o"
  done
  log "repeat $fam layers"
  python3 scripts/gpu/repeat_prefill.py --model "$d" --mode layers --repeats "${REPEATS:-8}" >> "$o" 2>> "$OUT/errors.log"
  tail -1 "$o"
  ;;
procs)
  fam=$1; d=$FULL/$fam; o=$OUT/procs-$fam.jsonl; n=${TOKENS:-512}
  ids=$(prompt_ids "$d")
  for i in $(seq "${PROCS:-3}"); do
    env ${SDPA_ENV:-} zmlx generate --model "$d" --prompt "$PROMPT" --max-tokens "$n" --ignore-eos --json \
      --patterns ${PATTERNS:-none} 2>> "$OUT/errors.log" |
      python3 -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps({"tool":"zmlx","patterns":sys.argv[1],"env":sys.argv[2],"ids":r["token_ids"],"prefill_tps":r["stats"]["prompt_tps"],"decode_tps":r["stats"]["generation_tps"]}))' \
        "${PATTERNS:-none}" "${SDPA_ENV:-}" >> "$o"
    [ -n "${ZMLX_ONLY:-}" ] || env ${SDPA_ENV:-} python3 benchmarks/mlx_lm_bench.py --model "$d" --prompt-ids "$ids" --max-tokens "$n" --warmup 0 \
      --dtype native 2>> "$OUT/errors.log" |
      python3 -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps({"tool":"mlx-lm","env":sys.argv[1],"ids":r["token_ids"],"prefill_tps":r["prompt_tps"],"decode_tps":r["generation_tps"]}))' \
        "${SDPA_ENV:-}" >> "$o"
  done
  python3 - "$o" "${SDPA_ENV:-}" <<'PY'
import json, sys
rs = [json.loads(l) for l in open(sys.argv[1]) if '"ids"' in l and json.loads(l).get("env", "") == sys.argv[2]]
for tool in ("zmlx", "mlx-lm"):
    runs = [r["ids"] for r in rs if r["tool"] == tool]
    if not runs:
        continue
    divs = [next((i for i, (a, b) in enumerate(zip(runs[0], x)) if a != b), None) for x in runs[1:]]
    print(json.dumps({"summary": True, "tool": tool, "env": sys.argv[2], "processes": len(runs), "tokens": len(runs[0]),
                      "identical": all(d is None for d in divs), "first_divergence_vs_run0": divs}))
zm = [r["ids"] for r in rs if r["tool"] == "zmlx"]
ml = [r["ids"] for r in rs if r["tool"] == "mlx-lm"]
if zm and ml:
    print(json.dumps({"summary": True, "zmlx_vs_mlx_lm_first_divergence": next((i for i, (a, b) in enumerate(zip(zm[0], ml[0])) if a != b), None)}))
PY
  tail -3 "$o" | cut -c1-300
  ;;
diag)
  fam=$1; d=$FULL/$fam; o=$OUT/diag-$fam.jsonl; n=${TOKENS:-32}
  ids=$(prompt_ids "$d")
  [ -n "${DUMPS_ONLY:-}" ] || for cfg in "default:" "no_cudnn_sdpa:MLX_CUDA_USE_CUDNN_SDPA=0" "no_cuda_graphs:MLX_USE_CUDA_GRAPHS=0" \
             "no_pipeline:ZMLX_DECODE_PIPELINE=0"; do
    name=${cfg%%:*}; envs=${cfg#*:}
    for i in $(seq "${PROCS:-4}"); do
      env $envs zmlx generate --model "$d" --prompt "$PROMPT" --max-tokens "$n" --ignore-eos --json --patterns none \
        2>> "$OUT/errors.log" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps({"tool":"zmlx","config":sys.argv[1],"ids":r["token_ids"]}))' "$name" >> "$o"
    done
    log "diag $fam zmlx $name done"
  done
  [ -n "${DUMPS_ONLY:-}" ] || for i in $(seq "${PROCS:-4}"); do
    python3 benchmarks/mlx_lm_bench.py --model "$d" --prompt-ids "$ids" --max-tokens "$n" --warmup 0 --dtype native \
      2>> "$OUT/errors.log" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps({"tool":"mlx-lm","config":"default","ids":r["token_ids"]}))' >> "$o"
  done
  for i in $(seq "${DUMPS:-2}"); do
    rm -rf /tmp/zmlx-gpu/dump$i
    ZMLX_DUMP_DIR=/tmp/zmlx-gpu/dump$i zmlx generate --model "$d" --prompt "$PROMPT" --max-tokens 1 --json --patterns none \
      > /dev/null 2>> "$OUT/errors.log"
  done
  python3 - "$o" <<'PY' | tee -a "$o"
import json, sys
import mlx.core as mx
rs = [json.loads(l) for l in open(sys.argv[1]) if '"ids"' in l]
for tool, cfg in sorted({(r["tool"], r["config"]) for r in rs}):
    runs = [r["ids"] for r in rs if (r["tool"], r["config"]) == (tool, cfg)]
    div = [[next((k for k, (a, b) in enumerate(zip(x, y)) if a != b), None) for y in runs] for x in runs]
    print(json.dumps({"summary": True, "tool": tool, "config": cfg, "processes": len(runs),
                      "distinct": len({tuple(x) for x in runs}), "pairwise_first_divergence": div}))
import glob
dumps = sorted(glob.glob("/tmp/zmlx-gpu/dump*/hidden.safetensors"))
try:
    a = mx.load(dumps[0])
    for other in dumps[1:]:
        b = mx.load(other)
        diff = {k: int(mx.sum(mx.not_equal(a[k], b[k])).item()) for k in sorted(a) if k in b}
        first = [k for k in sorted(a, key=lambda k: (not k.startswith("l0."), k)) if k in b and diff[k]]  # layer 0 parts first
        print(json.dumps({"summary": True, "dumps": [dumps[0], other], "compared": len(diff),
                          "differ_layer0_parts_first": [(k, diff[k]) for k in first][:30]}))
except Exception as e:
    print(json.dumps({"summary": True, "prefill_dumps_error": repr(e)}))
PY
  ;;
prefill)
  fam=$1; d=$FULL/$fam; o=$OUT/prefill-$fam.jsonl
  ids=$(prompt_ids "$d")
  env ${SDPA_ENV:-} zmlx profile "$d" --patterns ${PATTERNS:-none} --prompt "$PROMPT" --tokens 4 --prefill 3 --json 2>> "$OUT/errors.log" >> "$o"
  env ${SDPA_ENV:-} python3 scripts/gpu/mlx_lm_profile.py --model "$d" --prompt-ids "$ids" --runs 3 2>> "$OUT/errors.log" >> "$o"
  python3 - "$o" <<'PY'
import json, sys
z, m = [json.loads(l) for l in open(sys.argv[1]) if l.strip()][-2:]
zs = z["stock_prefill"]
print(f"prefill {zs['prompt_tokens']} tokens: zmlx {zs['ms_unbarriered']:.1f} ms (first {zs.get('ms_first', 0):.0f}), "
      f"mlx-lm {m['ms_unbarriered']:.1f} ms (first {m.get('ms_first', 0):.0f}); "
      f"ops zmlx {zs['ops_total']}, mlx-lm {m['ops_total']}")
keys = sorted(set(zs["ops_by_primitive"]) | set(m["ops_by_primitive"]))
for k in keys:
    a, b = zs["ops_by_primitive"].get(k, 0), m["ops_by_primitive"].get(k, 0)
    if a != b:
        print(f"  {k}: zmlx {a}, mlx-lm {b}")
print("zmlx barriered ms per slot:", {k: round(v, 2) for k, v in zs["ms_by_slot"].items()})
PY
  ;;
dumps)
  # Prefill dumps per MLX setting, each compared with MLX's own layer-0 down projection on the
  # dump's inputs (dump_compare.py) -> $OUT/dumps-FAMILY.jsonl
  fam=$1; d=$FULL/$fam; o=$OUT/dumps-$fam.jsonl; args=()
  for cfg in "default:" "no_cuda_graphs:MLX_USE_CUDA_GRAPHS=0" "no_cudnn_sdpa:MLX_CUDA_USE_CUDNN_SDPA=0"; do
    name=${cfg%%:*}; envs=${cfg#*:}
    for i in $(seq "${DUMPS:-2}"); do
      rm -rf "/tmp/zmlx-gpu/dump-$name-$i"
      env $envs ZMLX_DUMP_DIR="/tmp/zmlx-gpu/dump-$name-$i" zmlx generate --model "$d" --prompt "$PROMPT" --max-tokens 1 \
        --json --patterns none > /dev/null 2>> "$OUT/errors.log"
      args+=("$name-$i=/tmp/zmlx-gpu/dump-$name-$i/hidden.safetensors")
    done
  done
  python3 scripts/gpu/dump_compare.py "$d" "${args[@]}" 2>> "$OUT/errors.log" | tee -a "$o"
  ;;
ttft)
  # Where zmlx's generate-measured prompt tok/s goes: prefill and first-token seconds, decode
  # pipeline on and off, beside mlx-lm -> $OUT/ttft-FAMILY.jsonl
  fam=$1; d=$FULL/$fam; o=$OUT/ttft-$fam.jsonl
  ids=$(prompt_ids "$d")
  for pl in 1 0; do
    env ${SDPA_ENV:-} ZMLX_DECODE_PIPELINE=$pl zmlx generate --model "$d" --prompt "$PROMPT" --max-tokens 16 --ignore-eos --json --warmup 1 \
      --patterns none 2>> "$OUT/errors.log" |
      python3 -c 'import json,sys; r=json.load(sys.stdin); s=r["stats"]; print(json.dumps({"tool":"zmlx","pipeline":sys.argv[1],**{k:s[k] for k in ("prompt_tokens","prompt_tps","prefill_seconds","first_token_seconds","generation_tps")}}))' "$pl" | tee -a "$o"
  done
  env ${SDPA_ENV:-} python3 benchmarks/mlx_lm_bench.py --model "$d" --prompt-ids "$ids" --max-tokens 16 --warmup 1 --dtype native \
    2>> "$OUT/errors.log" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps({"tool":"mlx-lm","prompt_tokens":r["prompt_tokens"],"prompt_tps":r["prompt_tps"],"generation_tps":r["generation_tps"]}))' | tee -a "$o"
  ;;
speed)
  fam=$1; d=$FULL/$fam; o=$OUT/speed-$fam.jsonl
  ids=$(prompt_ids "$d")
  for r in $(seq "${ROUNDS:-2}"); do
    env ${SDPA_ENV:-} zmlx generate --model "$d" --prompt "$PROMPT" --max-tokens "${GEN:-256}" --ignore-eos --json \
      --warmup 1 --patterns ${PATTERNS:-none} 2>> "$OUT/errors.log" |
      python3 -c 'import json,sys; r=json.load(sys.stdin); s=r["stats"]; print(json.dumps({"tool":"zmlx","patterns":sys.argv[1],"round":int(sys.argv[2]),"prompt_tokens":s["prompt_tokens"],"prefill_tps":s["prompt_tps"],"decode_tps":s["generation_tps"],"peak_gb":s.get("peak_memory_gb"),"load_s":r["load_seconds"]}))' \
        "${PATTERNS:-none}" "$r" >> "$o"
    env ${SDPA_ENV:-} python3 benchmarks/mlx_lm_bench.py --model "$d" --prompt-ids "$ids" --max-tokens "${GEN:-256}" \
      --warmup 1 --dtype native 2>> "$OUT/errors.log" |
      python3 -c 'import json,sys; r=json.load(sys.stdin); print(json.dumps({"tool":"mlx-lm","round":int(sys.argv[1]),"prompt_tokens":r["prompt_tokens"],"prefill_tps":r["prompt_tps"],"decode_tps":r["generation_tps"],"peak_gb":r["peak_memory_gb"],"load_s":r["load_seconds"]}))' \
        "$r" >> "$o"
    tail -2 "$o"
  done
  ;;
*) echo "usage: issue15.sh synth|repeat|procs|diag|dumps|ttft|prefill|speed FAMILY..." >&2; exit 2 ;;
esac
