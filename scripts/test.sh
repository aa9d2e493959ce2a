#!/usr/bin/env bash
# README command (b): every test, from a fresh clone. Idempotent. In order:
#   1. fetch build inputs + the mlx-lm oracle venv (scripts/setup.sh --oracle);
#   2. clean environment: every inherited ZMLX_* variable is unset (only ZMLX_ORACLE_PYTHON, which
#      says where the oracle lives, is kept), so the caller's environment cannot change what runs;
#   3. cargo fmt --check and cargo clippy --all-targets -D warnings;
#   4. cargo test: unit tests, oracle tests vs mlx-lm, fidelity, kernels, hostile input, CLI;
#   5. zmlx selftest: every kernel case claimed bit-exact on this backend must be (exit 1 if not);
#   6. the CUDA kernel bodies compiled with NVRTC for sm_90a exactly as MLX's cuda_kernel wraps them (no GPU
#      needed; scripts/check_cuda_kernels.sh; Metal has no compiler outside macOS);
# Heavier checks live in scripts/test_extra.sh (the aarch64 cross build + kernel tests under qemu,
# the fast-preset validation suite, the #[ignore]d tests: batch invariance on five more bench
# checkpoints, deepseek_v3's bench oracle, four families' bf16 bench oracle): they would push this
# past the 45-minute budget cold.
set -euo pipefail
cd "$(dirname "$0")/.."
# Each stage's start says the seconds since the start, so a slow CI run shows where the time went.
step() { echo "[test +${SECONDS}s] $*"; }
step "setting up MLX inputs and the mlx-lm oracle"
bash scripts/setup.sh --oracle

for v in $(env | sed -n 's/^\(ZMLX_[A-Za-z0-9_]*\)=.*/\1/p'); do
  if [ "$v" != ZMLX_ORACLE_PYTHON ]; then
    echo "[test] unsetting inherited $v"
    unset "$v"
  fi
done

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings
step "cargo test (all targets; the #[ignore]d heavy tests run in scripts/test_extra.sh)"
cargo test --all-targets 2>&1
step "zmlx selftest (kernels vs their MLX-op references on this backend)"
./target/debug/zmlx selftest > target/selftest.jsonl
step "CUDA kernel bodies through NVRTC (sm_90a, no GPU): the check must catch a broken body, then pass"
bash scripts/check_cuda_kernels.sh --self-check
bash scripts/check_cuda_kernels.sh
step "done"
