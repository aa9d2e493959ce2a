"""Runs tests/oracle/mlx_lm_oracle.py with mx.fast.rope fed contiguous inputs (the same
workaround zmlx applies on GPUs for MLX 0.32.2's CUDA rope bug on strided views), so the GPU
oracle is deterministic for the MLA families. Arguments are passed through."""
import runpy
import sys

import mlx.core as mx

_rope = mx.fast.rope
mx.fast.rope = lambda x, *a, **k: _rope(mx.contiguous(x), *a, **k)
sys.argv = ["tests/oracle/mlx_lm_oracle.py"] + sys.argv[1:]
runpy.run_path("tests/oracle/mlx_lm_oracle.py", run_name="__main__")
