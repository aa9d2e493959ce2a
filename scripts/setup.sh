#!/usr/bin/env bash
# Prepares everything zmlx's build needs on a fresh Debian/Ubuntu machine, idempotently:
#   - libclang for bindgen (apt, only if missing),
#   - libmlx + headers from the PyPI wheel mlx-cpu==$MLX_VERSION into .mlx/mlx-cpu-$MLX_VERSION,
#   - mlx-c sources from the crates.io package mlx-sys 0.7.0 into .mlx/mlx-c-0.7.0,
#   - with --oracle: a Python venv .mlx/oracle-venv with mlx-lm (the numerical oracle for tests).
# Nothing third-party is committed: all of it is fetched here, from the registries.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MLX_VERSION=0.32.2          # must equal mlx-c's GIT_TAG (checked again by sys/mlx-sys/build.rs)
MLX_SYS_VERSION=0.7.0
MLX_LM_VERSION=0.32.0       # 0.32.1+ passes global_scale= to gather_qmm, which MLX 0.32.2 lacks
MLX_DIR=$ROOT/.mlx
say() { echo "[setup] $*"; }

want_oracle=0
for a in "$@"; do case $a in --oracle) want_oracle=1 ;; *) echo "usage: $0 [--oracle]" >&2; exit 2 ;; esac; done
mkdir -p "$MLX_DIR"

# 1. libclang (bindgen). libclang-dev pulls the clang resource headers (float.h) too.
if ! ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || ! ls /usr/lib/llvm-*/lib/clang/*/include/stddef.h >/dev/null 2>&1; then
  say "installing libclang-dev (bindgen needs it)"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libclang-dev
else
  say "libclang present"
fi

# 2. libmlx from the mlx-cpu wheel; keep the wheel layout (libmlx's RPATH is $ORIGIN/../../mlx_cpu.libs).
CPU_DIR=$MLX_DIR/mlx-cpu-$MLX_VERSION
if [ ! -f "$CPU_DIR/mlx/lib/libmlx.so" ]; then
  say "fetching mlx-cpu==$MLX_VERSION from PyPI into $CPU_DIR"
  rm -rf "$CPU_DIR.tmp"
  python3 -m pip install -q --disable-pip-version-check --no-deps --target "$CPU_DIR.tmp" "mlx-cpu==$MLX_VERSION"
  mv "$CPU_DIR.tmp" "$CPU_DIR"
else
  say "libmlx $MLX_VERSION present ($CPU_DIR)"
fi

# 3. mlx-c sources, as shipped inside the crates.io package mlx-sys (cargo fetches and unpacks it).
MLXC_DIR=$MLX_DIR/mlx-c-$MLX_SYS_VERSION
if [ ! -f "$MLXC_DIR/CMakeLists.txt" ]; then
  say "fetching mlx-c sources from crates.io package mlx-sys $MLX_SYS_VERSION"
  FETCH=$MLX_DIR/fetch-mlx-sys
  mkdir -p "$FETCH/src"; : > "$FETCH/src/lib.rs"
  cat > "$FETCH/Cargo.toml" <<TOML
[package]
name = "fetch-mlx-sys"
version = "0.0.0"
edition = "2021"
[dependencies]
mlx-sys = "=$MLX_SYS_VERSION"
[workspace]
TOML
  manifest=$(cargo metadata --quiet --format-version 1 --manifest-path "$FETCH/Cargo.toml" |
    python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="mlx-sys"))')
  rm -rf "$MLXC_DIR.tmp"; cp -r "$(dirname "$manifest")/src/mlx-c" "$MLXC_DIR.tmp"; mv "$MLXC_DIR.tmp" "$MLXC_DIR"
else
  say "mlx-c $MLX_SYS_VERSION sources present ($MLXC_DIR)"
fi

# 4. The mlx-lm oracle (tests only).
if [ $want_oracle = 1 ]; then
  VENV=$MLX_DIR/oracle-venv
  if ! "$VENV/bin/python" -c "import mlx_lm, mlx.core as mx; assert mx.__version__ == '$MLX_VERSION'" 2>/dev/null; then
    say "creating the mlx-lm oracle venv ($VENV): mlx==$MLX_VERSION mlx-cpu==$MLX_VERSION mlx-lm==$MLX_LM_VERSION"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "mlx==$MLX_VERSION" "mlx-cpu==$MLX_VERSION" "mlx-lm==$MLX_LM_VERSION"
  else
    say "mlx-lm oracle venv present ($VENV)"
  fi
fi
say "done"
