#!/usr/bin/env bash
# Packs what the GPU machine needs into carry folders .gpu/c1, .gpu/c2 (.gpu/c3 … only if needed),
# each small enough for one device call (the whole call may carry 64 MiB, working tree included).
# Runs HERE (needs network for PyPI). Idempotent: wheels are cached in .gpu/wheels, carry folders
# are rebuilt from scratch every run (hard links, so it is cheap).
#
#   bash scripts/gpu/package.sh [EXTRA_BINARY ...]
#
# Contents: mlx==0.32.2 (Python bindings), mlx-cuda-13==0.32.2 (CUDA libmlx; split in parts),
# mlx-lm==0.32.0 (the oracle), a stripped copy of target/release/zmlx, and any EXTRA_BINARY
# (e.g. test executables; stripped copies, installed into /tmp/zmlx-gpu/bin there).
# Not packed, because the GPU image already has them (KINDS.md package list):
#   mlx-cuda-13's needs  nvidia-cudnn-cu13, nvidia-nccl-cu13, nvidia-cublas, nvidia-cufft,
#                        nvidia-cuda-nvrtc, nvidia-cuda-runtime (PyTorch's CUDA 13 wheels);
#   mlx-lm's needs       numpy, transformers>=5.7, sentencepiece, protobuf, pyyaml, jinja2.
# stage.sh prints the versions it finds there.
#
# Env: CAP_MIB (default 60) = most bytes per carry folder; ZMLX_BIN (default target/release/zmlx).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
GPU=$ROOT/.gpu
CAP_MIB=${CAP_MIB:-60}
ZMLX_BIN=${ZMLX_BIN:-$ROOT/target/release/zmlx}
MLX_VERSION=0.32.2
MLX_LM_VERSION=0.32.0
say() { echo "[package] $*"; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
fsize() { stat -c %s "$1"; }

git check-ignore -q .gpu || { echo "[package] .gpu is not ignored by git; refusing (it would travel in every call)" >&2; exit 1; }
[ -x "$ZMLX_BIN" ] || { echo "[package] $ZMLX_BIN missing: build it first (cargo build --release)" >&2; exit 1; }
mkdir -p "$GPU/wheels"

# 1. Wheels (pip skips files already downloaded). MLX 0.32.2's Linux wheels are tagged
#    manylinux_2_35, so that tag must be in the list (the GPU image is Python 3.12.3 / glibc >= 2.35).
say "downloading wheels into .gpu/wheels (cached)"
python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$GPU/wheels" "mlx==$MLX_VERSION" "mlx-cuda-13==$MLX_VERSION" "mlx-lm==$MLX_LM_VERSION"
shopt -s nullglob
one() { local m=("$@"); [ ${#m[@]} = 1 ] || { echo "[package] expected exactly one of: $* (remove stale ones from .gpu/wheels)" >&2; exit 1; }; echo "${m[0]}"; }
W_MLX=$(one "$GPU"/wheels/mlx-$MLX_VERSION-cp312-*.whl)
W_CUDA=$(one "$GPU"/wheels/mlx_cuda_13-$MLX_VERSION-*.whl)
W_LM=$(one "$GPU"/wheels/mlx_lm-$MLX_LM_VERSION-*.whl)
for w in "$W_MLX" "$W_CUDA" "$W_LM"; do say "  $(basename "$w")  $(mib "$(fsize "$w")")"; done

# 2. Stage area: split parts of the big wheel, stripped binaries.
STAGE=$GPU/build
rm -rf "$STAGE"; mkdir -p "$STAGE/parts" "$STAGE/bin"
CUDA_NAME=$(basename "$W_CUDA")
CUDA_BYTES=$(fsize "$W_CUDA")
PART_BYTES=$(( (CUDA_BYTES + 1) / 2 ))               # two parts of ~42 MiB
say "splitting $CUDA_NAME ($(mib "$CUDA_BYTES")) into parts of <= $(mib "$PART_BYTES")"
split -b "$PART_BYTES" -a 2 "$W_CUDA" "$STAGE/parts/$CUDA_NAME.part-"
strip -o "$STAGE/bin/zmlx" "$ZMLX_BIN"
say "stripped $(basename "$ZMLX_BIN"): $(mib "$(fsize "$ZMLX_BIN")") -> $(mib "$(fsize "$STAGE/bin/zmlx")")"
for x in "$@"; do
  [ -f "$x" ] || { echo "[package] extra binary $x not found" >&2; exit 1; }
  n=$(basename "$x"); [ -e "$STAGE/bin/$n" ] && { echo "[package] duplicate binary name $n" >&2; exit 1; }
  strip -o "$STAGE/bin/$n" "$x" 2>/dev/null || cp "$x" "$STAGE/bin/$n"
  say "extra $n: $(mib "$(fsize "$STAGE/bin/$n")")"
done

# 3. Place items into carry folders: largest first, each into the emptiest folder that fits
#    (wheel parts always go to different folders, so each part is its own call).
rm -rf "$GPU"/c[0-9]*
CAP=$(( CAP_MIB * 1048576 - 65536 ))                  # keep room for the manifest
ITEMS=$(mktemp)
{ for f in "$STAGE"/parts/*; do echo "part $(fsize "$f") $f"; done
  for f in "$W_MLX" "$W_LM"; do echo "wheel $(fsize "$f") $f"; done
  for f in "$STAGE"/bin/*; do echo "bin $(fsize "$f") $f"; done; } | sort -k2,2nr > "$ITEMS"
declare -a used=()
MAN=$STAGE/manifest.txt
{ echo "# zmlx GPU bundle, made by scripts/gpu/package.sh on $(date -u +%FT%TZ) from $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo "# kind folder sha256 bytes name   (joined = the wheel rebuilt from its parts, in name order)"
  echo "joined - $(sha256sum "$W_CUDA" | cut -d' ' -f1) $CUDA_BYTES $CUDA_NAME"; } > "$MAN"
while read -r kind bytes path; do
  best=-1
  for i in "${!used[@]}"; do
    [ $(( used[i] + bytes )) -le $CAP ] || continue
    [ "$kind" = part ] && ls "$GPU/c$((i+1))"/*.part-* >/dev/null 2>&1 && continue
    if [ $best = -1 ] || [ "${used[i]}" -lt "${used[best]}" ]; then best=$i; fi
  done
  if [ $best = -1 ]; then
    [ "$bytes" -le $CAP ] || { echo "[package] $(basename "$path") ($(mib "$bytes")) exceeds CAP_MIB=$CAP_MIB" >&2; exit 1; }
    best=${#used[@]}; used+=(0); mkdir -p "$GPU/c$((best+1))"
  fi
  used[best]=$(( used[best] + bytes ))
  ln -f "$path" "$GPU/c$((best+1))/$(basename "$path")"
  echo "$kind c$((best+1)) $(sha256sum "$path" | cut -d' ' -f1) $bytes $(basename "$path")" >> "$MAN"
done < "$ITEMS"
rm -f "$ITEMS"
NF=${#used[@]}
echo "# folders $NF" >> "$MAN"
for i in $(seq 1 "$NF"); do cp "$MAN" "$GPU/c$i/manifest.txt"; done

# 4. Report.
WT=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
say "working tree that travels with every call: $(mib "$WT")"
say "carry folders (one device call each; name it in 'carry'):"
for i in $(seq 1 "$NF"); do
  b=$(du -cb "$GPU/c$i"/* | tail -1 | cut -f1)
  say "  .gpu/c$i  $(mib "$b")  (call total ~$(mib $(( b + WT ))))  $(cd "$GPU/c$i" && ls | tr '\n' ' ')"
  [ $(( b + WT )) -lt $(( 64 * 1048576 )) ] || { echo "[package] .gpu/c$i + working tree exceeds 64 MiB: lower CAP_MIB" >&2; exit 1; }
done
say "manifest: .gpu/c*/manifest.txt"
say "done"
