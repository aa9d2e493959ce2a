#!/usr/bin/env bash
# MLA-on-CUDA diagnostic (run there after stage.sh): per-layer zmlx vs mlx-lm prefill outputs
# for the tiny float glm4_moe_lite / deepseek_v3 checkpoints, in bf16 and f32
# -> $OUT/layer_diff_<family>_<dtype>.jsonl
set -u
. /tmp/zmlx-gpu/env.sh || exit 1
W=/tmp/zmlx-gpu/work; mkdir -p "$W"
for fam in ${FAMILIES:-glm4_moe_lite deepseek_v3}; do
  d=$W/$fam-tiny-none
  [ -f $d/config.json ] || zmlx synth --family $fam --out $d 2>>"$OUT/errors.log"
  for dt in bf16 f32; do
    rm -rf $W/dump; ZMLX_DUMP_DIR=$W/dump zmlx generate --model $d --max-tokens 2 --json --dtype $dt > $W/g.json 2>>"$OUT/errors.log"
    ids=$(python3 -c "import json;print(','.join(map(str,json.load(open('$W/g.json'))['prompt_ids'])))")
    extra=(); [ $dt = f32 ] && extra=(f32)
    python3 scripts/gpu/layer_diff.py $d $W/dump "$ids" "${extra[@]}" > "$OUT/layer_diff_${fam}_$dt.jsonl" 2>>"$OUT/errors.log"
    echo "== $fam $dt"; cat "$OUT/layer_diff_${fam}_$dt.jsonl"
  done
done
