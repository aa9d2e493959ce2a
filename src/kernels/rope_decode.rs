//! `rope_decode`: the MLA decode step's positional part in one kernel — RoPE of `q_pe`
//! (`[B, H, L, R]`, then × the softmax scale, as the stock `pe_scores` does) and of `k_pe`
//! (`[B, 1, L, R]`), including YaRN's pre-scale. In mlx-lm ≥ 0.30.6's MLA layout the rotated
//! parts are not concatenated with the latents (k_pe is cached separately and enters SDPA as an
//! additive score), so the "concat" of the original's `glm47_rope` becomes this scale fusion.
//! The `glm47_rope` pattern's kernel. Reference: `attention_mla::rope_pe` (the stock step).
//! CPU: `zmlx_cpu_rope_decode` (kernels/cpu/zmlx_rope.cpp), bit-identical to the stock chain;
//! CUDA/Metal: kernels/{cuda,metal}/rope_decode.*, MLX's rope formula, float cos/sin (not
//! claimed bit-identical to MLX's GPU rope kernels; opt-in `ZMLX_GPU_EXPERIMENTAL`).
use std::ffi::c_int;

use anyhow::{bail, Result};
use mlx_rs::{ops, Array, Dtype};

use super::check::{compare, rand, CaseResult};
use super::gpu::{pick, GpuKernel, TemplateArg};
use super::{backend, check_float, threads_for, CUDA_HEADER};
use crate::mlx_env::{raw_array, Backend};
use crate::nn::Rope;

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn zmlx_cpu_rope_decode(
        q_out: *mut mlx_sys::mlx_array,
        k_out: *mut mlx_sys::mlx_array,
        q: mlx_sys::mlx_array,
        k: mlx_sys::mlx_array,
        freqs: mlx_sys::mlx_array,
        has_freqs: bool,
        dims: c_int,
        traditional: bool,
        base: f32,
        scale: f32,
        offset: c_int,
        has_mscale: bool,
        mscale: f32,
        q_scale: f32,
        s: mlx_sys::mlx_stream,
    ) -> c_int;
}

/// Stock chain: `(rope(q_pe) * q_scale, rope(k_pe))` with the model's `Rope`.
pub fn rope_decode_reference(
    q_pe: &Array,
    k_pe: &Array,
    rope: &Rope,
    offset: i32,
    q_scale: f32,
) -> Result<(Array, Array)> {
    crate::attention_mla::rope_pe(q_pe, k_pe, rope, offset, q_scale)
}

static CUDA: GpuKernel = GpuKernel {
    name: "zmlx_rope_decode",
    inputs: &["q", "k", "inv_freq", "params"],
    outputs: &["q_out", "k_out"],
    source: include_str!("../../kernels/cuda/rope_decode.cu"),
    header: CUDA_HEADER,
};
static METAL: GpuKernel = GpuKernel {
    name: "zmlx_rope_decode",
    inputs: &["q", "k", "inv_freq", "params"],
    outputs: &["q_out", "k_out"],
    source: include_str!("../../kernels/metal/rope_decode.metal"),
    header: "",
};

/// Fused `(rope(q_pe) * q_scale, rope(k_pe))`.
pub fn rope_decode(q_pe: &Array, k_pe: &Array, rope: &Rope, offset: i32, q_scale: f32) -> Result<(Array, Array)> {
    check_float("rope_decode", q_pe)?;
    if q_pe.ndim() != 4 || k_pe.ndim() != 4 || q_pe.dtype() != k_pe.dtype() || q_pe.dim(2) != k_pe.dim(2) {
        bail!(
            "rope_decode: expected q_pe [B, H, L, R] and k_pe [B, 1, L, R] of one dtype, got {:?} and {:?}",
            q_pe.shape(),
            k_pe.shape()
        );
    }
    let mscale = rope.pre_scale.map(|m| m as f32);
    match backend() {
        Backend::Cpu => {
            let none = Array::from_f32(0.0);
            let freqs = rope.freqs.as_ref().unwrap_or(&none);
            let mut k_out = unsafe { mlx_sys::mlx_array_new() };
            let q_out = raw_array(|res, s| unsafe {
                zmlx_cpu_rope_decode(
                    res,
                    &mut k_out,
                    q_pe.as_ptr(),
                    k_pe.as_ptr(),
                    freqs.as_ptr(),
                    rope.freqs.is_some(),
                    rope.dims,
                    rope.traditional,
                    rope.base,
                    rope.scale,
                    offset,
                    mscale.is_some(),
                    mscale.unwrap_or(1.0),
                    q_scale,
                    s,
                )
            });
            let k_out = unsafe { Array::from_ptr(k_out) };
            Ok((q_out?, k_out))
        }
        b => {
            let half = rope.dims / 2;
            let inv_freq = match &rope.freqs {
                Some(f) => ops::reciprocal(f.as_dtype(Dtype::Float32)?)?,
                None => {
                    let c = Array::from_f32(rope.base.ln() / half as f32);
                    ops::exp(ops::arange::<_, f32>(0.0, -(half as f64), -1.0)?.multiply(&c)?)?
                }
            };
            let params = Array::from_slice(&[rope.scale, mscale.unwrap_or(1.0), q_scale, offset as f32], &[4]);
            let kern = pick(b, &CUDA, &METAL);
            let total = q_pe.size() + k_pe.size();
            let template = [
                ("T", TemplateArg::Dtype(q_pe.dtype())),
                ("DIMS", TemplateArg::Int(rope.dims)),
                ("TRAD", TemplateArg::Bool(rope.traditional)),
                ("HAS_MSCALE", TemplateArg::Bool(mscale.is_some())),
            ];
            let out = kern.apply(
                b,
                &[q_pe, k_pe, &inv_freq, &params],
                &template,
                (total as i32, 1, 1),
                (threads_for(total), 1, 1),
                &[(q_pe.shape(), q_pe.dtype()), (k_pe.shape(), k_pe.dtype())],
            )?;
            let mut it = out.into_iter();
            Ok((it.next().unwrap(), it.next().unwrap()))
        }
    }
}

/// Selftest cases for one dtype: traditional (MLA) and half-split rotation, a late offset.
pub fn selftest(dt: Dtype, out: &mut Vec<CaseResult>) -> Result<()> {
    for (name, r) in [
        ("base 1e6 traditional", Rope::plain(64, true, 1_000_000.0)),
        ("base 1e4 half-split", Rope::plain(64, false, 10_000.0)),
    ] {
        let q = rand(&[1, 20, 1, 64], 68, 2.0, dt)?;
        let k = rand(&[1, 1, 1, 64], 69, 2.0, dt)?;
        out.push(compare(
            "rope_decode",
            format!("{name} offset 777 {dt:?}"),
            rope_decode_reference(&q, &k, &r, 777, 0.07).map(|(a, b)| vec![a, b]),
            rope_decode(&q, &k, &r, 777, 0.07).map(|(a, b)| vec![a, b]),
        ));
    }
    Ok(())
}
