//! `moe_router`: softmax-family routing (softmax + top-k + renormalisation, Mixtral/Qwen
//! semantics, the stock slot order) in one node (the `moe_mlp` pattern's router). Reference:
//! `moe::softmax_route`. CPU: `zmlx_cpu_moe_router` (kernels/cpu/zmlx_cpu.cpp), bit-identical;
//! CUDA: kernels/cuda/moe_router.cu (bit-identical on the H100); Metal:
//! kernels/metal/moe_router.metal.
use std::ffi::c_int;

use anyhow::{bail, Result};
use mlx_rs::{ops, Array, Dtype};

pub use crate::moe::RouterKind;

use super::check::{compare, rand, CaseResult};
use super::gpu::{pick, GpuKernel, TemplateArg};
use super::{backend, check_float, cuda_block_dim, threads_for, CUDA_HEADER};
use crate::mlx_env::{raw_array, Backend};

extern "C" {
    fn zmlx_cpu_moe_router(
        indices: *mut mlx_sys::mlx_array,
        weights: *mut mlx_sys::mlx_array,
        logits: mlx_sys::mlx_array,
        kind: c_int,
        k: c_int,
        norm: bool,
        s: mlx_sys::mlx_stream,
    ) -> c_int;
}

/// The kernels' `KIND` code and renormalisation flag for a routing kind.
fn code(kind: RouterKind) -> (c_int, bool) {
    match kind {
        RouterKind::TopKThenSoftmax => (0, false),
        RouterKind::SoftmaxThenTopK { norm } => (1, norm),
        RouterKind::SoftmaxThenTopKDesc => (2, false),
    }
}

/// Stock composition (mlx-lm's op chain): `(indices uint32 [.., k], weights [.., k])`.
pub fn moe_router_reference(logits: &Array, kind: RouterKind, k: i32) -> Result<(Array, Array)> {
    crate::moe::softmax_route(logits, kind, k)
}

static ROUTER_CUDA: GpuKernel = GpuKernel {
    name: "zmlx_moe_router",
    inputs: &["logits"],
    outputs: &["indices", "weights"],
    source: include_str!("../../kernels/cuda/moe_router.cu"),
    header: CUDA_HEADER,
};

static ROUTER_METAL: GpuKernel = GpuKernel {
    name: "zmlx_moe_router",
    inputs: &["logits"],
    outputs: &["indices", "weights"],
    source: include_str!("../../kernels/metal/moe_router.metal"),
    header: "",
};

/// Fused softmax-family router over gate logits `[.., E]`; on CPU the same indices, slot order
/// and weights (bit for bit) as [`moe_router_reference`].
pub fn moe_router(logits: &Array, kind: RouterKind, k: i32) -> Result<(Array, Array)> {
    check_float("moe_router", logits)?;
    let e = if logits.ndim() > 0 { logits.dim(-1) } else { 0 };
    if k < 1 || k > e {
        bail!("moe_router: k = {k} must be between 1 and the number of experts ({e})");
    }
    let (code, norm) = code(kind);
    match backend() {
        Backend::Cpu => {
            let mut w = unsafe { mlx_sys::mlx_array_new() };
            let idx =
                raw_array(|res, s| unsafe { zmlx_cpu_moe_router(res, &mut w, logits.as_ptr(), code, k, norm, s) });
            let w = unsafe { Array::from_ptr(w) };
            Ok((idx?, w))
        }
        b => {
            let mut shape = logits.shape().to_vec();
            *shape.last_mut().unwrap() = k;
            let rows = logits.size() / e as usize;
            let mut template = vec![
                ("T", TemplateArg::Dtype(logits.dtype())),
                ("E", TemplateArg::Int(e)),
                ("K", TemplateArg::Int(k)),
                ("KIND", TemplateArg::Int(code)),
                ("NORM", TemplateArg::Bool(norm)),
            ];
            // Metal: one thread per row. CUDA: one block per row, shaped like MLX's softmax
            // kernel for the softmax length (the body says why).
            let (grid, group) = if b == Backend::Cuda {
                let reads = 16 / logits.item_size() as i32;
                super::check_cuda_top_k("moe_router", e)?;
                if norm && k > 32 * reads {
                    bail!("moe_router: k = {k} > {} is not supported by the CUDA body", 32 * reads);
                }
                let softmax_len = if code == 0 { k } else { e };
                let bd = cuda_block_dim((softmax_len + reads - 1) / reads);
                template.push(("BD", TemplateArg::Int(bd)));
                template.push(("NR", TemplateArg::Int(reads)));
                ((rows as i32 * bd, 1, 1), (bd, 1, 1))
            } else {
                ((rows as i32, 1, 1), (threads_for(rows), 1, 1))
            };
            let out = pick(b, &ROUTER_CUDA, &ROUTER_METAL).apply(
                b,
                &[logits],
                &template,
                grid,
                group,
                &[(&shape, Dtype::Uint32), (&shape, logits.dtype())],
            )?;
            let mut it = out.into_iter();
            Ok((it.next().unwrap(), it.next().unwrap()))
        }
    }
}

const KINDS: [RouterKind; 3] =
    [RouterKind::TopKThenSoftmax, RouterKind::SoftmaxThenTopK { norm: true }, RouterKind::SoftmaxThenTopKDesc];

/// Selftest cases for one dtype: every kind on decode/prefill shapes, exact ties, a long
/// softmax, and (CPU) NaN/inf logits.
pub fn selftest(dt: Dtype, out: &mut Vec<CaseResult>) -> Result<()> {
    // The last two: many exact ties (logits on a 0.5 grid), and a softmax long enough for a
    // multi-warp block on CUDA with a 3-chunk renormalising sum.
    for (i, (rows, e, k)) in [(1, 8, 2), (1, 128, 8), (40, 64, 4), (16, 64, 8), (2, 512, 10)].iter().enumerate() {
        let mut logits = rand(&[1, *rows, *e], 30 + i as u64, 3.0, dt)?;
        if i == 3 {
            logits = ops::round(&logits.multiply(Array::from_f32(2.0))?, None)?
                .divide(Array::from_f32(2.0))?
                .as_dtype(dt)?;
        }
        for kind in KINDS {
            let want = moe_router_reference(&logits, kind, *k).map(|(a, b)| vec![a, b]);
            let got = moe_router(&logits, kind, *k).map(|(a, b)| vec![a, b]);
            out.push(compare("moe_router", format!("{kind:?} rows={rows} E={e} k={k} {dt:?}"), want, got));
        }
    }
    // NaN, +-inf, -0 and extreme logits (the CPU tests' specials). CPU only for now: the
    // H100 run that included it did not finish within 300 s (HANDOFF.md, session 3).
    if backend() == Backend::Cpu {
        let mut v = rand(&[1, 4, 16], 35, 2.0, Dtype::Float32)?.as_slice::<f32>().to_vec();
        for (i, x) in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 88.0, -88.0, 1e-30].into_iter().enumerate() {
            v[i * 9] = x;
        }
        let special = Array::from_slice(&v, &[1, 4, 16]).as_dtype(dt)?;
        for kind in KINDS {
            let want = moe_router_reference(&special, kind, 4).map(|(a, b)| vec![a, b]);
            let got = moe_router(&special, kind, 4).map(|(a, b)| vec![a, b]);
            out.push(compare("moe_router", format!("{kind:?} nan/inf rows=4 E=16 k=4 {dt:?}"), want, got));
        }
    }
    Ok(())
}
