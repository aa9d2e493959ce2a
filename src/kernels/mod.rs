//! Fused kernels. Each has a reference made of MLX ops (the stock composition), a CPU
//! implementation (an MLX primitive in kernels/cpu/, one graph node), a CUDA body
//! (kernels/cuda/, run through MLX's cuda_kernel) and a Metal body (kernels/metal/, same
//! algorithm and reduction order as the CUDA one). The entry point picks by backend.
pub mod experts;
pub mod gpu;
pub mod rope;

use std::ffi::c_int;
use std::sync::OnceLock;

use anyhow::{bail, Result};
use mlx_rs::ops::indexing::{Ellipsis, NewAxis, TryIndexOp};
use mlx_rs::{ops, Array, Dtype};

use crate::mlx_env::{raw_array, Backend};
use gpu::{GpuKernel, TemplateArg};

extern "C" {
    fn zmlx_cpu_swiglu(
        res: *mut mlx_sys::mlx_array,
        gate: mlx_sys::mlx_array,
        up: mlx_sys::mlx_array,
        s: mlx_sys::mlx_stream,
    ) -> c_int;
    fn zmlx_cpu_moe_combine(
        res: *mut mlx_sys::mlx_array,
        y: mlx_sys::mlx_array,
        w: mlx_sys::mlx_array,
        s: mlx_sys::mlx_stream,
    ) -> c_int;
}

const CUDA_HEADER: &str = include_str!("../../kernels/cuda/header.cuh");

/// The backend of the loaded libmlx (fixed for the process).
pub fn backend() -> Backend {
    static B: OnceLock<Backend> = OnceLock::new();
    *B.get_or_init(Backend::detect)
}

/// Opt-in for GPU kernels whose results are within tolerance but not bit-identical to the stock
/// ops there (`qmv_swiglu`, `qmv_combine`, `rope_decode`): patterns fall back without it.
pub const GPU_EXPERIMENTAL_VAR: &str = "ZMLX_GPU_EXPERIMENTAL";

pub fn gpu_experimental() -> bool {
    crate::settings::switch_var(GPU_EXPERIMENTAL_VAR, false)
}

fn check_float(op: &str, a: &Array) -> Result<()> {
    if !matches!(a.dtype(), Dtype::Float32 | Dtype::Float16 | Dtype::Bfloat16) {
        bail!("{op}: expected float32, float16 or bfloat16, got {:?}", a.dtype());
    }
    Ok(())
}

fn threads_for(n: usize) -> i32 {
    n.clamp(1, 256) as i32
}

/// MLX's CUDA block size for `threads` wanted threads (`dispatch_block_dim`): the next of
/// 32, 64, ..., 1024.
fn cuda_block_dim(threads: i32) -> i32 {
    let mut bd = 32;
    while bd < threads && bd < 1024 {
        bd *= 2;
    }
    bd
}

// ---------------------------------------------------------------- swiglu

/// Stock composition: `(gate * sigmoid(gate)) * up`.
pub fn swiglu_reference(gate: &Array, up: &Array) -> Result<Array> {
    Ok(gate.multiply(ops::sigmoid(gate)?)?.multiply(up)?)
}

static SWIGLU_CUDA: GpuKernel = GpuKernel {
    name: "zmlx_swiglu",
    inputs: &["gate", "up"],
    outputs: &["out"],
    source: include_str!("../../kernels/cuda/swiglu.cu"),
    header: CUDA_HEADER,
};

static SWIGLU_METAL: GpuKernel = GpuKernel {
    name: "zmlx_swiglu",
    inputs: &["gate", "up"],
    outputs: &["out"],
    source: include_str!("../../kernels/metal/swiglu.metal"),
    header: "",
};

