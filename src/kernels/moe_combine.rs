//! `moe_combine`: the weighted sum of the k expert outputs in one node (the `moe_mlp` pattern's
//! combine). Reference: `moe::weighted_sum` (`(y * w[..., None]).sum(-2)`).
//! CPU: `zmlx_cpu_moe_combine` (kernels/cpu/zmlx_cpu.cpp), act mode bit-identical; CUDA:
//! kernels/cuda/moe_combine.cu (float32 bit-identical on the H100); Metal:
//! kernels/metal/moe_combine.metal.
use std::ffi::c_int;

use anyhow::{bail, Result};
use mlx_rs::{ops, Array, Dtype};

use super::check::{compare, rand, CaseResult};
use super::gpu::{pick, GpuKernel, TemplateArg};
use super::{backend, check_float, threads_for, CUDA_HEADER};
use crate::mlx_env::{raw_array, Backend};

extern "C" {
    fn zmlx_cpu_moe_combine(
        res: *mut mlx_sys::mlx_array,
        y: mlx_sys::mlx_array,
        w: mlx_sys::mlx_array,
        s: mlx_sys::mlx_stream,
    ) -> c_int;
}

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
    crate::moe::weighted_sum(y, w)
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
            let out =
                pick(b, &COMBINE_CUDA, &COMBINE_METAL).apply(b, &[&yt, &wt], &template, grid, group, &[(&shape, t)])?;
            Ok(out.into_iter().next().unwrap())
        }
    }
}

/// Selftest cases for one dtype: act mode, the CUDA accumulation probes, f32_no_fma.
pub fn selftest(dt: Dtype, out: &mut Vec<CaseResult>) -> Result<()> {
    for (i, (lead, k, d)) in [(vec![1, 1], 8, 2048), (vec![1, 64], 4, 2048), (vec![2, 3], 1, 64)].iter().enumerate() {
        let y = rand(&[lead.clone(), vec![*k, *d]].concat(), 10 + i as u64, 1.0, dt)?;
        let w = ops::softmax_axis(rand(&[lead.clone(), vec![*k]].concat(), 20 + i as u64, 2.0, dt)?, -1, true)?;
        let want = moe_combine_reference(&y, &w).map(|a| vec![a]);
        out.push(compare(
            "moe_combine",
            format!("act {lead:?} k={k} D={d} {dt:?}"),
            want,
            moe_combine(&y, &w, CombineMode::Act).map(|a| vec![a]),
        ));
        if backend() == Backend::Cuda && dt != Dtype::Float32 {
            for (acc, what) in [(1, "float running sum"), (2, "warp tree in T")] {
                out.push(compare(
                    "moe_combine",
                    format!("act probe: {what} {lead:?} k={k} D={d} {dt:?}"),
                    moe_combine_reference(&y, &w).map(|a| vec![a]),
                    moe_combine_acc(&y, &w, CombineMode::Act, acc).map(|a| vec![a]),
                ));
            }
        }
        let want32 = moe_combine_reference(&y.as_dtype(Dtype::Float32)?, &w.as_dtype(Dtype::Float32)?)
            .and_then(|a| Ok(vec![a.as_dtype(dt)?]));
        out.push(compare(
            "moe_combine",
            format!("f32_no_fma {lead:?} k={k} D={d} {dt:?}"),
            want32,
            moe_combine(&y, &w, CombineMode::F32NoFma).map(|a| vec![a]),
        ));
    }
    Ok(())
}
