//! `gqa_attention` (safe on CPU): the attention core of grouped-query attention — per-head
//! RMSNorm (Qwen3), RoPE, the KV-cache write and softmax attention — as three kernel nodes
//! (`kernels::gqa_attention`) instead of ~60 MLX ops (MLX's CPU rms_norm/rope/SDPA are op
//! fallbacks), reading the cache in place instead of copying K and V every token. Decode and
//! prefill. Families: Mixtral, Qwen2-MoE, Qwen3-MoE, GLM-4.5 (the GQA families). Bit-identical
//! to the stock core on the CPU (tests/kernels_attention.rs), token-identical (tests/fidelity.rs).
//! The projections stay the active ones, so it composes with `qmv_linear`/`qmv_linear_fast`.
//! Not applied on GPU backends (MLX's SDPA is fused there); non-f32 calls run stock (counted).
use std::any::Any;
use std::rc::Rc;

use anyhow::Result;
use mlx_rs::Array;

use super::{Pattern, PatternInfo, PatternOutcome, SafetyClass, SlotKind, Swap, Swaps};
use crate::attention::GqaAttention;
use crate::cache::KvCache;
use crate::config::Family;
use crate::fallbacks;
use crate::kernels::{self, gqa_attention as kernel, KernelClass};
use crate::mlx_env::Backend;
use crate::model::Model;
use crate::slots::{AttentionSlot, MapLinears};

pub struct GqaAttentionPattern;

static INFO: PatternInfo = PatternInfo {
    name: "gqa_attention",
    slot: SlotKind::Attention,
    slots: &[SlotKind::Attention],
    requires: &[],
    conflicts: &[],
    families: &[Family::Mixtral, Family::Qwen2Moe, Family::Qwen3Moe, Family::Glm4Moe],
    class: SafetyClass::Safe,
    decode_only: false,
    env: &["ZMLX_CPU_THREADS"],
    description:
        "GQA attention core (qk-norm + RoPE + KV-cache write + SDPA) in three CPU kernel nodes, cache read in place",
};

/// The active GQA attention with the fused core of `class` (counted under `pattern`).
pub struct FusedGqa {
    pub inner: GqaAttention,
    pub class: KernelClass,
    pub pattern: &'static str,
}

impl AttentionSlot for FusedGqa {
    fn forward(&self, x: &Array, caches: &mut [KvCache]) -> Result<Array> {
        let a = &self.inner;
        a.forward_with(x, caches, &|q, k, v, c| {
            if let Some(why) = kernel::gqa_attention_unsupported(a, q) {
                fallbacks::fallback(self.pattern, &why);
                return a.stock_core(q, k, v, c);
            }
            fallbacks::fused(self.pattern);
            kernel::gqa_attention(a, q, k, v, c, self.class)
        })
    }

    fn with_linears(&self, f: MapLinears) -> Option<Rc<dyn AttentionSlot>> {
        Some(Rc::new(FusedGqa { inner: self.inner.map_linears(f), class: self.class, pattern: self.pattern }))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Pattern for GqaAttentionPattern {
    fn info(&self) -> &'static PatternInfo {
        &INFO
    }

    fn apply(&self, model: &mut Model) -> Result<PatternOutcome> {
        apply_with(&INFO, KernelClass::Exact, model)
    }
}

/// The swap of `gqa_attention` and of its fast twin (`patterns::fast`): the stock GQA core for
/// the fused one of `class`.
pub fn apply_with(info: &'static PatternInfo, class: KernelClass, model: &mut Model) -> Result<PatternOutcome> {
    Swaps::new(info)
        .attention(|active| {
            if kernels::backend() != Backend::Cpu {
                return Swap::skip("CPU-only kernel (MLX's GPU SDPA is already fused)");
            }
            match active.as_any().downcast_ref::<GqaAttention>() {
                Some(g) => Swap::With(Rc::new(FusedGqa { inner: g.clone(), class, pattern: info.name })),
                None => Swap::skip("not grouped-query attention"),
            }
        })
        .apply(model)
}
