//! Mixtral (`mixtral`): GQA attention, every layer sparse (`block_sparse_moe`), router = softmax
//! over the top-k raw logits, combine in the activation dtype, no shared expert.
use std::rc::Rc;

use anyhow::Result;

use crate::attention::{GqaAttention, GqaShape};
use crate::config::ModelConfig;
use crate::kernels::RouterKind;
use crate::model::{slot, DecoderLayer, LayerMlp};
use crate::moe::{MoeBlock, SoftmaxRouter, SwitchGlu, WeightedSumCombine};
use crate::nn::{Linear, LoadCtx};
use crate::weights::WeightStore;

/// HF checkpoints hold `experts.{e}.w1/w2/w3` (+ scales/biases when quantized): stack them.
pub fn sanitize(c: &ModelConfig, store: &mut WeightStore) -> Result<()> {
    if !store.contains("model.layers.0.block_sparse_moe.experts.0.w1.weight") {
        return Ok(());
    }
    for l in 0..c.num_hidden_layers {
        let prefix = format!("model.layers.{l}.block_sparse_moe");
        for (hf, ours) in [("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")] {
            for k in ["weight", "scales", "biases"] {
                if store.contains(&format!("{prefix}.experts.0.{hf}.{k}")) {
                    let into = format!("{prefix}.switch_mlp.{ours}.{k}");
                    super::stack_experts(
                        store,
                        &format!("{prefix}.experts"),
                        &format!("{hf}.{k}"),
                        c.num_experts,
                        &into,
                    )?;
                }
            }
        }
    }
    Ok(())
}

pub fn load_layer(ctx: &mut LoadCtx, i: i32) -> Result<DecoderLayer> {
    let c = ctx.config.clone();
    let moe = format!("model.layers.{i}.block_sparse_moe");
    let attention =
        Rc::new(GqaAttention::load(ctx, &format!("model.layers.{i}.self_attn"), &GqaShape::from_config(&c))?);
    let router = SoftmaxRouter {
        gate: Linear::load(ctx, &format!("{moe}.gate"), c.hidden_size, c.num_experts, false)?,
        kind: RouterKind::TopKThenSoftmax,
        k: c.num_experts_per_tok,
    };
    let experts =
        SwitchGlu::load(ctx, &format!("{moe}.switch_mlp"), c.num_experts, c.hidden_size, c.intermediate_size)?;
    let mlp = LayerMlp::Moe(MoeBlock {
        path: moe,
        router: slot(Rc::new(router)),
        experts: slot(Rc::new(experts)),
        combine: slot(Rc::new(WeightedSumCombine { cast_back: false })),
        shared: None,
    });
    super::decoder_layer(ctx, i, attention, mlp)
}
