//! The `fast` (validated) twins of the quantized CPU kernel patterns: the same slot swaps as
//! `swiglu_mlp`, `downproj_combine` and `qmv_linear`, on the reassociated row kernels
//! (kernels/cpu/qmv_fast.inc: per group `scale·Σq·x + bias·Σx`, several accumulators, FMA).
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
    slots: &[SlotKind::Attention, SlotKind::SharedExpert, SlotKind::DenseMlp, SlotKind::Head],
    requires: &[],
    conflicts: &["qmv_linear"],
    families: &Family::ALL,
    class: SafetyClass::Validated,
    decode_only: false,
    env: &["ZMLX_CPU_THREADS", "ZMLX_CPU_ISA"],
    description: "qmv_linear on the fast (reassociated, FMA) quantized mat-vec: validated, not bit-exact",
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

/// The exact pattern a fast one replaces in a preset (and back).
pub const TWINS: &[(&str, &str)] = &[
    ("swiglu_mlp", "swiglu_mlp_fast"),
    ("downproj_combine", "downproj_combine_fast"),
    ("qmv_linear", "qmv_linear_fast"),
];
