//! `qmv_combine`: for quantized SwitchGLU experts, the gathered down mat-vec fused with the
//! weighted combine → `[T, D]`; the `[T, k, D]` expert outputs are never materialised (decode;
//! prefill groups the (token, slot) pairs by expert). The `downproj_combine` pattern's kernel.
//! Reference: gather_qmm → `moe::weighted_sum`. CPU: `zmlx_cpu_qmv_combine`
//! (kernels/cpu/zmlx_qmv.cpp + qmv_rows.inc), bit-identical for float32 activations;
//! CUDA/Metal: kernels/{cuda,metal}/qmv_combine.*, one block per output row, a warp (simdgroup)
//! per slot, the k slot dots summed in slot order: deterministic and independent of the token
//! count, within a tolerance (class validated; opt-in). Calls above `qmv_swiglu::GPU_MAX_TOKENS`
//! tokens: on CUDA the grouped expert dots (`qmv_grouped.cu`) then the same slot sum
//! (`qmv_slot_sum.cu`), so a token's output does not depend on the form; on Metal stock.
use std::ffi::c_int;

use anyhow::{bail, Result};
use mlx_rs::{ops, Array, Dtype};

use super::check::{compare, per_row, qweight, rand, spread_indices, CaseResult};
use super::gpu::{pick, GpuKernel, TemplateArg};
use super::qmv_swiglu::{check_shapes, unsupported};
use super::{backend, KernelClass, CUDA_HEADER};
use crate::mlx_env::{raw_array, Backend};
use crate::nn::QWeight;

extern "C" {
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
    #[allow(clippy::too_many_arguments)]
    fn zmlx_cpu_qmv_combine_fast(
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
    crate::moe::weighted_sum(&y.squeeze_axes(&[-2])?, w)
}

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

static SLOT_SUM_CUDA: GpuKernel = GpuKernel {
    name: "zmlx_qmv_slot_sum",
    inputs: &["y", "w"],
    outputs: &["out"],
    source: include_str!("../../kernels/cuda/qmv_slot_sum.cu"),
    header: CUDA_HEADER,
};

/// Fused gathered down mat-vec + weighted combine: `h` `[T, k, I]`, `idx`/`w` `[T, k]` →
/// `[T, D]` in `promote(h, w)` (float32 on CPU).
pub fn qmv_combine(h: &Array, idx: &Array, w: &Array, down: &QWeight) -> Result<Array> {
    qmv_combine_class(h, idx, w, down, KernelClass::Exact)
}

/// [`qmv_combine`] with the chosen CPU row kernels (`Fast`: not bit-exact; GPUs ignore the class).
pub fn qmv_combine_class(h: &Array, idx: &Array, w: &Array, down: &QWeight, class: KernelClass) -> Result<Array> {
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
                let f = if class == KernelClass::Fast { zmlx_cpu_qmv_combine_fast } else { zmlx_cpu_qmv_combine };
                f(
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
            let (t, k) = (idx.dim(0), idx.dim(1));
            let out_dtype = if h.dtype() == w.dtype() { h.dtype() } else { Dtype::Float32 };
            // The weights travel in the output dtype (no conversion op when they already are:
            // bf16 activations with bf16 routing weights, or float32 weights); the body widens
            // them to float exactly.
            let wo = if w.dtype() == out_dtype { w.clone() } else { w.as_dtype(out_dtype)? };
            if b == Backend::Cuda && t > super::qmv_swiglu::GPU_MAX_TOKENS {
                let y = super::qmv_grouped::qmv_grouped_cuda(h, idx, down, None)?;
                let grid = super::qmv_swiglu::gpu_grid("qmv_combine", &[t, n])?;
                let template = [
                    ("T", TemplateArg::Dtype(h.dtype())),
                    ("O", TemplateArg::Dtype(out_dtype)),
                    ("N", TemplateArg::Int(n)),
                    ("KSEL", TemplateArg::Int(k)),
                ];
                let out = SLOT_SUM_CUDA.apply(
                    b,
                    &[&y, &wo],
                    &template,
                    (grid, 1, 1),
                    (super::threads_for(grid as usize), 1, 1),
                    &[(&[t, n], out_dtype)],
                )?;
                return Ok(out.into_iter().next().unwrap());
            }
            // One block per output row, a warp per slot (up to 8 warps).
            let warps_per_row = (k as u32).next_power_of_two().min(8) as i32;
            let grid = super::qmv_swiglu::gpu_grid("qmv_combine", &[t, n, 32, warps_per_row])?;
            // The combine body also takes its output dtype `O`, right after `T`.
            let mut template = super::qmv_swiglu::quantized_template(h.dtype(), h.dim(-1), n, k, q, e);
            template.insert(1, ("O", TemplateArg::Dtype(out_dtype)));
            let ins = [h, idx, &wo, &down.weight, &down.scales, &down.biases];
            let out = pick(b, &COMBINE_CUDA, &COMBINE_METAL).apply(
                b,
                &ins,
                &template,
                (grid, 1, 1),
                (32 * warps_per_row, 1, 1),
                &[(&[t, n], out_dtype)],
            )?;
            Ok(out.into_iter().next().unwrap())
        }
    }
}

/// Selftest case for one dtype and bit width (decode step, E=16 D=2048 I=768 k=4).
pub fn selftest(dt: Dtype, bits: i32, out: &mut Vec<CaseResult>) -> Result<()> {
    let d = qweight(16, 2048, 768, bits, 63, dt)?;
    let idx = Array::from_slice(&[1u32, 5, 9, 15], &[1, 4]);
    let w = ops::softmax_axis(rand(&[1, 4], 65, 1.0, Dtype::Float32)?, -1, true)?;
    let h = rand(&[1, 4, 768], 66, 1.0, dt)?;
    out.push(compare(
        "qmv_combine",
        format!("E=16 D=2048 I=768 k=4 {bits}-bit {dt:?}"),
        qmv_combine_reference(&h, &idx, &w, &d).map(|a| vec![a]),
        qmv_combine(&h, &idx, &w, &d).map(|a| vec![a]),
    ));
    // A 40-token prefill (CUDA: grouped dots + slot sum), against the reference and, token by
    // token, against each token alone (the decode form).
    let idx = spread_indices(40, 4, 16);
    let w = ops::softmax_axis(rand(&[40, 4], 69, 1.0, Dtype::Float32)?, -1, true)?;
    let h = rand(&[40, 4, 768], 70, 1.0, dt)?;
    out.push(compare(
        "qmv_combine",
        format!("T=40 E=16 D=2048 I=768 k=4 {bits}-bit {dt:?}"),
        qmv_combine_reference(&h, &idx, &w, &d).map(|a| vec![a]),
        qmv_combine(&h, &idx, &w, &d).map(|a| vec![a]),
    ));
    out.push(compare(
        "qmv_combine",
        format!("token invariance T=40 vs T=1 {bits}-bit {dt:?}"),
        per_row(&[&h, &idx, &w], |a| qmv_combine(&a[0], &a[1], &a[2], &d)).map(|a| vec![a]),
        qmv_combine(&h, &idx, &w, &d).map(|a| vec![a]),
    ));
    Ok(())
}
