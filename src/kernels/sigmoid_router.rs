//! `sigmoid_router`: DeepSeek-V3 / Kimi-K2 / GLM routing (sigmoid, correction bias for
//! selection, group-limited top-k, renormalised weights × routed_scaling_factor) in one node
//! (the `deepseek_router` pattern). Reference: `moe::group_expert_select`. CPU:
//! `zmlx_cpu_sigmoid_router` (kernels/cpu/zmlx_cpu.cpp), bit-identical; CUDA:
//! kernels/cuda/sigmoid_router.cu (bit-identical on the H100); Metal:
//! kernels/metal/sigmoid_router.metal.
use std::ffi::c_int;

use anyhow::{bail, Result};
use mlx_rs::{ops, Array, Dtype};

pub use crate::moe::SigmoidRouting;

use super::check::{compare, rand, CaseResult};
use super::gpu::{pick, GpuKernel, TemplateArg};
use super::{backend, check_float, threads_for, CUDA_HEADER};
use crate::mlx_env::{raw_array, Backend};

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn zmlx_cpu_sigmoid_router(
        indices: *mut mlx_sys::mlx_array,
        weights: *mut mlx_sys::mlx_array,
        logits: mlx_sys::mlx_array,
        bias: mlx_sys::mlx_array,
        k: c_int,
        n_group: c_int,
        topk_group: c_int,
        norm: bool,
        eps: f32,
        has_eps: bool,
        rsf: f32,
        s: mlx_sys::mlx_stream,
    ) -> c_int;
}

/// Stock composition (mlx-lm's group_expert_select): `(indices uint32, weights f32)`.
pub fn sigmoid_router_reference(gates: &Array, bias: &Array, p: &SigmoidRouting) -> Result<(Array, Array)> {
    crate::moe::group_expert_select(gates, bias, p)
}

static SIGMOID_ROUTER_CUDA: GpuKernel = GpuKernel {
    name: "zmlx_sigmoid_router",
    inputs: &["logits", "bias"],
    outputs: &["indices", "weights"],
    source: include_str!("../../kernels/cuda/sigmoid_router.cu"),
    header: CUDA_HEADER,
};

static SIGMOID_ROUTER_METAL: GpuKernel = GpuKernel {
    name: "zmlx_sigmoid_router",
    inputs: &["logits", "bias"],
    outputs: &["indices", "weights"],
    source: include_str!("../../kernels/metal/sigmoid_router.metal"),
    header: "",
};

/// Fused [`sigmoid_router_reference`]; on CPU the same indices, slot order and weights, bit for bit.
pub fn sigmoid_router(gates: &Array, bias: &Array, p: &SigmoidRouting) -> Result<(Array, Array)> {
    check_float("sigmoid_router", gates)?;
    let e = if gates.ndim() > 0 { gates.dim(-1) } else { 0 };
    if p.k < 1 || p.k > e || p.n_group < 1 || e % p.n_group != 0 || p.topk_group < 1 || p.topk_group > p.n_group {
        bail!(
            "sigmoid_router: need 1 <= k <= E, n_group | E and 1 <= topk_group <= n_group (k {}, E {e}, groups {}/{})",
            p.k,
            p.n_group,
            p.topk_group
        );
    }
    match backend() {
        Backend::Cpu => {
            let mut w = unsafe { mlx_sys::mlx_array_new() };
            let idx = raw_array(|res, s| unsafe {
                zmlx_cpu_sigmoid_router(
                    res,
                    &mut w,
                    gates.as_ptr(),
                    bias.as_ptr(),
                    p.k,
                    p.n_group,
                    p.topk_group,
                    p.norm_topk_prob,
                    p.renorm_eps.unwrap_or(0.0),
                    p.renorm_eps.is_some(),
                    p.routed_scaling_factor,
                    s,
                )
            });
            let w = unsafe { Array::from_ptr(w) };
            Ok((idx?, w))
        }
        b => {
            if b == Backend::Cuda {
                super::check_cuda_top_k("sigmoid_router", e)?;
            }
            let mut shape = gates.shape().to_vec();
            *shape.last_mut().unwrap() = p.k;
            let rows = gates.size() / e as usize;
            let bias = bias.as_dtype(Dtype::Float32)?;
            let template = [
                ("T", TemplateArg::Dtype(gates.dtype())),
                ("E", TemplateArg::Int(e)),
                ("K", TemplateArg::Int(p.k)),
                ("NG", TemplateArg::Int(p.n_group)),
                ("TG", TemplateArg::Int(p.topk_group)),
                ("NORM", TemplateArg::Bool(p.norm_topk_prob)),
                ("HAS_EPS", TemplateArg::Bool(p.renorm_eps.is_some())),
            ];
            // eps and rsf are runtime values: pass them as a tiny input would need a new kernel
            // signature; the body reads them from the two trailing elements of `bias`.
            let extra = Array::from_slice(&[p.renorm_eps.unwrap_or(0.0), p.routed_scaling_factor], &[2]);
            let bias_ext = ops::concatenate(&[bias, extra], 0)?;
            // CUDA: one warp per row (the warp selects and sums like MLX's row reduction).
            let (grid, group) = if b == Backend::Cuda {
                if p.k > 128 {
                    bail!("sigmoid_router: k = {} > 128 is not supported by the CUDA body", p.k);
                }
                ((rows as i32 * 32, 1, 1), (32, 1, 1))
            } else {
                ((rows as i32, 1, 1), (threads_for(rows), 1, 1))
            };
            let out = pick(b, &SIGMOID_ROUTER_CUDA, &SIGMOID_ROUTER_METAL).apply(
                b,
                &[gates, &bias_ext],
                &template,
                grid,
                group,
                &[(&shape, Dtype::Uint32), (&shape, Dtype::Float32)],
            )?;
            let mut it = out.into_iter();
            Ok((it.next().unwrap(), it.next().unwrap()))
        }
    }
}

/// Selftest cases for one dtype: grouped (DeepSeek-V3), ungrouped with eps (GLM-4.7-Flash), wide.
pub fn selftest(dt: Dtype, out: &mut Vec<CaseResult>) -> Result<()> {
    for (i, (e, k, ng, tg)) in [(256, 8, 8, 4), (64, 4, 1, 1), (384, 8, 1, 1)].iter().enumerate() {
        let logits = rand(&[1, 3, *e], 40 + i as u64, 2.0, dt)?;
        let bias = rand(&[*e], 50 + i as u64, 0.1, Dtype::Float32)?;
        let p = SigmoidRouting {
            k: *k,
            n_group: *ng,
            topk_group: *tg,
            norm_topk_prob: true,
            renorm_eps: if i == 1 { Some(1e-20) } else { None },
            routed_scaling_factor: 2.5,
        };
        let want = sigmoid_router_reference(&logits, &bias, &p).map(|(a, b)| vec![a, b]);
        let got = sigmoid_router(&logits, &bias, &p).map(|(a, b)| vec![a, b]);
        out.push(compare("sigmoid_router", format!("E={e} k={k} groups {ng}/{tg} {dt:?}"), want, got));
    }
    Ok(())
}
