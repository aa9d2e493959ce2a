#!/usr/bin/env bash
# Runs ON the GPU machine, from the repo root, as the first command of a device call:
#
#   bash scripts/gpu/stage.sh 1      # call that carried .gpu/c1   -> exit 3 "incomplete" is expected
#   bash scripts/gpu/stage.sh 2      # call that carried .gpu/c2   -> exit 0 "READY" once all parts are in
#   bash scripts/gpu/stage.sh        # later calls: checks the install, rewrites env.sh, exit 0 if READY
#
# Copies the carried files (verified by sha256 against manifest.txt written by package.sh) into
# $ZMLX_GPU_DIR (default /tmp/zmlx-gpu, outside the working tree, so it survives back-to-back warm
# calls). Also picks up any other .gpu/cN still present in the working copy. When every part is
# there: joins the mlx-cuda-13 wheel (sha256 checked), installs all wheels with
# `pip install --no-deps --no-index --target $ZMLX_GPU_DIR/site`, puts the binaries in
# $ZMLX_GPU_DIR/bin and writes $ZMLX_GPU_DIR/env.sh (source it: `. /tmp/zmlx-gpu/env.sh`).
# Exit: 0 ready, 3 staged but parts missing (run the other call(s) right away), other = error.
#
# Env overrides (for testing elsewhere): ZMLX_GPU_DIR, ZMLX_GPU_SRC (folder holding c1, c2, …;
# default .gpu), ZMLX_PYTHON (default /opt/torch/.venv/bin/python3, else python3),
# ZMLX_NVIDIA_DIR (the site-packages/nvidia folder with cu13/, cudnn/, nccl/).
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
DEST=${ZMLX_GPU_DIR:-/tmp/zmlx-gpu}
SRC=${ZMLX_GPU_SRC:-.gpu}
say() { echo "[stage] $*"; }
die() { echo "[stage] ERROR: $*" >&2; exit 1; }
mkdir -p "$DEST/parts"

