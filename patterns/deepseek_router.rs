//! `deepseek_router` (safe): DeepSeek-V3 / Kimi-K2 / GLM routing — sigmoid, correction bias
//! for selection, group-limited top-k, unbiased renormalised weights × routed_scaling_factor —
//! as one fused kernel after the gate projection. Same indices, slot order and f32 weights as
//! mlx-lm's group_expert_select on CPU (tests/kernels.rs), token-identical (tests/fidelity.rs).
use std::any::Any;
use std::rc::Rc;

use anyhow::Result;
use mlx_rs::Array;

use super::{Pattern, PatternInfo, PatternOutcome, SafetyClass, SlotKind};
use crate::config::Family;
use crate::kernels;
use crate::model::Model;
use crate::moe::SigmoidGroupRouter;
use crate::slots::{RouterSlot, Routing};

pub struct DeepseekRouter;

static INFO: PatternInfo = PatternInfo {
    name: "deepseek_router",
    slot: SlotKind::Router,
    families: &[Family::Glm4Moe, Family::Glm4MoeLite, Family::DeepseekV3],
    class: SafetyClass::Safe,
    decode_only: false,
    env: &[],
    description: "fused sigmoid + bias + group-limited top-k + renormalise × scaling router (DeepSeek-V3/Kimi-K2/GLM)",
};

pub struct FusedSigmoidRouter(pub SigmoidGroupRouter);

impl RouterSlot for FusedSigmoidRouter {
    fn route(&self, x: &Array) -> Result<Routing> {
        let (indices, weights) = kernels::sigmoid_router(&self.0.logits(x)?, &self.0.bias, &self.0.params)?;
        Ok(Routing { indices, weights })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Pattern for DeepseekRouter {
    fn info(&self) -> &PatternInfo {
        &INFO
    }

    fn apply(&self, model: &mut Model) -> Result<PatternOutcome> {
        let mut out = PatternOutcome::default();
        for (_, block) in model.moe_blocks_mut() {
            let stock = block.router.stock().clone();
            match stock.as_any().downcast_ref::<SigmoidGroupRouter>() {
                Some(r) => {
                    block.router.swap(Rc::new(FusedSigmoidRouter(r.clone())), INFO.name);
                    out.patched.push(format!("{}.gate", block.path));
                }
                None => out.skipped.push((format!("{}.gate", block.path), "not a sigmoid group router".into())),
            }
        }
        Ok(out)
    }
}