/// Fused `silu(gate) * up`, bit-identical to [`swiglu_reference`] on CPU.
pub fn swiglu(gate: &Array, up: &Array) -> Result<Array> {
    check_float("swiglu", gate)?;
    if gate.shape() != up.shape() || gate.dtype() != up.dtype() {
        bail!("swiglu: gate {:?} {:?} and up {:?} {:?} must match", gate.shape(), gate.dtype(), up.shape(), up.dtype());
    }
    match backend() {
        Backend::Cpu => Ok(raw_array(|res, s| unsafe { zmlx_cpu_swiglu(res, gate.as_ptr(), up.as_ptr(), s) })?),
        b => {
            let k = if b == Backend::Cuda { &SWIGLU_CUDA } else { &SWIGLU_METAL };
            let n = gate.size();
            let out = k.apply(
                b,
                &[gate, up],
                &[("T", TemplateArg::Dtype(gate.dtype()))],
                (n as i32, 1, 1),
                (threads_for(n), 1, 1),
                &[(gate.shape(), gate.dtype())],
            )?;
            Ok(out.into_iter().next().unwrap())
        }
    }
}

// ---------------------------------------------------------------- moe_combine

/// How the combine accumulates (`ZMLX_COMBINE_MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CombineMode {
    /// Products rounded to the activation dtype, summed in it (MLX 0.32.2's CPU `sum`).
    Act,
    /// Products and sum in float32 (FMA allowed on GPUs), cast back.
    F32,
    /// Products rounded to float32, then added without FMA, cast back.
    F32NoFma,
}

impl CombineMode {
    pub const NAMES: [&'static str; 3] = ["act", "f32", "f32_no_fma"];

    pub fn parse(s: &str) -> Result<CombineMode> {
        Ok(match s {
            "act" => CombineMode::Act,
            "f32" => CombineMode::F32,
            "f32_no_fma" => CombineMode::F32NoFma,
            other => bail!("ZMLX_COMBINE_MODE={other}: expected one of {}", Self::NAMES.join(", ")),
        })
    }

    fn index(self) -> i32 {
        match self {
            CombineMode::Act => 0,
            CombineMode::F32 => 1,
            CombineMode::F32NoFma => 2,
        }
    }
}

/// Stock composition: `(y * w[..., None]).sum(-2)` in the promoted dtype.
pub fn moe_combine_reference(y: &Array, w: &Array) -> Result<Array> {
    Ok(ops::sum_axis(y.multiply(w.try_index((Ellipsis, NewAxis))?)?, -2, false)?)
}

static COMBINE_CUDA: GpuKernel = GpuKernel {
    name: "zmlx_moe_combine",
    inputs: &["y", "w"],
    outputs: &["out"],
    source: include_str!("../../kernels/cuda/moe_combine.cu"),
    header: CUDA_HEADER,
};

static COMBINE_METAL: GpuKernel = GpuKernel {
    name: "zmlx_moe_combine",
    inputs: &["y", "w"],
    outputs: &["out"],
    source: include_str!("../../kernels/metal/moe_combine.metal"),
    header: "",
};

/// Fused weighted sum of the k expert outputs: `y` `[..., k, D]`, `w` `[..., k]` → `[..., D]`
/// in the promoted dtype. `Act` is bit-identical to [`moe_combine_reference`] on CPU.
pub fn moe_combine(y: &Array, w: &Array, mode: CombineMode) -> Result<Array> {
    moe_combine_acc(y, w, mode, 0)
}

/// [`moe_combine`] with another GPU act-mode accumulation (`acc`: 0 running sum in T, 1 running
/// sum in float, 2 one warp tree over the k slots in T): probes run by `zmlx selftest` on GPUs to
/// learn which one MLX's reduction matches.
pub fn moe_combine_acc(y: &Array, w: &Array, mode: CombineMode, acc: i32) -> Result<Array> {
    check_float("moe_combine", y)?;
    check_float("moe_combine", w)?;
    if y.ndim() < 2 || w.ndim() + 1 != y.ndim() || y.shape()[..w.ndim()] != *w.shape() {
        bail!("moe_combine: expected y [..., k, D] and w [..., k], got {:?} and {:?}", y.shape(), w.shape());
    }
    let t = if y.dtype() == w.dtype() { y.dtype() } else { Dtype::Float32 };
    match (backend(), mode) {
        (Backend::Cpu, CombineMode::Act) => {
            Ok(raw_array(|res, s| unsafe { zmlx_cpu_moe_combine(res, y.as_ptr(), w.as_ptr(), s) })?)
        }
        (Backend::Cpu, _) => {
            // Products rounded to f32 and summed in order: the act kernel on f32 inputs.
            let (yf, wf) = (y.as_dtype(Dtype::Float32)?, w.as_dtype(Dtype::Float32)?);
            let out = raw_array(|res, s| unsafe { zmlx_cpu_moe_combine(res, yf.as_ptr(), wf.as_ptr(), s) })?;
            Ok(out.as_dtype(t)?)
        }
        (b, mode) => {
            let kern = if b == Backend::Cuda { &COMBINE_CUDA } else { &COMBINE_METAL };
            let (yt, wt) = (y.as_dtype(t)?, w.as_dtype(t)?);
            let (k, d) = (y.dim(-2), y.dim(-1));
            let mut shape = y.shape().to_vec();
            shape.remove(shape.len() - 2);
            let n = shape.iter().map(|&x| x as usize).product::<usize>();
            let template = [
                ("T", TemplateArg::Dtype(t)),
                ("K", TemplateArg::Int(k)),
                ("D", TemplateArg::Int(d)),
                ("MODE", TemplateArg::Int(mode.index())),
                ("ACC", TemplateArg::Int(acc)),
            ];
            let (grid, group) = if acc == 2 {
                if k > 32 || b != Backend::Cuda {
                    bail!("moe_combine: the warp-tree probe needs CUDA and k <= 32");
                }
                ((n as i32 * 32, 1, 1), (256, 1, 1))
            } else {
                ((n as i32, 1, 1), (threads_for(n), 1, 1))
            };
            let out = kern.apply(b, &[&yt, &wt], &template, grid, group, &[(&shape, t)])?;
            Ok(out.into_iter().next().unwrap())
        }
    }
}

// ---------------------------------------------------------------- moe_router

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

/// Softmax-family routing semantics (moe-families.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterKind {
    /// Mixtral: top-k of the raw logits (descending), softmax over the k selected.
    TopKThenSoftmax,
    /// Qwen3-MoE: softmax over all experts, top-k ascending, optional renormalisation.
    SoftmaxThenTopK { norm: bool },
    /// Qwen2-MoE: softmax over all experts, top-k descending, never renormalised.
    SoftmaxThenTopKDesc,
}

