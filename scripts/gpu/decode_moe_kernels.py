"""Issue #15: zmlx's CUDA decode MoE kernels alone (kernels/cuda/qmv_swiglu.cu, qmv_combine.cu,
with kernels/cuda/header.cuh, launched through mx.fast.cuda_kernel with the template arguments,
grid and block of src/kernels/qmv_{swiglu,combine}.rs) at the Qwen3-30B-A3B expert shapes
(hidden 2048, moe_intermediate 768, 128 experts, top-8, 4-bit g64, bf16), against
  - a float32 reference of the dequantized weights (TF32 off), and MLX's stock chain
    (gather_qmm gate/up, silu(g) * u, gather_qmm down, (y * w).sum(-2)) against the same reference;
  - run-to-run bitwise repeatability (REPEATS launches in one graph), and batch invariance (each
    token of a T-token launch vs the same token alone);
  - timing vs the stock chain for T = 1, 4, 8: LAYERS distinct layers' weights (so the selected
    experts are not L2-resident), CALLS dependent calls per timed graph (out feeds the next x),
    best of ROUNDS, µs per layer call.
One JSON line per result on stdout.
usage: MLX_ENABLE_TF32=0 python decode_moe_kernels.py [--layers 8] [--calls 384] [--rounds 5]"""
import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("MLX_ENABLE_TF32", "0")
import mlx.core as mx  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
HEADER = (ROOT / "kernels/cuda/header.cuh").read_text()
E, D, I, KSEL, GS, BITS = 128, 2048, 768, 8, 64, 4
DT = mx.bfloat16

SWIGLU = mx.fast.cuda_kernel(
    name="zmlx_qmv_swiglu", input_names=["x", "idx", "wg", "sg", "bg", "wu", "su", "bu"], output_names=["out"],
    source=(ROOT / "kernels/cuda/qmv_swiglu.cu").read_text(), header=HEADER)
COMBINE = mx.fast.cuda_kernel(
    name="zmlx_qmv_combine", input_names=["h", "idx", "w", "wd", "sd", "bd"], output_names=["out"],
    source=(ROOT / "kernels/cuda/qmv_combine.cu").read_text(), header=HEADER)


def emit(**kw):
    print(json.dumps(kw), flush=True)


