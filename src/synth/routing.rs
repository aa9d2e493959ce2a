//! What the routers of a checkpoint do: each MoE layer's router slot is wrapped by a recorder
//! for one forward pass over seeded random tokens (zmlx's own model) that keeps the experts it
//! chose; each layer's selection histogram is summarised by the share of the top 10 % / 25 %
//! experts and the normalised entropy ([`RoutingSummary`]).
use std::any::Any;
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

use anyhow::Result;
use mlx_rs::Array;
use rand::Rng;
use serde::Serialize;

use super::gen::{rng, Stream};
use super::skew::{normalized_entropy, target_shares, top_share, RouteSkew};
use crate::config::ModelConfig;
use crate::model::{DtypeChoice, Model};
use crate::slots::{RouterSlot, Routing};

/// Sequences × positions of a measurement or calibration pass: 512 tokens (64 selections per
/// expert of a 64-expert top-8 layer). Many short sequences rather than one long one: a
/// sequence's tokens share context, so one sequence prefers experts of its own (on top of the
/// layer's skew), which a calibration on one sequence would learn. A bench-preset pass takes
/// ~15-30 s on 2 CPU cores.
pub const SEQUENCES: i32 = 8;
pub const POSITIONS: i32 = 64;

/// Keeps the experts its router chose, per call.
struct Recorder {
    inner: Rc<dyn RouterSlot>,
    layer: usize,
    log: Rc<RefCell<Vec<(usize, Array)>>>,
}

impl RouterSlot for Recorder {
    fn route(&self, x: &Array) -> Result<Routing> {
        let r = self.inner.route(x)?;
        self.log.borrow_mut().push((self.layer, r.indices.clone()));
        Ok(r)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The measurement tokens `[SEQUENCES, POSITIONS]`: uniform random ids from the seed.
pub fn tokens(seed: u64, vocab: i32) -> Array {
    batch(seed, vocab, 0, SEQUENCES)
}

/// Other tokens of the same shape, for calibrating `--route-skew` (so that the measurement
/// shows how the calibration holds on tokens it did not see).
pub fn calibration_tokens(seed: u64, vocab: i32) -> Array {
    batch(seed, vocab, 1, SEQUENCES)
}

fn batch(seed: u64, vocab: i32, stream: u64, sequences: i32) -> Array {
    let mut r = rng(seed, "zmlx_synth.routing", stream, Stream::Tokens);
    let ids: Vec<u32> = (0..sequences * POSITIONS).map(|_| r.random_range(0..vocab as u32)).collect();
    Array::from_slice(&ids, &[sequences, POSITIONS])
}

/// Runs `tokens` through `model` with every router recorded (the routers are stock again
/// after): per MoE layer, the chosen experts `[B, L, k]`.
fn record(model: &mut Model, tokens: &Array) -> Result<Vec<(usize, Array)>> {
    let log = Rc::new(RefCell::new(Vec::new()));
    forward_with_routers(model, tokens, "zmlx_synth.routing", |layer, inner| {
        Some(Rc::new(Recorder { inner, layer, log: log.clone() }))
    })?;
    let recorded = std::mem::take(&mut *log.borrow_mut());
    Ok(recorded)
}

/// One forward pass of `tokens` with each MoE layer's router replaced by what `wrap(layer,
/// active router)` returns (None: left as is); every router is restored afterwards, also on error.
pub fn forward_with_routers(
    model: &mut Model,
    tokens: &Array,
    label: &'static str,
    mut wrap: impl FnMut(usize, Rc<dyn RouterSlot>) -> Option<Rc<dyn RouterSlot>>,
) -> Result<()> {
    for (layer, b) in model.moe_blocks_mut() {
        if let Some(r) = wrap(layer, b.router.get_rc().clone()) {
            b.router.swap(r, label);
        }
    }
    let run = || -> Result<()> {
        let mut caches = model.new_cache();
        model.hidden(tokens, &mut caches)?.eval()?;
        Ok(())
    };
    let result = run();
    for (_, b) in model.moe_blocks_mut() {
        b.router.restore();
    }
    result
}

/// The values of `a` (converted to `T`'s dtype) on the host, row-major.
pub(super) fn host<T: mlx_rs::ArrayElement + Copy>(a: &Array) -> Result<Vec<T>> {
    let c = a.as_dtype(T::DTYPE)?.contiguous()?;
    c.eval()?;
    Ok(c.as_slice::<T>().to_vec())
}

/// One MoE layer's selection histogram, summarised.
#[derive(Debug, Clone, Serialize)]
pub struct LayerSummary {
    pub layer: usize,
    /// Share of the selections taken by the top 10 % / 25 % of experts (at least one).
    pub top10: f64,
    pub top25: f64,
    /// Entropy of the histogram over ln(E) (1 = uniform).
    pub entropy: f64,
    /// Share of the most selected expert.
    pub max: f64,
}

impl LayerSummary {
    fn of_counts(layer: usize, counts: &[f64]) -> LayerSummary {
        LayerSummary {
            layer,
            top10: top_share(counts, 0.10),
            top25: top_share(counts, 0.25),
            entropy: normalized_entropy(counts),
            max: top_share(counts, 0.0),
        }
    }
}

/// What the shares would be if the routing followed `--route-skew` exactly.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub route_skew: String,
    pub top10: f64,
    pub top25: f64,
    pub entropy: f64,
}

/// The routing of a checkpoint over [`tokens`].
#[derive(Debug, Clone, Serialize)]
pub struct RoutingSummary {
    pub tokens: usize,
    /// Means over the MoE layers.
    pub top10: f64,
    pub top25: f64,
    pub entropy: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
    pub layers: Vec<LayerSummary>,
}

impl RoutingSummary {
    pub fn new(tokens: usize, layers: Vec<LayerSummary>) -> RoutingSummary {
        let n = layers.len().max(1) as f64;
        let mean = |f: fn(&LayerSummary) -> f64| layers.iter().map(f).sum::<f64>() / n;
        let (top10, top25, entropy) = (mean(|l| l.top10), mean(|l| l.top25), mean(|l| l.entropy));
        RoutingSummary { tokens, top10, top25, entropy, target: None, layers }
    }

