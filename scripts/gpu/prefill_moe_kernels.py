"""Issue #15: zmlx's CUDA prefill forms alone — the grouped expert dots (kernels/cuda/qmv_grouped.cu:
gate/up + SwiGLU, and down; the pairs sorted by expert) with the slot sum (qmv_slot_sum.cu), and the
dense projection on the same body with one expert (qmv_linear's CUDA path) — at the Qwen3-30B-A3B
shapes (bf16, 4-bit g64), launched as src/kernels/qmv_{swiglu,combine,linear}.rs launch them, against
  - a float32 reference of the dequantized weights (TF32 off) and MLX's stock chain (mlx-lm's
    SwitchGLU at prefill: sort the pairs, gather_qmm with sorted_indices, unsort; the weighted sum;
    quantized_matmul for the dense projection), max |diff| and relative rms;
  - repeatability (REPEATS launches in one graph, bitwise), and prefill = decode: every token of a
    T-token grouped launch against the same token through the decode bodies (decode_moe_kernels.py);
  - timing vs the stock chain for T in TOKENS: LAYERS distinct layers, CALLS calls per graph, best of
    ROUNDS, µs per layer call.
One JSON line per result on stdout.
usage: MLX_ENABLE_TF32=0 python prefill_moe_kernels.py [--tokens 16 64 178 512] [--layers 4] [--calls 24]"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MLX_ENABLE_TF32", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))
import mlx.core as mx  # noqa: E402
import decode_moe_kernels as dm  # noqa: E402

ROOT = dm.ROOT
E, D, I, KSEL, GS, BITS, DT = dm.E, dm.D, dm.I, dm.KSEL, dm.GS, dm.BITS, dm.DT
TB = 8  # src/kernels/qmv_swiglu.rs GROUPED_PAIRS
# UNROLL (env): the word loop's unroll factor instead of the committed one (a tuning probe).
_SRC = (ROOT / "kernels/cuda/qmv_grouped.cu").read_text()
if os.environ.get("UNROLL"):
    _SRC = _SRC.replace("#pragma unroll 2\nfor (int w", "#pragma unroll %s\nfor (int w" % os.environ["UNROLL"])
GROUPED = mx.fast.cuda_kernel(
    name="zmlx_qmv_grouped" + os.environ.get("UNROLL", ""),
    input_names=["x", "idx", "order", "wa", "sa", "ba", "wb", "sb", "bb"],
    output_names=["out"], source=_SRC, header=dm.HEADER)
SLOT_SUM = mx.fast.cuda_kernel(
    name="zmlx_qmv_slot_sum", input_names=["y", "w"], output_names=["out"],
    source=(ROOT / "kernels/cuda/qmv_slot_sum.cu").read_text(), header=dm.HEADER)
emit = dm.emit


def grouped(x, idx, a, b, n, e):
    t, k = x.shape[0], idx.shape[1]
    order = idx if e == 1 else mx.argsort(idx.flatten()).astype(mx.uint32)
    warps = -(-t * k // TB) * n
    bb = b if b is not None else a
    (y,) = GROUPED(inputs=[x, idx, order, a[0], a[1], a[2], bb[0], bb[1], bb[2]],
                   template=[("T", DT), ("K", x.shape[-1]), ("N", n), ("KSEL", k), ("GS", GS), ("BITS", BITS),
                             ("E", e), ("TB", TB), ("GLU", b is not None)],
                   grid=(warps * 32, 1, 1), threadgroup=(dm.threads(warps * 32), 1, 1),
                   output_shapes=[(t, k, n)], output_dtypes=[DT])
    return y


def ours_swiglu(x, idx, g, u):
    return grouped(x, idx, g, u, I, E)


def ours_combine(h, idx, w, d):
    t = idx.shape[0]
    y = grouped(h, idx, d, None, D, E)
    out_dt = DT if w.dtype == DT else mx.float32
    (o,) = SLOT_SUM(inputs=[y, w if w.dtype == out_dt else w.astype(out_dt)],
                    template=[("T", DT), ("O", out_dt), ("N", D), ("KSEL", KSEL)],
                    grid=(t * D, 1, 1), threadgroup=(dm.threads(t * D), 1, 1),
                    output_shapes=[(t, D)], output_dtypes=[out_dt])
    return o


def ours_dense(x, q):
    n = q[0].shape[0]
    one = tuple(a.reshape(1, n, a.shape[1]) for a in q)
    return grouped(x[:, None, :], mx.zeros((1, 1), dtype=mx.uint32), one, None, n, 1).reshape(x.shape[0], n)


def stock_dense(x, q):
    return mx.quantized_matmul(x, q[0], q[1], q[2], transpose=True, group_size=GS, bits=BITS)


def sorted_gqmm(x, q, idx):
    """mlx-lm's SwitchGLU prefill: pairs sorted by expert, gather_qmm(sorted_indices=True), unsorted."""
    t, k = idx.shape
    flat = idx.flatten()
    order = mx.argsort(flat)
    inv = mx.argsort(order)
    xs = x.reshape(-1, 1, x.shape[-1])[order // k] if x.ndim == 2 else x.reshape(-1, 1, x.shape[-1])[order]
    y = mx.gather_qmm(xs, q[0], q[1], q[2], rhs_indices=flat[order], transpose=True, group_size=GS, bits=BITS,
                      sorted_indices=True)
    return y[inv].reshape(t, k, -1)


def stock_swiglu(x, idx, g, u):
    up, gate = sorted_gqmm(x, u, idx), sorted_gqmm(x, g, idx)
    return gate * mx.sigmoid(gate) * up


def stock_combine(h, idx, w, d):
    return (sorted_gqmm(h, d, idx) * w[..., None]).sum(axis=-2)


def accuracy(layers, tokens, repeats):
    g, u, d = layers[0]
    for t in tokens:
        x = mx.random.normal((t, D), key=mx.random.key(300 + t)).astype(DT)
        idx, w = dm.route(t, 400 + t)
        h = ours_swiglu(x, idx, g, u)
        y = ours_combine(h, idx, w, d)
        hs_, ys_ = stock_swiglu(x, idx, g, u), stock_combine(h, idx, w, d)
        hr, yr = dm.ref_swiglu(x, idx, g, u), dm.ref_combine(h, idx, w, d)
        mx.eval(h, y, hs_, ys_, hr, yr)
        for name, o, s, r in (("swiglu", h, hs_, hr), ("combine", y, ys_, yr)):
            emit(test="accuracy", kernel=name, T=t, max_abs_ours_vs_f32=dm.maxabs(o, r), max_abs_stock_vs_f32=dm.maxabs(s, r),
                 relrms_ours=dm.relrms(o, r), relrms_stock=dm.relrms(s, r))
        hh = [ours_swiglu(x, idx, g, u) for _ in range(repeats)]
        yy = [ours_combine(h, idx, w, d) for _ in range(repeats)]
        ss = [stock_swiglu(x, idx, g, u) for _ in range(repeats)]
        mx.eval(*hh, *yy, *ss)
        emit(test="repeat", T=t, repeats=repeats,
             ours_swiglu_differ=sum(int(not mx.array_equal(a, h).item()) for a in hh),
             ours_combine_differ=sum(int(not mx.array_equal(a, y).item()) for a in yy),
             stock_swiglu_differ=sum(int(not mx.array_equal(a, hs_).item()) for a in ss))
        # prefill = decode: the grouped launch's tokens against the decode bodies, one token at a time
        bad_h = bad_y = 0
        for i in range(t):
            h1 = dm.ours_swiglu(x[i:i + 1], idx[i:i + 1], g, u)
            y1 = dm.ours_combine(h[i:i + 1], idx[i:i + 1], w[i:i + 1], d)
            bad_h += int(not mx.array_equal(h1[0], h[i]).item())
            bad_y += int(not mx.array_equal(y1[0], y[i]).item())
        emit(test="prefill_equals_decode", T=t, swiglu_tokens_differ=bad_h, combine_tokens_differ=bad_y)
    # the dense projection (q_proj shape, N 4096 x K 2048)
    q = dm.qweight(4096, D, 99)
    q = tuple(a[0] for a in q)
    for t in [1] + list(tokens):
        x = mx.random.normal((t, D), key=mx.random.key(500 + t)).astype(DT)
        o, s = ours_dense(x, q), stock_dense(x, q)
        r = x.astype(mx.float32) @ mx.dequantize(q[0], q[1].astype(mx.float32), q[2].astype(mx.float32),
                                                 group_size=GS, bits=BITS).T
        rep = [ours_dense(x, q) for _ in range(repeats)]
        mx.eval(o, s, r, *rep)
        one = [ours_dense(x[i:i + 1], q) for i in range(min(t, 16))]
        mx.eval(*one)
        emit(test="accuracy", kernel="dense", T=t, max_abs_ours_vs_f32=dm.maxabs(o, r), max_abs_stock_vs_f32=dm.maxabs(s, r),
             relrms_ours=dm.relrms(o, r), relrms_stock=dm.relrms(s, r),
             repeat_differ=sum(int(not mx.array_equal(a, o).item()) for a in rep),
             rows_alone_differ=sum(int(not mx.array_equal(a[0], o[i]).item()) for i, a in enumerate(one)))


def speed(layers, tokens, calls, rounds):
    nl = len(layers)
    for t in tokens:
        routes = [dm.route(t, 2000 + i) for i in range(calls)]
        x0 = mx.random.normal((t, D), key=mx.random.key(8)).astype(DT)
        mx.eval(x0, *[a for r in routes for a in r])

        def chain(sw, cb):
            return dm.make_chain(layers, routes, x0, calls, sw, cb)

        res = {}
        for name, fn in [("ours_chain", chain(ours_swiglu, ours_combine)),
                         ("stock_chain", chain(stock_swiglu, stock_combine)),
                         ("decode_bodies_chain", chain(dm.ours_swiglu, dm.ours_combine))]:
            if name == "decode_bodies_chain" and t > 64:
                continue
            mx.eval(fn())  # warm-up (JIT)
            res[name + "_us"] = round(dm.timed(fn, rounds) / calls * 1e6, 1)
        res["speedup_vs_stock"] = round(res["stock_chain_us"] / res["ours_chain_us"], 3)
        emit(test="speed", kernel="experts", T=t, calls=calls, layers=nl, rounds=rounds, **res)
    qs = [tuple(a[0] for a in dm.qweight(4096, D, 700 + i)) for i in range(nl)]
    for t in [1] + list(tokens):
        x0 = mx.random.normal((t, D), key=mx.random.key(9)).astype(DT)

        def dense_chain(f):
            def run():
                outs = []
                for i in range(calls * 4):
                    outs.append(f(x0, qs[i % nl]))
                return outs
            return run

        res = {}
        for name, f in [("ours", ours_dense), ("stock", stock_dense)]:
            fn = dense_chain(f)
            mx.eval(fn())
            res[name + "_us"] = round(dm.timed(fn, rounds) / (calls * 4) * 1e6, 1)
        res["speedup_vs_stock"] = round(res["stock_us"] / res["ours_us"], 3)
        emit(test="speed", kernel="dense N4096 K2048", T=t, **res)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 64, 178, 512])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--calls", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--speed-only", action="store_true")
    a = ap.parse_args()
    emit(test="env", mlx=mx.__version__, device=str(mx.default_device()), tf32=os.environ.get("MLX_ENABLE_TF32"),
         unroll=os.environ.get("UNROLL", "committed"))
    layers = [(dm.qweight(I, D, 3 * l), dm.qweight(I, D, 3 * l + 1), dm.qweight(D, I, 3 * l + 2)) for l in range(a.layers)]
    if not a.speed_only:
        accuracy(layers, a.tokens, a.repeats)
    speed(layers, a.tokens, a.calls, a.rounds)


if __name__ == "__main__":
    main()
