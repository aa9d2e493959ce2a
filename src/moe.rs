//! Stock MoE slot implementations, each the exact mlx-lm op sequence of its family.
use std::any::Any;
use std::rc::Rc;

use anyhow::Result;
use mlx_rs::ops::indexing::{Ellipsis, NewAxis, TryIndexOp};
use mlx_rs::{ops, stop_gradient, Array, Dtype};

use crate::nn::{Linear, LoadCtx, SwitchLinear, Weight};
use crate::slots::{ActivationSlot, CombineSlot, ExpertsSlot, MapLinears, MlpSlot, RouterSlot, Routing, Slot};

// ---------------------------------------------------------------- the stock op chains
// mlx-lm's exact op sequences. The slots below run them; each fused kernel in `kernels/` is
// checked bit for bit against the one it replaces (its `*_reference` is the function here).

/// `silu(gate) * up` as mlx-lm's swiglu: `(gate * sigmoid(gate)) * up`, each product rounded.
pub fn swiglu(gate: &Array, up: &Array) -> Result<Array> {
    Ok(gate.multiply(ops::sigmoid(gate)?)?.multiply(up)?)
}

/// The MoE combine: `(y * w[..., None]).sum(-2)` in the promoted dtype.
pub fn weighted_sum(y: &Array, w: &Array) -> Result<Array> {
    Ok(ops::sum_axis(y.multiply(w.try_index((Ellipsis, NewAxis))?)?, -2, false)?)
}

/// Softmax-family routing semantics (moe-families.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouterKind {
    /// Mixtral: top-k of the raw logits (descending), softmax over the k selected.
    TopKThenSoftmax,
    /// Qwen3-MoE: softmax over all experts, top-k ascending, optional renormalisation.
    SoftmaxThenTopK { norm: bool },
    /// Qwen2-MoE: softmax over all experts, top-k descending, never renormalised.
    SoftmaxThenTopKDesc,
}

/// Softmax-family expert selection over gate logits `[.., E]` (mlx-lm's op chain):
/// `(indices uint32 [.., k], weights [.., k])`.
pub fn softmax_route(logits: &Array, kind: RouterKind, k: i32) -> Result<(Array, Array)> {
    Ok(match kind {
        RouterKind::TopKThenSoftmax => {
            let inds =
                stop_gradient(&ops::argpartition_axis(logits.negative()?, k - 1, -1)?.try_index((Ellipsis, ..k))?)?;
            let w = ops::softmax_axis(logits.take_along_axis(&inds, -1)?, -1, true)?;
            (inds, w)
        }
        RouterKind::SoftmaxThenTopK { norm } => {
            let p = ops::softmax_axis(logits, -1, true)?;
            let inds = stop_gradient(&ops::argpartition_axis(&p, -k, -1)?.try_index((Ellipsis, -k..))?)?;
            let mut w = p.take_along_axis(&inds, -1)?;
            if norm {
                w = w.divide(ops::sum_axis(&w, -1, true)?)?;
            }
            (inds, w)
        }
        RouterKind::SoftmaxThenTopKDesc => {
            let p = ops::softmax_axis(logits, -1, true)?;
            let inds = stop_gradient(&ops::argpartition_axis(p.negative()?, k - 1, -1)?.try_index((Ellipsis, ..k))?)?;
            (inds.clone(), p.take_along_axis(&inds, -1)?)
        }
    })
}

/// DeepSeek-V3 / Kimi-K2 / GLM routing parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SigmoidRouting {
    pub k: i32,
    pub n_group: i32,
    pub topk_group: i32,
    pub norm_topk_prob: bool,
    /// GLM-4.7-Flash: `w / (sum + eps)`.
    pub renorm_eps: Option<f32>,
    pub routed_scaling_factor: f32,
}

/// mlx-lm's group_expert_select over gate logits: `(indices uint32, weights f32)`.
pub fn group_expert_select(gates: &Array, bias: &Array, p: &SigmoidRouting) -> Result<(Array, Array)> {
    let orig = ops::sigmoid(gates.as_dtype(Dtype::Float32)?)?;
    let mut scores = orig.add(bias)?;
    if p.n_group > 1 {
        scores = ops::unflatten(&scores, -1, &[p.n_group, -1])?;
        let group_scores = ops::sum_axis(ops::indexing::topk_axis(&scores, 2, -1)?, -1, true)?;
        let drop = p.n_group - p.topk_group;
        if drop > 0 {
            let group_idx = ops::argpartition_axis(&group_scores, drop - 1, -2)?.try_index((Ellipsis, ..drop, ..))?;
            scores = ops::indexing::put_along_axis(&scores, stop_gradient(&group_idx)?, Array::from_f32(0.0), -2)?;
        }
        scores = scores.flatten(-2, -1)?;
    }
    let k = p.k;
    let indices = stop_gradient(&ops::argpartition_axis(scores.negative()?, k - 1, -1)?.try_index((Ellipsis, ..k))?)?;
    let mut weights = orig.take_along_axis(&indices, -1)?;
    if k > 1 && p.norm_topk_prob {
        let mut den = ops::sum_axis(&weights, -1, true)?;
        if let Some(eps) = p.renorm_eps {
            den = den.add(Array::from_f32(eps))?;
        }
        weights = weights.divide(&den)?;
    }
    Ok((indices, weights.multiply(Array::from_f32(p.routed_scaling_factor))?))
}

