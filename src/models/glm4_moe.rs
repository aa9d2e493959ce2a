//! GLM-4.5 / 4.5-Air / 4.6 (`glm4_moe`): GQA with q/k/v biases (`attention_bias`), optional
//! per-head qk-norm, partial RoPE (`head_dim × partial_rotary_factor` features, half-split),
//! dense layers below `first_k_dense_replace`, then the sigmoid-router MoE (sigmoid_moe.rs).
use std::rc::Rc;

use anyhow::Result;

use crate::attention::{GqaAttention, GqaShape};
use crate::model::DecoderLayer;
use crate::nn::LoadCtx;

pub fn load_layer(ctx: &mut LoadCtx, i: i32) -> Result<DecoderLayer> {
    let c = ctx.config.clone();
    let attention =
        Rc::new(GqaAttention::load(ctx, &format!("model.layers.{i}.self_attn"), &GqaShape::from_config(&c))?);
    let mlp = super::sigmoid_moe::load_mlp(ctx, i)?;
    super::decoder_layer(ctx, i, attention, mlp)
}
