//! Expert kernels for quantized SwitchGLU experts (decode; prefill groups tokens by expert):
//! - `qmv_swiglu`: gathered gate and up mat-vecs + SwiGLU in one node → `h` `[T, k, I]`;
//! - `qmv_combine`: gathered down mat-vec fused with the weighted combine → `[T, D]`; the
//!   `[T, k, D]` expert outputs are never materialised.
//!
//! CPU: bit-identical to the stock ops (gather_qmm → swiglu → gather_qmm → `(y*w).sum(-2)`) for
//! float32 activations (kernels/cpu/zmlx_qmv.cpp says why); CUDA/Metal: float accumulation,
//! within a tolerance of the reference (not bit-identical).
use std::ffi::c_int;

use anyhow::{bail, Result};
use mlx_rs::{ops, Array, Dtype};

use super::gpu::{GpuKernel, TemplateArg};
use super::{backend, moe_combine_reference, swiglu_reference, threads_for, CUDA_HEADER};
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
    #[allow(clippy::too_many_arguments)]
    fn zmlx_cpu_qmv_combine(
        res: *mut mlx_sys::mlx_array,
        h: mlx_sys::mlx_array,
        idx: mlx_sys::mlx_array,
        w: mlx_sys::mlx_array,
        wd: mlx_sys::mlx_array,
        sd: mlx_sys::mlx_array,
        bd: mlx_sys::mlx_array,
        group_size: c_int,
        bits: c_int,
        s: mlx_sys::mlx_stream,
    ) -> c_int;
}

/// Why a decode-step expert kernel does not apply to these weights/activations (None: it does).
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
        _ if weights.iter().any(|w| w.scales.dtype() != x_dtype) => {
            Some("scales dtype differs from the activations".into())
        }
        _ => None,
    }
}

/// Stock composition of `qmv_swiglu`: `x` `[T, K]`, `idx` `[T, k]` → `[T, k, I]`.
pub fn qmv_swiglu_reference(x: &Array, idx: &Array, gate: &QWeight, up: &QWeight) -> Result<Array> {
    let xe = x.expand_dims_axes(&[-2, -3])?; // [T, 1, 1, K]
    let mm = |w: &QWeight| {
        ops::gather_qmm(&xe, &w.weight, &w.scales, &w.biases, None, idx, true, w.q.group_size, w.q.bits, false)
    };
    let (u, g) = (mm(up)?, mm(gate)?);
    Ok(swiglu_reference(&g, &u)?.squeeze_axes(&[-2])?)
}

