#!/usr/bin/env python3
"""GPU smoke test for MLX 0.32.2 (CUDA backend), run ON the GPU machine after scripts/gpu/stage.sh:

    . /tmp/zmlx-gpu/env.sh && python3 scripts/gpu/smoke.py [--out FILE.json]

Prints one JSON object (also written to --out): versions, which libmlx.so was loaded, default
device, mx.cuda.is_available(), device_info, memory limits, then checks, each independent:
  matmul_f32   256x384 @ 384x128 vs numpy float64 (TF32 is on by default: rel err ~1e-3)
  matmul_bf16  same in bfloat16
  cuda_kernel  mx.fast.cuda_kernel (NVRTC) axpy with template T/N and an input's _shape param
  cuda_kernel_mlx_header  kernel including MLX's embedded "mlx/backend/cuda/device/unary_ops.cuh"
               (as zmlx's kernels/cuda/header.cuh does): Sigmoid in float on bfloat16 data vs
               mx.sigmoid (expected bit-identical; passes within 2^-8)
  quantized_matmul  4-bit g64 float32 mx.quantize + mx.quantized_matmul vs dequantize + matmul
  mlx_lm_import  the oracle's import (transformers etc. from the image)
Exit status 0 only if every check passed and the default device is the GPU.
"""
import argparse
import json
import os
import sys
import time
import traceback

ap = argparse.ArgumentParser()
ap.add_argument("--out", help="also write the JSON here (e.g. $OUT/smoke.json)")
ap.add_argument("--memory-fraction", type=float, default=0.5,
                help="mx.set_memory_limit(fraction * total GPU memory) before the checks")
args = ap.parse_args()

res = {"ok": False, "checks": {}}
t_start = time.time()


