//! The DeepSeek-style MoE block shared by glm4_moe, glm4_moe_lite and deepseek_v3: sigmoid
//! group router, SwitchGLU experts, f32 combine cast back to the activation dtype, then the
//! ungated shared experts. Dense layers use a SwiGLU MLP of `intermediate_size`. Also the
//! config.json keys of that block, read the same way by the three families.
use std::rc::Rc;

use anyhow::Result;

use crate::config::{Keys, ModelConfig};
use crate::model::{slot, LayerMlp};
use crate::moe::SigmoidRouting;
use crate::moe::{DenseMlp, MoeBlock, SigmoidGroupRouter, SwitchGlu, WeightedSumCombine};
use crate::nn::LoadCtx;

/// The DeepSeek-style MoE keys shared by glm4_moe, glm4_moe_lite and deepseek_v3.
/// `defaults`: (routed_scaling_factor, first_k_dense_replace) where mlx-lm has defaults.
pub fn parse_keys(k: &Keys, c: &mut ModelConfig, defaults: Option<(f64, i64)>) -> Result<()> {
    c.moe_intermediate_size = k.positive("moe_intermediate_size", None)?;
    c.num_experts = k.positive("n_routed_experts", None)?;
    c.num_experts_per_tok = k.positive("num_experts_per_tok", None)?;
    c.norm_topk_prob = k.boolean("norm_topk_prob", defaults.map(|_| true))?;
    c.n_group = k.positive("n_group", defaults.map(|_| 1))?;
    c.topk_group = k.positive("topk_group", defaults.map(|_| 1))?;
    c.routed_scaling_factor = k.positive_float("routed_scaling_factor", defaults.map(|d| d.0))?;
    c.first_k_dense_replace = k.non_negative("first_k_dense_replace", defaults.map(|d| d.1))?;
    c.n_shared_experts = Some(k.non_negative("n_shared_experts", Some(0))?).filter(|&v| v > 0);
    if let Some(f) = k.string_opt("scoring_func")? {
        if f != "sigmoid" {
            return Err(k.err("scoring_func", "\"sigmoid\" (the only scoring mlx-lm implements for this family)"));
        }
    }
    if let Some(m) = k.string_opt("topk_method")? {
        if m != "noaux_tc" {
            return Err(k.err("topk_method", "\"noaux_tc\""));
        }
    }
    Ok(())
}

pub fn load_mlp(ctx: &mut LoadCtx, i: i32) -> Result<LayerMlp> {
    let c = ctx.config.clone();
    let mlp = format!("model.layers.{i}.mlp");
    if !c.is_moe_layer(i) {
        return Ok(LayerMlp::Dense(slot(Rc::new(DenseMlp::load(ctx, &mlp, c.hidden_size, c.intermediate_size)?))));
    }
    let router = SigmoidGroupRouter {
        weight: ctx.tensor(&format!("{mlp}.gate.weight"), &[c.num_experts, c.hidden_size])?,
        bias: ctx.tensor_stored(&format!("{mlp}.gate.e_score_correction_bias"), &[c.num_experts])?,
        params: SigmoidRouting {
            k: c.num_experts_per_tok,
            n_group: c.n_group,
            topk_group: c.topk_group,
            norm_topk_prob: c.norm_topk_prob,
            renorm_eps: c.renorm_eps,
            routed_scaling_factor: c.routed_scaling_factor,
        },
    };
    let experts =
        SwitchGlu::load(ctx, &format!("{mlp}.switch_mlp"), c.num_experts, c.hidden_size, c.moe_intermediate_size)?;
    let shared = match c.n_shared_experts {
        Some(n) => Some(slot(Rc::new(DenseMlp::load(
            ctx,
            &format!("{mlp}.shared_experts"),
            c.hidden_size,
            c.moe_intermediate_size * n,
        )?) as Rc<_>)),
        None => None,
    };
    Ok(LayerMlp::Moe(MoeBlock {
        path: mlp,
        router: slot(Rc::new(router)),
        experts: slot(Rc::new(experts)),
        combine: slot(Rc::new(WeightedSumCombine { cast_back: true })),
        shared,
        offload: None,
    }))
}
