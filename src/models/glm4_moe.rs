//! GLM-4.5 / 4.5-Air / 4.6 (`glm4_moe`): GQA with q/k/v biases (`attention_bias`), optional
//! per-head qk-norm, partial RoPE (`head_dim × partial_rotary_factor` features, half-split),
//! dense layers below `first_k_dense_replace`, then the sigmoid-router MoE (sigmoid_moe.rs).
use std::rc::Rc;

use anyhow::Result;

use crate::attention::{GqaAttention, GqaShape};
use crate::model::{slot, DecoderLayer};
use crate::nn::{LoadCtx, RmsNorm, Rope};

pub fn load_layer(ctx: &mut LoadCtx, i: i32) -> Result<DecoderLayer> {
    let c = ctx.config.clone();
    let p = format!("model.layers.{i}");
    let shape = GqaShape {
        hidden: c.hidden_size,
        n_heads: c.num_attention_heads,
        n_kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        bias: c.attention_bias,
        qk_norm_eps: c.use_qk_norm.then_some(c.rms_norm_eps),
        rope: Rope::plain(c.rope_dims, false, c.rope_theta),
    };
    Ok(DecoderLayer {
        attention: slot(Rc::new(GqaAttention::load(ctx, &format!("{p}.self_attn"), &shape)?) as Rc<_>),
        mlp: super::sigmoid_moe::load_mlp(ctx, i)?,
        input_layernorm: RmsNorm::load(ctx, &format!("{p}.input_layernorm"), c.hidden_size, c.rms_norm_eps)?,
        post_attention_layernorm: RmsNorm::load(ctx, &format!("{p}.post_attention_layernorm"), c.hidden_size, c.rms_norm_eps)?,
    })
}