def qweight(n, k, seed):
    """Random packed 4-bit words + scales/biases of a ~N(0, 0.02) weight (as zmlx synth)."""
    key = mx.random.key(seed)
    k1, k2, k3 = mx.random.split(key, 3)
    w = mx.random.randint(0, 2**31 - 1, (E, n, k * BITS // 32), key=k1).astype(mx.uint32)
    w = w * 2 + (mx.random.randint(0, 2, w.shape, key=k2).astype(mx.uint32))  # all 32 bits
    s = (0.0046 * (1 + 0.1 * mx.random.normal((E, n, k // GS), key=k3))).astype(DT)
    b = (-7.5 * s.astype(mx.float32)).astype(DT)
    mx.eval(w, s, b)
    return w, s, b


def threads(n):
    return max(1, min(n, 256))


def ours_swiglu(x, idx, g, u):
    t = idx.shape[0]
    warps = t * KSEL * I
    (h,) = SWIGLU(inputs=[x, idx, g[0], g[1], g[2], u[0], u[1], u[2]],
                  template=[("T", DT), ("K", D), ("N", I), ("KSEL", KSEL), ("GS", GS), ("BITS", BITS), ("E", E)],
                  grid=(warps * 32, 1, 1), threadgroup=(threads(warps * 32), 1, 1),
                  output_shapes=[(t, KSEL, I)], output_dtypes=[DT])
    return h


def ours_combine(h, idx, w, d):
    t = idx.shape[0]
    out_dt = DT if w.dtype == DT else mx.float32
    nw = min(8, 1 << (KSEL - 1).bit_length())  # warps per output row (src/kernels/qmv_combine.rs)
    (y,) = COMBINE(inputs=[h, idx, w if w.dtype == out_dt else w.astype(out_dt), d[0], d[1], d[2]],
                   template=[("T", DT), ("O", out_dt), ("K", I), ("N", D), ("KSEL", KSEL), ("GS", GS), ("BITS", BITS),
                             ("E", E)],
                   grid=(t * D * 32 * nw, 1, 1), threadgroup=(32 * nw, 1, 1),
                   output_shapes=[(t, D)], output_dtypes=[out_dt])
    return y


def gqmm(x, q, idx):
    return mx.gather_qmm(x, q[0], q[1], q[2], rhs_indices=idx, transpose=True, group_size=GS, bits=BITS)


def stock_swiglu(x, idx, g, u):
    xe = x[:, None, None, :]
    up, gate = gqmm(xe, u, idx), gqmm(xe, g, idx)
    return (gate * mx.sigmoid(gate) * up).squeeze(-2)  # mlx-lm's swiglu: silu(gate) * up


def stock_combine(h, idx, w, d):
    y = gqmm(h[:, :, None, :], d, idx).squeeze(-2)
    return (y * w[..., None]).sum(axis=-2)


def deq(q, idx):
    """float32 dequantized rows of the selected experts: [T, KSEL, N, K]."""
    return mx.dequantize(q[0][idx], q[1][idx].astype(mx.float32), q[2][idx].astype(mx.float32), group_size=GS,
                         bits=BITS)


def ref_swiglu(x, idx, g, u):
    xf = x.astype(mx.float32)[:, None, :, None]
    gg = (deq(g, idx) @ xf)[..., 0]
    uu = (deq(u, idx) @ xf)[..., 0]
    return gg * mx.sigmoid(gg) * uu


def ref_combine(h, idx, w, d):
    y = (deq(d, idx) @ h.astype(mx.float32)[..., None])[..., 0]  # [T, KSEL, D]
    return (y * w.astype(mx.float32)[..., None]).sum(axis=-2)


def route(t, seed):
    key = mx.random.key(seed)
    k1, k2 = mx.random.split(key)
    idx = mx.argsort(mx.random.uniform(shape=(t, E), key=k1), axis=-1)[:, :KSEL].astype(mx.uint32)
    w = mx.softmax(mx.random.normal((t, KSEL), key=k2), axis=-1).astype(DT)
    return idx, w


def maxabs(a, b):
    return mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()


def relrms(a, ref):
    d = a.astype(mx.float32) - ref
    return (mx.sqrt((d * d).mean()) / mx.sqrt((ref * ref).mean())).item()


def accuracy(layers, repeats):
    g, u, d = layers[0]
    for t in (1, 4, 8):
        x = mx.random.normal((t, D), key=mx.random.key(100 + t)).astype(DT)
        idx, w = route(t, 200 + t)
        h_ours, h_stock, h_ref = ours_swiglu(x, idx, g, u), stock_swiglu(x, idx, g, u), ref_swiglu(x, idx, g, u)
        # the combine on one common h (ours), so the comparison is the combine's alone
        y_ours, y_stock, y_ref = ours_combine(h_ours, idx, w, d), stock_combine(h_ours, idx, w, d), ref_combine(
            h_ours, idx, w, d)
        mx.eval(h_ours, h_stock, h_ref, y_ours, y_stock, y_ref)
        emit(test="accuracy", kernel="qmv_swiglu", T=t, max_abs_ours_vs_f32=maxabs(h_ours, h_ref),
             max_abs_stock_vs_f32=maxabs(h_stock, h_ref), max_abs_ours_vs_stock=maxabs(h_ours, h_stock),
             relrms_ours=relrms(h_ours, h_ref), relrms_stock=relrms(h_stock, h_ref),
             ref_max_abs=mx.abs(h_ref).max().item())
        emit(test="accuracy", kernel="qmv_combine", T=t, max_abs_ours_vs_f32=maxabs(y_ours, y_ref),
             max_abs_stock_vs_f32=maxabs(y_stock, y_ref), max_abs_ours_vs_stock=maxabs(y_ours, y_stock),
             relrms_ours=relrms(y_ours, y_ref), relrms_stock=relrms(y_stock, y_ref),
             ref_max_abs=mx.abs(y_ref).max().item())
        # repeatability: REPEATS launches in one graph, bitwise vs the first
        hs = [ours_swiglu(x, idx, g, u) for _ in range(repeats)]
        ys = [ours_combine(h_ours, idx, w, d) for _ in range(repeats)]
        ss = [stock_swiglu(x, idx, g, u) for _ in range(repeats)]
        cs = [stock_combine(h_ours, idx, w, d) for _ in range(repeats)]
        mx.eval(*hs, *ys, *ss, *cs)
        emit(test="repeat", T=t, repeats=repeats,
             ours_swiglu_differ=sum(int(not mx.array_equal(a, h_ours).item()) for a in hs),
             ours_combine_differ=sum(int(not mx.array_equal(a, y_ours).item()) for a in ys),
             stock_swiglu_differ=sum(int(not mx.array_equal(a, h_stock).item()) for a in ss),
             stock_combine_differ=sum(int(not mx.array_equal(a, y_stock).item()) for a in cs))
        # batch invariance: token i of the T-token launch vs token i alone
        if t > 1:
            bad_h = bad_y = 0
            for i in range(t):
                h1 = ours_swiglu(x[i:i + 1], idx[i:i + 1], g, u)
                y1 = ours_combine(h_ours[i:i + 1], idx[i:i + 1], w[i:i + 1], d)
                bad_h += int(not mx.array_equal(h1[0], h_ours[i]).item())
                bad_y += int(not mx.array_equal(y1[0], y_ours[i]).item())
            emit(test="batch_invariance", T=t, swiglu_tokens_differ=bad_h, combine_tokens_differ=bad_y)


def timed(fn, rounds):
    best = None
    for _ in range(rounds):
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best


def make_chain(layers, routes, x0, calls, sw, cb):
    """CALLS dependent layer calls (each output feeds the next x), layers taken in turn."""
    def run():
        x = x0
        for i in range(calls):
            g, u, d = layers[i % len(layers)]
            idx, w = routes[i]
            x = cb(sw(x, idx, g, u), idx, w, d)
        return x
    return run


def speed(layers, calls, rounds):
    nl = len(layers)
    for t in (1, 4, 8):
        routes = [route(t, 1000 + i) for i in range(calls)]
        x0 = mx.random.normal((t, D), key=mx.random.key(7)).astype(DT)
        mx.eval(x0, *[a for r in routes for a in r])

        def chain(sw, cb):
            return make_chain(layers, routes, x0, calls, sw, cb)

        def alone(f, which):
            def run():
                outs = []
                for i in range(calls):
                    g, u, d = layers[i % nl]
                    idx, w = routes[i]
                    if which == "swiglu":
                        outs.append(f(x0, idx, g, u))
                    else:
                        outs.append(f(h0, idx, w, d))
                return outs
            return run

        h0 = ours_swiglu(x0, routes[0][0], *layers[0][:2])
        mx.eval(h0)
        res = {}
        for name, fn in [("ours_chain", chain(ours_swiglu, ours_combine)),
                         ("stock_chain", chain(stock_swiglu, stock_combine)),
                         ("ours_swiglu", alone(ours_swiglu, "swiglu")), ("stock_swiglu", alone(stock_swiglu, "swiglu")),
                         ("ours_combine", alone(ours_combine, "combine")),
                         ("stock_combine", alone(stock_combine, "combine"))]:
            fn()  # warm-up (JIT)
            mx.eval(fn())
            res[name + "_us"] = round(timed(fn, rounds) / calls * 1e6, 2)
        res["chain_speedup"] = round(res["stock_chain_us"] / res["ours_chain_us"], 3)
        # bytes of expert weights read per layer call (selected rows, words + scales + biases)
        wbytes = KSEL * (2 * I * D + D * I) * BITS / 8 + KSEL * 3 * (I * D // GS) * 2 * 2
        res["ours_chain_weight_GBps_per_token_set"] = round(wbytes / (res["ours_chain_us"] * 1e-6) / 1e9, 1)
        emit(test="speed", T=t, calls=calls, layers=nl, rounds=rounds, **res)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--calls", type=int, default=384)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=50)
    a = ap.parse_args()
    emit(test="env", mlx=mx.__version__, device=str(mx.default_device()), tf32=os.environ.get("MLX_ENABLE_TF32"))
    t0 = time.time()
    layers = [(qweight(I, D, 3 * l), qweight(I, D, 3 * l + 1), qweight(D, I, 3 * l + 2)) for l in range(a.layers)]
    emit(test="setup", seconds=round(time.time() - t0, 1))
    accuracy(layers, a.repeats)
    speed(layers, a.calls, a.rounds)


if __name__ == "__main__":
    main()
