//! `qmv_linear`: `quantized_matmul(x, W, transpose=true)` of a dense projection as one
//! multi-threaded node, any number of rows (decode and prefill): the `qmv_linear` pattern's
//! kernel. Reference: `nn::quantized_matmul` (QuantizedLinear). CPU: `zmlx_cpu_qmv_linear`
//! (kernels/cpu/zmlx_qmv.cpp + qmv_rows.inc), each output row keeps `_qmm_t`'s exact sequential
//! sum, so it is bit-identical. CUDA (opt-in `ZMLX_GPU_EXPERIMENTAL`, class validated): the
//! grouped expert body with one expert (`qmv_grouped::qmv_grouped_cuda`): a warp per output row
//! and 8 tokens, fixed-order float sums — deterministic and batch-invariant, where MLX's tiled
//! `quantized_matmul` (>= 8 rows in half precision) races (HANDOFF, Known bugs); for prefill
//! rows only (decode rows keep MLX's faster, deterministic qmv). No tensor cores: ~17x slower
//! than MLX's tiled kernel at 178 rows (H200), the price of determinism until a tiled body
//! exists. Metal: stock.
use std::ffi::c_int;

use anyhow::{bail, Result};
use mlx_rs::{Array, Dtype};

use super::check::{compare, per_row, qweight, rand, CaseResult};
use super::qmv_swiglu::unsupported;
use super::{backend, KernelClass};
use crate::mlx_env::{raw_array, Backend};
use crate::nn::QWeight;

extern "C" {
    fn zmlx_cpu_qmv_linear(
        res: *mut mlx_sys::mlx_array,
        x: mlx_sys::mlx_array,
        w: mlx_sys::mlx_array,
        s: mlx_sys::mlx_array,
        b: mlx_sys::mlx_array,
        group_size: c_int,
        bits: c_int,
        st: mlx_sys::mlx_stream,
    ) -> c_int;
    fn zmlx_cpu_qmv_linear_fast(
        res: *mut mlx_sys::mlx_array,
        x: mlx_sys::mlx_array,
        w: mlx_sys::mlx_array,
        s: mlx_sys::mlx_array,
        b: mlx_sys::mlx_array,
        group_size: c_int,
        bits: c_int,
        st: mlx_sys::mlx_stream,
    ) -> c_int;
}

/// Stock composition: QuantizedLinear's `quantized_matmul` (no bias).
pub fn qmv_linear_reference(x: &Array, w: &QWeight) -> Result<Array> {
    crate::nn::quantized_matmul(x, w)
}

/// Why `qmv_linear` does not apply to this call (None: it does). On CUDA, calls of fewer than
/// [`CUDA_MIN_ROWS`] rows keep MLX's `quantized_matmul`: its mat-vec (qmv) is deterministic and
/// ~4x faster than the grouped body there (H200, N 4096 K 2048: 8.5 vs 33 us).
pub fn qmv_linear_unsupported(x: &Array, w: &QWeight) -> Option<String> {
    if backend() == Backend::Cuda && x.ndim() > 0 {
        let rows = x.size() / x.dim(-1).max(1) as usize;
        if rows < CUDA_MIN_ROWS as usize {
            return Some(format!("{rows} rows: MLX's CUDA qmv (deterministic below {CUDA_MIN_ROWS} rows) is faster"));
        }
    }
    qmv_linear_unsupported_for(x.dtype(), w)
}

/// From this many rows MLX's CUDA `quantized_matmul` runs its tiled `qmm_sm80` kernel, which
/// races (HANDOFF, Known bugs); below it, its deterministic mat-vec.
pub const CUDA_MIN_ROWS: i32 = 8;

/// [`qmv_linear_unsupported`] for activations of `dtype` (what a pattern decides at patch time).
pub fn qmv_linear_unsupported_for(dtype: Dtype, w: &QWeight) -> Option<String> {
    if backend() == Backend::Metal {
        return Some("Metal backend (no Metal body yet)".into());
    }
    unsupported(dtype, &[w])
}