impl RouterKind {
    fn code(self) -> (c_int, bool) {
        match self {
            RouterKind::TopKThenSoftmax => (0, false),
            RouterKind::SoftmaxThenTopK { norm } => (1, norm),
            RouterKind::SoftmaxThenTopKDesc => (2, false),
        }
    }
}

/// Stock composition (mlx-lm's op chain): `(indices uint32 [.., k], weights [.., k])`.
pub fn moe_router_reference(logits: &Array, kind: RouterKind, k: i32) -> Result<(Array, Array)> {
    use mlx_rs::stop_gradient;
    Ok(match kind {
        RouterKind::TopKThenSoftmax => {
            let inds =
                stop_gradient(&ops::argpartition_axis(logits.negative()?, k - 1, -1)?.try_index((Ellipsis, ..k))?)?;
            let w = ops::softmax_axis(logits.take_along_axis(&inds, -1)?, -1, true)?;
            (inds, w)
        }
        RouterKind::SoftmaxThenTopK { norm } => {
            let p = ops::softmax_axis(logits, -1, true)?;
            let inds = stop_gradient(&ops::argpartition_axis(&p, -k, -1)?.try_index((Ellipsis, -k..))?)?;
            let mut w = p.take_along_axis(&inds, -1)?;
            if norm {
                w = w.divide(ops::sum_axis(&w, -1, true)?)?;
            }
            (inds, w)
        }
        RouterKind::SoftmaxThenTopKDesc => {
            let p = ops::softmax_axis(logits, -1, true)?;
            let inds = stop_gradient(&ops::argpartition_axis(p.negative()?, k - 1, -1)?.try_index((Ellipsis, ..k))?)?;
            (inds.clone(), p.take_along_axis(&inds, -1)?)
        }
    })
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
    let (code, norm) = kind.code();
    match backend() {
        Backend::Cpu => {
            let mut w = unsafe { mlx_sys::mlx_array_new() };
            let idx =
                raw_array(|res, s| unsafe { zmlx_cpu_moe_router(res, &mut w, logits.as_ptr(), code, k, norm, s) });
            let w = unsafe { Array::from_ptr(w) };
            Ok((idx?, w))
        }
        b => {
            let kern = if b == Backend::Cuda { &ROUTER_CUDA } else { &ROUTER_METAL };
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
            let out =
                kern.apply(b, &[logits], &template, grid, group, &[(&shape, Dtype::Uint32), (&shape, logits.dtype())])?;
            let mut it = out.into_iter();
            Ok((it.next().unwrap(), it.next().unwrap()))
        }
    }
}

