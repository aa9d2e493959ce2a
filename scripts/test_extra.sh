#!/usr/bin/env bash
# The checks too heavy for the README's test command (scripts/test.sh, kept under 45 min cold on
# the 2-core VM). Run before a release, or when touching what they cover:
#   1. scripts/cross_aarch64.sh --test: the aarch64-unknown-linux-gnu cross build and the kernel
#      tests (exact and fast row kernels, NEON and scalar) under qemu-aarch64 (~10 min warm,
#      ~25 min cold: it builds MLX's aarch64 inputs and a second target dir);
#   2. scripts/validate_fast.sh: the `fast` preset vs unpatched, 4 prompts x 256 tokens on every
#      family's bench checkpoint (and FULL=... full-size ones), ledger lines with logit max-abs/KL
#      (~30 min);
#   3. the #[ignore]d tests (scripts/test.sh leaves them out): batch invariance on the bench
#      checkpoints of five more families and unpatched, deepseek_v3's bench oracle (~12 min).
# Exit status: non-zero if any fails (all run).
set -uo pipefail
cd "$(dirname "$0")/.."
rc=0
echo "[test_extra] aarch64 cross build + kernel tests under qemu-aarch64"
bash scripts/cross_aarch64.sh --test || rc=1
echo "[test_extra] fast-preset validation suite"
bash scripts/validate_fast.sh || rc=1
echo "[test_extra] ignored tests (batch invariance on the bench checkpoints, deepseek_v3 bench oracle, the bf16 bench oracle of four families)"
cargo test --release --test batch --test oracle_bench -- --ignored || rc=1
echo "[test_extra] done (exit $rc)"
exit $rc
