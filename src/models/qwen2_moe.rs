//! Qwen2-MoE (`qwen2_moe`, Qwen1.5-MoE): GQA with q/k/v biases, every layer sparse, router =
//! softmax over all experts then top-k of the probabilities (descending, never renormalised),
//! plus a sigmoid-gated shared expert. head_dim is always hidden/heads.
use std::rc::Rc;

use anyhow::Result;

use crate::attention::{GqaAttention, GqaShape};
use crate::kernels::RouterKind;
use crate::model::{slot, DecoderLayer, LayerMlp};
use crate::moe::{DenseMlp, GatedSharedExpert, MoeBlock, SoftmaxRouter, SwitchGlu, WeightedSumCombine};
use crate::nn::{Linear, LoadCtx};

pub fn load_layer(ctx: &mut LoadCtx, i: i32) -> Result<DecoderLayer> {
    let c = ctx.config.clone();
    let attention =
        Rc::new(GqaAttention::load(ctx, &format!("model.layers.{i}.self_attn"), &GqaShape::from_config(&c))?);
    let mlp = format!("model.layers.{i}.mlp");
    let router = SoftmaxRouter {
        gate: Linear::load(ctx, &format!("{mlp}.gate"), c.hidden_size, c.num_experts, false)?,
        kind: RouterKind::SoftmaxThenTopKDesc,
        k: c.num_experts_per_tok,
    };
    let experts =
        SwitchGlu::load(ctx, &format!("{mlp}.switch_mlp"), c.num_experts, c.hidden_size, c.moe_intermediate_size)?;
    let width = c.shared_expert_intermediate_size.unwrap_or(c.moe_intermediate_size);
    let shared = GatedSharedExpert {
        mlp: DenseMlp::load(ctx, &format!("{mlp}.shared_expert"), c.hidden_size, width)?,
        gate: Linear::load(ctx, &format!("{mlp}.shared_expert_gate"), c.hidden_size, 1, false)?,
    };
    let block = LayerMlp::Moe(MoeBlock {
        path: mlp,
        router: slot(Rc::new(router)),
        experts: slot(Rc::new(experts)),
        combine: slot(Rc::new(WeightedSumCombine { cast_back: false })),
        shared: Some(slot(Rc::new(shared))),
    });
    super::decoder_layer(ctx, i, attention, block)
}
