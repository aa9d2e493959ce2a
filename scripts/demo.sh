#!/usr/bin/env bash
# README command (a): the main job on the built-in default checkpoint.
# Synthesizes the default MoE checkpoint once (qwen3_moe, tiny preset, 4-bit) and generates from it.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "[demo] setting up MLX inputs"
bash scripts/setup.sh
echo "[demo] building zmlx (release)"
cargo build --release --quiet
echo "[demo] running: zmlx demo"
./target/release/zmlx demo "$@"
