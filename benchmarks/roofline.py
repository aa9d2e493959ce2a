"""Roofline helpers for `benchmarks/bench.sh`.

  python roofline.py triad [THREADS]       -> {"triad_gbs": ..., "triad_gbs_1t": ..., ...}
      STREAM-like a = 3c; a += b (numpy, float64, 5 x 8 bytes per element moved), once on one
      thread and once on THREADS threads (argument, else the THREADS env, else the CPUs this
      process may use) over disjoint slices; triad_gbs (the roofline) is the THREADS figure
      (the 1-thread one if noise put that higher).
      TRIAD_N overrides the array length (default 20M, at least 4x the total L3).
  python roofline.py bytes DIR CTX         -> bytes read per decoded token at context CTX: every
      non-expert tensor once, expert tensors x k/E (only the routed experts are read), one row of
      the input embedding, float tensors at float32 (zmlx/mlx-lm CPU compute dtype), packed
      weights as stored, plus the KV cache read by attention (CTX positions, float32).
  python roofline.py bytes-batch DIR CTX B -> the same per decode step of B sequences: experts
      x the expected fraction of distinct experts B tokens touch, 1 - (1 - k/E)^B (uniform,
      independent routing: what the random-weight bench routers do), B embedding rows, B KV
      caches; bytes_per_token = step bytes / B.
"""
import json
import os
import struct
import sys
import time

import numpy as np

SIZES = {"F32": 4, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "U8": 1, "F64": 8, "I64": 8}


def _total_l3_bytes():
    """Sum of the distinct L3 caches (Linux sysfs); 0 when unknown."""
    seen, total = set(), 0
    base = "/sys/devices/system/cpu"
    try:
        cpus = [c for c in os.listdir(base) if c.startswith("cpu") and c[3:].isdigit()]
    except OSError:
        return 0
    for c in cpus:
        cdir = os.path.join(base, c, "cache")
        try:
            idxs = os.listdir(cdir)
        except OSError:
            continue
        for i in idxs:
            p = os.path.join(cdir, i)
            try:
                if open(os.path.join(p, "level")).read().strip() != "3":
                    continue
                shared = open(os.path.join(p, "shared_cpu_list")).read().strip()
                size = open(os.path.join(p, "size")).read().strip()
            except OSError:
                continue
            if shared in seen:
                continue
            seen.add(shared)
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1:].upper(), 1)
            total += int(size.rstrip("KkMmGg")) * mult
    return total


