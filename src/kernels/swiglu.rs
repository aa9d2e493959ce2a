//! `swiglu`: `silu(gate) * up` in one node instead of three ops (the `swiglu_mlp` pattern's
//! activation). Reference: `moe::swiglu` (mlx-lm's `(gate * sigmoid(gate)) * up`).
//! CPU: `zmlx_cpu_swiglu` (kernels/cpu/zmlx_cpu.cpp), bit-identical; CUDA: kernels/cuda/swiglu.cu
//! (bit-identical on the H100); Metal: kernels/metal/swiglu.metal.
use std::ffi::c_int;

use anyhow::{bail, Result};
use mlx_rs::{Array, Dtype};

use super::check::{compare, rand, CaseResult};
use super::gpu::{pick, GpuKernel, TemplateArg};
use super::{backend, check_float, threads_for, CUDA_HEADER};
use crate::mlx_env::{raw_array, Backend};

extern "C" {
    fn zmlx_cpu_swiglu(
        res: *mut mlx_sys::mlx_array,
        gate: mlx_sys::mlx_array,
        up: mlx_sys::mlx_array,
        s: mlx_sys::mlx_stream,
    ) -> c_int;
}

/// Stock composition: `(gate * sigmoid(gate)) * up`.
pub fn swiglu_reference(gate: &Array, up: &Array) -> Result<Array> {
    crate::moe::swiglu(gate, up)
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
            let n = gate.size();
            let out = pick(b, &SWIGLU_CUDA, &SWIGLU_METAL).apply(
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

/// Selftest cases for one dtype: decode, prefill and odd shapes.
pub fn selftest(dt: Dtype, out: &mut Vec<CaseResult>) -> Result<()> {
    for (i, shape) in [vec![1, 1, 8, 1, 768], vec![1, 64, 8, 1, 768], vec![3, 17, 130]].iter().enumerate() {
        let g = rand(shape, i as u64, 3.0, dt)?;
        let u = rand(shape, 100 + i as u64, 1.0, dt)?;
        out.push(compare(
            "swiglu",
            format!("{shape:?} {dt:?}"),
            swiglu_reference(&g, &u).map(|a| vec![a]),
            swiglu(&g, &u).map(|a| vec![a]),
        ));
    }
    Ok(())
}