// ---------------------------------------------------------------- sigmoid_router (deepseek_router)

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

/// DeepSeek-V3 / Kimi-K2 / GLM routing parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SigmoidRouting {
    pub k: i32,
    pub n_group: i32,
    pub topk_group: i32,
    pub norm_topk_prob: bool,
    /// GLM-4.7-Flash: `w / (sum + eps)`.
    pub renorm_eps: Option<f32>,
    pub routed_scaling_factor: f32,
}

/// Stock composition (mlx-lm's group_expert_select): `(indices uint32, weights f32)`.
pub fn sigmoid_router_reference(gates: &Array, bias: &Array, p: &SigmoidRouting) -> Result<(Array, Array)> {
    use mlx_rs::stop_gradient;
    let orig = ops::sigmoid(gates.as_dtype(Dtype::Float32)?)?;
    let mut scores = orig.add(bias)?;
    if p.n_group > 1 {
        scores = ops::unflatten(&scores, -1, &[p.n_group, -1])?;
        let group_scores = ops::sum_axis(ops::indexing::topk_axis(&scores, 2, -1)?, -1, true)?;
        let drop = p.n_group - p.topk_group;
        if drop > 0 {
            let group_idx = ops::argpartition_axis(&group_scores, drop - 1, -2)?.try_index((Ellipsis, ..drop, ..))?;
            scores = ops::indexing::put_along_axis(&scores, stop_gradient(&group_idx)?, Array::from_f32(0.0), -2)?;
        }
        scores = scores.flatten(-2, -1)?;
    }
    let k = p.k;
    let indices = stop_gradient(&ops::argpartition_axis(scores.negative()?, k - 1, -1)?.try_index((Ellipsis, ..k))?)?;
    let mut weights = orig.take_along_axis(&indices, -1)?;
    if k > 1 && p.norm_topk_prob {
        let mut den = ops::sum_axis(&weights, -1, true)?;
        if let Some(eps) = p.renorm_eps {
            den = den.add(Array::from_f32(eps))?;
        }
        weights = weights.divide(&den)?;
    }
    Ok((indices, weights.multiply(Array::from_f32(p.routed_scaling_factor))?))
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
            let kern = if b == Backend::Cuda { &SIGMOID_ROUTER_CUDA } else { &SIGMOID_ROUTER_METAL };
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
            // CUDA: one warp per row (lane 0 selects, all lanes sum like MLX's row reduction).
            let (grid, group) = if b == Backend::Cuda {
                if p.k > 128 {
                    bail!("sigmoid_router: k = {} > 128 is not supported by the CUDA body", p.k);
                }
                ((rows as i32 * 32, 1, 1), (32, 1, 1))
            } else {
                ((rows as i32, 1, 1), (threads_for(rows), 1, 1))
            };
            let out = kern.apply(
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
