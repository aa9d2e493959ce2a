//! `swiglu_mlp` (safe): the gated activation `silu(gate) * up` of every expert MLP (SwitchGLU),
//! dense MLP and shared expert runs as one fused kernel instead of three MLX ops.
//! Bit-identical on CPU (tests/kernels.rs), token-identical (tests/fidelity.rs).
use std::any::Any;
use std::rc::Rc;

use anyhow::Result;
use mlx_rs::Array;

use super::{Pattern, PatternInfo, PatternOutcome, SafetyClass, SlotKind};
use crate::config::Family;
use crate::kernels;
use crate::model::{LayerMlp, Model};
use crate::moe::{DenseMlp, GatedSharedExpert, SwitchGlu};
use crate::slots::{ActivationSlot, ExpertsSlot, MlpSlot};

pub struct SwigluMlp;

static INFO: PatternInfo = PatternInfo {
    name: "swiglu_mlp",
    slot: SlotKind::Activation,
    families: &Family::ALL,
    class: SafetyClass::Safe,
    decode_only: false,
    env: &[],
    description: "fused silu(gate)*up in expert, dense and shared-expert MLPs (one kernel instead of three ops)",
};

/// The fused activation.
pub struct FusedSwiGlu;

impl ActivationSlot for FusedSwiGlu {
    fn forward(&self, gate: &Array, up: &Array) -> Result<Array> {
        kernels::swiglu(gate, up)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn fused_dense(stock: &Rc<dyn MlpSlot>) -> Option<Rc<dyn MlpSlot>> {
    let any = stock.as_any();
    if let Some(g) = any.downcast_ref::<GatedSharedExpert>() {
        let mlp = DenseMlp { activation: Rc::new(FusedSwiGlu), ..g.mlp.clone() };
        return Some(Rc::new(GatedSharedExpert { mlp, gate: g.gate.clone() }));
    }
    let d = any.downcast_ref::<DenseMlp>()?;
    Some(Rc::new(DenseMlp { activation: Rc::new(FusedSwiGlu), ..d.clone() }))
}

impl Pattern for SwigluMlp {
    fn info(&self) -> &PatternInfo {
        &INFO
    }

    fn apply(&self, model: &mut Model) -> Result<PatternOutcome> {
        let mut out = PatternOutcome::default();
        for (i, layer) in model.layers.iter_mut().enumerate() {
            match &mut layer.mlp {
                LayerMlp::Moe(block) => {
                    let stock = block.experts.stock().clone();
                    match stock.as_any().downcast_ref::<SwitchGlu>() {
                        Some(s) => {
                            let fused: Rc<dyn ExpertsSlot> =
                                Rc::new(SwitchGlu { activation: Rc::new(FusedSwiGlu), ..s.clone() });
                            block.experts.swap(fused, INFO.name);
                            out.patched.push(format!("{}.switch_mlp", block.path));
                        }
                        None => out
                            .skipped
                            .push((format!("{}.switch_mlp", block.path), "experts are not a SwitchGLU".into())),
                    }
                    if let Some(shared) = &mut block.shared {
                        if let Some(f) = fused_dense(&shared.stock().clone()) {
                            shared.swap(f, INFO.name);
                            out.patched.push(format!("{}.shared_expert", block.path));
                        }
                    }
                }
                LayerMlp::Dense(mlp) => match fused_dense(&mlp.stock().clone()) {
                    Some(f) => {
                        mlp.swap(f, INFO.name);
                        out.patched.push(format!("model.layers.{i}.mlp"));
                    }
                    None => out.skipped.push((format!("model.layers.{i}.mlp"), "not a SwiGLU MLP".into())),
                },
            }
        }
        Ok(out)
    }
}
