#!/usr/bin/env bash
# Prepares everything zmlx's build needs on a fresh Debian/Ubuntu machine, idempotently:
#   - libclang for bindgen (apt, only if missing),
#   - libmlx + headers from the PyPI wheel mlx-cpu==$MLX_VERSION into .mlx/mlx-cpu-$MLX_VERSION,
#   - mlx-c sources from the crates.io package mlx-sys 0.7.0 into .mlx/mlx-c-0.7.0,
#   - with --oracle: a Python venv .mlx/oracle-venv with mlx-lm (the numerical oracle for tests),
#   - with --aarch64: the inputs of the aarch64-unknown-linux-gnu cross build (opt-in; see
#     scripts/cross_aarch64.sh and docs/building.md): the GCC cross compiler and qemu-user (apt),
#     a Rust std for the target (rustup's if installed, else Debian's rustc-web with its arm64
#     std, unpacked into .mlx/aarch64/rust-std) and the aarch64 mlx-cpu wheel in
#     .mlx/aarch64/mlx-cpu-$MLX_VERSION.
# Nothing third-party is committed: all of it is fetched here, from the registries.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MLX_VERSION=0.32.2          # must equal mlx-c's GIT_TAG (checked again by sys/mlx-sys/build.rs)
MLX_SYS_VERSION=0.7.0
MLX_LM_VERSION=0.32.0       # 0.32.1+ passes global_scale= to gather_qmm, which MLX 0.32.2 lacks
MLX_DIR=$ROOT/.mlx
say() { echo "[setup] $*"; }

want_oracle=0 want_aarch64=0
for a in "$@"; do
  case $a in
    --oracle) want_oracle=1 ;;
    --aarch64) want_aarch64=1 ;;
    *) echo "usage: $0 [--oracle] [--aarch64]" >&2; exit 2 ;;
  esac
done
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
  # The official OpenAI client library: tests/server.rs talks to `zmlx serve` through it.
  OPENAI_VERSION=3.57.0
  if ! "$VENV/bin/python" -c "import openai; assert openai.__version__ == '$OPENAI_VERSION'" 2>/dev/null; then
    say "installing openai==$OPENAI_VERSION into the oracle venv"
    "$VENV/bin/pip" install -q --disable-pip-version-check "openai==$OPENAI_VERSION"
  fi
fi
# 5. The aarch64 cross-build inputs (opt-in).
if [ $want_aarch64 = 1 ]; then
  X=$MLX_DIR/aarch64
  mkdir -p "$X"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  apt_updated=0
  need_apt() {  # installs the named Debian packages that are missing
    local missing=()
    for p in "$@"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
    [ ${#missing[@]} = 0 ] && return 0
    say "installing ${missing[*]} (apt)"
    if [ $apt_updated = 0 ]; then $SUDO apt-get update -qq; apt_updated=1; fi
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  }
  need_apt g++-aarch64-linux-gnu qemu-user
  # Rust std for the target: rustup's when installed (rustup needs its own server to add it);
  # otherwise Debian's rustc-web (a second rustc in /usr/bin, behind rustup's in PATH) and its
  # arm64 std, fetched with a private apt state (no dpkg --add-architecture on this machine).
  if [ "${ZMLX_CROSS_RUST:-}" != debian ] && rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
    say "rust std for aarch64-unknown-linux-gnu present (rustup)"
  else
    need_apt rustc-web cargo-web
    ver=$(dpkg-query -W -f='${Version}' rustc-web)
    stamp=$X/rust-std/.version
    if [ "$(cat "$stamp" 2>/dev/null)" != "$ver" ]; then
      say "fetching Debian's arm64 Rust std $ver into $X/rust-std"
      A=$X/apt
      rm -rf "$A" "$X/rust-std"
      mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/debs"
      : > "$A/status"
      APT_OPTS=(-o APT::Architecture=arm64 -o APT::Architectures::=arm64 -o "Dir::State::Lists=$A/lists"
        -o "Dir::State::status=$A/status" -o "Dir::Cache=$A/cache" -o Debug::NoLocking=1)
      apt-get "${APT_OPTS[@]}" update -qq
      vmaj=$(/usr/bin/rustc -V | awk '{print $2}' | cut -d. -f1,2)
      (cd "$A/debs" && apt-get "${APT_OPTS[@]}" download -qq "libstd-rust-web-dev:arm64=$ver" "libstd-rust-web-$vmaj:arm64=$ver" 2>&1 |
        grep -v "couldn't be accessed by user '_apt'" || true)
      mkdir -p "$X/rust-std"
      for d in "$A"/debs/*.deb; do dpkg-deb -x "$d" "$X/rust-std"; done
      [ -d "$X/rust-std/usr/lib/rustlib/aarch64-unknown-linux-gnu/lib" ] || { echo "[setup] error: no arm64 Rust std in the Debian packages" >&2; exit 1; }
      echo "$ver" > "$stamp"
      rm -rf "$A"
    else
      say "Debian arm64 Rust std $ver present ($X/rust-std)"
    fi
  fi
  XCPU=$X/mlx-cpu-$MLX_VERSION
  if [ ! -f "$XCPU/mlx/lib/libmlx.so" ]; then
    say "fetching the aarch64 mlx-cpu==$MLX_VERSION wheel into $XCPU"
    rm -rf "$XCPU.tmp" "$X/wheel"
    python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --platform manylinux_2_35_aarch64 -d "$X/wheel" "mlx-cpu==$MLX_VERSION"
    python3 -m zipfile -e "$X"/wheel/mlx_cpu-*.whl "$XCPU.tmp"
    mv "$XCPU.tmp" "$XCPU"; rm -rf "$X/wheel"
  else
    say "aarch64 libmlx $MLX_VERSION present ($XCPU)"
  fi
fi
say "done"
