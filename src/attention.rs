//! Grouped-query attention with RoPE (Mixtral, Qwen3-MoE), mlx-lm's op order.
use std::any::Any;
use std::rc::Rc;

use anyhow::Result;
use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::Array;

use crate::cache::{per_sequence, KvCache};
use crate::nn::{Linear, LoadCtx, RmsNorm, Rope};
use crate::slots::{AttentionSlot, MapLinears};

#[derive(Clone)]
pub struct GqaAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: Option<(RmsNorm, RmsNorm)>,
    pub rope: Rope,
    pub n_heads: i32,
    pub n_kv_heads: i32,
    pub head_dim: i32,
    pub scale: f32,
}

pub struct GqaShape {
    pub hidden: i32,
    pub n_heads: i32,
    pub n_kv_heads: i32,
    pub head_dim: i32,
    pub bias: bool,
    pub qk_norm_eps: Option<f32>,
    pub rope: Rope,
}

impl GqaShape {
    /// The GQA attention a config describes (biases, qk-norm, partial/traditional RoPE).
    pub fn from_config(c: &crate::config::ModelConfig) -> GqaShape {
        GqaShape {
            hidden: c.hidden_size,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
            bias: c.attention_bias,
            qk_norm_eps: c.use_qk_norm.then_some(c.rms_norm_eps),
            rope: Rope::plain(c.rope_dims, c.rope_traditional, c.rope_theta),
        }
    }
}

impl GqaAttention {
    pub fn load(ctx: &mut LoadCtx, path: &str, s: &GqaShape) -> Result<GqaAttention> {
        let (q_out, kv_out) = (s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim);
        let qk_norm = match s.qk_norm_eps {
            Some(eps) => Some((
                RmsNorm::load(ctx, &format!("{path}.q_norm"), s.head_dim, eps)?,
                RmsNorm::load(ctx, &format!("{path}.k_norm"), s.head_dim, eps)?,
            )),
            None => None,
        };
        Ok(GqaAttention {
            q_proj: Linear::load(ctx, &format!("{path}.q_proj"), s.hidden, q_out, s.bias)?,
            k_proj: Linear::load(ctx, &format!("{path}.k_proj"), s.hidden, kv_out, s.bias)?,
            v_proj: Linear::load(ctx, &format!("{path}.v_proj"), s.hidden, kv_out, s.bias)?,
            o_proj: Linear::load(ctx, &format!("{path}.o_proj"), q_out, s.hidden, false)?,
            qk_norm,
            rope: s.rope.clone(),
            n_heads: s.n_heads,
            n_kv_heads: s.n_kv_heads,
            head_dim: s.head_dim,
            scale: (s.head_dim as f32).powf(-0.5),
        })
    }
}

/// The attention core after the projections: `q` `[B, L, Hq·D]`, `k`, `v` `[B, L, Hk·D]` →
/// `[B, L, Hq·D]` for `o_proj`, updating the cache (the `gqa_attention` pattern swaps it).
pub type GqaCore<'a> = &'a dyn Fn(&Array, &Array, &Array, &mut KvCache) -> Result<Array>;

impl GqaAttention {
    /// The stock core: per-head norms, RoPE, cache update, SDPA (mlx-lm's op order).
    pub fn stock_core(&self, q: &Array, k: &Array, v: &Array, cache: &mut KvCache) -> Result<Array> {
        let (b, l) = (q.dim(0), q.dim(1));
        let heads = |a: &Array, h: i32| a.reshape(&[b, l, h, -1]);
        let mut q = heads(q, self.n_heads)?;
        let mut k = heads(k, self.n_kv_heads)?;
        let v = heads(v, self.n_kv_heads)?.transpose_axes(&[0, 2, 1, 3])?;
        if let Some((qn, kn)) = &self.qk_norm {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        let q = self.rope.forward(&q.transpose_axes(&[0, 2, 1, 3])?, cache.offset)?;
        let k = self.rope.forward(&k.transpose_axes(&[0, 2, 1, 3])?, cache.offset)?;
        let (k, v) = cache.update_and_fetch(&k, &v)?;
        // mlx-lm: the string mask "causal" for L > 1, none for a single token.
        let mask = (l > 1).then_some(ScaledDotProductAttentionMask::Causal);
        let o = fast::scaled_dot_product_attention(&q, &k, &v, self.scale, mask, None)?;
        Ok(o.transpose_axes(&[0, 2, 1, 3])?.reshape(&[b, l, -1])?)
    }

    /// The attention with a replaceable core: the projections over the whole batch, the core
    /// per sequence when each row has its own cache.
    pub fn forward_with(&self, x: &Array, caches: &mut [KvCache], core: GqaCore) -> Result<Array> {
        let q = self.q_proj.forward(x)?;
        let k = self.k_proj.forward(x)?;
        let v = self.v_proj.forward(x)?;
        let o = per_sequence(&[&q, &k, &v], caches, |p, c| core(&p[0], &p[1], &p[2], c))?;
        self.o_proj.forward(&o)
    }

    /// A copy with each dense projection replaced by `f(projection)`.
    pub fn map_linears(&self, f: MapLinears) -> GqaAttention {
        GqaAttention {
            q_proj: f(&self.q_proj),
            k_proj: f(&self.k_proj),
            v_proj: f(&self.v_proj),
            o_proj: f(&self.o_proj),
            ..self.clone()
        }
    }
}

impl AttentionSlot for GqaAttention {
    fn forward(&self, x: &Array, caches: &mut [KvCache]) -> Result<Array> {
        self.forward_with(x, caches, &|q, k, v, c| self.stock_core(q, k, v, c))
    }

    fn with_linears(&self, f: MapLinears) -> Option<Rc<dyn AttentionSlot>> {
        Some(Rc::new(self.map_linears(f)))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
