//! `qmv_swiglu`: for quantized SwitchGLU experts, the gathered gate and up mat-vecs + SwiGLU in
//! one node → `h` `[T, k, I]` (decode; prefill groups the (token, slot) pairs by expert). The
//! `swiglu_mlp` pattern's expert path. Reference: gather_qmm → `moe::swiglu` (SwitchGLU's ops).
//! CPU: `zmlx_cpu_qmv_swiglu` (kernels/cpu/zmlx_qmv.cpp + qmv_rows.inc), bit-identical for
//! float32 activations (zmlx_qmv.cpp says why); CUDA/Metal: kernels/{cuda,metal}/qmv_swiglu.*,
//! one warp (simdgroup) per output row, float accumulation and a fixed-order warp sum:
//! deterministic and independent of the token count, within a tolerance of gather_qmm (class
//! validated, not bit-identical; opt-in `ZMLX_GPU_EXPERIMENTAL`). Those decode bodies read a
//! weight row once per (token, slot); calls above [`GPU_MAX_TOKENS`] tokens run, on CUDA, the
//! grouped form (kernels/cuda/qmv_grouped.cu: the pairs sorted by expert, a row read once per
//! chunk of pairs, each pair's arithmetic the decode body's, so tokens do not depend on the
//! form); on Metal (no grouped body yet) they stay stock ([`gpu_tokens_unsupported`]).
use std::ffi::c_int;

use anyhow::{bail, Result};
use mlx_rs::{ops, Array, Dtype};

use super::check::{compare, per_row, qweight, rand, spread_indices, CaseResult};
use super::gpu::{pick, GpuKernel, TemplateArg};
use super::{backend, threads_for, KernelClass, CUDA_HEADER};
use crate::config::QuantParams;
use crate::mlx_env::{raw_array, Backend};
use crate::nn::QWeight;

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn zmlx_cpu_qmv_swiglu(
        res: *mut mlx_sys::mlx_array,
        x: mlx_sys::mlx_array,
        idx: mlx_sys::mlx_array,
        wg: mlx_sys::mlx_array,
        sg: mlx_sys::mlx_array,
        bg: mlx_sys::mlx_array,
        wu: mlx_sys::mlx_array,
        su: mlx_sys::mlx_array,
        bu: mlx_sys::mlx_array,
        group_size: c_int,
        bits: c_int,
        s: mlx_sys::mlx_stream,
    ) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn zmlx_cpu_qmv_swiglu_fast(
        res: *mut mlx_sys::mlx_array,
        x: mlx_sys::mlx_array,
        idx: mlx_sys::mlx_array,
        wg: mlx_sys::mlx_array,
        sg: mlx_sys::mlx_array,
        bg: mlx_sys::mlx_array,
        wu: mlx_sys::mlx_array,
        su: mlx_sys::mlx_array,
        bu: mlx_sys::mlx_array,
        group_size: c_int,
        bits: c_int,
        s: mlx_sys::mlx_stream,
    ) -> c_int;
}

/// Why a quantized expert kernel (`qmv_swiglu`, `qmv_combine`, `qmv_linear`) does not apply to
/// these weights/activations (None: it does).
pub fn unsupported(x_dtype: Dtype, weights: &[&QWeight]) -> Option<String> {
    let q = weights[0].q;
    if weights.iter().any(|w| w.q != q) {
        return Some("gate/up/down quantized with different bits or group sizes".into());
    }
    if ![2, 4, 8].contains(&q.bits) {
        return Some(format!("{}-bit weights (kernel has 2/4/8)", q.bits));
    }
    match backend() {
        b @ (Backend::Cuda | Backend::Metal) if !super::gpu_experimental() => {
            Some(format!("not bit-exact on {} (set {}=1 to run it anyway)", b.name(), super::GPU_EXPERIMENTAL_VAR))
        }
        Backend::Cpu if x_dtype != Dtype::Float32 => {
            Some(format!("{x_dtype:?} activations (the CPU kernel is bit-exact for float32 only)"))
        }
        // The CPU row kernels read f32/bf16/f16 scales as stored and widen them exactly, as
        // MLX's promotion to the f32 activations does.
        Backend::Cpu => weights.iter().find_map(|w| {
            if !matches!(w.scales.dtype(), Dtype::Float32 | Dtype::Bfloat16 | Dtype::Float16) {
                Some(format!("{:?} scales (the CPU kernel reads float32, bfloat16 or float16)", w.scales.dtype()))
            } else if w.biases.dtype() != w.scales.dtype() {
                Some("scales and biases differ in dtype".into())
            } else {
                None
            }
        }),
        _ if weights.iter().any(|w| w.scales.dtype() != x_dtype) => {
            Some("scales dtype differs from the activations".into())
        }
        _ => None,
    }
}

