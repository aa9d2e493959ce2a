#!/usr/bin/env bash
# README command (b): every test, from a fresh clone. Idempotent.
#   1. fetch build inputs + the mlx-lm oracle venv (scripts/setup.sh --oracle),
#   2. cargo test: unit tests, oracle tests vs mlx-lm, fidelity, bad-input and CLI tests.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "[test] setting up MLX inputs and the mlx-lm oracle"
bash scripts/setup.sh --oracle
echo "[test] cargo test (all targets)"
cargo test --all-targets 2>&1
echo "[test] done"
