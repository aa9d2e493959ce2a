"""One mlx-lm timing run for `benchmarks/bench.sh`: load, warm up (as `zmlx run --warmup N`:
N greedy generations of 5 tokens on the tokenized WARMUP_TEXT), prefill PROMPT_IDS, greedy-decode
exactly N tokens (EOS ignored, as `zmlx run --ignore-eos`) with mlx-lm's own stream_generate;
prints one JSON object (load seconds, prompt and generation tok/s, peak memory — MLX's allocator
and the process's peak RSS, after load and at the end — token ids, the warm-up and the thread
settings it ran with) to stdout.

usage: python mlx_lm_bench.py --model DIR --prompt-ids 1,2,3 --max-tokens N [--warmup N]
                              [--dtype f32|native]
"""
import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import mlx.core as mx  # noqa: E402
import mlx_lm  # noqa: E402
from mlx_lm.generate import stream_generate  # noqa: E402
from mlx_lm.sample_utils import greedy_sampler  # noqa: E402

# = src/generate.rs WARMUP_TEXT (its unit test checks that they match).
WARMUP_TEXT = "Hello, world. Hello, world. Hello, world. Hello, world. Hello, world. Hello, world."

THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
              "ZMLX_CPU_THREADS", "THREADS")


def thread_settings():
    """What this process ran with: the thread env, the CPUs it may use, and the BLAS libraries
    mapped into it (MLX's CPU backend runs its own ops on one thread; only BLAS calls, the float
    matmuls, may use more, per these variables)."""
    blas = set()
    try:
        for line in open("/proc/self/maps"):
            p = line.split()[-1]
            name = os.path.basename(p)
            if any(s in name.lower() for s in ("blas", "lapack", "mkl", "accelerate", "gomp", "omp")):
                blas.add(name)
    except OSError:
        pass
    return {
        "env": {k: os.environ.get(k) for k in THREAD_ENV},
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "blas_libs": sorted(blas),
    }


def peak_rss_bytes():
    """Peak resident set size of this process, bytes, as `zmlx generate --json` reports it: VmHWM
    on Linux (ru_maxrss survives exec, so it would include a large parent's size), else
    ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-ids", required=True)
    ap.add_argument("--max-tokens", type=int, required=True)
    ap.add_argument("--warmup", type=int, default=2,
                    help="greedy generations of 5 tokens on 'Hello' before timing (zmlx run --warmup)")
    ap.add_argument("--dtype", default="f32", choices=["f32", "native"])
    a = ap.parse_args()
    t0 = time.perf_counter()
    model, tok = mlx_lm.load(a.model)
    if a.dtype == "f32":
        # zmlx's CPU default: every float parameter (incl. quantization scales) in float32.
        model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    load_s = time.perf_counter() - t0
    load_rss = peak_rss_bytes()
    ids = [int(x) for x in a.prompt_ids.split(",")]
    # Warm-up as zmlx's: the tokenizer's own encoding of zmlx's WARMUP_TEXT (src/generate.rs;
    # special tokens as its post-processor adds them), 5 greedy tokens, EOS still stopping, not timed.
    hello = tok.encode(WARMUP_TEXT)
    t1 = time.perf_counter()
    for _ in range(a.warmup):
        for _ in stream_generate(model, tok, hello, max_tokens=5, sampler=greedy_sampler):
            pass
    warm_s = time.perf_counter() - t1
    # Fixed-length decode (as zmlx --ignore-eos): no EOS stop.
    tok._eos_token_ids = set()
    mx.reset_peak_memory()
    last, out = None, []
    for r in stream_generate(model, tok, ids, max_tokens=a.max_tokens, sampler=greedy_sampler):
        out.append(int(r.token))
        last = r
    print(json.dumps({
        "load_seconds": load_s, "prompt_tokens": last.prompt_tokens, "prompt_tps": last.prompt_tps,
        "generation_tokens": last.generation_tokens, "generation_tps": last.generation_tps,
        "peak_memory_gb": last.peak_memory, "peak_rss_bytes": peak_rss_bytes(), "load_peak_rss_bytes": load_rss,
        "token_ids": out, "max_tokens": a.max_tokens,
        "ignore_eos": True, "warmup": a.warmup, "warmup_seconds": warm_s, "dtype": a.dtype,
        "mlx_version": mx.__version__, "mlx_lm_version": getattr(mlx_lm, "__version__", None),
        "threads": thread_settings(),
    }))


if __name__ == "__main__":
    sys.exit(main())
