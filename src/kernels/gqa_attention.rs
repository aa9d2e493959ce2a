//! `gqa_attention`: a GQA layer's attention core after the projections — per-head RMSNorm
//! (Qwen3), RoPE, the KV-cache write, and softmax attention (causal for L > 1) — as three MLX
//! nodes instead of ~60, reading the cache in place. The `gqa_attention` pattern's kernel.
//! Reference: `GqaAttention::stock_core` (rms_norm / rope / SDPA, whose CPU versions are MLX op
//! fallbacks). CPU only, float32: `zmlx_cpu_gqa_attention` (kernels/cpu/zmlx_attention.cpp)
//! evaluates those fallbacks' exact sums — including the wheel's reference-BLAS matmul order —
//! so outputs and cache contents are bit-identical; on GPUs MLX's SDPA is already a fused kernel.
use std::ffi::c_int;

use anyhow::{bail, Result};
use mlx_rs::{Array, Dtype};

use super::check::{compare, rand, CaseResult};
use super::{backend, KernelClass};
use crate::attention::GqaAttention;
use crate::cache::KvCache;
use crate::mlx_env::{raw_array, Backend};

extern "C" {
    #[allow(clippy::too_many_arguments)]
    fn zmlx_cpu_gqa_attention(
        o_out: *mut mlx_sys::mlx_array,
        kc_out: *mut mlx_sys::mlx_array,
        vc_out: *mut mlx_sys::mlx_array,
        q: mlx_sys::mlx_array,
        k: mlx_sys::mlx_array,
        v: mlx_sys::mlx_array,
        q_norm: mlx_sys::mlx_array,
        k_norm: mlx_sys::mlx_array,
        kc: mlx_sys::mlx_array,
        vc: mlx_sys::mlx_array,
        freqs: mlx_sys::mlx_array,
        has_norm: bool,
        has_freqs: bool,
        n_heads: c_int,
        n_kv_heads: c_int,
        head_dim: c_int,
        eps: f32,
        rope_dims: c_int,
        traditional: bool,
        base: f32,
        rope_scale: f32,
        offset: c_int,
        scale: f32,
        fast: bool,
        s: mlx_sys::mlx_stream,
    ) -> c_int;
}

/// Stock composition: the attention's own core (norms, RoPE, cache update, SDPA).
pub fn gqa_attention_reference(
    a: &GqaAttention,
    q: &Array,
    k: &Array,
    v: &Array,
    cache: &mut KvCache,
) -> Result<Array> {
    a.stock_core(q, k, v, cache)
}

/// Why the kernel does not apply to this call (None: it does).
pub fn gqa_attention_unsupported(a: &GqaAttention, q: &Array) -> Option<String> {
    if backend() != Backend::Cpu {
        return Some(format!("{} backend (CPU-only kernel)", backend().name()));
    }
    if q.dtype() != Dtype::Float32 {
        return Some(format!("{:?} activations (the bit-identical path is float32)", q.dtype()));
    }
    if a.rope.pre_scale.is_some() {
        return Some("YaRN mscale pre-scaling".into());
    }
    None
}

/// The fused core: `q` `[B, L, Hq·D]`, `k`, `v` `[B, L, Hk·D]` → `[B, L, Hq·D]`; the cache
/// receives the L new positions. `KernelClass::Exact`: bit-identical to
/// [`gqa_attention_reference`] on the CPU. `KernelClass::Fast`: the scores, softmax and weighted
/// sum reassociated (vector FMA dot products, a vector exp: kernels/cpu/attend_fast.inc), the
/// cache contents still bit-identical.
pub fn gqa_attention(
    a: &GqaAttention,
    q: &Array,
    k: &Array,
    v: &Array,
    cache: &mut KvCache,
    class: KernelClass,
) -> Result<Array> {
    if let Some(why) = gqa_attention_unsupported(a, q) {
        bail!("gqa_attention: {why}");
    }
    if q.ndim() != 3 || k.ndim() != 3 || v.ndim() != 3 {
        bail!("gqa_attention: expected q, k, v [B, L, H*D], got {:?}, {:?}, {:?}", q.shape(), k.shape(), v.shape());
    }
    let (b, l, d) = (q.dim(0), q.dim(1), a.head_dim);
    let kv = [b, a.n_kv_heads, d];
    cache.reserve(l, kv, kv, (Dtype::Float32, Dtype::Float32))?;
    let Some((kc, vc)) = cache.buffers() else { bail!("gqa_attention: the cache has no buffers after reserve") };
    let none = Array::from_f32(1.0);
    let (qn, kn) = match &a.qk_norm {
        Some((qn, kn)) => ((&qn.weight, qn.eps), (&kn.weight, kn.eps)),
        None => ((&none, 0.0), (&none, 0.0)),
    };
    let r = &a.rope;
    let freqs = r.freqs.as_ref().unwrap_or(&none);
    let (mut kc_out, mut vc_out) = unsafe { (mlx_sys::mlx_array_new(), mlx_sys::mlx_array_new()) };
    let o = raw_array(|res, s| unsafe {
        zmlx_cpu_gqa_attention(
            res,
            &mut kc_out,
            &mut vc_out,
            q.as_ptr(),
            k.as_ptr(),
            v.as_ptr(),
            qn.0.as_ptr(),
            kn.0.as_ptr(),
            kc.as_ptr(),
            vc.as_ptr(),
            freqs.as_ptr(),
            a.qk_norm.is_some(),
            r.freqs.is_some(),
            a.n_heads,
            a.n_kv_heads,
            d,
            qn.1,
            r.dims,
            r.traditional,
            r.base,
            r.scale,
            cache.offset,
            a.scale,
            class == KernelClass::Fast,
            s,
        )
    });
    let (kc_out, vc_out) = unsafe { (Array::from_ptr(kc_out), Array::from_ptr(vc_out)) };
    let o = o?;
    cache.commit(kc_out, vc_out, l);
    Ok(o)
}

