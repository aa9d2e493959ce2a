//! `swiglu_mlp` (safe): the gated activation `silu(gate) * up` of every expert MLP (SwitchGLU),
//! dense MLP and shared expert runs as one fused kernel instead of three MLX ops; with quantized
//! experts (2/4/8-bit, f32 activations on CPU) the gathered gate and up mat-vecs run inside the
//! same kernel (`qmv_swiglu`: decode, and prefill grouped by expert). Whether that kernel applies
//! is decided at patch time from the weights, compute dtype and backend (float experts or bf16
//! activations on the CPU: the activation kernel alone; a GPU backend without
//! `ZMLX_GPU_EXPERIMENTAL`: the experts stay stock, the patch report says why; on CUDA a prefill
//! runs the grouped form, gate/up and down; on Metal calls above `GPU_MAX_TOKENS` tokens stay
//! stock, counted).
//! Bit-identical on CPU (tests/kernels.rs), token-identical (tests/fidelity.rs).
use std::any::Any;
use std::rc::Rc;

use anyhow::Result;
use mlx_rs::{Array, Dtype};

use super::{Pattern, PatternInfo, PatternOutcome, SafetyClass, SlotKind, Swap, Swaps};
use crate::config::Family;
use crate::fallbacks;
use crate::kernels;
use crate::kernels::qmv_grouped::qmv_grouped_cuda;
use crate::kernels::qmv_swiglu::{gpu_tokens_unsupported, qmv_swiglu_class, unsupported, GPU_MAX_TOKENS};
use crate::kernels::swiglu::swiglu;
use crate::kernels::KernelClass;
use crate::mlx_env::Backend;
use crate::model::Model;
use crate::moe::{DenseMlp, GatedSharedExpert, SwitchGlu};
use crate::nn::Weight;
use crate::slots::{ActivationSlot, ExpertsSlot, MlpSlot};

pub struct SwigluMlp;

