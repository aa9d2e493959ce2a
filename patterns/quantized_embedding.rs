//! `quantized_embedding` (safe on CPU): the quantized token-embedding lookup as one kernel node
//! (`kernels::quantized_embedding`) instead of the ~57 op nodes MLX's CPU `dequantize` of the
//! gathered rows builds (three gathers, two shifts and an expand per packed field, concatenate,
//! reshapes, scale and bias with broadcasts). Same arithmetic per element (`q * scale + bias`,
//! two roundings): it saves per-node overhead in the decode loop, not compute. Bit-identical
//! (tests/kernels.rs, `zmlx selftest`), token-identical on every family (tests/fidelity.rs).
//! Float tables (a plain gather) are skipped; not applied on GPU backends (MLX's dequantize is
//! a fused kernel there); non-f32 compute or 3/5/6-bit tables run stock (counted).
use std::any::Any;
use std::rc::Rc;

use anyhow::Result;
use mlx_rs::Array;

use super::{Pattern, PatternInfo, PatternOutcome, SafetyClass, SlotKind, Swap, Swaps};
use crate::config::Family;
use crate::fallbacks;
use crate::kernels::{self, quantized_embedding as kernel};
use crate::mlx_env::Backend;
use crate::model::Model;
use crate::nn::{Embedding, Weight};
use crate::slots::EmbeddingSlot;

pub struct QuantizedEmbeddingPattern;

static INFO: PatternInfo = PatternInfo {
    name: "quantized_embedding",
    slot: SlotKind::Embedding,
    slots: &[SlotKind::Embedding],
    requires: &[],
    conflicts: &[],
    families: &Family::ALL,
    class: SafetyClass::Safe,
    decode_only: false,
    env: &[],
    description: "quantized token-embedding lookup as one CPU kernel node instead of ~57 MLX ops",
};

/// The stock embedding's table on the fused lookup.
pub struct FusedQuantizedEmbedding {
    pub inner: Embedding,
}

impl EmbeddingSlot for FusedQuantizedEmbedding {
    fn forward(&self, ids: &Array) -> Result<Array> {
        if let Err(why) = kernel::quantized_embedding_unsupported(ids, &self.inner) {
            fallbacks::fallback(INFO.name, &why);
            return self.inner.forward(ids);
        }
        fallbacks::fused(INFO.name);
        kernel::quantized_embedding(ids, &self.inner)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Pattern for QuantizedEmbeddingPattern {
    fn info(&self) -> &'static PatternInfo {
        &INFO
    }

    fn apply(&self, model: &mut Model) -> Result<PatternOutcome> {
        Swaps::new(&INFO)
            .embedding(|active| {
                if kernels::backend() != Backend::Cpu {
                    return Swap::skip("CPU-only kernel (MLX's dequantize is fused on GPUs)");
                }
                match active.as_any().downcast_ref::<Embedding>() {
                    Some(e) if matches!(e.weight, Weight::Quant(_)) => {
                        Swap::With(Rc::new(FusedQuantizedEmbedding { inner: e.clone() }))
                    }
                    Some(_) => Swap::skip("float weights (a plain gather: nothing to fuse)"),
                    None => Swap::skip("not the stock embedding"),
                }
            })
            .apply(model)
    }
}
