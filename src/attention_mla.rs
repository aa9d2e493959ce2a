//! Multi-head latent attention (DeepSeek-V3, Kimi-K2, GLM-4.7-Flash), mlx-lm ≥ 0.30.6's form.
//! The cache holds the normalised latent `[B, 1, T, kv_lora_rank]` as keys and the rotated
//! `k_pe` `[B, 1, T, rope]` as values. The RoPE part enters SDPA as an additive mask
//! (`pe_scores`). A single token takes the absorbed path (queries projected into the latent
//! space); several tokens the expanded one — they differ in the last bits, so the caller must
//! chunk exactly like mlx-lm (generate.rs does).
use std::any::Any;
use std::rc::Rc;

use anyhow::Result;
use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::ops::indexing::{NewAxis, TryIndexOp};
use mlx_rs::{ops, Array};

use crate::cache::{per_sequence, KvCache};
use crate::config::{MlaConfig, ModelConfig, RopeScaling};
use crate::nn::{Linear, LoadCtx, MultiLinear, RmsNorm, Rope};
use crate::slots::{AttentionSlot, MapLinears};

#[derive(Clone)]
pub enum QueryProj {
    Direct(Linear),
    LowRank { a: Linear, norm: RmsNorm, b: Linear },
}

#[derive(Clone)]
pub struct MlaAttention {
    pub q: QueryProj,
    pub kv_a_proj_with_mqa: Linear,
    pub kv_a_layernorm: RmsNorm,
    pub embed_q: MultiLinear,
    pub unembed_out: MultiLinear,
    pub o_proj: Linear,
    pub rope: Rope,
    pub dims: MlaConfig,
    pub n_heads: i32,
    pub scale: f32,
}

/// `(nope+rope)^-0.5`, times `(0.1·mscale_all_dim·ln(factor) + 1)²` when the scaling sets
/// mscale_all_dim and factor > 1 — in f64, rounded once, as mlx-lm does.
fn softmax_scale(d: &MlaConfig, scaling: Option<&RopeScaling>) -> f32 {
    let mut scale = ((d.qk_nope_head_dim + d.qk_rope_head_dim) as f64).powf(-0.5);
    if let Some(RopeScaling::Yarn { factor, mscale_all_dim, .. }) = scaling {
        if *mscale_all_dim != 0.0 && *factor > 1.0 {
            let s = 0.1 * mscale_all_dim * factor.ln() + 1.0;
            scale = scale * s * s;
        }
    }
    scale as f32
}

impl MlaAttention {
    pub fn load(ctx: &mut LoadCtx, path: &str, c: &ModelConfig) -> Result<MlaAttention> {
        let d = c.mla.clone().expect("MLA config");
        let (h, hidden) = (c.num_attention_heads, c.hidden_size);
        let qk = d.qk_nope_head_dim + d.qk_rope_head_dim;
        let q = match d.q_lora_rank {
            None => QueryProj::Direct(Linear::load(ctx, &format!("{path}.q_proj"), hidden, h * qk, false)?),
            Some(r) => QueryProj::LowRank {
                a: Linear::load(ctx, &format!("{path}.q_a_proj"), hidden, r, c.attention_bias)?,
                norm: RmsNorm::load(ctx, &format!("{path}.q_a_layernorm"), r, d.norm_eps)?,
                b: Linear::load(ctx, &format!("{path}.q_b_proj"), r, h * qk, false)?,
            },
        };
        let rope = match &c.rope_scaling {
            Some(y @ RopeScaling::Yarn { .. }) => Rope::yarn(d.qk_rope_head_dim, true, c.rope_theta as f64, y)?,
            Some(RopeScaling::Linear { factor }) => {
                Rope { scale: 1.0 / factor, ..Rope::plain(d.qk_rope_head_dim, true, c.rope_theta) }
            }
            None => Rope::plain(d.qk_rope_head_dim, true, c.rope_theta),
        };
        Ok(MlaAttention {
            q,
            kv_a_proj_with_mqa: Linear::load(
                ctx,
                &format!("{path}.kv_a_proj_with_mqa"),
                hidden,
                d.kv_lora_rank + d.qk_rope_head_dim,
                c.attention_bias,
            )?,
            kv_a_layernorm: RmsNorm::load(ctx, &format!("{path}.kv_a_layernorm"), d.kv_lora_rank, d.norm_eps)?,
            embed_q: MultiLinear::load(ctx, &format!("{path}.embed_q"), h, d.qk_nope_head_dim, d.kv_lora_rank)?,
            unembed_out: MultiLinear::load(ctx, &format!("{path}.unembed_out"), h, d.kv_lora_rank, d.v_head_dim)?,
            o_proj: Linear::load(ctx, &format!("{path}.o_proj"), h * d.v_head_dim, hidden, c.attention_bias)?,
            rope,
            scale: softmax_scale(&d, c.rope_scaling.as_ref()),
            dims: d,
            n_heads: h,
        })
    }
}

/// The stock positional step as mlx-lm runs it: `(rope(q_pe) * q_scale, rope(k_pe))` with the
/// model's `Rope` (the scale rounded to q_pe's dtype first).
pub fn rope_pe(q_pe: &Array, k_pe: &Array, rope: &Rope, offset: i32, q_scale: f32) -> Result<(Array, Array)> {
    let scale = Array::from_f32(q_scale).as_dtype(q_pe.dtype())?;
    Ok((rope.forward(q_pe, offset)?.multiply(&scale)?, rope.forward(k_pe, offset)?))
}

/// The positional step: `(q_pe, k_pe, offset)` → `(rope(q_pe) * scale, rope(k_pe))`.
pub type PeStep<'a> = &'a dyn Fn(&Array, &Array, i32) -> Result<(Array, Array)>;

