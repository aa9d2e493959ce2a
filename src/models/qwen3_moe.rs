//! Qwen3-MoE (`qwen3_moe`): GQA attention with per-head q/k RMSNorm, MoE layers by
//! decoder_sparse_step / mlp_only_layers (else a dense SwiGLU MLP), router = softmax over all
//! experts then top-k with optional renormalisation, combine cast back to the activation dtype.
use std::rc::Rc;

use anyhow::Result;

use crate::attention::{GqaAttention, GqaShape};
use crate::config::ModelConfig;
use crate::kernels::RouterKind;
use crate::model::{slot, DecoderLayer, LayerMlp};
use crate::moe::{DenseMlp, MoeBlock, SoftmaxRouter, SwitchGlu, WeightedSumCombine};
use crate::nn::{Linear, LoadCtx};
use crate::weights::WeightStore;

/// HF checkpoints hold `mlp.experts.{e}.{up,down,gate}_proj.weight`; mlx-lm stacks only `.weight`.
pub fn sanitize(c: &ModelConfig, store: &mut WeightStore) -> Result<()> {
    for l in 0..c.num_hidden_layers {
        let prefix = format!("model.layers.{l}.mlp");
        for n in ["up_proj", "down_proj", "gate_proj"] {
            if store.contains(&format!("{prefix}.experts.0.{n}.weight")) {
                let into = format!("{prefix}.switch_mlp.{n}.weight");
                super::stack_experts(
                    store,
                    &format!("{prefix}.experts"),
                    &format!("{n}.weight"),
                    c.num_experts,
                    &into,
                )?;
            }
        }
    }
    Ok(())
}

pub fn load_layer(ctx: &mut LoadCtx, i: i32) -> Result<DecoderLayer> {
    let c = ctx.config.clone();
    let attention =
        Rc::new(GqaAttention::load(ctx, &format!("model.layers.{i}.self_attn"), &GqaShape::from_config(&c))?);
    let mlp_path = format!("model.layers.{i}.mlp");
    let mlp = if c.is_moe_layer(i) {
        let router = SoftmaxRouter {
            gate: Linear::load(ctx, &format!("{mlp_path}.gate"), c.hidden_size, c.num_experts, false)?,
            kind: RouterKind::SoftmaxThenTopK { norm: c.norm_topk_prob },
            k: c.num_experts_per_tok,
        };
        let experts = SwitchGlu::load(
            ctx,
            &format!("{mlp_path}.switch_mlp"),
            c.num_experts,
            c.hidden_size,
            c.moe_intermediate_size,
        )?;
        LayerMlp::Moe(MoeBlock {
            path: mlp_path,
            router: slot(Rc::new(router)),
            experts: slot(Rc::new(experts)),
            combine: slot(Rc::new(WeightedSumCombine { cast_back: true })),
            shared: None,
        })
    } else {
        LayerMlp::Dense(slot(Rc::new(DenseMlp::load(ctx, &mlp_path, c.hidden_size, c.intermediate_size)?)))
    };
    super::decoder_layer(ctx, i, attention, mlp)
}
