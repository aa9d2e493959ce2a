"""Issue #15: one MLX quantized matmul launch of a chosen shape, for `compute-sanitizer --tool
racecheck` (MLX 0.32.2's qmm_sm80 kernel leaves a cp.async in flight into shared memory that its
epilogue reuses for the output tile; whether a shape is hit depends on its number of K tiles).
Also prints whether 50 repeats in one graph agree.
usage: python qmm_race.py gather|dense K [ROWS]"""
import json
import sys

import mlx.core as mx

kind, K = sys.argv[1], int(sys.argv[2])
rows = int(sys.argv[3]) if len(sys.argv) > 3 else 64
E, N = 8, 256
mx.random.seed(0)
wf = mx.random.normal((E, N, K)).astype(mx.bfloat16) * 0.05
w, s, b = mx.quantize(wf, group_size=64, bits=4)
x = mx.random.normal((rows, 1, K)).astype(mx.bfloat16)
idx = mx.sort(mx.random.randint(0, E, (rows,)).astype(mx.uint32))
mx.eval(w, s, b, x, idx)
if kind == "gather":
    f = lambda: mx.gather_qmm(x, w, s, b, rhs_indices=idx, transpose=True, group_size=64, bits=4, sorted_indices=True)
else:
    f = lambda: mx.quantized_matmul(x[:, 0, :], w[0], s[0], b[0], transpose=True, group_size=64, bits=4)
ref = f()
mx.eval(ref)
ys = [f() for _ in range(int(sys.argv[4]) if len(sys.argv) > 4 else 50)]
mx.eval(*ys)
print(json.dumps({"kind": kind, "K": K, "rows": rows, "k_tiles": K // 64,
                  "repeats_differ": sum(int(not mx.array_equal(y, ref).item()) for y in ys)}), flush=True)