static INFO: PatternInfo = PatternInfo {
    name: "swiglu_mlp",
    slot: SlotKind::Activation,
    slots: &[SlotKind::Experts, SlotKind::SharedExpert, SlotKind::DenseMlp],
    requires: &[],
    conflicts: &["swiglu_mlp_fast"],
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
        swiglu(gate, up)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// SwitchGLU whose decode step runs gate/up/SwiGLU as one `qmv_swiglu` kernel.
pub struct FusedSwitchGlu {
    /// The stock experts with the fused activation (used wherever `qmv_swiglu` does not apply).
    pub inner: SwitchGlu,
    /// Exact (`swiglu_mlp`) or fast (`swiglu_mlp_fast`) row kernels.
    pub class: KernelClass,
    /// The fused/fallback counter name (`<pattern>.experts`).
    pub counter: &'static str,
}

impl FusedSwitchGlu {
    /// h `[T, k, I]` from the fused kernel, or the reason it does not apply to this call.
    fn fused_hidden(&self, x: &Array, indices: &Array) -> Result<std::result::Result<Array, String>> {
        let (Weight::Quant(g), Weight::Quant(u)) = (&self.inner.gate_proj.weight, &self.inner.up_proj.weight) else {
            return Ok(Err("float experts".into()));
        };
        if let Some(why) = unsupported(x.dtype(), &[g, u]) {
            return Ok(Err(why));
        }
        let (k, d) = (indices.dim(-1), x.dim(-1));
        let t = indices.size() as i32 / k;
        if let Some(why) = gpu_tokens_unsupported(t) {
            return Ok(Err(why));
        }
        Ok(Ok(qmv_swiglu_class(&x.reshape(&[t, d])?, &indices.reshape(&[t, k])?, g, u, self.class)?))
    }
}

impl ExpertsSlot for FusedSwitchGlu {
    fn forward(&self, x: &Array, indices: &Array) -> Result<Array> {
        let h = match self.fused_hidden(x, indices)? {
            Ok(h) => h,
            Err(why) => {
                fallbacks::fallback(self.counter, &why);
                return self.inner.forward(x, indices);
            }
        };
        fallbacks::fused(self.counter);
        let (t, k) = (h.dim(0), h.dim(1));
        let idx = indices.reshape(&[t, k])?;
        let y = match &self.inner.down_proj.weight {
            // A CUDA prefill's down projection grouped by expert too: MLX's gather_qmm on
            // unsorted pairs is slow and its tiled kernel races (HANDOFF, Known bugs).
            Weight::Quant(d)
                if kernels::backend() == Backend::Cuda
                    && t > GPU_MAX_TOKENS
                    && unsupported(h.dtype(), &[d]).is_none() =>
            {
                qmv_grouped_cuda(&h, &idx, d, None)?
            }
            _ => self.inner.down_proj.forward(&h.expand_dims(-2)?, &idx, false)?,
        };
        let mut shape = indices.shape().to_vec();
        shape.push(x.dim(-1));
        Ok(y.reshape(&shape)?)
    }

    fn hidden(&self, x: &Array, indices: &Array) -> Result<Option<Array>> {
        match self.fused_hidden(x, indices)? {
            Ok(h) => {
                fallbacks::fused(self.counter);
                Ok(Some(h))
            }
            // Not counted here: the caller falls back to `forward`, which counts.
            Err(_) => self.inner.hidden(x, indices),
        }
    }

    fn wraps(&self) -> Option<&dyn ExpertsSlot> {
        Some(&self.inner)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Decided once, at patch time, from the weights, the compute dtype and the backend (what the
/// kernel would check on every call): the `qmv_swiglu` experts where that kernel applies; else,
/// on the CPU, only the fused activation; on a GPU backend the stock experts (the activation
/// kernel alone has shown no gain there, and a wrapper that always falls back costs time).
fn fused_experts(s: &SwitchGlu, dtype: Dtype, class: KernelClass, counter: &'static str) -> Swap<dyn ExpertsSlot> {
    let inner = SwitchGlu { activation: Rc::new(FusedSwiGlu), ..s.clone() };
    let why = match (&s.gate_proj.weight, &s.up_proj.weight) {
        (Weight::Quant(g), Weight::Quant(u)) => match unsupported(dtype, &[g, u]) {
            None => return Swap::With(Rc::new(FusedSwitchGlu { inner, class, counter })),
            Some(why) => why,
        },
        _ => "float experts".to_owned(),
    };
    if kernels::backend() == Backend::Cpu {
        // The fused activation still applies; the gate/up kernel never would.
        Swap::With(Rc::new(inner))
    } else {
        Swap::skip(format!("{why}: the stock experts run"))
    }
}

/// The active dense or shared-expert MLP with the fused activation (its projections as active).
fn fused_dense(active: &Rc<dyn MlpSlot>) -> Swap<dyn MlpSlot> {
    let any = active.as_any();
    if let Some(g) = any.downcast_ref::<GatedSharedExpert>() {
        let mlp = DenseMlp { activation: Rc::new(FusedSwiGlu), ..g.mlp.clone() };
        return Swap::With(Rc::new(GatedSharedExpert { mlp, gate: g.gate.clone() }));
    }
    match any.downcast_ref::<DenseMlp>() {
        Some(d) => Swap::With(Rc::new(DenseMlp { activation: Rc::new(FusedSwiGlu), ..d.clone() })),
        None => Swap::skip("not a SwiGLU MLP"),
    }
}

impl Pattern for SwigluMlp {
    fn info(&self) -> &'static PatternInfo {
        &INFO
    }

    fn apply(&self, model: &mut Model) -> Result<PatternOutcome> {
        apply_with(&INFO, KernelClass::Exact, "swiglu_mlp.experts", model)
    }
}

/// `swiglu_mlp`'s swaps with the given row kernels (shared with `swiglu_mlp_fast`).
pub(super) fn apply_with(
    info: &'static PatternInfo,
    class: KernelClass,
    counter: &'static str,
    model: &mut Model,
) -> Result<PatternOutcome> {
    let dtype = model.dtype;
    Swaps::new(info)
        .experts(|active| match active.as_any().downcast_ref::<SwitchGlu>() {
            Some(s) => fused_experts(s, dtype, class, counter),
            None => Swap::skip("experts are not a SwitchGLU"),
        })
        .shared_expert(fused_dense)
        .dense_mlp(fused_dense)
        .apply(model)
}