    /// Records the shares Zipf(`s`) (capped at 1/k) predicts for `c`'s experts.
    pub fn set_target(&mut self, c: &ModelConfig, s: f64) {
        let shares = target_shares(c.num_experts as usize, c.num_experts_per_tok as usize, s);
        self.target = Some(Target {
            route_skew: RouteSkew::Zipf(s).to_string(),
            top10: top_share(&shares, 0.10),
            top25: top_share(&shares, 0.25),
            entropy: normalized_entropy(&shares),
        });
    }

    /// One line for people: the means, and the target's where set.
    pub fn line(&self) -> String {
        let mut s = format!(
            "top 10 % of experts {:.1} % of selections, top 25 % {:.1} %, entropy {:.3} (mean of {} MoE layers, {} tokens)",
            100.0 * self.top10,
            100.0 * self.top25,
            self.entropy,
            self.layers.len(),
            self.tokens
        );
        if let Some(t) = &self.target {
            s += &format!(
                "; {} predicts {:.1} %, {:.1} %, {:.3}",
                t.route_skew,
                100.0 * t.top10,
                100.0 * t.top25,
                t.entropy
            );
        }
        s
    }
}

/// The routing summary of `model` over the seed's measurement tokens.
pub fn summarize(model: &mut Model, seed: u64) -> Result<RoutingSummary> {
    let e = model.config.num_experts as usize;
    let mut layers = Vec::new();
    for (layer, indices) in record(model, &tokens(seed, model.config.vocab_size))? {
        let mut counts = vec![0f64; e];
        for i in host::<u32>(&indices)? {
            counts[i as usize] += 1.0;
        }
        layers.push(LayerSummary::of_counts(layer, &counts));
    }
    Ok(RoutingSummary::new((SEQUENCES * POSITIONS) as usize, layers))
}

/// Loads the checkpoint in `dir` and summarises its routing.
pub fn measure(dir: &Path, seed: u64) -> Result<RoutingSummary> {
    let (mut model, _) = Model::load(dir, DtypeChoice::Auto, crate::mlx_env::backend())?;
    summarize(&mut model, seed)
}