/// A random float32 GQA attention core (projections are not used by the core).
pub fn random_attention(
    n_heads: i32,
    n_kv_heads: i32,
    head_dim: i32,
    qk_norm: bool,
    rope: crate::nn::Rope,
) -> Result<GqaAttention> {
    use crate::nn::{Linear, RmsNorm, Weight};
    let lin = || Linear::new(Weight::Float(Array::from_f32(0.0)), None);
    let norm =
        |seed| -> Result<RmsNorm> { Ok(RmsNorm { weight: rand(&[head_dim], seed, 1.0, Dtype::Float32)?, eps: 1e-6 }) };
    Ok(GqaAttention {
        q_proj: lin(),
        k_proj: lin(),
        v_proj: lin(),
        o_proj: lin(),
        qk_norm: if qk_norm { Some((norm(81)?, norm(82)?)) } else { None },
        rope,
        n_heads,
        n_kv_heads,
        head_dim,
        scale: (head_dim as f32).powf(-0.5),
    })
}

/// Runs `steps` (lengths L) through the kernel (of `class`) and the reference on separate
/// caches; returns every step's outputs and both final caches' used parts, kernel side second.
pub fn run_both(a: &GqaAttention, steps: &[i32], seed: u64, class: KernelClass) -> Result<(Vec<Array>, Vec<Array>)> {
    let (mut cw, mut cg) = (KvCache::default(), KvCache::default());
    let (mut want, mut got) = (vec![], vec![]);
    for (i, &l) in steps.iter().enumerate() {
        let s = seed + 3 * i as u64;
        let q = rand(&[1, l, a.n_heads * a.head_dim], s, 2.0, Dtype::Float32)?;
        let k = rand(&[1, l, a.n_kv_heads * a.head_dim], s + 1, 2.0, Dtype::Float32)?;
        let v = rand(&[1, l, a.n_kv_heads * a.head_dim], s + 2, 1.0, Dtype::Float32)?;
        want.push(gqa_attention_reference(a, &q, &k, &v, &mut cw)?);
        got.push(gqa_attention(a, &q, &k, &v, &mut cg, class)?);
    }
    for (c, out) in [(&cw, &mut want), (&cg, &mut got)] {
        let Some((k, v)) = c.buffers() else { bail!("gqa_attention: no steps were run") };
        use mlx_rs::ops::indexing::{Ellipsis, TryIndexOp};
        out.push(k.try_index((Ellipsis, ..c.offset, ..))?);
        out.push(v.try_index((Ellipsis, ..c.offset, ..))?);
    }
    Ok((want, got))
}

/// Selftest cases (CPU, float32): Qwen3-like decode after a prefill, and a chunked prefill
/// crossing the cache's 256-position step, without qk-norm and with partial RoPE.
pub fn selftest(dt: Dtype, out: &mut Vec<CaseResult>) -> Result<()> {
    if backend() != Backend::Cpu || dt != Dtype::Float32 {
        return Ok(());
    }
    use crate::nn::Rope;
    let cases = [
        (
            "Hq=32 Hk=4 D=128 qk-norm, prefill 9 + decode 3",
            random_attention(32, 4, 128, true, Rope::plain(128, false, 1e6))?,
            vec![9, 1, 1, 1],
        ),
        (
            "Hq=8 Hk=8 D=64 partial rope 32, chunks 200 + 100 + decode",
            random_attention(8, 8, 64, false, Rope::plain(32, false, 1e4))?,
            vec![200, 100, 1],
        ),
    ];
    for (name, a, steps) in cases {
        let r = run_both(&a, &steps, 90, KernelClass::Exact);
        let (want, got) = match r {
            Ok((w, g)) => (Ok(w), Ok(g)),
            Err(e) => (Err(anyhow::anyhow!("{e:#}")), Err(e)),
        };
        out.push(compare("gqa_attention", name.to_owned(), want, got));
    }
    Ok(())
}