def emit(code):
    res["wall_s"] = round(time.time() - t_start, 3)
    text = json.dumps(res, indent=1, default=str)
    print(text, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    sys.exit(code)


try:
    import numpy as np
    import mlx.core as mx
except Exception as e:  # noqa: BLE001
    res["error"] = f"import failed: {e!r}"
    res["traceback"] = traceback.format_exc()
    res["env"] = {k: os.environ.get(k) for k in ("PYTHONPATH", "LD_LIBRARY_PATH")}
    emit(2)

res["python"] = sys.version.split()[0]
res["mlx_version"] = mx.__version__
res["mlx_module"] = os.path.dirname(mx.__file__) if getattr(mx, "__file__", None) else None
with open("/proc/self/maps") as f:
    res["libmlx_loaded"] = sorted({l.split()[-1] for l in f if "libmlx" in l})
res["default_device"] = str(mx.default_device())
res["cuda_available"] = bool(mx.cuda.is_available())
res["metal_available"] = bool(mx.metal.is_available())
try:
    info = dict(mx.device_info())
except Exception as e:  # noqa: BLE001
    info = {"error": repr(e)}
res["device_info"] = info
res["env"] = {k: os.environ.get(k) for k in (
    "MLX_ENABLE_TF32", "MLX_USE_CUDA_GRAPHS", "MLX_PTX_CACHE_DIR", "CUDA_HOME", "CUDA_VISIBLE_DEVICES")}
total = info.get("total_memory") or info.get("memory_size")
if isinstance(total, int) and total > 0:
    # MLX 0.32.2 on CUDA: set_memory_limit only steers cache reclamation (no hard cap, no env var).
    res["memory_limit_default"] = mx.set_memory_limit(int(total * args.memory_fraction))
    res["memory_limit_set"] = int(total * args.memory_fraction)


def check(name, fn):
    t0 = time.time()
    try:
        out = fn() or {}
        ok = bool(out.pop("ok", True))
        res["checks"][name] = {"ok": ok, "s": round(time.time() - t0, 3), **out}
    except Exception as e:  # noqa: BLE001
        res["checks"][name] = {"ok": False, "s": round(time.time() - t0, 3), "error": repr(e),
                               "traceback": traceback.format_exc(limit=4)}


def rel_err(got, ref):
    got = np.asarray(got, dtype=np.float64)
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


rng = np.random.default_rng(0)
A = rng.standard_normal((256, 384)).astype(np.float32)
B = rng.standard_normal((384, 128)).astype(np.float32)
REF = A.astype(np.float64) @ B.astype(np.float64)


def matmul_f32():
    c = mx.array(A) @ mx.array(B)
    mx.eval(c)
    e = rel_err(c, REF)
    return {"ok": e < 1e-2, "rel_err": e, "device": str(mx.default_device())}


def matmul_bf16():
    a, b = mx.array(A).astype(mx.bfloat16), mx.array(B).astype(mx.bfloat16)
    ref = np.array(a.astype(mx.float32), dtype=np.float64) @ np.array(b.astype(mx.float32), dtype=np.float64)
    c = (a @ b).astype(mx.float32)
    mx.eval(c)
    e = rel_err(c, ref)
    return {"ok": e < 2e-2, "rel_err": e}


def cuda_kernel():
    n = 1000  # not a multiple of the block: MLX's grid is in threads, rounded up to blocks
    src = """
        auto i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i < N && i < x_shape[0]) {
            out[i] = static_cast<T>(SCALE) * x[i] + y[i];
        }
    """
    k = mx.fast.cuda_kernel(name="zmlx_smoke_axpy", input_names=["x", "y"], output_names=["out"],
                            source=src)
    x = mx.array(rng.standard_normal(n).astype(np.float32))
    y = mx.array(rng.standard_normal(n).astype(np.float32))
    (out,) = k(inputs=[x, y], template=[("T", mx.float32), ("N", n), ("SCALE", 3)],
               grid=(n, 1, 1), threadgroup=(256, 1, 1), output_shapes=[(n,)],
               output_dtypes=[mx.float32], init_value=0.0)
    mx.eval(out)
    ref = 3.0 * np.array(x, dtype=np.float64) + np.array(y, dtype=np.float64)
    e = rel_err(out, ref)
    return {"ok": e < 1e-6, "rel_err": e}


def cuda_kernel_mlx_header():
    n = 777
    header = '#include "mlx/backend/cuda/device/unary_ops.cuh"\n'
    src = """
        auto i = blockIdx.x * blockDim.x + threadIdx.x;
        if (i < N) { out[i] = static_cast<T>(Sigmoid{}(static_cast<float>(x[i]))); }
    """
    k = mx.fast.cuda_kernel(name="zmlx_smoke_sigmoid", input_names=["x"], output_names=["out"],
                            source=src, header=header)
    x = mx.array(rng.standard_normal(n).astype(np.float32) * 4).astype(mx.bfloat16)
    (out,) = k(inputs=[x], template=[("T", mx.bfloat16), ("N", n)], grid=(n, 1, 1),
               threadgroup=(128, 1, 1), output_shapes=[(n,)], output_dtypes=[mx.bfloat16])
    ref = mx.sigmoid(x.astype(mx.float32)).astype(mx.bfloat16)
    mx.eval(out, ref)
    diff = int(mx.sum(out != ref).item())
    maxd = float(mx.max(mx.abs(out.astype(mx.float32) - ref.astype(mx.float32))).item())
    return {"ok": maxd <= 2.0 ** -8, "mismatches_vs_mx_sigmoid": diff, "max_abs_diff": maxd, "n": n}


def quantized_matmul():
    w = mx.array(rng.standard_normal((256, 512)).astype(np.float32))
    x = mx.array(rng.standard_normal((8, 512)).astype(np.float32))
    wq, s, b = mx.quantize(w, group_size=64, bits=4)
    y = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4)
    wd = mx.dequantize(wq, s, b, group_size=64, bits=4)
    mx.eval(y, wd)
    ref = np.array(x, dtype=np.float64) @ np.array(wd, dtype=np.float64).T  # not TF32
    e = rel_err(np.array(y), ref)
    return {"ok": e < 1e-3, "rel_err": e}


def mlx_lm_import():
    import mlx_lm  # noqa: F401
    from importlib import metadata as md
    return {"mlx_lm": md.version("mlx-lm"), "transformers": md.version("transformers")}


check("matmul_f32", matmul_f32)
check("matmul_bf16", matmul_bf16)
check("cuda_kernel", cuda_kernel)
check("cuda_kernel_mlx_header", cuda_kernel_mlx_header)
check("quantized_matmul", quantized_matmul)
check("mlx_lm_import", mlx_lm_import)
try:
    res["peak_memory"] = mx.get_peak_memory()
except Exception:  # noqa: BLE001
    pass

on_gpu = res["default_device"].startswith("Device(gpu") and res["cuda_available"]
res["ok"] = on_gpu and all(c["ok"] for c in res["checks"].values())
if not on_gpu:
    res["error"] = "default device is not the CUDA GPU"
emit(0 if res["ok"] else 1)