/// The most tokens per call the GPU decode bodies of `qmv_swiglu`/`qmv_combine` take; larger
/// calls run the grouped form on CUDA and stay stock on Metal.
pub const GPU_MAX_TOKENS: i32 = 8;

/// Why a GPU expert kernel is not used for a call of `t` tokens (None: it is); the CPU kernels
/// and CUDA's grouped form take any count.
pub fn gpu_tokens_unsupported(t: i32) -> Option<String> {
    (backend() == Backend::Metal && t > GPU_MAX_TOKENS)
        .then(|| format!("{t} tokens in one call (the Metal expert kernels are for decode, <= {GPU_MAX_TOKENS})"))
}

/// A GPU launch's thread count (the product of `dims`), if it fits MLX's int grid.
pub(super) fn gpu_grid(op: &str, dims: &[i32]) -> Result<i32> {
    let n = dims.iter().map(|&d| d as i64).product::<i64>();
    match i32::try_from(n) {
        Ok(g) if g > 0 => Ok(g),
        _ => bail!("{op}: a launch of {n} threads (shape {dims:?}) does not fit the GPU grid"),
    }
}

/// The template arguments every quantized expert body takes, in their signature's order:
/// activation dtype `T`, input width `K`, output rows `N`, selected experts `KSEL`, the
/// quantization (`GS`, `BITS`) and the expert count `E`.
pub(super) fn quantized_template(
    t: Dtype,
    k: i32,
    n: i32,
    ksel: i32,
    q: QuantParams,
    e: i32,
) -> Vec<(&'static str, TemplateArg)> {
    vec![
        ("T", TemplateArg::Dtype(t)),
        ("K", TemplateArg::Int(k)),
        ("N", TemplateArg::Int(n)),
        ("KSEL", TemplateArg::Int(ksel)),
        ("GS", TemplateArg::Int(q.group_size)),
        ("BITS", TemplateArg::Int(q.bits)),
        ("E", TemplateArg::Int(e)),
    ]
}

/// `x` `[T, ..., K]` and uint32 `idx` `[T, k]` (shared with `qmv_combine`).
pub(super) fn check_shapes(op: &str, x: &Array, idx: &Array) -> Result<()> {
    if x.ndim() < 2 || idx.ndim() != 2 || idx.dim(0) != x.dim(0) || idx.dtype() != Dtype::Uint32 {
        bail!(
            "{op}: expected activations [T, ..., K] and uint32 indices [T, k], got {:?} and {:?} {:?}",
            x.shape(),
            idx.shape(),
            idx.dtype()
        );
    }
    Ok(())
}

/// Stock composition of `qmv_swiglu`: `x` `[T, K]`, `idx` `[T, k]` → `[T, k, I]`.
pub fn qmv_swiglu_reference(x: &Array, idx: &Array, gate: &QWeight, up: &QWeight) -> Result<Array> {
    let xe = x.expand_dims_axes(&[-2, -3])?; // [T, 1, 1, K]
    let mm = |w: &QWeight| {
        ops::gather_qmm(&xe, &w.weight, &w.scales, &w.biases, None, idx, true, w.q.group_size, w.q.bits, false)
    };
    let (u, g) = (mm(up)?, mm(gate)?);
    Ok(crate::moe::swiglu(&g, &u)?.squeeze_axes(&[-2])?)
}

static SWIGLU_CUDA: GpuKernel = GpuKernel {
    name: "zmlx_qmv_swiglu",
    inputs: &["x", "idx", "wg", "sg", "bg", "wu", "su", "bu"],
    outputs: &["out"],
    source: include_str!("../../kernels/cuda/qmv_swiglu.cu"),
    header: CUDA_HEADER,
};
static SWIGLU_METAL: GpuKernel = GpuKernel {
    name: "zmlx_qmv_swiglu",
    inputs: &["x", "idx", "wg", "sg", "bg", "wu", "su", "bu"],
    outputs: &["out"],
    source: include_str!("../../kernels/metal/qmv_swiglu.metal"),
    header: "",
};