def _mem_available_bytes():
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _triad_len():
    """Elements per array: TRIAD_N if set, else 20M, raised to 4x the total L3 (STREAM's rule),
    capped so the three arrays fit in a quarter of the available memory."""
    if os.environ.get("TRIAD_N"):
        return int(os.environ["TRIAD_N"])
    n = max(20_000_000, 4 * _total_l3_bytes() // 8)
    avail = _mem_available_bytes()
    if avail:
        n = min(n, max(1_000_000, avail // 4 // (3 * 8)))
    return n


def _triad_gbs(a, b, c, threads, reps):
    """Best of `reps` of a = 3c; a += b (float64), split into `threads` contiguous slices run on
    `threads` Python threads (numpy drops the GIL inside large ufunc loops), each slice first
    touched by its own thread. Bytes counted: multiply reads c, writes a; add reads a, b, writes a:
    5 x 8 per element."""
    from concurrent.futures import ThreadPoolExecutor

    n = a.shape[0]
    bounds = [(n * i // threads, n * (i + 1) // threads) for i in range(threads)]

    def touch(i):
        lo, hi = bounds[i]
        a[lo:hi] = 0.0
        b[lo:hi] = 1.0
        c[lo:hi] = 2.0

    def kernel(i):
        lo, hi = bounds[i]
        np.multiply(c[lo:hi], 3.0, out=a[lo:hi])
        np.add(a[lo:hi], b[lo:hi], out=a[lo:hi])

    best = 0.0
    if threads == 1:
        touch(0)
        for _ in range(reps):
            t = time.perf_counter()
            kernel(0)
            best = max(best, 5 * 8 * n / (time.perf_counter() - t) / 1e9)
        return best
    with ThreadPoolExecutor(max_workers=threads) as ex:
        list(ex.map(touch, range(threads)))
        list(ex.map(kernel, range(threads)))  # start the workers
        for _ in range(reps):
            t = time.perf_counter()
            list(ex.map(kernel, range(threads)))
            best = max(best, 5 * 8 * n / (time.perf_counter() - t) / 1e9)
    return best


def triad(threads=None):
    """STREAM-like bandwidth with 1 thread and with THREADS threads (default: THREADS env, else
    the CPUs this process may run on). triad_gbs, the roofline's bandwidth, is the THREADS figure
    (or the 1-thread one where that came out higher):
    zmlx's fused kernels run on ZMLX_CPU_THREADS threads; MLX's own CPU ops on one."""
    if threads is None:
        threads = int(os.environ.get("THREADS") or 0) or len(os.sched_getaffinity(0))
    n = _triad_len()
    reps = 5

    def fresh():
        # np.empty maps fresh pages: the first write (touch(), per slice) places them (NUMA).
        return np.empty(n), np.empty(n), np.empty(n)

    one = _triad_gbs(*fresh(), 1, reps)
    mt = one if threads == 1 else _triad_gbs(*fresh(), threads, reps)
    # The roofline is an upper bound: the THREADS figure, unless noise put it below one thread's.
    return {
        "triad_gbs": round(max(mt, one), 2), "triad_gbs_1t": round(one, 2), "triad_gbs_mt": round(mt, 2),
        "threads": threads, "elements": n, "array_mb": round(8 * n / 1e6, 1),
        "cpus_available": len(os.sched_getaffinity(0)), "l3_bytes": _total_l3_bytes(),
        "method": f"numpy a = 3c; a += b, float64, best of {reps}; 1 thread, and {threads} threads on "
                  "disjoint slices (ThreadPoolExecutor, per-thread first touch); triad_gbs = the "
                  f"{threads}-thread figure (the 1-thread one if that is higher)",
    }


def tensors(d):
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            with open(os.path.join(d, f), "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                hdr = json.loads(fh.read(n))
            for k, v in hdr.items():
                if k != "__metadata__":
                    yield k, v["dtype"], v["shape"]


def bytes_per_token(d, ctx, batch=1):
    cfg = json.load(open(os.path.join(d, "config.json")))
    e = cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts")
    k = cfg["num_experts_per_tok"]
    total = 0.0
    for name, dt, shape in tensors(d):
        n = 1
        for s in shape:
            n *= s
        size = n * (SIZES[dt] if dt in ("U32", "I32", "U8") else 4)
        if "embed_tokens" in name:
            size *= batch / shape[0]  # one row per sequence is gathered
        elif ".experts." in name or "switch_mlp" in name or "block_sparse_moe.experts" in name:
            size *= 1 - (1 - k / e) ** batch  # expected share of distinct experts touched
        total += size
    layers = cfg["num_hidden_layers"]
    if cfg.get("kv_lora_rank"):
        per_pos = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
    else:
        hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        per_pos = 2 * cfg["num_key_value_heads"] * hd
    kv = layers * per_pos * 4 * ctx * batch
    return {"weights_bytes": int(total), "kv_bytes": int(kv), "bytes_per_step": int(total + kv),
            "bytes_per_token": int((total + kv) / batch), "batch": batch, "experts": e, "k": k}


if __name__ == "__main__":
    if sys.argv[1] == "triad":
        print(json.dumps(triad(int(sys.argv[2]) if len(sys.argv) > 2 else None)))
    elif sys.argv[1] == "bytes-batch":
        print(json.dumps(bytes_per_token(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
    else:
        print(json.dumps(bytes_per_token(sys.argv[2], int(sys.argv[3]))))
