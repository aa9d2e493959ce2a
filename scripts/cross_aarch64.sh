#!/usr/bin/env bash
# Cross-builds zmlx for aarch64-unknown-linux-gnu on an x86-64 Debian/Ubuntu machine, idempotently,
# and with --test runs the kernel tests under qemu-user. See docs/building.md.
#   bash scripts/cross_aarch64.sh            # lib + bin + the kernel test binaries (no run)
#   bash scripts/cross_aarch64.sh --test     # ... and run tests/kernels.rs, tests/expert_kernels.rs
#                                            #     tests/kernels_rope.rs and tests/fast_kernels.rs under qemu-aarch64
# Inputs (scripts/setup.sh --aarch64 fetches them): g++-aarch64-linux-gnu + qemu-user (apt), a Rust
# std for the target (rustup's if installed, else Debian's rustc-web + its arm64 std unpacked into
# .mlx/aarch64/rust-std), the aarch64 mlx-cpu wheel in .mlx/aarch64/mlx-cpu-<ver>.
# ZMLX_CROSS_RUST=debian uses Debian's rustc-web even where rustup has the target.
# Output: target/aarch64-cross/aarch64-unknown-linux-gnu/{debug,release}/ (its own target dir:
# another rustc must not invalidate the host build's artefacts). PROFILE=release for a release build.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
T=aarch64-unknown-linux-gnu
say() { echo "[cross-aarch64] $*"; }
die() { echo "[cross-aarch64] error: $*" >&2; exit 1; }

run_tests=0
for a in "$@"; do case $a in --test) run_tests=1 ;; *) echo "usage: $0 [--test]" >&2; exit 2 ;; esac; done

bash scripts/setup.sh --aarch64
X=$ROOT/.mlx/aarch64
command -v aarch64-linux-gnu-g++ >/dev/null || die "aarch64-linux-gnu-g++ missing (apt-get install g++-aarch64-linux-gnu)"

# Which Rust: rustup's toolchain if it has the target, else Debian's rustc-web with its arm64 std.
if [ "${ZMLX_CROSS_RUST:-}" != debian ] && rustup target list --installed 2>/dev/null | grep -qx $T; then
  CARGO=(cargo)
  say "using rustup's $(rustc -V) with its $T std"
else
  [ -x /usr/bin/rustc ] && [ -x /usr/bin/cargo ] || die "no $T std in rustup and no Debian rustc-web (apt-get install rustc-web cargo-web)"
  [ -d "$X/rust-std/usr/lib/rustlib/$T/lib" ] || die "no Debian arm64 Rust std in $X/rust-std (run scripts/setup.sh --aarch64)"
  CARGO=(env RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc /usr/bin/cargo)
  # Target crates take the arm64 std from the unpacked package; build scripts and proc macros
  # (host crates, no RUSTFLAGS under --target) use rustc-web's own x86-64 std.
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="--sysroot=$X/rust-std/usr"
  say "using Debian's $(/usr/bin/rustc -V) with the arm64 std in $X/rust-std"
fi
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
# bindgen parses mlx-c's headers as the target sees them (its --target comes from TARGET).
export BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu="--sysroot=/usr/aarch64-linux-gnu"
# qemu-user runs the target's binaries (cargo test, build-time probes) with the cross sysroot.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export CARGO_TARGET_DIR=$ROOT/target/aarch64-cross
PROFILE=${PROFILE:-debug}
prof=(); [ "$PROFILE" = release ] && prof=(--release)

TESTS=(--test kernels --test expert_kernels --test kernels_rope --test fast_kernels)
start=$(date +%s)
say "cargo build --target $T (lib + bins + kernel tests, $PROFILE)"
"${CARGO[@]}" build --locked --target $T "${prof[@]}" --lib --bins "${TESTS[@]}"
say "built in $(( $(date +%s) - start )) s: $CARGO_TARGET_DIR/$T/$PROFILE/zmlx"
file "$CARGO_TARGET_DIR/$T/$PROFILE/zmlx" | grep -q "ARM aarch64" || die "the binary is not aarch64"

if [ $run_tests = 1 ]; then
  command -v qemu-aarch64 >/dev/null || die "qemu-aarch64 missing (apt-get install qemu-user)"
  start=$(date +%s)
  export ZMLX_CPU_THREADS=${ZMLX_CPU_THREADS:-1}
  # The default row kernel (neon). The *_on_each_isa tests re-execute its own test
  # binary, which the host kernel cannot exec without a binfmt_misc entry for qemu; the second
  # run below does its job (ZMLX_CPU_ISA set: it returns at once and every other test runs on
  # the scalar kernel).
  say "running the kernel tests under qemu-aarch64: neon row kernel"
  "${CARGO[@]}" test --locked --target $T "${prof[@]}" "${TESTS[@]}" -- --skip expert_kernels_bit_exact_on_each_isa --skip fast_kernels_on_each_isa
  say "running the expert kernel tests under qemu-aarch64: ZMLX_CPU_ISA=base (scalar row kernel)"
  ZMLX_CPU_ISA=base "${CARGO[@]}" test --locked --target $T "${prof[@]}" --test expert_kernels --test fast_kernels
  say "kernel tests passed under qemu in $(( $(date +%s) - start )) s"
fi
say "done"