/// Fused gathered gate/up mat-vecs + SwiGLU: `x` `[T, K]`, `idx` `[T, k]` → `h` `[T, k, I]`.
pub fn qmv_swiglu(x: &Array, idx: &Array, gate: &QWeight, up: &QWeight) -> Result<Array> {
    qmv_swiglu_class(x, idx, gate, up, KernelClass::Exact)
}

/// [`qmv_swiglu`] with the chosen CPU row kernels (`Fast`: not bit-exact; GPUs ignore the class).
pub fn qmv_swiglu_class(x: &Array, idx: &Array, gate: &QWeight, up: &QWeight, class: KernelClass) -> Result<Array> {
    check_shapes("qmv_swiglu", x, idx)?;
    if let Some(why) = unsupported(x.dtype(), &[gate, up]) {
        bail!("qmv_swiglu: {why}");
    }
    let (q, n, e) = (gate.q, gate.weight.dim(1), gate.weight.dim(0));
    match backend() {
        Backend::Cpu => Ok(raw_array(|res, s| unsafe {
            let f = if class == KernelClass::Fast { zmlx_cpu_qmv_swiglu_fast } else { zmlx_cpu_qmv_swiglu };
            f(
                res,
                x.as_ptr(),
                idx.as_ptr(),
                gate.weight.as_ptr(),
                gate.scales.as_ptr(),
                gate.biases.as_ptr(),
                up.weight.as_ptr(),
                up.scales.as_ptr(),
                up.biases.as_ptr(),
                q.group_size,
                q.bits,
                s,
            )
        })?),
        Backend::Cuda if idx.dim(0) > GPU_MAX_TOKENS => super::qmv_grouped::qmv_grouped_cuda(x, idx, gate, Some(up)),
        b => {
            let (t, k) = (idx.dim(0), idx.dim(1));
            let grid = gpu_grid("qmv_swiglu", &[t, k, n, 32])?;
            let template = quantized_template(x.dtype(), x.dim(-1), n, k, q, e);
            let ins = [x, idx, &gate.weight, &gate.scales, &gate.biases, &up.weight, &up.scales, &up.biases];
            let out = pick(b, &SWIGLU_CUDA, &SWIGLU_METAL).apply(
                b,
                &ins,
                &template,
                (grid, 1, 1),
                (threads_for(grid as usize), 1, 1),
                &[(&[t, k, n], x.dtype())],
            )?;
            Ok(out.into_iter().next().unwrap())
        }
    }
}

/// Selftest case for one dtype and bit width (decode step, E=16 D=2048 I=768 k=4).
pub fn selftest(dt: Dtype, bits: i32, out: &mut Vec<CaseResult>) -> Result<()> {
    let (g, u) = (qweight(16, 768, 2048, bits, 61, dt)?, qweight(16, 768, 2048, bits, 62, dt)?);
    let idx = Array::from_slice(&[1u32, 5, 9, 15], &[1, 4]);
    let x = rand(&[1, 2048], 64, 1.0, dt)?;
    out.push(compare(
        "qmv_swiglu",
        format!("E=16 D=2048 I=768 k=4 {bits}-bit {dt:?}"),
        qmv_swiglu_reference(&x, &idx, &g, &u).map(|a| vec![a]),
        qmv_swiglu(&x, &idx, &g, &u).map(|a| vec![a]),
    ));
    // A 40-token prefill (CUDA: the grouped form), against the reference and, token by token,
    // against each token alone (the decode form).
    let idx = spread_indices(40, 4, 16);
    let x = rand(&[40, 2048], 68, 1.0, dt)?;
    out.push(compare(
        "qmv_swiglu",
        format!("T=40 E=16 D=2048 I=768 k=4 {bits}-bit {dt:?}"),
        qmv_swiglu_reference(&x, &idx, &g, &u).map(|a| vec![a]),
        qmv_swiglu(&x, &idx, &g, &u).map(|a| vec![a]),
    ));
    out.push(compare(
        "qmv_swiglu",
        format!("token invariance T=40 vs T=1 {bits}-bit {dt:?}"),
        per_row(&[&x, &idx], |a| qmv_swiglu(&a[0], &a[1], &g, &u)).map(|a| vec![a]),
        qmv_swiglu(&x, &idx, &g, &u).map(|a| vec![a]),
    ));
    Ok(())
}