// ---------------------------------------------------------------- the stock slots

/// Softmax-family routers (Mixtral, Qwen2-MoE, Qwen3-MoE): a gate Linear, then the family's
/// softmax/top-k/renormalisation chain (see `RouterKind`).
pub struct SoftmaxRouter {
    pub gate: Linear,
    pub kind: RouterKind,
    pub k: i32,
}

impl RouterSlot for SoftmaxRouter {
    fn route(&self, x: &Array) -> Result<Routing> {
        let (indices, weights) = softmax_route(&self.gate.forward(x)?, self.kind, self.k)?;
        Ok(Routing { indices, weights })
    }

    fn with_linears(&self, f: MapLinears) -> Option<Rc<dyn RouterSlot>> {
        Some(Rc::new(SoftmaxRouter { gate: f(&self.gate), kind: self.kind, k: self.k }))
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
        let (indices, weights) = group_expert_select(&self.logits(x)?, &self.bias, &self.params)?;
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
        swiglu(gate, up)
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
        let out = weighted_sum(y, weights)?;
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
            crate::debug_dump::record("experts_sort_order", &order);
            crate::debug_dump::record("experts_x_sorted", &x);
            (x, flat.take_axis(&order, 0)?, Some(inv))
        } else {
            (x, indices.clone(), None)
        };
        let up = self.up_proj.forward(&x, &idx, do_sort)?;
        let gate = self.gate_proj.forward(&x, &idx, do_sort)?;
        let h = self.activation.forward(&gate, &up)?;
        let mut y = self.down_proj.forward(&h, &idx, do_sort)?;
        for (name, a) in [("experts_up", &up), ("experts_gate", &gate), ("experts_h", &h), ("experts_down", &y)] {
            crate::debug_dump::record(name, a);
        }
        if crate::debug_dump::recording() {
            // The down projection's parameters as this process holds them (packed words as
            // uint16 halves: exact in the dump's float32), to compare with the file.
            if let Weight::Quant(q) = &self.down_proj.weight {
                crate::debug_dump::record("experts_down_w_u16", &q.weight.view::<u16>()?);
                crate::debug_dump::record("experts_down_scales", &q.scales);
                crate::debug_dump::record("experts_down_biases", &q.biases);
            }
        }
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

impl DenseMlp {
    /// A copy with gate/up/down replaced by `f(projection)` (same activation).
    pub fn map_linears(&self, f: MapLinears) -> DenseMlp {
        DenseMlp {
            gate_proj: f(&self.gate_proj),
            up_proj: f(&self.up_proj),
            down_proj: f(&self.down_proj),
            activation: self.activation.clone(),
        }
    }
}

impl MlpSlot for DenseMlp {
    fn forward(&self, x: &Array) -> Result<Array> {
        let h = self.activation.forward(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?;
        self.down_proj.forward(&h)
    }

    fn with_linears(&self, f: MapLinears) -> Option<Rc<dyn MlpSlot>> {
        Some(Rc::new(self.map_linears(f)))
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

    fn with_linears(&self, f: MapLinears) -> Option<Rc<dyn MlpSlot>> {
        let mlp = self.mlp.map_linears(f);
        Some(Rc::new(GatedSharedExpert { mlp, gate: f(&self.gate) }))
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
    /// With expert offloading: this layer's expert pool (the experts' weights are its slots).
    pub offload: Option<Rc<crate::offload::LayerCache>>,
}

impl MoeBlock {
    pub fn forward(&self, x: &Array) -> Result<Array> {
        let r = self.router.get().route(x)?;
        crate::debug_dump::record("router_indices", &r.indices);
        crate::debug_dump::record("router_weights", &r.weights);
        crate::profile::barrier("router", &r.weights)?;
        let mut out = crate::profile::span("experts+combine", || match &self.offload {
            Some(pool) => pool.forward(x, &r, self.experts.get(), self.combine.get()),
            None => self.experts.get().forward_combined(x, &r, self.combine.get()),
        })?;
        crate::debug_dump::record("moe_routed", &out);
        if let Some(shared) = &self.shared {
            out = out.add(crate::profile::span("shared_expert", || shared.get().forward(x))?)?;
        }
        Ok(out)
    }
}