/// Stock composition of `qmv_combine`: `h` `[T, k, I]`, `idx`/`w` `[T, k]` → `[T, D]`.
pub fn qmv_combine_reference(h: &Array, idx: &Array, w: &Array, down: &QWeight) -> Result<Array> {
    let y = ops::gather_qmm(
        h.expand_dims(-2)?,
        &down.weight,
        &down.scales,
        &down.biases,
        None,
        idx,
        true,
        down.q.group_size,
        down.q.bits,
        false,
    )?;
    moe_combine_reference(&y.squeeze_axes(&[-2])?, w)
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
static COMBINE_CUDA: GpuKernel = GpuKernel {
    name: "zmlx_qmv_combine",
    inputs: &["h", "idx", "w", "wd", "sd", "bd"],
    outputs: &["out"],
    source: include_str!("../../kernels/cuda/qmv_combine.cu"),
    header: CUDA_HEADER,
};
static COMBINE_METAL: GpuKernel = GpuKernel {
    name: "zmlx_qmv_combine",
    inputs: &["h", "idx", "w", "wd", "sd", "bd"],
    outputs: &["out"],
    source: include_str!("../../kernels/metal/qmv_combine.metal"),
    header: "",
};

fn check_shapes(op: &str, x: &Array, idx: &Array) -> Result<()> {
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

/// Fused gathered gate/up mat-vecs + SwiGLU: `x` `[T, K]`, `idx` `[T, k]` → `h` `[T, k, I]`.
pub fn qmv_swiglu(x: &Array, idx: &Array, gate: &QWeight, up: &QWeight) -> Result<Array> {
    check_shapes("qmv_swiglu", x, idx)?;
    if let Some(why) = unsupported(x.dtype(), &[gate, up]) {
        bail!("qmv_swiglu: {why}");
    }
    let (q, n, e) = (gate.q, gate.weight.dim(1), gate.weight.dim(0));
    match backend() {
        Backend::Cpu => Ok(raw_array(|res, s| unsafe {
            zmlx_cpu_qmv_swiglu(
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
        b => {
            let kern = if b == Backend::Cuda { &SWIGLU_CUDA } else { &SWIGLU_METAL };
            let (t, k) = (idx.dim(0), idx.dim(1));
            let total = (t * k * n) as usize;
            let template = [
                ("T", TemplateArg::Dtype(x.dtype())),
                ("K", TemplateArg::Int(x.dim(-1))),
                ("N", TemplateArg::Int(n)),
                ("KSEL", TemplateArg::Int(k)),
                ("GS", TemplateArg::Int(q.group_size)),
                ("BITS", TemplateArg::Int(q.bits)),
                ("E", TemplateArg::Int(e)),
            ];
            let ins = [x, idx, &gate.weight, &gate.scales, &gate.biases, &up.weight, &up.scales, &up.biases];
            let out = kern.apply(
                b,
                &ins,
                &template,
                (total as i32, 1, 1),
                (threads_for(total), 1, 1),
                &[(&[t, k, n], x.dtype())],
            )?;
            Ok(out.into_iter().next().unwrap())
        }
    }
}

/// Fused gathered down mat-vec + weighted combine: `h` `[T, k, I]`, `idx`/`w` `[T, k]` →
/// `[T, D]` in `promote(h, w)` (float32 on CPU).
pub fn qmv_combine(h: &Array, idx: &Array, w: &Array, down: &QWeight) -> Result<Array> {
    check_shapes("qmv_combine", h, idx)?;
    if h.ndim() != 3 || w.shape() != idx.shape() {
        bail!("qmv_combine: expected h [T, k, I] and weights [T, k], got {:?} and {:?}", h.shape(), w.shape());
    }
    if let Some(why) = unsupported(h.dtype(), &[down]) {
        bail!("qmv_combine: {why}");
    }
    let (q, n, e) = (down.q, down.weight.dim(1), down.weight.dim(0));
    match backend() {
        Backend::Cpu => {
            if w.dtype() != Dtype::Float32 {
                bail!("qmv_combine: the CPU kernel needs float32 combine weights, got {:?}", w.dtype());
            }
            Ok(raw_array(|res, s| unsafe {
                zmlx_cpu_qmv_combine(
                    res,
                    h.as_ptr(),
                    idx.as_ptr(),
                    w.as_ptr(),
                    down.weight.as_ptr(),
                    down.scales.as_ptr(),
                    down.biases.as_ptr(),
                    q.group_size,
                    q.bits,
                    s,
                )
            })?)
        }
        b => {
            let kern = if b == Backend::Cuda { &COMBINE_CUDA } else { &COMBINE_METAL };
            let (t, k) = (idx.dim(0), idx.dim(1));
            let out_dtype = if h.dtype() == w.dtype() { h.dtype() } else { Dtype::Float32 };
            let wf = w.as_dtype(Dtype::Float32)?;
            let total = (t * n) as usize;
            let template = [
                ("T", TemplateArg::Dtype(h.dtype())),
                ("O", TemplateArg::Dtype(out_dtype)),
                ("K", TemplateArg::Int(h.dim(-1))),
                ("N", TemplateArg::Int(n)),
                ("KSEL", TemplateArg::Int(k)),
                ("GS", TemplateArg::Int(q.group_size)),
                ("BITS", TemplateArg::Int(q.bits)),
                ("E", TemplateArg::Int(e)),
            ];
            let ins = [h, idx, &wf, &down.weight, &down.scales, &down.biases];
            let out = kern.apply(
                b,
                &ins,
                &template,
                (total as i32, 1, 1),
                (threads_for(total), 1, 1),
                &[(&[t, n], out_dtype)],
            )?;
            Ok(out.into_iter().next().unwrap())
        }
    }
}

/// Why `qmv_linear` does not apply to this call (None: it does). CPU only: on GPUs MLX's own
/// quantized matmul is already a tuned kernel.
pub fn qmv_linear_unsupported(x: &Array, w: &QWeight) -> Option<String> {
    if backend() != Backend::Cpu {
        return Some(format!("{} backend (CPU-only kernel)", backend().name()));
    }
    unsupported(x.dtype(), &[w])
}

/// `quantized_matmul(x, w, transpose=true)` as one multi-threaded node, any number of rows
/// (decode and prefill); bit-identical on CPU. `x` `[..., K]` → `[..., N]`.
pub fn qmv_linear(x: &Array, w: &QWeight) -> Result<Array> {
    if let Some(why) = qmv_linear_unsupported(x, w) {
        bail!("qmv_linear: {why}");
    }
    let k = x.dim(-1);
    let rows = (x.size() / k.max(1) as usize) as i32;
    let x2 = x.reshape(&[rows, k])?;
    let out = raw_array(|res, s| unsafe {
        zmlx_cpu_qmv_linear(
            res,
            x2.as_ptr(),
            w.weight.as_ptr(),
            w.scales.as_ptr(),
            w.biases.as_ptr(),
            w.q.group_size,
            w.q.bits,
            s,
        )
    })?;
    let mut shape = x.shape().to_vec();
    *shape.last_mut().unwrap() = w.weight.dim(0);
    Ok(out.reshape(&shape)?)
}
