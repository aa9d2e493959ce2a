//! Patchable slots. A model is assembled from these trait objects; a pattern swaps the active
//! implementation of one slot on a loaded model and `restore` puts the stock one back, exactly.
use std::any::Any;
use std::rc::Rc;

use anyhow::Result;
use mlx_rs::Array;

use crate::cache::KvCache;

/// Expert choice of a router: `indices` `[B, L, k]` (uint32) and `weights` `[B, L, k]`, in the
/// slot order the combine sums over (order matters for bit-identity).
pub struct Routing {
    pub indices: Array,
    pub weights: Array,
}

/// Attention including its positional encoding; updates the layer's KV cache.
pub trait AttentionSlot: Any {
    fn forward(&self, x: &Array, cache: &mut KvCache) -> Result<Array>;
    fn as_any(&self) -> &dyn Any;
}

/// Gate projection + expert selection + routing weights.
pub trait RouterSlot: Any {
    fn route(&self, x: &Array) -> Result<Routing>;
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
    fn as_any(&self) -> &dyn Any;
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
    fn as_any(&self) -> &dyn Any;
}

/// The output head: final hidden states `[B, L, D]` → logits `[B, L, V]`.
pub trait HeadSlot: Any {
    fn forward(&self, h: &Array) -> Result<Array>;
    fn as_any(&self) -> &dyn Any;
}

/// One slot: the stock implementation it was loaded with and the one that runs.
pub struct Slot<T: ?Sized> {
    stock: Rc<T>,
    active: Rc<T>,
    patched_by: Option<&'static str>,
}

impl<T: ?Sized> Slot<T> {
    pub fn new(stock: Rc<T>) -> Self {
        Slot { active: stock.clone(), stock, patched_by: None }
    }

    pub fn get(&self) -> &T {
        &self.active
    }

    /// The implementation that runs now (a pattern may wrap it).
    pub fn get_rc(&self) -> &Rc<T> {
        &self.active
    }

    pub fn stock(&self) -> &Rc<T> {
        &self.stock
    }

    pub fn patched_by(&self) -> Option<&'static str> {
        self.patched_by
    }

    pub fn swap(&mut self, implementation: Rc<T>, pattern: &'static str) {
        self.active = implementation;
        self.patched_by = Some(pattern);
    }

    pub fn restore(&mut self) {
        self.active = self.stock.clone();
        self.patched_by = None;
    }
}
