//! `rms_norm` (safe on CPU): each layer-level RMSNorm — every layer's input and post-attention
//! norms and the final norm — as one kernel node (`kernels::rms_norm`) instead of the ~10 op nodes
//! of MLX's CPU `fast::rms_norm` fallback. The arithmetic is the same: it saves per-node
//! overhead (graph node, allocation, task hand-off: ~14 µs per small op in the 2-core VM's decode
//! loop; 50 of 152 nodes per decode step on the 2-layer bench model), not compute. Bit-identical
//! (tests/kernels.rs, `zmlx selftest`), token-identical on every family (tests/fidelity.rs). The norms inside MLA
//! attention (q_a/kv_a) and Qwen3's per-head q/k norms are parts of the attention slot
//! (`gqa_attention` already fuses the latter). Not applied on GPU backends (`fast::rms_norm` is
//! one fused kernel there); non-f32 calls run stock (counted).
use std::any::Any;
use std::rc::Rc;

use anyhow::Result;
use mlx_rs::Array;

use super::{Pattern, PatternInfo, PatternOutcome, SafetyClass, SlotKind, Swap, Swaps};
use crate::config::Family;
use crate::fallbacks;
use crate::kernels::{self, rms_norm as kernel};
use crate::mlx_env::Backend;
use crate::model::Model;
use crate::nn::RmsNorm;
use crate::slots::NormSlot;

pub struct RmsNormPattern;

static INFO: PatternInfo = PatternInfo {
    name: "rms_norm",
    slot: SlotKind::Norm,
    slots: &[SlotKind::Norm],
    requires: &[],
    conflicts: &[],
    families: &Family::ALL,
    class: SafetyClass::Safe,
    decode_only: false,
    env: &["ZMLX_CPU_THREADS"],
    description: "layer RMSNorms (input, post-attention, final) as one CPU kernel node each instead of ~10 MLX ops",
};

/// The stock norm's weights on the fused kernel.
pub struct FusedRmsNorm {
    pub inner: RmsNorm,
}

impl NormSlot for FusedRmsNorm {
    fn forward(&self, x: &Array) -> Result<Array> {
        if let Some(why) = kernel::rms_norm_unsupported(x, &self.inner) {
            fallbacks::fallback(INFO.name, &why);
            return self.inner.forward(x);
        }
        fallbacks::fused(INFO.name);
        kernel::rms_norm(x, &self.inner)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Pattern for RmsNormPattern {
    fn info(&self) -> &'static PatternInfo {
        &INFO
    }

    fn apply(&self, model: &mut Model) -> Result<PatternOutcome> {
        Swaps::new(&INFO)
            .norm(|active| {
                if kernels::backend() != Backend::Cpu {
                    return Swap::skip("CPU-only kernel (fast::rms_norm is one fused kernel on GPUs)");
                }
                match active.as_any().downcast_ref::<RmsNorm>() {
                    Some(n) => Swap::With(Rc::new(FusedRmsNorm { inner: n.clone() })),
                    None => Swap::skip("not an RMSNorm"),
                }
            })
            .apply(model)
    }
}