/// `quantized_matmul(x, w, transpose=true)` as one multi-threaded node, any number of rows
/// (decode and prefill); bit-identical on CPU. `x` `[..., K]` → `[..., N]`.
pub fn qmv_linear(x: &Array, w: &QWeight) -> Result<Array> {
    qmv_linear_class(x, w, KernelClass::Exact)
}

/// [`qmv_linear`] with the chosen CPU row kernels (`Fast`: reassociated, not bit-exact).
pub fn qmv_linear_class(x: &Array, w: &QWeight, class: KernelClass) -> Result<Array> {
    // The kernel runs any row count; skipping CUDA decode rows is the pattern's choice.
    if let Some(why) = qmv_linear_unsupported_for(x.dtype(), w) {
        bail!("qmv_linear: {why}");
    }
    if backend() == Backend::Cuda {
        // One expert: w as [1, N, K'] and every row on slot 0 (the body reads no indices for
        // one expert, so a one-element placeholder stands in for them: no extra launch).
        let k = x.dim(-1);
        let t = (x.size() / k.max(1) as usize) as i32;
        let n = w.weight.dim(0);
        let one = |a: &Array| a.reshape(&[1, n, a.dim(1)]);
        let ew = QWeight { weight: one(&w.weight)?, scales: one(&w.scales)?, biases: one(&w.biases)?, q: w.q };
        let idx = Array::from_slice(&[0u32], &[1, 1]);
        let y = super::qmv_grouped::qmv_grouped_cuda(&x.reshape(&[t, 1, k])?, &idx, &ew, None)?;
        let mut shape = x.shape().to_vec();
        *shape.last_mut().unwrap() = n;
        return Ok(y.reshape(&shape)?);
    }
    // The node takes x of any rank and returns [..., N] (no reshape nodes around it).
    Ok(raw_array(|res, s| unsafe {
        let f = if class == KernelClass::Fast { zmlx_cpu_qmv_linear_fast } else { zmlx_cpu_qmv_linear };
        f(res, x.as_ptr(), w.weight.as_ptr(), w.scales.as_ptr(), w.biases.as_ptr(), w.q.group_size, w.q.bits, s)
    })?)
}

/// Selftest cases for one dtype and bit width (CPU and CUDA): one expert of the `qmv_combine`
/// case's down projection as a dense `[2048, 768]` weight, one row and 40 rows.
pub fn selftest(dt: Dtype, bits: i32, out: &mut Vec<CaseResult>) -> Result<()> {
    if backend() == Backend::Metal {
        return Ok(());
    }
    let d = qweight(16, 2048, 768, bits, 63, dt)?;
    let lw = QWeight {
        weight: d.weight.take_axis(Array::from_int(0), 0)?,
        scales: d.scales.take_axis(Array::from_int(0), 0)?,
        biases: d.biases.take_axis(Array::from_int(0), 0)?,
        q: d.q,
    };
    let hx = rand(&[1, 1, 768], 67, 1.0, dt)?;
    out.push(compare(
        "qmv_linear",
        format!("N=2048 K=768 {bits}-bit {dt:?}"),
        qmv_linear_reference(&hx, &lw).map(|a| vec![a]),
        qmv_linear(&hx, &lw).map(|a| vec![a]),
    ));
    // A 40-row prefill, against the reference and row by row against each row alone.
    let x = rand(&[40, 768], 71, 1.0, dt)?;
    out.push(compare(
        "qmv_linear",
        format!("T=40 N=2048 K=768 {bits}-bit {dt:?}"),
        qmv_linear_reference(&x, &lw).map(|a| vec![a]),
        qmv_linear(&x, &lw).map(|a| vec![a]),
    ));
    out.push(compare(
        "qmv_linear",
        format!("token invariance T=40 vs T=1 {bits}-bit {dt:?}"),
        per_row(&[&x], |a| qmv_linear(&a[0], &lw)).map(|a| vec![a]),
        qmv_linear(&x, &lw).map(|a| vec![a]),
    ));
    Ok(())
}