# 1. Which parts were asked for; copy every file of every carry folder present, verified.
want=()
for a in "$@"; do a=${a#c}; [[ $a =~ ^[0-9]+$ ]] || die "usage: $0 [PART ...] (PART = 1, 2, … or c1, c2, …)"; want+=("c$a"); done
for w in "${want[@]}"; do [ -f "$SRC/$w/manifest.txt" ] || die "$SRC/$w not here: name .gpu/$w in this call's carry list"; done
shopt -s nullglob
for d in "$SRC"/c[0-9]*/; do
  d=${d%/}; c=$(basename "$d")
  [ -f "$d/manifest.txt" ] || continue
  if [ -f "$DEST/manifest.txt" ] && ! cmp -s "$d/manifest.txt" "$DEST/manifest.txt"; then
    say "new bundle (manifest differs from the staged one): starting over"
    rm -rf "$DEST/parts" "$DEST/site" "$DEST/bin" "$DEST/env.sh" "$DEST/manifest.txt"; mkdir -p "$DEST/parts"
  fi
  cp "$d/manifest.txt" "$DEST/manifest.txt"
  while read -r kind folder sha bytes name; do
    [ "$folder" = "$c" ] || continue
    [ -f "$DEST/parts/$name" ] && echo "$sha  $DEST/parts/$name" | sha256sum -c --status && continue
    [ -f "$d/$name" ] || die "$d/$name listed in the manifest but missing"
    echo "$sha  $d/$name" | sha256sum -c --status || die "$d/$name: sha256 mismatch (damaged in transfer? re-run package.sh and this call)"
    cp "$d/$name" "$DEST/parts/$name.tmp" && mv "$DEST/parts/$name.tmp" "$DEST/parts/$name"
    say "staged $c/$name ($(( bytes / 1048576 )) MiB)"
  done < <(grep -v '^#' "$d/manifest.txt")
done
MAN=$DEST/manifest.txt
[ -f "$MAN" ] || die "nothing staged in $DEST and no .gpu/cN/manifest.txt here: carry .gpu/c1 (and run package.sh first)"

# 2. Complete?
missing=()
while read -r kind folder sha bytes name; do
  [ "$kind" = joined ] && continue
  [ -f "$DEST/parts/$name" ] || missing+=("$folder/$name")
done < <(grep -v '^#' "$MAN")
if [ ${#missing[@]} -gt 0 ]; then
  folders=$(printf '%s\n' "${missing[@]}" | cut -d/ -f1 | sort -u | paste -sd' ')
  say "INCOMPLETE: still missing ${missing[*]}"
  say "next: a call carrying $folders right away (the machine stays warm only ~30 s after a call)"
  exit 3
fi

# 3. Python and the image's CUDA 13 libraries (PyTorch's nvidia-* wheels).
PY=${ZMLX_PYTHON:-}
if [ -z "$PY" ]; then if [ -x /opt/torch/.venv/bin/python3 ]; then PY=/opt/torch/.venv/bin/python3; else PY=$(command -v python3); fi; fi
NV=${ZMLX_NVIDIA_DIR:-}
if [ -z "$NV" ]; then
  NV=$(env -u PYTHONPATH "$PY" -c '
import os
try:
    import nvidia
    cands = list(nvidia.__path__)
except Exception:
    cands = []
import sysconfig
cands.append(os.path.join(sysconfig.get_paths()["purelib"], "nvidia"))
print(next((p for p in cands if os.path.isdir(os.path.join(p, "cu13", "lib"))), ""))' 2>/dev/null || true)
fi
if [ -n "$NV" ] && [ -d "$NV/cu13/lib" ]; then say "CUDA 13 libraries: $NV/{cu13,cudnn,nccl}/lib"
else say "WARNING: no site-packages/nvidia/cu13/lib found for $PY (set ZMLX_NVIDIA_DIR); libmlx will not load"; NV=; fi

# 4. Join + install (skipped when this exact bundle is already installed).
SITE=$DEST/site
STAMP=$SITE/.zmlx-bundle
if [ -f "$STAMP" ] && cmp -s "$STAMP" "$MAN"; then
  say "bundle already installed in $SITE"
else
  read -r _ _ jsha jbytes jname < <(grep '^joined ' "$MAN")
  say "joining $jname from $(grep -c '^part ' "$MAN") parts"
  grep '^part ' "$MAN" | awk '{print $5}' | sort | sed "s|^|$DEST/parts/|" | xargs cat > "$DEST/$jname.tmp"
  echo "$jsha  $DEST/$jname.tmp" | sha256sum -c --status || die "joined $jname: sha256 mismatch"
  mv "$DEST/$jname.tmp" "$DEST/$jname"
  say "joined wheel sha256 OK ($(( jbytes / 1048576 )) MiB)"
  wheels=("$DEST/$jname")
  while read -r kind _ _ _ name; do [ "$kind" = wheel ] && wheels+=("$DEST/parts/$name"); done < <(grep -v '^#' "$MAN")
  rm -rf "$SITE.tmp"
  say "pip install --no-deps --no-index --target $SITE: $(for w in "${wheels[@]}"; do basename "$w"; done | tr '\n' ' ')"
  t0=$(date +%s)
  # One pip command for all wheels: mlx and mlx-cuda-13 share the mlx/ folder, so they must be
  # merged by a single --target install (a second --target install would skip or replace mlx/).
  if ! "$PY" -m pip install -q --disable-pip-version-check --no-deps --no-index --no-compile --no-cache-dir \
         --target "$SITE.tmp" ${ZMLX_PIP_EXTRA:-} "${wheels[@]}"; then
    say "pip failed; unpacking the wheels with zipfile instead (none of them has .data or scripts to place)"
    rm -rf "$SITE.tmp"; mkdir -p "$SITE.tmp"
    for w in "${wheels[@]}"; do "$PY" -m zipfile -e "$w" "$SITE.tmp"; done
    find "$SITE.tmp" -name '*.so*' -exec chmod +x {} +
  fi
  rm -rf "$SITE"; mv "$SITE.tmp" "$SITE"
  cp "$MAN" "$STAMP"
  rm -f "$DEST/$jname"                                  # the installed tree is what counts now
  say "installed in $(( $(date +%s) - t0 )) s: $(du -sm "$SITE" | cut -f1) MiB"
fi
# Make libmlx's RPATH ($ORIGIN/../../nvidia/...) and MLX's NVRTC header lookup
# (<site>/nvidia/cu13/include) resolve as in a normal pip install next to PyTorch's CUDA wheels.
# PyTorch's nvidia/cu13/include has no crt/ (mma.h includes crt/mma.h), so MLX's JIT of its
# sm90 quantized matmul failed there ("cannot open source file crt/mma.h", 4-bit MLA prefill, in
# zmlx and mlx-lm alike). Where the image lacks crt/, build a merged nvidia/ tree of symlinks
# and take crt/ from the CUDA toolkit on the machine.
if [ -n "$NV" ]; then
  rm -rf "$SITE/nvidia"
  CRT=$(find /usr/local /opt /usr/include -path '*/include/crt/mma.h' 2>/dev/null | head -1)
  if [ -e "$NV/cu13/include/crt" ] || [ -z "$CRT" ]; then
    ln -sfn "$NV" "$SITE/nvidia"
    [ -e "$NV/cu13/include/crt" ] || say "WARNING: no crt/ headers found; MLX kernels that include mma.h will not compile"
  else
    CRT=$(dirname "$CRT")
    mkdir -p "$SITE/nvidia/cu13/include"
    for e in "$NV"/*; do [ "$(basename "$e")" = cu13 ] || ln -s "$e" "$SITE/nvidia/"; done
    for e in "$NV"/cu13/*; do [ "$(basename "$e")" = include ] || ln -s "$e" "$SITE/nvidia/cu13/"; done
    for e in "$NV"/cu13/include/*; do ln -s "$e" "$SITE/nvidia/cu13/include/"; done
    ln -s "$CRT" "$SITE/nvidia/cu13/include/crt"
    say "NVRTC headers: crt/ from $CRT"
  fi
fi

# 5. Binaries.
mkdir -p "$DEST/bin"
while read -r kind _ sha _ name; do
  [ "$kind" = bin ] || continue
  if ! { [ -f "$DEST/bin/$name" ] && echo "$sha  $DEST/bin/$name" | sha256sum -c --status; }; then
    cp "$DEST/parts/$name" "$DEST/bin/$name.tmp" && chmod +x "$DEST/bin/$name.tmp" && mv "$DEST/bin/$name.tmp" "$DEST/bin/$name"
  fi
done < <(grep -v '^#' "$MAN")

# 6. env.sh. MLX 0.32.2 reads no environment variable for a memory limit (CUDA allocator: limit =
#    95% of the GPU's memory, and set_memory_limit only steers cache reclamation, it caps nothing);
#    zmlx / the oracle must call set_memory_limit themselves, and keep models well below the GPU's
#    free memory (weights loaded by mx.load land in CUDA managed memory).
LDP=$SITE/mlx/lib
[ -n "$NV" ] && for sub in cu13 cudnn nccl; do [ -d "$NV/$sub/lib" ] && LDP=$LDP:$NV/$sub/lib; done
cat > "$DEST/env.sh.tmp" <<EOF
# written by scripts/gpu/stage.sh on $(date -u +%FT%TZ); source it: . $DEST/env.sh
export ZMLX_GPU_DIR=$DEST
export PYTHONPATH=$SITE\${PYTHONPATH:+:\$PYTHONPATH}
export LD_LIBRARY_PATH=$LDP\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
export PATH=$DEST/bin:\$PATH
export ZMLX_ORACLE_PYTHON=$PY
export ZMLX=$DEST/bin/zmlx
export MLX_PTX_CACHE_DIR=$DEST/ptx-cache
export PYTHONUNBUFFERED=1
# MLX knobs worth knowing (defaults shown, not set here): MLX_ENABLE_TF32=1 (float32 matmuls/convs
# use TF32 on CUDA: set 0 for f32-exact runs), MLX_USE_CUDA_GRAPHS=1, MLX_CUDA_USE_CUDNN_SDPA=1.
EOF
mv "$DEST/env.sh.tmp" "$DEST/env.sh"
say "wrote $DEST/env.sh"

# 7. Checks that need no GPU: shared libraries resolve; the packages mlx-lm and mlx-cuda-13 rely on.
( . "$DEST/env.sh"
  nf=$(ldd "$SITE/mlx/lib/libmlx.so" 2>&1 | grep 'not found' || true)
  if [ -n "$nf" ]; then say "libmlx.so: unresolved libraries:"; echo "$nf"; else say "libmlx.so: all shared libraries resolve"; fi
  for b in "$DEST"/bin/*; do
    nf=$(ldd "$b" 2>&1 | grep 'not found' || true)
    [ -z "$nf" ] || { say "$(basename "$b"): unresolved:"; echo "$nf"; }
  done
  "$PY" - <<'PYEOF' || true
from importlib import metadata as md
names = ["mlx", "mlx-cuda-13", "mlx-lm", "numpy", "transformers", "tokenizers", "sentencepiece",
         "protobuf", "pyyaml", "jinja2", "safetensors", "nvidia-cuda-runtime", "nvidia-cublas",
         "nvidia-cuda-nvrtc", "nvidia-cufft", "nvidia-cudnn-cu13", "nvidia-nccl-cu13"]
out = []
for n in names:
    try:
        out.append(f"{n}={md.version(n)}")
    except md.PackageNotFoundError:
        out.append(f"{n}=MISSING")
print("[stage] packages: " + " ".join(out))
PYEOF
)
say "READY: . $DEST/env.sh   (python: $PY, zmlx: $DEST/bin/zmlx)"
