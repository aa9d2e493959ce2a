//! The DeepSeek-style MoE block shared by glm4_moe, glm4_moe_lite and deepseek_v3: sigmoid
//! group router, SwitchGLU experts, f32 combine cast back to the activation dtype, then the
//! ungated shared experts. Dense layers use a SwiGLU MLP of `intermediate_size`.
use std::rc::Rc;

use anyhow::Result;

use crate::kernels::SigmoidRouting;
use crate::model::{slot, LayerMlp};
use crate::moe::{DenseMlp, MoeBlock, SigmoidGroupRouter, SwitchGlu, WeightedSumCombine};
use crate::nn::LoadCtx;

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
    }))
}
