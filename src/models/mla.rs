//! The MLA families' shared parts (DeepSeek-V3 / Kimi-K2 in deepseek_v3.rs, GLM-4.7-Flash in
//! glm4_moe_lite.rs): their config.json keys (same keys, different mlx-lm defaults), the
//! `kv_b_proj` split of HF checkpoints, and the decoder layer: MLA attention (attention_mla.rs)
//! + the sigmoid-router MoE (sigmoid_moe.rs).
use std::rc::Rc;

use anyhow::{anyhow, Result};
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{ops, Array};

use crate::attention_mla::MlaAttention;
use crate::config::{parse_rope_scaling, Keys, MlaConfig, ModelConfig};
use crate::model::DecoderLayer;
use crate::nn::LoadCtx;
use crate::weights::WeightStore;

/// Where the two MLA families' mlx-lm ModelArgs differ.
pub struct MlaDefaults {
    pub routed_scaling_factor: f64,
    pub first_k_dense_replace: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    /// Added to the router's renormalisation denominator (GLM-4.7-Flash: 1e-20).
    pub renorm_eps: Option<f32>,
    /// q_a_layernorm / kv_a_layernorm eps; None = rms_norm_eps (DeepSeek-V3 hard-codes 1e-6).
    pub norm_eps: Option<f32>,
}

pub fn parse_keys(k: &Keys, c: &mut ModelConfig, d: &MlaDefaults) -> Result<()> {
    // mlx-lm defaults these silently (to GLM-4.7-Flash / DeepSeek sizes); a config without
    // them is almost surely broken, so zmlx asks for them.
    c.vocab_size = k.positive("vocab_size", None)?;
    c.num_hidden_layers = k.positive("num_hidden_layers", None)?;
    c.intermediate_size = k.positive("intermediate_size", None)?;
    super::sigmoid_moe::parse_keys(k, c, Some((d.routed_scaling_factor, d.first_k_dense_replace)))?;
    c.moe_layer_freq = k.positive("moe_layer_freq", Some(1))?;
    c.rms_norm_eps = k.positive_float("rms_norm_eps", Some(d.rms_norm_eps))?;
    c.rope_theta = k.positive_float("rope_theta", Some(d.rope_theta))?;
    c.attention_bias = k.boolean("attention_bias", Some(false))?;
    c.renorm_eps = d.renorm_eps;
    let mla = MlaConfig {
        q_lora_rank: k.positive_opt("q_lora_rank")?,
        kv_lora_rank: k.positive("kv_lora_rank", None)?,
        qk_nope_head_dim: k.positive("qk_nope_head_dim", None)?,
        qk_rope_head_dim: k.positive("qk_rope_head_dim", None)?,
        v_head_dim: k.positive("v_head_dim", None)?,
        norm_eps: d.norm_eps.unwrap_or(c.rms_norm_eps),
    };
    c.head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim;
    c.rope_dims = mla.qk_rope_head_dim;
    c.rope_traditional = true;
    c.num_key_value_heads = c.num_attention_heads;
    c.mla = Some(mla);
    c.rope_scaling = parse_rope_scaling(k.map, k.file)?;
    Ok(())
}

/// Dense layers below first_k_dense_replace, then MoE every moe_layer_freq layers.
pub fn is_moe_layer(c: &ModelConfig, i: i32) -> bool {
    i >= c.first_k_dense_replace && i % c.moe_layer_freq == 0
}

pub fn load_layer(ctx: &mut LoadCtx, i: i32) -> Result<DecoderLayer> {
    let c = ctx.config.clone();
    let attention = Rc::new(MlaAttention::load(ctx, &format!("model.layers.{i}.self_attn"), &c)?);
    let mlp = super::sigmoid_moe::load_mlp(ctx, i)?;
    super::decoder_layer(ctx, i, attention, mlp)
}

/// HF checkpoints (and pre-0.30.6 conversions) hold `kv_b_proj` `[H·(nope+v), kv_lora_rank]`;
/// mlx-lm splits it into `embed_q` `[H, kvr, nope]` and `unembed_out` `[H, v, kvr]`, through a
/// dequantize → split → re-quantize round trip when it is quantized (lossy, but it is the oracle).
pub fn split_kv_b_proj(c: &ModelConfig, store: &mut WeightStore) -> Result<()> {
    let d = c.mla.as_ref().ok_or_else(|| anyhow!("internal: MLA family without MLA config"))?;
    let h = c.num_attention_heads;
    for l in 0..c.num_hidden_layers {
        let path = format!("model.layers.{l}.self_attn");
        let name = format!("{path}.kv_b_proj.weight");
        if !store.contains(&name) {
            continue;
        }
        let file = store.file_of(&name);
        let w = store.take(&name)?;
        let scales = store.take_opt(&format!("{path}.kv_b_proj.scales"));
        let quant = match &scales {
            Some(s) => {
                let biases = store.take(&format!("{path}.kv_b_proj.biases"))?;
                let bits = *w.shape().last().unwrap() * 32 / d.kv_lora_rank;
                let group = d.kv_lora_rank / *s.shape().last().unwrap();
                Some((ops::dequantize(&w, s, &biases, group, bits)?, group, bits))
            }
            None => None,
        };
        let v = match &quant {
            Some((deq, _, _)) => deq.clone(),
            None => w,
        };
        let expected = [h * (d.qk_nope_head_dim + d.v_head_dim), d.kv_lora_rank];
        if v.shape() != expected {
            return Err(anyhow!("{file}: tensor `{name}` has shape {:?}, expected {expected:?}", v.shape()));
        }
        let v = v.reshape(&[h, d.qk_nope_head_dim + d.v_head_dim, -1])?;
        let wk = v.try_index((.., ..d.qk_nope_head_dim, ..))?.swap_axes(-1, -2)?.contiguous()?;
        let wv = v.try_index((.., d.qk_nope_head_dim.., ..))?.contiguous()?;
        let mut put = |suffix: &str, a: Array| store.insert(format!("{path}.{suffix}"), a, &name);
        match quant {
            Some((_, group, bits)) => {
                let (kq, ks, kb) = ops::quantize(&wk, group, bits)?;
                let (vq, vs, vb) = ops::quantize(&wv, group, bits)?;
                put("embed_q.weight", kq);
                put("embed_q.scales", ks);
                put("embed_q.biases", kb);
                put("unembed_out.weight", vq);
                put("unembed_out.scales", vs);
                put("unembed_out.biases", vb);
            }
            None => {
                put("embed_q.weight", wk);
                put("unembed_out.weight", wv);
            }
        }
    }
    Ok(())
}
