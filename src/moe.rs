//! Stock MoE slot implementations, each the exact mlx-lm op sequence of its family.
use std::any::Any;
use std::rc::Rc;

use anyhow::Result;
use mlx_rs::{ops, stop_gradient, Array};

use crate::kernels::{
    moe_combine_reference, moe_router_reference, sigmoid_router_reference, swiglu_reference, RouterKind, SigmoidRouting,
};
use crate::nn::{Linear, LoadCtx, SwitchLinear};
use crate::slots::{ActivationSlot, CombineSlot, ExpertsSlot, MlpSlot, RouterSlot, Routing, Slot};

/// Softmax-family routers (Mixtral, Qwen2-MoE, Qwen3-MoE): a gate Linear, then the family's
/// softmax/top-k/renormalisation chain (see `RouterKind`).
pub struct SoftmaxRouter {
    pub gate: Linear,
    pub kind: RouterKind,
    pub k: i32,
}

impl RouterSlot for SoftmaxRouter {
    fn route(&self, x: &Array) -> Result<Routing> {
        let (indices, weights) = moe_router_reference(&self.gate.forward(x)?, self.kind, self.k)?;
        Ok(Routing { indices, weights })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// DeepSeek-V3 / Kimi-K2 / GLM MoEGate + group_expert_select: sigmoid scores in f32, the
/// correction bias for selection only, group-limited top-k (top-2-sum group score, dropped
/// groups set to 0.0), unbiased renormalised weights × routed_scaling_factor (f32).
#[derive(Clone)]
pub struct SigmoidGroupRouter {
    /// `[E, D]`, a plain array (never quantized), in the compute dtype.
    pub weight: Array,
    /// e_score_correction_bias `[E]`, kept in its stored dtype (f32).
    pub bias: Array,
    pub params: SigmoidRouting,
}

impl SigmoidGroupRouter {
    /// The gate projection (outside mlx-lm's compiled selection function).
    pub fn logits(&self, x: &Array) -> Result<Array> {
        Ok(x.matmul(self.weight.t())?)
    }
}

impl RouterSlot for SigmoidGroupRouter {
    fn route(&self, x: &Array) -> Result<Routing> {
        let (indices, weights) = sigmoid_router_reference(&self.logits(x)?, &self.bias, &self.params)?;
        Ok(Routing { indices, weights })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// `silu(gate) * up` with `silu(g) = g * sigmoid(g)`, each product rounded (mlx-lm's swiglu).
pub struct SwiGlu;

impl ActivationSlot for SwiGlu {
    fn forward(&self, gate: &Array, up: &Array) -> Result<Array> {
        swiglu_reference(gate, up)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// `(y * w[..., None]).sum(-2)`, optionally cast back to y's dtype (Qwen3's `.astype(y.dtype)`).
pub struct WeightedSumCombine {
    pub cast_back: bool,
}

impl CombineSlot for WeightedSumCombine {
    fn forward(&self, y: &Array, weights: &Array) -> Result<Array> {
        let out = moe_combine_reference(y, weights)?;
        Ok(if self.cast_back { out.as_dtype(y.dtype())? } else { out })
    }

    fn plain_weighted_sum(&self) -> Option<bool> {
        Some(self.cast_back)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// SwitchGLU: gathered gate/up/down projections per selected expert.
#[derive(Clone)]
pub struct SwitchGlu {
    pub gate_proj: SwitchLinear,
    pub up_proj: SwitchLinear,
    pub down_proj: SwitchLinear,
    /// A pattern replaces the activation by swapping the whole experts slot for a copy with
    /// another activation, so restoring that slot restores the activation too.
    pub activation: Rc<dyn ActivationSlot>,
}

/// Token count × k from which mlx-lm sorts tokens by expert before the gathered matmuls.
pub const SORT_THRESHOLD: usize = 64;

impl SwitchGlu {
    pub fn load(ctx: &mut LoadCtx, path: &str, experts: i32, hidden: i32, inter: i32) -> Result<SwitchGlu> {
        Ok(SwitchGlu {
            gate_proj: SwitchLinear::load(ctx, &format!("{path}.gate_proj"), experts, hidden, inter)?,
            up_proj: SwitchLinear::load(ctx, &format!("{path}.up_proj"), experts, hidden, inter)?,
            down_proj: SwitchLinear::load(ctx, &format!("{path}.down_proj"), experts, inter, hidden)?,
            activation: Rc::new(SwiGlu),
        })
    }
}

impl ExpertsSlot for SwitchGlu {
    fn forward(&self, x: &Array, indices: &Array) -> Result<Array> {
        let x = x.expand_dims_axes(&[-2, -3])?;
        let indices = stop_gradient(indices)?;
        let do_sort = indices.size() >= SORT_THRESHOLD;
        let (x, idx, inv_order) = if do_sort {
            let m = *indices.shape().last().unwrap();
            let flat = indices.flatten(None, None)?;
            let order = ops::argsort_axis(&flat, 0)?;
            let inv = ops::argsort_axis(&order, 0)?;
            let rows = order.floor_divide(Array::from_int(m).as_dtype(order.dtype())?)?;
            let x = x.flatten(0, -3)?.take_axis(&rows, 0)?;
            (x, flat.take_axis(&order, 0)?, Some(inv))
        } else {
            (x, indices.clone(), None)
        };
        let up = self.up_proj.forward(&x, &idx, do_sort)?;
        let gate = self.gate_proj.forward(&x, &idx, do_sort)?;
        let mut y = self.down_proj.forward(&self.activation.forward(&gate, &up)?, &idx, do_sort)?;
        if let Some(inv) = inv_order {
            y = ops::unflatten(y.take_axis(&inv, 0)?, 0, indices.shape())?;
        }
        Ok(y.squeeze_axes(&[-2])?)
    }

    fn hidden(&self, x: &Array, indices: &Array) -> Result<Option<Array>> {
        if indices.size() >= SORT_THRESHOLD {
            return Ok(None);
        }
        let (k, d) = (indices.dim(-1), x.dim(-1));
        let t = (indices.size() as i32) / k;
        let xe = x.reshape(&[t, 1, 1, d])?;
        let idx = indices.reshape(&[t, k])?;
        let up = self.up_proj.forward(&xe, &idx, false)?;
        let gate = self.gate_proj.forward(&xe, &idx, false)?;
        Ok(Some(self.activation.forward(&gate, &up)?.squeeze_axes(&[-2])?))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Dense SwiGLU MLP: `down(act(gate(x)) * up(x))` (Qwen3 dense layers, shared experts).
#[derive(Clone)]
pub struct DenseMlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub activation: Rc<dyn ActivationSlot>,
}

impl DenseMlp {
    pub fn load(ctx: &mut LoadCtx, path: &str, hidden: i32, inter: i32) -> Result<DenseMlp> {
        Ok(DenseMlp {
            gate_proj: Linear::load(ctx, &format!("{path}.gate_proj"), hidden, inter, false)?,
            up_proj: Linear::load(ctx, &format!("{path}.up_proj"), hidden, inter, false)?,
            down_proj: Linear::load(ctx, &format!("{path}.down_proj"), inter, hidden, false)?,
            activation: Rc::new(SwiGlu),
        })
    }
}

impl MlpSlot for DenseMlp {
    fn forward(&self, x: &Array) -> Result<Array> {
        let h = self.activation.forward(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&h)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Qwen2-MoE's shared expert: `sigmoid(shared_expert_gate(x)) * shared_expert(x)`.
#[derive(Clone)]
pub struct GatedSharedExpert {
    pub mlp: DenseMlp,
    pub gate: Linear,
}

impl MlpSlot for GatedSharedExpert {
    fn forward(&self, x: &Array) -> Result<Array> {
        let shared = self.mlp.forward(x)?;
        Ok(ops::sigmoid(self.gate.forward(x)?)?.multiply(&shared)?)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A sparse MoE block: router → experts → combine (+ shared expert).
pub struct MoeBlock {
    /// Module path in the checkpoint (e.g. `model.layers.3.mlp`), for patch reports.
    pub path: String,
    pub router: Slot<dyn RouterSlot>,
    pub experts: Slot<dyn ExpertsSlot>,
    pub combine: Slot<dyn CombineSlot>,
    pub shared: Option<Slot<dyn MlpSlot>>,
}

impl MoeBlock {
    pub fn forward(&self, x: &Array) -> Result<Array> {
        let r = self.router.get().route(x)?;
        crate::profile::barrier("router", &r.weights)?;
        let mut out =
            crate::profile::span("experts+combine", || self.experts.get().forward_combined(x, &r, self.combine.get()))?;
        if let Some(shared) = &self.shared {
            out = out.add(crate::profile::span("shared_expert", || shared.get().forward(x))?)?;
        }
        Ok(out)
    }
}
