//! DeepSeek-V3 / Kimi-K2 (`deepseek_v3`, `kimi_k2`) and GLM-4.7-Flash (`glm4_moe_lite`): MLA
//! attention (attention_mla.rs) + the sigmoid-router MoE (sigmoid_moe.rs). The two model types
//! differ only in config semantics: DeepSeek hard-codes 1e-6 for the MLA norms and divides by
//! the plain sum; GLM-4.7-Flash uses rms_norm_eps and `sum + 1e-20` (set in config.rs).
use std::rc::Rc;

use anyhow::{anyhow, Result};
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{ops, Array};

use crate::attention_mla::MlaAttention;
use crate::config::ModelConfig;
use crate::model::DecoderLayer;
use crate::nn::LoadCtx;
use crate::weights::WeightStore;

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
