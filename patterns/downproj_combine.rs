//! `downproj_combine` (safe on CPU): with quantized experts (2/4/8-bit, f32 activations) the
//! gathered down projection and the weighted combine of the k experts run as one kernel
//! (`qmv_combine`); at decode it never materialises the `[k, D]` expert outputs, at prefill it
//! groups the (token, slot) pairs by expert. Bit-identical
//! to gather_qmm + `(y * w).sum(-2)` on CPU (tests/kernels.rs), token-identical
//! (tests/fidelity.rs). Wraps the active experts: on `swiglu_mlp`'s fused experts its gate/up
//! kernel feeds this one (the down weights are found under any wrapper by `find_experts`). Float
//! or 3/5/6-bit experts, a compute dtype or backend the kernel is not exact for: the experts stay
//! as they were, decided at patch time (the report says why). Calls without a fused hidden state
//! from the experts slot or with a non-plain combine use the stock slots, counted in `fallbacks`.
//! On a GPU (opt-in `ZMLX_GPU_EXPERIMENTAL`, class validated there) the kernel takes
//! half-precision routing weights, and on Metal calls of at most `GPU_MAX_TOKENS` tokens (CUDA
//! runs prefill grouped by expert).
use std::any::Any;
use std::rc::Rc;

use anyhow::Result;
use mlx_rs::{Array, Dtype};

use super::{Pattern, PatternInfo, PatternOutcome, SafetyClass, SlotKind, Swap, Swaps};
use crate::config::Family;
use crate::fallbacks;
use crate::kernels;
use crate::kernels::qmv_combine::qmv_combine_class;
use crate::kernels::qmv_swiglu::{gpu_tokens_unsupported, unsupported};
use crate::kernels::KernelClass;
use crate::mlx_env::Backend;
use crate::model::Model;
use crate::moe::SwitchGlu;
use crate::nn::{QWeight, Weight};
use crate::slots::{find_experts, CombineSlot, ExpertsSlot, Routing};

pub struct DownprojCombine;

static INFO: PatternInfo = PatternInfo {
    name: "downproj_combine",
    slot: SlotKind::Experts,
    slots: &[SlotKind::Experts],
    requires: &[],
    conflicts: &["downproj_combine_fast"],
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
    /// Exact (`downproj_combine`) or fast (`downproj_combine_fast`) row kernels.
    pub class: KernelClass,
    /// The pattern name its calls are counted under.
    pub counter: &'static str,
}

impl FusedDownCombine {
    fn try_fused(&self, x: &Array, routing: &Routing, combine: &dyn CombineSlot) -> Result<Result<Array, String>> {
        let Some(cast_back) = combine.plain_weighted_sum() else {
            return Ok(Err("the active combine is not the plain weighted sum".into()));
        };
        if let Some(why) = unsupported(x.dtype(), &[&self.down]) {
            return Ok(Err(why));
        }
        // The CPU kernel takes float32 routing weights; the GPU bodies also take half-precision
        // ones (widened to float exactly in the kernel).
        let wdt = routing.weights.dtype();
        let gpu = kernels::backend() != Backend::Cpu;
        if !(wdt == Dtype::Float32 || (gpu && matches!(wdt, Dtype::Float16 | Dtype::Bfloat16))) {
            return Ok(Err(format!("{wdt:?} routing weights")));
        }
        let k = routing.indices.dim(-1);
        if let Some(why) = gpu_tokens_unsupported(routing.indices.size() as i32 / k) {
            return Ok(Err(why));
        }
        let Some(h) = self.inner.hidden(x, &routing.indices)? else {
            return Ok(Err("the experts slot gives no fused hidden state (stock SwitchGLU at prefill)".into()));
        };
        let (t, k) = (h.dim(0), h.dim(1));
        let (idx, w) = (routing.indices.reshape(&[t, k])?, routing.weights.reshape(&[t, k])?);
        let out = qmv_combine_class(&h, &idx, &w, &self.down, self.class)?;
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
                fallbacks::fused(self.counter);
                Ok(out)
            }
            Err(why) => {
                fallbacks::fallback(self.counter, &why);
                self.inner.forward_combined(x, routing, combine)
            }
        }
    }

    fn wraps(&self) -> Option<&dyn ExpertsSlot> {
        Some(&*self.inner)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

fn fused(
    active: &Rc<dyn ExpertsSlot>,
    dtype: Dtype,
    class: KernelClass,
    counter: &'static str,
) -> Swap<dyn ExpertsSlot> {
    let Some(s) = find_experts::<SwitchGlu>(&**active) else {
        return Swap::skip("experts are not a SwitchGLU");
    };
    let Weight::Quant(down) = &s.down_proj.weight else {
        return Swap::skip("float experts (the fused kernel is for quantized 2/4/8-bit experts)");
    };
    if ![2, 4, 8].contains(&down.q.bits) {
        return Swap::skip(format!("{}-bit experts (the kernel has 2/4/8)", down.q.bits));
    }
    // Compute dtype and backend decide at patch time: a wrapper that would fall back on every
    // call is not installed (the per-call checks stay as a guard and are counted).
    if let Some(why) = unsupported(dtype, &[down]) {
        return Swap::skip(why);
    }
    Swap::With(Rc::new(FusedDownCombine { inner: active.clone(), down: down.clone(), class, counter }))
}

impl Pattern for DownprojCombine {
    fn info(&self) -> &'static PatternInfo {
        &INFO
    }

    fn apply(&self, model: &mut Model) -> Result<PatternOutcome> {
        apply_with(&INFO, KernelClass::Exact, model)
    }
}

/// `downproj_combine`'s swap with the given row kernels (shared with `downproj_combine_fast`).
pub(super) fn apply_with(info: &'static PatternInfo, class: KernelClass, model: &mut Model) -> Result<PatternOutcome> {
    let dtype = model.dtype;
    Swaps::new(info)
        .experts(|active| fused(active, dtype, class, info.name))
        .report_suffix(SlotKind::Experts, ".down_proj")
        .apply(model)
}