impl MlaAttention {
    /// The stock positional step: RoPE of both parts, then the softmax scale on q.
    pub fn stock_pe(&self, q_pe: &Array, k_pe: &Array, offset: i32) -> Result<(Array, Array)> {
        rope_pe(q_pe, k_pe, &self.rope, offset, self.scale)
    }

    /// A copy with each dense projection (q, kv_a, o) replaced by `f(projection)`.
    pub fn map_linears(&self, f: MapLinears) -> MlaAttention {
        let q = match &self.q {
            QueryProj::Direct(p) => QueryProj::Direct(f(p)),
            QueryProj::LowRank { a, norm, b } => QueryProj::LowRank { a: f(a), norm: norm.clone(), b: f(b) },
        };
        MlaAttention { q, kv_a_proj_with_mqa: f(&self.kv_a_proj_with_mqa), o_proj: f(&self.o_proj), ..self.clone() }
    }

    /// The attention with a replaceable positional step (the `glm47_rope` pattern swaps it):
    /// the projections over the whole batch, the rest per sequence when each row has its own
    /// cache.
    pub fn forward_with(&self, x: &Array, caches: &mut [KvCache], pe: PeStep) -> Result<Array> {
        let (b, l) = (x.dim(0), x.dim(1));
        let d = &self.dims;
        let q = match &self.q {
            QueryProj::Direct(p) => p.forward(x)?,
            QueryProj::LowRank { a, norm, b } => b.forward(&norm.forward(&a.forward(x)?)?)?,
        };
        let q =
            q.reshape(&[b, l, self.n_heads, d.qk_nope_head_dim + d.qk_rope_head_dim])?.transpose_axes(&[0, 2, 1, 3])?;
        let qs = q.split_at_indices(&[d.qk_nope_head_dim], -1)?;
        let ckv = self.kv_a_proj_with_mqa.forward(x)?;
        let parts = ckv.split_at_indices(&[d.kv_lora_rank], -1)?;
        let k_pe = parts[1].reshape(&[b, l, 1, d.qk_rope_head_dim])?.transpose_axes(&[0, 2, 1, 3])?;
        let kv_latent = self.kv_a_layernorm.forward(&parts[0])?;
        let out = per_sequence(&[&qs[0], &qs[1], &k_pe, &kv_latent], caches, |p, cache| {
            self.attend(&p[0], &p[1], &p[2], &p[3], cache, pe)
        })?;
        let out = out.transpose_axes(&[0, 2, 1, 3])?.reshape(&[b, l, self.n_heads * d.v_head_dim])?;
        self.o_proj.forward(&out)
    }

    /// RoPE, cache update and SDPA for rows sharing one cache: `q_nope` `[B, H, L, nope]`,
    /// `q_pe` `[B, H, L, rope]`, `k_pe` `[B, 1, L, rope]`, `kv_latent` `[B, L, rank]` →
    /// `[B, H, L, v_head_dim]`.
    fn attend(
        &self,
        q_nope: &Array,
        q_pe: &Array,
        k_pe: &Array,
        kv_latent: &Array,
        cache: &mut KvCache,
        pe: PeStep,
    ) -> Result<Array> {
        let l = q_nope.dim(2);
        let offset = cache.offset;
        let (q_pe_scaled, k_pe) = pe(q_pe, k_pe, offset)?;
        let kv_latent = kv_latent.expand_dims(1)?;
        let (kv_latent, k_pe) = cache.update_and_fetch(&kv_latent, &k_pe)?;
        for (n, a) in [("q_nope", q_nope), ("q_pe_scaled", &q_pe_scaled), ("k_pe", &k_pe), ("kv_latent", &kv_latent)] {
            crate::debug_dump::record(n, a);
        }

        let mut pe_scores = q_pe_scaled.matmul(k_pe.swap_axes(-1, -2)?)?;
        if l > 1 {
            // Boolean causal mask [L, T] aligned to the end; masked scores get finfo.min, not -inf.
            let t = offset + l;
            let rows = ops::arange::<_, i32>(offset, t, None)?.try_index((.., NewAxis))?;
            let cols = ops::arange::<_, i32>(None, t, None)?.try_index(NewAxis)?;
            let mask = ops::ge(&rows, &cols)?;
            let min = Array::from_f32(pe_scores.dtype().finfo_min()? as f32).as_dtype(pe_scores.dtype())?;
            pe_scores = ops::select(&mask, &pe_scores, &min)?;
        }
        crate::debug_dump::record("pe_scores", &pe_scores);
        let pe_mask = ScaledDotProductAttentionMask::Array(&pe_scores);
        let out = if l == 1 {
            let q_abs = self.embed_q.forward(q_nope, true)?;
            let o = fast::scaled_dot_product_attention(&q_abs, &kv_latent, &kv_latent, self.scale, pe_mask, None)?;
            self.unembed_out.forward(&o, true)?
        } else {
            let k = self.embed_q.forward(&kv_latent, false)?;
            let v = self.unembed_out.forward(&kv_latent, true)?;
            crate::debug_dump::record("k", &k);
            crate::debug_dump::record("v", &v);
            fast::scaled_dot_product_attention(q_nope, &k, &v, self.scale, pe_mask, None)?
        };
        crate::debug_dump::record("sdpa", &out);
        Ok(out)
    }
}

impl AttentionSlot for MlaAttention {
    fn forward(&self, x: &Array, caches: &mut [KvCache]) -> Result<Array> {
        self.forward_with(x, caches, &|q, k, o| self.stock_pe(q, k, o))
    }

    fn with_linears(&self, f: MapLinears) -> Option<Rc<dyn AttentionSlot>> {
        Some(Rc::new(self.map_linears(f)))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
