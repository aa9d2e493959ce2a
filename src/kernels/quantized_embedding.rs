//! `quantized_embedding`: QuantizedEmbedding's lookup (`dequantize` of the gathered rows) as one
//! graph node — the `quantized_embedding` pattern's kernel. Reference: `nn::Embedding::forward`
//! (on the CPU MLX 0.32 builds it from ~57 op nodes). CPU only: `zmlx_cpu_quantized_embedding`
//! (kernels/cpu/zmlx_embedding.cpp): each element `float(q) * scale + bias` with both roundings,
//! scales widened exactly, so it is bit-identical. On GPUs MLX's dequantize is a fused kernel.
use anyhow::{bail, Result};
use mlx_rs::{Array, Dtype};

use super::backend;
use super::check::{compare, qweight, CaseResult};
use crate::mlx_env::{raw_array, Backend};
use crate::nn::{Embedding, QWeight, Weight};

extern "C" {
    fn zmlx_cpu_quantized_embedding(
        res: *mut mlx_sys::mlx_array,
        ids: mlx_sys::mlx_array,
        w: mlx_sys::mlx_array,
        s: mlx_sys::mlx_array,
        b: mlx_sys::mlx_array,
        group_size: std::ffi::c_int,
        bits: std::ffi::c_int,
        st: mlx_sys::mlx_stream,
    ) -> std::ffi::c_int;
}

/// Stock composition: QuantizedEmbedding's lookup.
pub fn quantized_embedding_reference(ids: &Array, emb: &Embedding) -> Result<Array> {
    emb.forward(ids)
}

/// The quantized table, or why the kernel does not apply: CPU, float32 compute, 2/4/8 bits,
/// uint32 ids.
pub fn quantized_embedding_unsupported<'a>(ids: &Array, emb: &'a Embedding) -> Result<&'a QWeight, String> {
    let Weight::Quant(q) = &emb.weight else {
        return Err("float weights (a plain gather: nothing to fuse)".into());
    };
    if backend() != Backend::Cpu {
        return Err(format!("{} backend (CPU-only kernel)", backend().name()));
    }
    if emb.dtype != Dtype::Float32 {
        return Err(format!("{:?} compute dtype (the CPU kernel is bit-exact for float32)", emb.dtype));
    }
    if ![2, 4, 8].contains(&q.q.bits) {
        return Err(format!("{}-bit table (kernel has 2/4/8)", q.q.bits));
    }
    if !matches!(q.scales.dtype(), Dtype::Float32 | Dtype::Bfloat16 | Dtype::Float16)
        || q.biases.dtype() != q.scales.dtype()
    {
        return Err(format!("{:?} / {:?} scales / biases", q.scales.dtype(), q.biases.dtype()));
    }
    if ids.dtype() != Dtype::Uint32 {
        return Err(format!("{:?} token ids (the kernel takes uint32)", ids.dtype()));
    }
    Ok(q)
}

/// `emb.forward(ids)` as one node; bit-identical on the CPU. `ids` `[...]` → `[..., D]`.
pub fn quantized_embedding(ids: &Array, emb: &Embedding) -> Result<Array> {
    let q = match quantized_embedding_unsupported(ids, emb) {
        Ok(q) => q,
        Err(why) => bail!("quantized_embedding: {why}"),
    };
    Ok(raw_array(|res, s| unsafe {
        zmlx_cpu_quantized_embedding(
            res,
            ids.as_ptr(),
            q.weight.as_ptr(),
            q.scales.as_ptr(),
            q.biases.as_ptr(),
            q.q.group_size,
            q.q.bits,
            s,
        )
    })?)
}

/// Selftest cases (CPU only): a decode id and a prefill block, 4- and 8-bit, scales in `dt`.
pub fn selftest(dt: Dtype, bits: i32, out: &mut Vec<CaseResult>) -> Result<()> {
    if backend() != Backend::Cpu {
        return Ok(());
    }
    let table = qweight(1, 512, 256, bits, 81, dt)?;
    let q = QWeight {
        weight: table.weight.take_axis(Array::from_int(0), 0)?,
        scales: table.scales.take_axis(Array::from_int(0), 0)?,
        biases: table.biases.take_axis(Array::from_int(0), 0)?,
        q: table.q,
    };
    let emb = Embedding { weight: Weight::Quant(q), dtype: Dtype::Float32 };
    for ids in [vec![7u32], vec![0, 511, 3, 3, 200, 64]] {
        let a = Array::from_slice(&ids, &[1, ids.len() as i32]);
        out.push(compare(
            "quantized_embedding",
            format!("V=512 D=256 {bits}-bit {dt:?} scales, {} ids", ids.len()),
            quantized_embedding_reference(&a, &emb).map(|a| vec![a]),
            quantized_embedding(&a, &emb).map(|a| vec![a]),
        ));
    }
    Ok(())
}
