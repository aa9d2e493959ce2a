//! `rms_norm`: mlx.nn.RMSNorm (`fast::rms_norm(x, w, eps)`) as one graph node — the `rms_norm`
//! pattern's kernel. Reference: `nn::RmsNorm::forward` (on the CPU MLX 0.32 runs it as a fallback
//! of ~10 op nodes). CPU only: `zmlx_cpu_rms_norm` (kernels/cpu/zmlx_rms_norm.cpp, the row in
//! rms_norm_row.h, shared with `gqa_attention`'s q/k norms): the same sequential sum of squares,
//! scale by `(float)(1/n)`, `rsqrt`, and two rounded multiplies, so it is bit-identical. On GPUs
//! `fast::rms_norm` is already one fused kernel.
use anyhow::{bail, Result};
use mlx_rs::{Array, Dtype};

use super::backend;
use super::check::{compare, rand, CaseResult};
use crate::mlx_env::{raw_array, Backend};
use crate::nn::RmsNorm;

extern "C" {
    fn zmlx_cpu_rms_norm(
        res: *mut mlx_sys::mlx_array,
        x: mlx_sys::mlx_array,
        w: mlx_sys::mlx_array,
        eps: f32,
        st: mlx_sys::mlx_stream,
    ) -> std::ffi::c_int;
}

/// Stock composition: mlx.nn.RMSNorm.
pub fn rms_norm_reference(x: &Array, norm: &RmsNorm) -> Result<Array> {
    norm.forward(x)
}

/// Why the kernel does not apply (None: it does): CPU, float32 activations and weight.
pub fn rms_norm_unsupported(x: &Array, norm: &RmsNorm) -> Option<String> {
    if backend() != Backend::Cpu {
        return Some(format!("{} backend (CPU-only kernel; fast::rms_norm is fused there)", backend().name()));
    }
    if x.dtype() != Dtype::Float32 || norm.weight.dtype() != Dtype::Float32 {
        return Some(format!(
            "{:?} activations / {:?} weight (the CPU kernel is bit-exact for float32)",
            x.dtype(),
            norm.weight.dtype()
        ));
    }
    None
}

/// `norm.forward(x)` as one node; bit-identical on the CPU. `x` `[..., D]`.
pub fn rms_norm(x: &Array, norm: &RmsNorm) -> Result<Array> {
    if let Some(why) = rms_norm_unsupported(x, norm) {
        bail!("rms_norm: {why}");
    }
    Ok(raw_array(|res, s| unsafe { zmlx_cpu_rms_norm(res, x.as_ptr(), norm.weight.as_ptr(), norm.eps, s) })?)
}

/// Selftest cases (CPU only): a decode row and a prefill block at hidden 2048, a wide-range row.
pub fn selftest(out: &mut Vec<CaseResult>) -> Result<()> {
    if backend() != Backend::Cpu {
        return Ok(());
    }
    let norm = RmsNorm { weight: rand(&[2048], 71, 1.0, Dtype::Float32)?, eps: 1e-6 };
    for (shape, scale, seed) in
        [(&[1, 1, 2048][..], 1.0, 72), (&[1, 40, 2048][..], 1.0, 73), (&[2, 3, 2048][..], 1e3, 74)]
    {
        let x = rand(shape, seed, scale, Dtype::Float32)?;
        out.push(compare(
            "rms_norm",
            format!("{shape:?} scale {scale}"),
            rms_norm_reference(&x, &norm).map(|a| vec![a]),
            rms_norm(&x, &norm).map(|a| vec![a]),
        ));
    }
    Ok(())
}
