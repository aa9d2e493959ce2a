//! `downproj_combine` (safe on CPU): with quantized experts (2/4/8-bit, f32 activations) the
//! gathered down projection and the weighted combine of the k experts run as one kernel
//! (`qmv_combine`); at decode it never materialises the `[k, D]` expert outputs, at prefill it
//! groups the (token, slot) pairs by expert. Bit-identical
//! to gather_qmm + `(y * w).sum(-2)` on CPU (tests/kernels.rs), token-identical
//! (tests/fidelity.rs). Stacks on `swiglu_mlp` (its fused gate/up kernel feeds this one). Other
//! calls (no fused hidden state from the experts slot, float experts, bf16 activations, a
//! non-plain combine) use the stock slots and are counted in `fallbacks`.
use std::any::Any;
use std::rc::Rc;

use anyhow::Result;
use mlx_rs::Array;

use super::{Pattern, PatternInfo, PatternOutcome, SafetyClass, SlotKind};
use crate::config::Family;
use crate::fallbacks;
use crate::kernels::experts;
use crate::model::Model;
use crate::moe::SwitchGlu;
use crate::nn::{QWeight, Weight};
use crate::slots::{CombineSlot, ExpertsSlot, Routing};

pub struct DownprojCombine;

static INFO: PatternInfo = PatternInfo {
    name: "downproj_combine",
    slot: SlotKind::Experts,
    families: &Family::ALL,
    class: SafetyClass::Safe,
    decode_only: false,
    env: &["ZMLX_CPU_THREADS", "ZMLX_CPU_ISA"],
    description: "decode: quantized expert down projection fused with the weighted combine (no [k, D] intermediate)",
};

/// Wraps the experts slot that was active when the pattern applied.
pub struct FusedDownCombine {
    pub inner: Rc<dyn ExpertsSlot>,
    pub down: QWeight,
}

impl FusedDownCombine {
    fn try_fused(&self, x: &Array, routing: &Routing, combine: &dyn CombineSlot) -> Result<Result<Array, String>> {
        let Some(cast_back) = combine.plain_weighted_sum() else {
            return Ok(Err("the active combine is not the plain weighted sum".into()));
        };
        if let Some(why) = experts::unsupported(x.dtype(), &[&self.down]) {
            return Ok(Err(why));
        }
        if routing.weights.dtype() != mlx_rs::Dtype::Float32 {
            return Ok(Err(format!("{:?} routing weights", routing.weights.dtype())));
        }
        let Some(h) = self.inner.hidden(x, &routing.indices)? else {
            return Ok(Err("the experts slot gives no fused hidden state (stock SwitchGLU at prefill)".into()));
        };
        let (t, k) = (h.dim(0), h.dim(1));
        let out = experts::qmv_combine(
            &h,
            &routing.indices.reshape(&[t, k])?,
            &routing.weights.reshape(&[t, k])?,
            &self.down,
        )?;
        let mut shape = routing.indices.shape().to_vec();
        *shape.last_mut().unwrap() = x.dim(-1);
        let out = out.reshape(&shape)?;
        // promote(f32 activations, f32 weights) = f32: the cast is the stock one, a no-op here.
        Ok(Ok(if cast_back { out.as_dtype(x.dtype())? } else { out }))
    }
}

impl ExpertsSlot for FusedDownCombine {
    fn forward(&self, x: &Array, indices: &Array) -> Result<Array> {
        self.inner.forward(x, indices)
    }

    fn hidden(&self, x: &Array, indices: &Array) -> Result<Option<Array>> {
        self.inner.hidden(x, indices)
    }

    fn forward_combined(&self, x: &Array, routing: &Routing, combine: &dyn CombineSlot) -> Result<Array> {
        match self.try_fused(x, routing, combine)? {
            Ok(out) => {
                fallbacks::fused(INFO.name);
                Ok(out)
            }
            Err(why) => {
                fallbacks::fallback(INFO.name, &why);
                self.inner.forward_combined(x, routing, combine)
            }
        }
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Pattern for DownprojCombine {
    fn info(&self) -> &PatternInfo {
        &INFO
    }

    fn apply(&self, model: &mut Model) -> Result<PatternOutcome> {
        let mut out = PatternOutcome::default();
        for (_, block) in model.moe_blocks_mut() {
            let path = format!("{}.switch_mlp.down_proj", block.path);
            let stock = block.experts.stock().clone();
            let Some(s) = stock.as_any().downcast_ref::<SwitchGlu>() else {
                out.skipped.push((path, "experts are not a SwitchGLU".into()));
                continue;
            };
            let Weight::Quant(down) = &s.down_proj.weight else {
                out.skipped.push((path, "float experts (the fused kernel is for quantized 2/4/8-bit experts)".into()));
                continue;
            };
            if ![2, 4, 8].contains(&down.q.bits) {
                out.skipped.push((path, format!("{}-bit experts (the kernel has 2/4/8)", down.q.bits)));
                continue;
            }
            // Activation dtype and backend are checked per call (fallbacks are counted).
            let inner = Rc::new(FusedDownCombine { inner: block.experts.get_rc().clone(), down: down.clone() });
            block.experts.swap(inner, INFO.name);
            out.patched.push(path);
        }
        Ok(out)
    }
}
