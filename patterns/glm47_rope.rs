//! `glm47_rope` (safe on CPU): the MLA decode step's positional part — YaRN pre-scale, RoPE of
//! q_pe and k_pe, and the softmax scale on q_pe — as one kernel (`kernels::rope_decode`), for
//! GLM-4.7-Flash (`glm4_moe_lite`) and DeepSeek-V3 / Kimi-K2. Decode only: a prefill step (L > 1)
//! runs the stock chain, counted in `fallbacks`. Bit-identical to MLX's rope on CPU
//! (tests/kernels_rope.rs), token-identical (tests/fidelity.rs).
use std::any::Any;
use std::rc::Rc;

use anyhow::Result;
use mlx_rs::Array;

use super::{Pattern, PatternInfo, PatternOutcome, SafetyClass, SlotKind, Swap, Swaps};
use crate::attention_mla::MlaAttention;
use crate::cache::KvCache;
use crate::config::Family;
use crate::fallbacks;
use crate::kernels::{self, rope_decode::rope_decode};
use crate::mlx_env::Backend;
use crate::model::Model;
use crate::slots::{AttentionSlot, MapLinears};

pub struct Glm47Rope;

static INFO: PatternInfo = PatternInfo {
    name: "glm47_rope",
    slot: SlotKind::Attention,
    slots: &[SlotKind::Attention],
    requires: &[],
    conflicts: &[],
    families: &[Family::Glm4MoeLite, Family::DeepseekV3],
    class: SafetyClass::Safe,
    decode_only: true,
    env: &[],
    description: "MLA decode: YaRN pre-scale + RoPE of q_pe/k_pe + softmax scale on q_pe in one kernel",
};

/// The active MLA attention with the fused positional step.
pub struct FusedRopeMla {
    pub inner: MlaAttention,
}

impl AttentionSlot for FusedRopeMla {
    fn forward(&self, x: &Array, caches: &mut [KvCache]) -> Result<Array> {
        let a = &self.inner;
        self.inner.forward_with(x, caches, &|q, k, offset| {
            if q.dim(2) != 1 {
                fallbacks::fallback(INFO.name, "prefill (L > 1)");
                return a.stock_pe(q, k, offset);
            }
            if kernels::backend() != Backend::Cpu && !kernels::gpu_experimental() {
                fallbacks::fallback(INFO.name, "not bit-exact on this GPU backend (ZMLX_GPU_EXPERIMENTAL=1 runs it)");
                return a.stock_pe(q, k, offset);
            }
            fallbacks::fused(INFO.name);
            rope_decode(q, k, &a.rope, offset, a.scale)
        })
    }

    fn with_linears(&self, f: MapLinears) -> Option<Rc<dyn AttentionSlot>> {
        Some(Rc::new(FusedRopeMla { inner: self.inner.map_linears(f) }))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Pattern for Glm47Rope {
    fn info(&self) -> &'static PatternInfo {
        &INFO
    }

    fn apply(&self, model: &mut Model) -> Result<PatternOutcome> {
        let gpu_not_exact = kernels::backend() != Backend::Cpu && !kernels::gpu_experimental();
        Swaps::new(&INFO)
            .attention(|active| match active.as_any().downcast_ref::<MlaAttention>() {
                Some(_) if gpu_not_exact => Swap::skip(format!(
                    "not bit-exact on {} (ZMLX_GPU_EXPERIMENTAL=1 runs it): the stock rope runs",
                    kernels::backend().name()
                )),
                Some(m) => Swap::With(Rc::new(FusedRopeMla { inner: m.clone() })),
                None => Swap::skip("not multi-head latent attention"),
            })
            .apply(model)
    }
}
