//! `debug_drop_expert` (unsafe): gives the last routed expert of every token weight 0.
//! A deliberately wrong pattern: it exists so the fidelity tooling (`zmlx validate`, tests) can
//! be shown to catch a divergence and report where it happens. It wraps whichever router is
//! active (stock, `moe_mlp`'s or `deepseek_router`'s fused one), so it composes with them.
use std::any::Any;
use std::rc::Rc;

use anyhow::Result;
use mlx_rs::{ops, Array};

use super::{Pattern, PatternInfo, PatternOutcome, SafetyClass, SlotKind, Swap, Swaps};
use crate::config::Family;
use crate::model::Model;
use crate::slots::{RouterSlot, Routing};

pub struct DebugDropExpert;

static INFO: PatternInfo = PatternInfo {
    name: "debug_drop_expert",
    slot: SlotKind::Router,
    slots: &[SlotKind::Router],
    requires: &[],
    conflicts: &[],
    families: &Family::ALL,
    class: SafetyClass::Unsafe,
    decode_only: false,
    env: &[],
    description: "drops the last routed expert (weight 0); a wrong-on-purpose pattern for testing fidelity tooling",
};

/// Wraps the active router.
pub struct DropLast(pub Rc<dyn RouterSlot>);

impl RouterSlot for DropLast {
    fn route(&self, x: &Array) -> Result<Routing> {
        let r = self.0.route(x)?;
        let k = r.weights.dim(-1);
        let keep = ops::lt(ops::arange::<_, i32>(None, k, None)?, Array::from_int(k - 1))?;
        let weights = ops::select(&keep, &r.weights, ops::zeros_like(&r.weights)?)?;
        Ok(Routing { indices: r.indices, weights })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Pattern for DebugDropExpert {
    fn info(&self) -> &'static PatternInfo {
        &INFO
    }

    fn apply(&self, model: &mut Model) -> Result<PatternOutcome> {
        Swaps::new(&INFO).router(|active| Swap::With(Rc::new(DropLast(active.clone())))).apply(model)
    }
}
