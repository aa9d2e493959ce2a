//! `zmlx selftest`: every fused kernel against its MLX-ops reference on the backend this process
//! runs on (the GPU machine has no cargo, so the kernel checks ship in the binary). Reports, per
//! case, whether the outputs are bit-identical and the max |difference|. The cases live with
//! their kernel (`kernels::<kernel>::selftest`); this runs them in a fixed order.
use anyhow::Result;
use mlx_rs::Dtype;

pub use crate::kernels::check::{claims_exact, CaseResult};
use crate::kernels::{
    self, gqa_attention, moe_combine, moe_router, qmv_combine, qmv_linear, qmv_swiglu, quantized_embedding, rms_norm,
    rope_decode, sigmoid_router, swiglu,
};

pub fn run() -> Result<Vec<CaseResult>> {
    let mut out = Vec::new();
    for dt in [Dtype::Float32, Dtype::Float16, Dtype::Bfloat16] {
        swiglu::selftest(dt, &mut out)?;
        moe_combine::selftest(dt, &mut out)?;
        moe_router::selftest(dt, &mut out)?;
        sigmoid_router::selftest(dt, &mut out)?;
    }
    decode_kernels(&mut out)?;
    Ok(out)
}

/// The decode-step kernels (expert mat-vecs, rope). On a GPU their bodies are opt-in
/// (`ZMLX_GPU_EXPERIMENTAL`), which the selftest turns on for itself to measure them.
fn decode_kernels(out: &mut Vec<CaseResult>) -> Result<()> {
    if kernels::backend() != crate::mlx_env::Backend::Cpu {
        std::env::set_var(kernels::GPU_EXPERIMENTAL_VAR, "1");
    }
    let dts: &[Dtype] = if kernels::backend() == crate::mlx_env::Backend::Cpu {
        &[Dtype::Float32]
    } else {
        &[Dtype::Float32, Dtype::Bfloat16]
    };
    for &dt in dts {
        for bits in [4, 8] {
            qmv_swiglu::selftest(dt, bits, out)?;
            qmv_combine::selftest(dt, bits, out)?;
            qmv_linear::selftest(dt, bits, out)?;
        }
        rope_decode::selftest(dt, out)?;
        gqa_attention::selftest(dt, out)?;
    }
    rms_norm::selftest(out)?;
    for dt in [Dtype::Float32, Dtype::Bfloat16] {
        for bits in [4, 8] {
            quantized_embedding::selftest(dt, bits, out)?;
        }
    }
    Ok(())
}
