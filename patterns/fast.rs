//! The `fast` (validated) twins of the CPU kernel patterns: the same slot swaps as
//! `swiglu_mlp`, `downproj_combine` and `qmv_linear`, on the reassociated row kernels
//! (kernels/cpu/qmv_fast.inc: per group `scale·Σq·x + bias·Σx`, several accumulators, FMA),
//! and as `gqa_attention` with the scores, softmax and weighted sum vectorised
//! (kernels/cpu/attend_fast.inc: FMA dot products, a vector exp; the cache writes stay exact).
//! Not bit-identical to MLX (float rounding differs, ~1e-6 relative per row), so class
//! `validated`: token-identity to the unpatched model is shown over the validation suite by
//! `zmlx validate --logits` (max-abs/KL of the logits in the ledger), tests/fast_fidelity.rs
//! on every family's small checkpoints. Each conflicts with its exact twin.
use anyhow::Result;

use super::{Pattern, PatternInfo, PatternOutcome, SafetyClass, SlotKind};
use crate::config::Family;
use crate::kernels::KernelClass;
use crate::model::Model;

pub struct SwigluMlpFast;
pub struct DownprojCombineFast;
pub struct QmvLinearFast;
pub struct GqaAttentionFast;

static SWIGLU: PatternInfo = PatternInfo {
    name: "swiglu_mlp_fast",
    slot: SlotKind::Activation,
    slots: &[SlotKind::Experts, SlotKind::SharedExpert, SlotKind::DenseMlp],
    requires: &[],
    conflicts: &["swiglu_mlp"],
    families: &Family::ALL,
    class: SafetyClass::Validated,
    decode_only: false,
    env: &["ZMLX_CPU_THREADS", "ZMLX_CPU_ISA"],
    description: "swiglu_mlp on the fast (reassociated, FMA) quantized expert kernel: validated, not bit-exact",
};

static DOWNPROJ: PatternInfo = PatternInfo {
    name: "downproj_combine_fast",
    slot: SlotKind::Experts,
    slots: &[SlotKind::Experts],
    requires: &[],
    conflicts: &["downproj_combine"],
    families: &Family::ALL,
    class: SafetyClass::Validated,
    decode_only: false,
    env: &["ZMLX_CPU_THREADS", "ZMLX_CPU_ISA"],
    description: "downproj_combine on the fast (reassociated, FMA) quantized kernel: validated, not bit-exact",
};

static LINEAR: PatternInfo = PatternInfo {
    name: "qmv_linear_fast",
    slot: SlotKind::Linear,
    slots: &[SlotKind::Attention, SlotKind::SharedExpert, SlotKind::DenseMlp, SlotKind::Head, SlotKind::Router],
    requires: &[],
    conflicts: &["qmv_linear"],
    families: &Family::ALL,
    class: SafetyClass::Validated,
    decode_only: false,
    env: &["ZMLX_CPU_THREADS", "ZMLX_CPU_ISA"],
    description: "qmv_linear on the fast (reassociated, FMA) quantized mat-vec (the router gate on the exact one): validated, not bit-exact",
};

static ATTENTION: PatternInfo = PatternInfo {
    name: "gqa_attention_fast",
    slot: SlotKind::Attention,
    slots: &[SlotKind::Attention],
    requires: &[],
    conflicts: &["gqa_attention"],
    families: &[Family::Mixtral, Family::Qwen2Moe, Family::Qwen3Moe, Family::Glm4Moe],
    class: SafetyClass::Validated,
    decode_only: false,
    env: &["ZMLX_CPU_THREADS", "ZMLX_CPU_ISA"],
    description:
        "gqa_attention with vectorised scores/softmax/weighted sum (FMA, vector exp): validated, not bit-exact",
};

impl Pattern for SwigluMlpFast {
    fn info(&self) -> &'static PatternInfo {
        &SWIGLU
    }

    fn apply(&self, model: &mut Model) -> Result<PatternOutcome> {
        super::swiglu_mlp::apply_with(&SWIGLU, KernelClass::Fast, "swiglu_mlp_fast.experts", model)
    }
}

impl Pattern for DownprojCombineFast {
    fn info(&self) -> &'static PatternInfo {
        &DOWNPROJ
    }

    fn apply(&self, model: &mut Model) -> Result<PatternOutcome> {
        super::downproj_combine::apply_with(&DOWNPROJ, KernelClass::Fast, model)
    }
}

impl Pattern for QmvLinearFast {
    fn info(&self) -> &'static PatternInfo {
        &LINEAR
    }

    fn apply(&self, model: &mut Model) -> Result<PatternOutcome> {
        super::qmv_linear::apply_with(&LINEAR, KernelClass::Fast, model)
    }
}

impl Pattern for GqaAttentionFast {
    fn info(&self) -> &'static PatternInfo {
        &ATTENTION
    }

    fn apply(&self, model: &mut Model) -> Result<PatternOutcome> {
        super::gqa_attention::apply_with(&ATTENTION, KernelClass::Fast, model)
    }
}

/// The exact pattern a fast one replaces in a preset (and back).
pub const TWINS: &[(&str, &str)] = &[
    ("gqa_attention", "gqa_attention_fast"),
    ("swiglu_mlp", "swiglu_mlp_fast"),
    ("downproj_combine", "downproj_combine_fast"),
    ("qmv_linear", "qmv_linear_fast"),
];
