//! Fused kernels, one module per kernel (candle's `CustomOp` shape). Each module holds, for its
//! op: the reference (the stock MLX-op chain it replaces, owned by the stock layer in `moe.rs`,
//! `attention_mla.rs` or `nn.rs` and only called from here), the CPU primitive binding (an MLX
//! primitive in `kernels/cpu/`, one graph node), the CUDA and Metal launches (bodies in
//! `kernels/cuda/<kernel>.cu` and `kernels/metal/<kernel>.metal`, same algorithm and reduction
//! order; their mlx-c objects are built once, see `gpu.rs`), and its `zmlx selftest` cases.
//!
//! | module | CPU entry (`kernels/cpu/`) | CUDA / Metal body |
//! |---|---|---|
//! | `swiglu` | `zmlx_cpu_swiglu` (zmlx_cpu.cpp) | `swiglu.cu` / `swiglu.metal` |
//! | `moe_combine` | `zmlx_cpu_moe_combine` (zmlx_cpu.cpp) | `moe_combine.cu` / `.metal` |
//! | `moe_router` | `zmlx_cpu_moe_router` (zmlx_cpu.cpp) | `moe_router.cu` / `.metal` |
//! | `sigmoid_router` | `zmlx_cpu_sigmoid_router` (zmlx_cpu.cpp) | `sigmoid_router.cu` / `.metal` |
//! | `qmv_swiglu` | `zmlx_cpu_qmv_swiglu` (zmlx_qmv.cpp + qmv_rows.inc) | `qmv_swiglu.cu` / `.metal` |
//! | `qmv_combine` | `zmlx_cpu_qmv_combine` (zmlx_qmv.cpp + qmv_rows.inc) | `qmv_combine.cu` / `.metal` |
//! | `qmv_linear` | `zmlx_cpu_qmv_linear` (zmlx_qmv.cpp + qmv_rows.inc) | none (CPU only) |
//! | `gqa_attention` | `zmlx_cpu_gqa_attention` (zmlx_attention.cpp) | none (CPU only) |
//! | `rope_decode` | `zmlx_cpu_rope_decode` (zmlx_rope.cpp) | `rope_decode.cu` / `.metal` |
//! | `rms_norm` | `zmlx_cpu_rms_norm` (zmlx_rms_norm.cpp + rms_norm_row.h) | none (CPU only) |
//! | `quantized_embedding` | `zmlx_cpu_quantized_embedding` (zmlx_embedding.cpp) | none (CPU only) |
//!
//! Layering: kernels depend on the stock layers (for the references and the weight types),
//! never the other way round; patterns (`patterns/`) depend on both.
//!
//! Adding a kernel `foo`: (1) the stock op chain it replaces stays in (or goes to) the stock
//! layer; (2) `kernels/cpu/` gets `zmlx_cpu_foo` (C++ files are compiled by build.rs) and
//! `kernels/cuda/foo.cu` / `kernels/metal/foo.metal` the GPU bodies; (3) `src/kernels/foo.rs`
//! declares the `extern "C"` binding, a `static …: GpuKernel = GpuKernel { name, inputs,
//! outputs, source: include_str!(…), header }` per GPU body (scripts/check_cuda_kernels.py reads
//! these; add the launched instantiations to its INSTANCES), `foo_reference` (calling the stock
//! chain), `foo` (dispatch by backend) and `selftest`; (4) one `pub mod` line here, one call in
//! `crate::selftest::run`, and its claim in `check::claims_exact`.
pub mod check;
pub mod gpu;
pub mod gqa_attention;
pub mod moe_combine;
pub mod moe_router;
pub mod qmv_combine;
pub mod qmv_grouped;
pub mod qmv_linear;
pub mod qmv_swiglu;
pub mod quantized_embedding;
pub mod rms_norm;
pub mod rope_decode;
pub mod sigmoid_router;
pub mod swiglu;

use anyhow::{bail, Result};
use mlx_rs::{Array, Dtype};

pub use crate::mlx_env::backend;
pub use moe_combine::{moe_combine, moe_combine_acc, moe_combine_reference, CombineMode};
pub use moe_router::{moe_router, moe_router_reference, RouterKind};
pub use sigmoid_router::{sigmoid_router, sigmoid_router_reference, SigmoidRouting};
pub use swiglu::{swiglu, swiglu_reference};

/// The quantized expert kernels under their former path (`kernels::experts::*`).
pub mod experts {
    pub use super::qmv_combine::{qmv_combine, qmv_combine_reference};
    pub use super::qmv_linear::{qmv_linear, qmv_linear_unsupported};
    pub use super::qmv_swiglu::{qmv_swiglu, qmv_swiglu_reference, unsupported};
}

/// The MLA rope kernel under its former path (`kernels::rope::*`).
pub mod rope {
    pub use super::rope_decode::{rope_decode, rope_decode_reference};
}

/// Shared by every module's CUDA body (`header:` of its `GpuKernel`).
const CUDA_HEADER: &str = include_str!("../../kernels/cuda/header.cuh");

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

/// The most experts the CUDA routers select from (`zmlx_warp_top_k`: one 32-bit taken-mask per
/// lane).
const CUDA_TOP_K_MAX_E: i32 = 1024;

/// A CUDA router's top-k over `e` experts, or why its body cannot take them.
fn check_cuda_top_k(op: &str, e: i32) -> anyhow::Result<()> {
    if e > CUDA_TOP_K_MAX_E {
        anyhow::bail!("{op}: {e} experts > {CUDA_TOP_K_MAX_E} (the CUDA body's warp top-k)");
    }
    Ok(())
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

/// Which CPU row kernels a quantized expert/dense kernel runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelClass {
    /// Bit-identical to MLX's `_qmm_t` (qmv_rows.inc): the `safe` patterns.
    Exact,
    /// Reassociated per-group sums with FMA (qmv_fast.inc): not bit-exact, `validated` patterns.
    Fast,
}

extern "C" {
    fn zmlx_cpu_qmv_fast_supported(bits: std::ffi::c_int, group_size: std::ffi::c_int) -> std::ffi::c_int;
}

/// Whether the fast CPU kernels take this bit width and group size on this CPU (else the node
/// runs the exact kernels: same result class as `Exact`).
pub fn fast_supported(bits: i32, group_size: i32) -> bool {
    unsafe { zmlx_cpu_qmv_fast_supported(bits, group_size) != 0 }
}
