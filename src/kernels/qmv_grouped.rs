//! `qmv_grouped` (CUDA only): the prefill form of the quantized expert dots — `qmv_swiglu`'s
//! gate/up + SwiGLU, `qmv_combine`'s down projection (its slot sum follows there) — and of a
//! dense projection (`qmv_linear`, one expert). kernels/cuda/qmv_grouped.cu: the (token, slot)
//! pairs sorted by expert, a warp per [`GROUPED_PAIRS`] sorted pairs × output row, each pair
//! the decode bodies' exact arithmetic, so a token's result does not depend on the form, the
//! batch or the order. References and selftest cases: those of the three kernels it serves.
//! Metal: no body yet (calls above `qmv_swiglu::GPU_MAX_TOKENS` tokens stay stock there).
use anyhow::Result;
use mlx_rs::{ops, Array, Dtype};

use super::gpu::{GpuKernel, TemplateArg};
use super::qmv_swiglu::gpu_grid;
use super::{threads_for, CUDA_HEADER};
use crate::mlx_env::Backend;
use crate::nn::QWeight;

/// (token, slot) pairs per warp (`qmv_grouped.cu`'s TB).
const GROUPED_PAIRS: i32 = 8;

static GROUPED_CUDA: GpuKernel = GpuKernel {
    name: "zmlx_qmv_grouped",
    inputs: &["x", "idx", "order", "wa", "sa", "ba", "wb", "sb", "bb"],
    outputs: &["out"],
    source: include_str!("../../kernels/cuda/qmv_grouped.cu"),
    header: CUDA_HEADER,
};

/// The grouped CUDA form: `[T, k, N]` expert dots for `idx` `[T, k]`, the pairs sorted by
/// expert. With `b` (gate `a`, up `b`): `x` `[T, K]` → swiglu(gate, up); without: `x`
/// `[T, k, K]` (one row per pair) → the T-rounded dots with `a`.
/// With one expert (`a` `[1, N, K']`, a dense projection; `x` `[T, 1, K]`) `idx` is any `[1, 1]`
/// uint32 array: it is neither sorted nor read.
pub fn qmv_grouped_cuda(x: &Array, idx: &Array, a: &QWeight, b: Option<&QWeight>) -> Result<Array> {
    let (t, k) = (x.dim(0), idx.dim(1));
    let (q, n, e) = (a.q, a.weight.dim(1), a.weight.dim(0));
    // A stable sort on CUDA; the order only decides which pairs share a weight read, never a
    // result.
    let order =
        if e == 1 { idx.clone() } else { ops::argsort_axis(&idx.flatten(None, None)?, 0)?.as_dtype(Dtype::Uint32)? };
    let chunks = (t * k + GROUPED_PAIRS - 1) / GROUPED_PAIRS;
    let grid = gpu_grid("qmv_grouped", &[chunks, n, 32])?;
    let mut template = super::qmv_swiglu::quantized_template(x.dtype(), x.dim(-1), n, k, q, e);
    template.extend([("TB", TemplateArg::Int(GROUPED_PAIRS)), ("GLU", TemplateArg::Bool(b.is_some()))]);
    let bw = b.unwrap_or(a);
    let ins = [x, idx, &order, &a.weight, &a.scales, &a.biases, &bw.weight, &bw.scales, &bw.biases];
    let out = GROUPED_CUDA.apply(
        Backend::Cuda,
        &ins,
        &template,
        (grid, 1, 1),
        (threads_for(grid as usize), 1, 1),
        &[(&[t, k, n], x.dtype())],
    )?;
    Ok(out.into_iter().next().unwrap())
}
