//! Patchable slots. A model is assembled from these trait objects; a pattern swaps the active
//! implementation of a slot on a loaded model (wrapping or copying the one active before it, so
//! patterns compose), the slot records every pattern that shaped it, and `restore` puts the stock
//! one back, exactly. Stock implementations know nothing of patterns; the generic hooks below
//! (`wraps`, `with_linears`) let a pattern reach the stock parts under other patterns' wrappers.
use std::any::Any;
use std::rc::Rc;

use anyhow::Result;
use mlx_rs::Array;
use serde::Serialize;

use crate::cache::KvCache;
use crate::nn::Linear;

/// A kind of model part a pattern can target. All but `Activation` and `Linear` are slots
/// (`Model::slots_mut` walks them); those two name parts inside slots (the activation of expert
/// and dense MLPs; dense projections in attention, MLP and head slots), replaced by swapping the
/// slot that holds them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotKind {
    Attention,
    Router,
    Experts,
    Activation,
    Combine,
    SharedExpert,
    /// Dense projections inside the attention, MLP and head slots.
    Linear,
    /// The MLP of a dense (non-MoE) layer.
    DenseMlp,
    /// The output head.
    Head,
    /// The token embedding lookup.
    Embedding,
    /// A layer-level RMSNorm (input / post-attention norms, the final norm).
    Norm,
}

/// A copy of an implementation with each dense projection replaced by `f(projection)`.
pub type MapLinears<'a> = &'a mut dyn FnMut(&Linear) -> Linear;

/// Expert choice of a router: `indices` `[B, L, k]` (uint32) and `weights` `[B, L, k]`, in the
/// slot order the combine sums over (order matters for bit-identity).
pub struct Routing {
    pub indices: Array,
    pub weights: Array,
}

/// Attention including its positional encoding; updates the layer's KV caches.
///
/// `caches` holds either one cache for every row of `x` `[B, L, D]` (mlx-lm's layout: the rows
/// share positions) or one cache per row (a batch of independent sequences at their own
/// positions; see [`crate::cache::per_sequence`]).
pub trait AttentionSlot: Any {
    fn forward(&self, x: &Array, caches: &mut [KvCache]) -> Result<Array>;
    /// This implementation with its dense projections replaced (None: it has none it can rebuild).
    fn with_linears(&self, _f: MapLinears) -> Option<Rc<dyn AttentionSlot>> {
        None
    }
    fn as_any(&self) -> &dyn Any;
}

/// Gate projection + expert selection + routing weights.
pub trait RouterSlot: Any {
    fn route(&self, x: &Array) -> Result<Routing>;
    /// This implementation with its gate projection replaced (None: it has no `Linear` gate).
    fn with_linears(&self, _f: MapLinears) -> Option<Rc<dyn RouterSlot>> {
        None
    }
    fn as_any(&self) -> &dyn Any;
}

/// The gathered expert MLP: `x` `[B, L, D]`, indices `[B, L, k]` → `[B, L, k, D]`.
pub trait ExpertsSlot: Any {
    fn forward(&self, x: &Array, indices: &Array) -> Result<Array>;
    /// The activations fed to the down projection, `[B·L, k, I]`, where the implementation can
    /// produce them exactly as its `forward` does (unsorted decode path); None otherwise.
    fn hidden(&self, _x: &Array, _indices: &Array) -> Result<Option<Array>> {
        Ok(None)
    }
    /// Experts and combine together; implementations that fuse the two override this.
    fn forward_combined(&self, x: &Array, routing: &Routing, combine: &dyn CombineSlot) -> Result<Array> {
        combine.forward(&self.forward(x, &routing.indices)?, &routing.weights)
    }
    /// The implementation this one wraps or extends (a pattern's wrapper), so that a later
    /// pattern can reach the stock experts' parameters; None for a stock implementation.
    fn wraps(&self) -> Option<&dyn ExpertsSlot> {
        None
    }
    fn as_any(&self) -> &dyn Any;
}

/// The first implementation of type `T` in the chain `experts`, `experts.wraps()`, ...
pub fn find_experts<T: 'static>(experts: &dyn ExpertsSlot) -> Option<&T> {
    let mut cur = Some(experts);
    while let Some(e) = cur {
        if let Some(t) = e.as_any().downcast_ref::<T>() {
            return Some(t);
        }
        cur = e.wraps();
    }
    None
}

/// The gated activation `act(gate) * up` used by expert and dense MLPs.
pub trait ActivationSlot: Any {
    fn forward(&self, gate: &Array, up: &Array) -> Result<Array>;
    fn as_any(&self) -> &dyn Any;
}

/// Weighted sum of the k expert outputs: `y` `[B, L, k, D]`, weights `[B, L, k]` → `[B, L, D]`.
pub trait CombineSlot: Any {
    fn forward(&self, y: &Array, weights: &Array) -> Result<Array>;
    /// `Some(cast_back)` when this is exactly `(y * w[..., None]).sum(-2)` accumulated from 0
    /// in slot order in the promoted dtype (then cast to y's dtype if `cast_back`): a fused
    /// down-projection + combine may then stand in for it bit-exactly.
    fn plain_weighted_sum(&self) -> Option<bool> {
        None
    }
    fn as_any(&self) -> &dyn Any;
}

