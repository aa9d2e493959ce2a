//! `qmv_linear`: `quantized_matmul(x, W, transpose=true)` of a dense projection as one
//! multi-threaded node, any number of rows (decode and prefill): the `qmv_linear` pattern's
//! kernel. Reference: `nn::quantized_matmul` (QuantizedLinear). CPU only:
//! `zmlx_cpu_qmv_linear` (kernels/cpu/zmlx_qmv.cpp + qmv_rows.inc), each output row keeps
//! `_qmm_t`'s exact sequential sum, so it is bit-identical; on GPUs MLX's own quantized matmul is
//! already a tuned kernel.
use std::ffi::c_int;

use anyhow::{bail, Result};
use mlx_rs::{Array, Dtype};

use super::check::{compare, qweight, rand, CaseResult};
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

/// Why `qmv_linear` does not apply to this call (None: it does). CPU only: on GPUs MLX's own
/// quantized matmul is already a tuned kernel.
pub fn qmv_linear_unsupported(x: &Array, w: &QWeight) -> Option<String> {
    qmv_linear_unsupported_for(x.dtype(), w)
}

/// [`qmv_linear_unsupported`] for activations of `dtype` (what a pattern decides at patch time).
pub fn qmv_linear_unsupported_for(dtype: Dtype, w: &QWeight) -> Option<String> {
    if backend() != Backend::Cpu {
        return Some(format!("{} backend (CPU-only kernel)", backend().name()));
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
    if let Some(why) = qmv_linear_unsupported(x, w) {
        bail!("qmv_linear: {why}");
    }
    // The node takes x of any rank and returns [..., N] (no reshape nodes around it).
    Ok(raw_array(|res, s| unsafe {
        let f = if class == KernelClass::Fast { zmlx_cpu_qmv_linear_fast } else { zmlx_cpu_qmv_linear };
        f(res, x.as_ptr(), w.weight.as_ptr(), w.scales.as_ptr(), w.biases.as_ptr(), w.q.group_size, w.q.bits, s)
    })?)
}

/// Selftest case for one dtype and bit width (CPU only): one expert of the `qmv_combine` case's
/// down projection as a dense `[2048, 768]` weight.
pub fn selftest(dt: Dtype, bits: i32, out: &mut Vec<CaseResult>) -> Result<()> {
    if backend() != Backend::Cpu {
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
    Ok(())
}
