#!/usr/bin/env bash
# Compiles every CUDA kernel body (kernels/cuda/*.cu) with NVRTC exactly as MLX 0.32.2's
# cuda_kernel builds it, for the template instantiations zmlx launches; no GPU needed.
#   bash scripts/check_cuda_kernels.sh               # all instantiations; exit 1 if one fails
#   bash scripts/check_cuda_kernels.sh --self-check  # proves a broken body fails (quick)
#   (other arguments go to scripts/check_cuda_kernels.py: --only REGEX, --show-source, -v, --arch)
# Fetches, idempotently, into .mlx/cuda-check/ (ignored by git), from PyPI only:
#   - nvidia-cuda-nvrtc + nvidia-cuda-runtime $CUDA_WHEELS (libnvrtc, CUDA headers) -> nvidia-$CUDA_WHEELS/
#   - mlx-cuda-13==$MLX_VERSION: only its mlx/include/ tree (CCCL, CUTLASS, MLX headers) and the
#     device headers MLX hands NVRTC from memory (read out of its libmlx.so) -> mlx-cuda-13-$MLX_VERSION/
# Exit: 0 all compiled, 1 a body failed, 2 setup failed (e.g. no registry).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MLX_VERSION=0.32.2                                  # must match scripts/setup.sh
CUDA_WHEELS=${ZMLX_CUDA_CHECK_CUDA:-13.5.37}        # nvidia-cuda-nvrtc / -runtime version (CUDA 13)
CACHE=$ROOT/.mlx/cuda-check
say() { echo "[cuda-check] $*"; }
die() { echo "[cuda-check] ERROR: $*" >&2; exit 2; }
PY=python3
[ -x "$ROOT/.mlx/oracle-venv/bin/python" ] && PY=$ROOT/.mlx/oracle-venv/bin/python
command -v python3 >/dev/null || die "python3 not found"
python3 -m pip --version >/dev/null 2>&1 || die "python3 -m pip not available (needed to fetch the wheels from PyPI)"
pipq() { PIP_ROOT_USER_ACTION=ignore python3 -m pip "$@" -q --disable-pip-version-check --timeout 60 --retries 2; }
mkdir -p "$CACHE"

# 1. NVRTC and the CUDA runtime headers (cu13/include: cuda_fp16.h, cooperative_groups, …).
NV=$CACHE/nvidia-$CUDA_WHEELS
if [ ! -f "$NV/nvidia/cu13/include/cooperative_groups/reduce.h" ] || ! ls "$NV"/nvidia/cu13/lib/libnvrtc.so.* >/dev/null 2>&1; then
  say "fetching nvidia-cuda-nvrtc==$CUDA_WHEELS nvidia-cuda-runtime==$CUDA_WHEELS from PyPI into $NV"
  rm -rf "$NV.tmp"
  pipq install --no-deps --no-compile --target "$NV.tmp" "nvidia-cuda-nvrtc==$CUDA_WHEELS" "nvidia-cuda-runtime==$CUDA_WHEELS" ||
    { rm -rf "$NV.tmp"; die "could not install nvidia-cuda-nvrtc/nvidia-cuda-runtime $CUDA_WHEELS from PyPI (registry unreachable?)"; }
  rm -rf "$NV"; mv "$NV.tmp" "$NV"
else
  say "NVRTC $CUDA_WHEELS present ($NV)"
fi

# 2. MLX's headers from the mlx-cuda-13 wheel (83 MiB download; the wheel is deleted afterwards).
MX=$CACHE/mlx-cuda-13-$MLX_VERSION
if [ ! -f "$MX/jit/ORDER" ]; then
  say "fetching mlx-cuda-13==$MLX_VERSION from PyPI, extracting its headers into $MX"
  DL=$CACHE/download.tmp
  rm -rf "$DL" "$MX.tmp"; mkdir -p "$DL"
  # Any interpreter may unpack it (nothing is loaded), so ask for its platform explicitly.
  pipq download --no-deps --only-binary=:all: --platform manylinux_2_35_x86_64 -d "$DL" "mlx-cuda-13==$MLX_VERSION" ||
    { rm -rf "$DL"; die "could not download mlx-cuda-13==$MLX_VERSION from PyPI (registry unreachable?)"; }
  whl=$(ls "$DL"/mlx_cuda_13-"$MLX_VERSION"-*.whl 2>/dev/null | head -1)
  [ -n "$whl" ] || die "mlx-cuda-13 wheel not found after download"
  "$PY" scripts/check_cuda_kernels.py --prepare "$whl" --mlx "$MX.tmp" || { rm -rf "$MX.tmp" "$DL"; die "preparing $whl failed"; }
  rm -rf "$MX" "$DL"; mv "$MX.tmp" "$MX"
else
  say "MLX $MLX_VERSION CUDA headers present ($MX)"
fi

# 3. The check.
exec "$PY" scripts/check_cuda_kernels.py --mlx "$MX" --nvidia "$NV/nvidia/cu13" "$@"