/// An always-on expert added to the routed sum (and dense MLPs of non-MoE layers).
pub trait MlpSlot: Any {
    fn forward(&self, x: &Array) -> Result<Array>;
    /// This implementation with its dense projections replaced (None: it has none it can rebuild).
    fn with_linears(&self, _f: MapLinears) -> Option<Rc<dyn MlpSlot>> {
        None
    }
    fn as_any(&self) -> &dyn Any;
}

/// The output head: final hidden states `[B, L, D]` → logits `[B, L, V]`.
pub trait HeadSlot: Any {
    fn forward(&self, h: &Array) -> Result<Array>;
    /// This implementation with its dense projections replaced (None: it has none it can rebuild).
    fn with_linears(&self, _f: MapLinears) -> Option<Rc<dyn HeadSlot>> {
        None
    }
    fn as_any(&self) -> &dyn Any;
}

/// The token embedding: ids `[B, L]` (uint32) → hidden states `[B, L, D]`.
pub trait EmbeddingSlot: Any {
    fn forward(&self, ids: &Array) -> Result<Array>;
    fn as_any(&self) -> &dyn Any;
}

/// A normalisation over the last axis (`x` `[..., D]` → same shape).
pub trait NormSlot: Any {
    fn forward(&self, x: &Array) -> Result<Array>;
    fn as_any(&self) -> &dyn Any;
}

/// One slot: the stock implementation it was loaded with, the one that runs, and every pattern
/// that shaped the active one, in the order they were applied (each wraps or copies the one
/// active before it).
pub struct Slot<T: ?Sized> {
    stock: Rc<T>,
    active: Rc<T>,
    patched_by: Vec<&'static str>,
}

impl<T: ?Sized> Slot<T> {
    pub fn new(stock: Rc<T>) -> Self {
        Slot { active: stock.clone(), stock, patched_by: Vec::new() }
    }

    pub fn get(&self) -> &T {
        &self.active
    }

    /// The implementation that runs now (a pattern wraps or copies it).
    pub fn get_rc(&self) -> &Rc<T> {
        &self.active
    }

    pub fn stock(&self) -> &Rc<T> {
        &self.stock
    }

    /// The last pattern applied to this slot (the outermost layer); None while stock.
    pub fn patched_by(&self) -> Option<&'static str> {
        self.patched_by.last().copied()
    }

    /// Every pattern that shaped the active implementation, first applied first.
    pub fn patterns(&self) -> &[&'static str] {
        &self.patched_by
    }

    /// Makes `implementation` (built from the active one) the active one, recording `pattern`.
    pub fn swap(&mut self, implementation: Rc<T>, pattern: &'static str) {
        self.active = implementation;
        self.patched_by.push(pattern);
    }

    pub fn restore(&mut self) {
        self.active = self.stock.clone();
        self.patched_by.clear();
    }
}

/// One slot of a model, by kind, as `Model::slots_mut` yields it.
pub enum SlotMut<'a> {
    Attention(&'a mut Slot<dyn AttentionSlot>),
    Router(&'a mut Slot<dyn RouterSlot>),
    Experts(&'a mut Slot<dyn ExpertsSlot>),
    Combine(&'a mut Slot<dyn CombineSlot>),
    SharedExpert(&'a mut Slot<dyn MlpSlot>),
    DenseMlp(&'a mut Slot<dyn MlpSlot>),
    Head(&'a mut Slot<dyn HeadSlot>),
    Embedding(&'a mut Slot<dyn EmbeddingSlot>),
    Norm(&'a mut Slot<dyn NormSlot>),
}

impl SlotMut<'_> {
    pub fn kind(&self) -> SlotKind {
        match self {
            SlotMut::Attention(_) => SlotKind::Attention,
            SlotMut::Router(_) => SlotKind::Router,
            SlotMut::Experts(_) => SlotKind::Experts,
            SlotMut::Combine(_) => SlotKind::Combine,
            SlotMut::SharedExpert(_) => SlotKind::SharedExpert,
            SlotMut::DenseMlp(_) => SlotKind::DenseMlp,
            SlotMut::Head(_) => SlotKind::Head,
            SlotMut::Embedding(_) => SlotKind::Embedding,
            SlotMut::Norm(_) => SlotKind::Norm,
        }
    }

    pub fn patterns(&self) -> &[&'static str] {
        match self {
            SlotMut::Attention(s) => s.patterns(),
            SlotMut::Router(s) => s.patterns(),
            SlotMut::Experts(s) => s.patterns(),
            SlotMut::Combine(s) => s.patterns(),
            SlotMut::SharedExpert(s) | SlotMut::DenseMlp(s) => s.patterns(),
            SlotMut::Head(s) => s.patterns(),
            SlotMut::Embedding(s) => s.patterns(),
            SlotMut::Norm(s) => s.patterns(),
        }
    }

    pub fn restore(&mut self) {
        match self {
            SlotMut::Attention(s) => s.restore(),
            SlotMut::Router(s) => s.restore(),
            SlotMut::Experts(s) => s.restore(),
            SlotMut::Combine(s) => s.restore(),
            SlotMut::SharedExpert(s) | SlotMut::DenseMlp(s) => s.restore(),
            SlotMut::Head(s) => s.restore(),
            SlotMut::Embedding(s) => s.restore(),
            SlotMut::Norm(s) => s.restore(),
        }
    }
}
