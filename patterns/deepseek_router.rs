//! `deepseek_router` (safe): DeepSeek-V3 / Kimi-K2 / GLM routing — sigmoid, correction bias
//! for selection, group-limited top-k, unbiased renormalised weights × routed_scaling_factor —
//! as one fused kernel (`kernels::sigmoid_router`) after the gate projection. Same indices, slot
//! order and f32 weights as mlx-lm's group_expert_select on CPU (tests/kernels.rs),
//! token-identical (tests/fidelity.rs).
use std::any::Any;
use std::rc::Rc;

use anyhow::Result;
use mlx_rs::Array;

use super::{Pattern, PatternInfo, PatternOutcome, SafetyClass, SlotKind, Swap, Swaps};
use crate::config::Family;
use crate::kernels::sigmoid_router::sigmoid_router;
use crate::model::Model;
use crate::moe::SigmoidGroupRouter;
use crate::slots::{RouterSlot, Routing};

pub struct DeepseekRouter;

static INFO: PatternInfo = PatternInfo {
    name: "deepseek_router",
    slot: SlotKind::Router,
    slots: &[SlotKind::Router],
    requires: &[],
    conflicts: &[],
    families: &[Family::Glm4Moe, Family::Glm4MoeLite, Family::DeepseekV3],
    class: SafetyClass::Safe,
    decode_only: false,
    env: &[],
    description: "fused sigmoid + bias + group-limited top-k + renormalise × scaling router (DeepSeek-V3/Kimi-K2/GLM)",
};

pub struct FusedSigmoidRouter(pub SigmoidGroupRouter);

impl RouterSlot for FusedSigmoidRouter {
    fn route(&self, x: &Array) -> Result<Routing> {
        let (indices, weights) = sigmoid_router(&self.0.logits(x)?, &self.0.bias, &self.0.params)?;
        Ok(Routing { indices, weights })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Pattern for DeepseekRouter {
    fn info(&self) -> &'static PatternInfo {
        &INFO
    }

    fn apply(&self, model: &mut Model) -> Result<PatternOutcome> {
        Swaps::new(&INFO)
            .router(|active| match active.as_any().downcast_ref::<SigmoidGroupRouter>() {
                Some(r) => Swap::With(Rc::new(FusedSigmoidRouter(r.clone()))),
                None => Swap::skip("not a sigmoid group router"),
            })
            .apply(model)
    }
}
