//! `moe_mlp` (safe): the softmax-family router (softmax + top-k + renormalisation, same expert
//! slot order as the stock path; Mixtral/Qwen only — sigmoid routers are `deepseek_router`'s)
//! and the weighted combine of the k expert outputs (every family) each run as one fused kernel
//! (`kernels::moe_router`, `kernels::moe_combine`). `ZMLX_COMBINE_MODE` picks the combine
//! accumulation (default: the token-identical one for the family on this backend).
use std::any::Any;
use std::rc::Rc;

use anyhow::Result;
use mlx_rs::{Array, Dtype};

use super::{Pattern, PatternInfo, PatternOutcome, SafetyClass, SlotKind, Swap, Swaps};
use crate::config::Family;
use crate::fallbacks;
use crate::kernels;
use crate::kernels::moe_combine::{moe_combine, moe_combine_reference, CombineMode};
use crate::kernels::moe_router::{moe_router, RouterKind};
use crate::model::Model;
use crate::moe::{SoftmaxRouter, WeightedSumCombine};
use crate::nn::Linear;
use crate::slots::{CombineSlot, MapLinears, RouterSlot, Routing};

pub struct MoeMlp;

pub const COMBINE_MODE_VAR: &str = "ZMLX_COMBINE_MODE";

static INFO: PatternInfo = PatternInfo {
    name: "moe_mlp",
    slot: SlotKind::Router,
    slots: &[SlotKind::Router, SlotKind::Combine],
    requires: &[],
    conflicts: &[],
    families: &Family::ALL,
    class: SafetyClass::Safe,
    decode_only: false,
    env: &[COMBINE_MODE_VAR],
    description: "fused softmax top-k router (Mixtral/Qwen semantics, stock slot order) + fused weighted combine of the k experts (all families)",
};

pub struct FusedRouter {
    pub gate: Linear,
    pub kind: RouterKind,
    pub k: i32,
}

impl RouterSlot for FusedRouter {
    fn route(&self, x: &Array) -> Result<Routing> {
        let (indices, weights) = moe_router(&self.gate.forward(x)?, self.kind, self.k)?;
        Ok(Routing { indices, weights })
    }

    fn with_linears(&self, f: MapLinears) -> Option<Rc<dyn RouterSlot>> {
        Some(Rc::new(FusedRouter { gate: f(&self.gate), kind: self.kind, k: self.k }))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

pub struct FusedCombine {
    pub mode: CombineMode,
    pub cast_back: bool,
}

impl FusedCombine {
    /// Why the act-mode kernel is not used for these inputs: on GPUs its half-precision sum is
    /// not bit-identical to MLX's reduction (selftest on the H100), so the stock ops run there.
    fn not_exact(&self, y: &Array, weights: &Array) -> Option<&'static str> {
        let half = y.dtype() != Dtype::Float32 && y.dtype() == weights.dtype();
        (self.mode == CombineMode::Act && half && kernels::backend() != crate::mlx_env::Backend::Cpu)
            .then_some("half-precision act combine on a GPU (not bit-exact there)")
    }
}

impl CombineSlot for FusedCombine {
    fn forward(&self, y: &Array, weights: &Array) -> Result<Array> {
        let out = match self.not_exact(y, weights) {
            Some(why) => {
                fallbacks::fallback("moe_mlp.combine", why);
                moe_combine_reference(y, weights)?
            }
            None => {
                fallbacks::fused("moe_mlp.combine");
                moe_combine(y, weights, self.mode)?
            }
        };
        Ok(if self.cast_back { out.as_dtype(y.dtype())? } else { out })
    }

    fn plain_weighted_sum(&self) -> Option<bool> {
        // The act mode is bit-identical to the stock sum on CPU (tests/kernels.rs).
        (self.mode == CombineMode::Act && kernels::backend() == crate::mlx_env::Backend::Cpu).then_some(self.cast_back)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The combine accumulation that is token-identical to the stock path: MLX 0.32.2 sums in the
/// activation dtype on CPU. (GPU backends: see HANDOFF.md; measured per backend.)
fn combine_mode() -> Result<CombineMode> {
    match crate::settings::var(COMBINE_MODE_VAR) {
        Some(v) if !v.trim().is_empty() && v != "auto" => CombineMode::parse(v.trim()),
        _ => Ok(CombineMode::Act),
    }
}

impl Pattern for MoeMlp {
    fn info(&self) -> &'static PatternInfo {
        &INFO
    }

    fn apply(&self, model: &mut Model) -> Result<PatternOutcome> {
        let mode = combine_mode()?;
        // The act-mode combine's half-precision sum is not bit-exact on GPUs: there the combine
        // stays the stock weighted sum (which `downproj_combine` composes with), decided here
        // rather than on every call.
        let model_dtype = model.dtype;
        let half = matches!(model_dtype, Dtype::Float16 | Dtype::Bfloat16);
        let gpu_half_act = mode == CombineMode::Act && half && kernels::backend() != crate::mlx_env::Backend::Cpu;
        Swaps::new(&INFO)
            .router(|active| match active.as_any().downcast_ref::<SoftmaxRouter>() {
                Some(r) => Swap::With(Rc::new(FusedRouter { gate: r.gate.clone(), kind: r.kind, k: r.k })),
                None => Swap::skip("sigmoid group router (see deepseek_router)"),
            })
            .combine(|active| match active.as_any().downcast_ref::<WeightedSumCombine>() {
                Some(_) if gpu_half_act => Swap::skip(format!(
                    "{:?} act combine on {} (not bit-exact there): the stock weighted sum runs",
                    model_dtype,
                    kernels::backend().name()
                )),
                Some(c) => Swap::With(Rc::new(FusedCombine { mode, cast_back: c.cast_back })),
                None => Swap::skip("not a weighted-sum combine"),
            })
            .apply(model)
    }
}
