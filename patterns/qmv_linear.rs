//! `qmv_linear` (safe on CPU): every quantized dense projection (decode and prefill rows) —
//! attention q/k/v/o (GQA and MLA), dense and shared-expert MLPs, the output head, the softmax
//! routers' gate (always on the exact rows, also in `qmv_linear_fast`) — runs through
//! zmlx's multi-threaded SIMD mat-vec (`kernels::qmv_linear`) instead of MLX's scalar CPU
//! `quantized_matmul`. Each output row keeps `_qmm_t`'s exact sequential sum, so it is
//! bit-identical (tests/expert_kernels.rs) and token-identical (tests/fidelity.rs). Float
//! weights, bf16 activations on the CPU, Metal, and CUDA without `ZMLX_GPU_EXPERIMENTAL` keep the
//! stock projection, decided at patch time (the report says why). On CUDA with it, prefill rows
//! run zmlx's deterministic grouped body (class validated there; MLX's tiled kernel races) and
//! decode rows stay on MLX's qmv (counted as fallbacks).
//! It gives each projection of the *active* attention/MLP/head implementation a new
//! `DenseProjection` (through the slots' generic `with_linears`), so it composes with the other
//! attention/MLP patterns without knowing their types.
use std::any::Any;
use std::cell::Cell;
use std::rc::Rc;

use anyhow::Result;
use mlx_rs::{Array, Dtype};

use super::{Pattern, PatternInfo, PatternOutcome, SafetyClass, SlotKind, Swap, Swaps};
use crate::config::Family;
use crate::fallbacks;
use crate::kernels::qmv_linear::{qmv_linear_class, qmv_linear_unsupported, qmv_linear_unsupported_for};
use crate::kernels::KernelClass;
use crate::model::Model;
use crate::nn::{DenseProjection, Linear, QWeight, Weight};

pub struct QmvLinear;

static INFO: PatternInfo = PatternInfo {
    name: "qmv_linear",
    slot: SlotKind::Linear,
    slots: &[SlotKind::Attention, SlotKind::SharedExpert, SlotKind::DenseMlp, SlotKind::Head, SlotKind::Router],
    requires: &[],
    conflicts: &["qmv_linear_fast"],
    families: &Family::ALL,
    class: SafetyClass::Safe,
    decode_only: false,
    env: &["ZMLX_CPU_THREADS", "ZMLX_CPU_ISA"],
    description: "quantized dense projections (attention, dense/shared MLP, lm_head, softmax router gate) on zmlx's bit-exact multi-threaded mat-vec",
};

/// A quantized projection on the `qmv_linear` kernel; the projection it wraps runs wherever the
/// kernel does not apply.
pub struct QmvProjection {
    pub weight: QWeight,
    pub inner: Rc<dyn DenseProjection>,
    /// Exact (`qmv_linear`) or fast (`qmv_linear_fast`) row kernels.
    pub class: KernelClass,
    /// The pattern name its calls are counted under.
    pub counter: &'static str,
}

impl DenseProjection for QmvProjection {
    fn forward(&self, x: &Array) -> Result<Array> {
        match qmv_linear_unsupported(x, &self.weight) {
            None => {
                fallbacks::fused(self.counter);
                let y = qmv_linear_class(x, &self.weight, self.class)?;
                Ok(match self.inner.bias() {
                    Some(b) => y.add(b)?,
                    None => y,
                })
            }
            Some(why) => {
                fallbacks::fallback(self.counter, &why);
                self.inner.forward(x)
            }
        }
    }

    fn weight(&self) -> &Weight {
        self.inner.weight()
    }

    fn bias(&self) -> Option<&Array> {
        self.inner.bias()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Rebuilds the active implementation with every quantized projection the kernel applies to
/// (decided here, at patch time, from the weights, the compute dtype and the backend) on the
/// kernel; skips it, saying why, when there is none.
fn on_kernel<T: ?Sized>(
    class: KernelClass,
    counter: &'static str,
    dtype: Dtype,
    rebuild: impl FnOnce(&mut dyn FnMut(&Linear) -> Linear) -> Option<Rc<T>>,
) -> Swap<T> {
    let swapped = Cell::new(0);
    let mut why: Option<String> = None;
    let mut f = |l: &Linear| match l.weight() {
        Weight::Quant(q) => match qmv_linear_unsupported_for(dtype, q) {
            None => {
                swapped.set(swapped.get() + 1);
                l.with(Rc::new(QmvProjection { weight: q.clone(), inner: l.implementation().clone(), class, counter }))
            }
            Some(w) => {
                why.get_or_insert(w);
                l.clone()
            }
        },
        Weight::Float(_) => l.clone(),
    };
    let rebuilt = rebuild(&mut f);
    match (rebuilt, why) {
        (Some(imp), _) if swapped.get() > 0 => Swap::With(imp),
        (Some(_), Some(why)) => Swap::skip(why),
        (Some(_), None) => Swap::skip("float weights (the kernel is for quantized 2/4/8-bit projections)"),
        (None, _) => Swap::skip("no Linear projection to swap (e.g. a sigmoid router's plain gate matrix)"),
    }
}

impl Pattern for QmvLinear {
    fn info(&self) -> &'static PatternInfo {
        &INFO
    }

    fn apply(&self, model: &mut Model) -> Result<PatternOutcome> {
        apply_with(&INFO, KernelClass::Exact, model)
    }
}

/// `qmv_linear`'s swaps with the given row kernels (shared with `qmv_linear_fast`).
pub(super) fn apply_with(info: &'static PatternInfo, class: KernelClass, model: &mut Model) -> Result<PatternOutcome> {
    let (n, dt) = (info.name, model.dtype);
    Swaps::new(info)
        .attention(|active| on_kernel(class, n, dt, |f| active.with_linears(f)))
        .shared_expert(|active| on_kernel(class, n, dt, |f| active.with_linears(f)))
        .dense_mlp(|active| on_kernel(class, n, dt, |f| active.with_linears(f)))
        .head(|active| on_kernel(class, n, dt, |f| active.with_linears(f)))
        // The router gate always on the exact rows, in the fast twin too: routing decisions stay
        // bit-identical to MLX's (a near-tie flipped by rounding would swap an expert).
        .router(|active| on_kernel(KernelClass::Exact, n, dt, |f| active.with_linears(f)))
        .apply(model)
}
