//! What the routers of a checkpoint do: each MoE layer's router slot is wrapped by a recorder
//! for one forward pass over seeded random tokens (zmlx's own model), which keeps the router's
//! input and the experts it chose. The per-layer selection histogram is summarised by the share
//! of the top 10 % / 25 % experts and the normalised entropy ([`RoutingSummary`]); the recorded
//! inputs are what `--route-skew` calibrates its offsets on (`calibrate.rs`).
use std::any::Any;
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

use anyhow::Result;
use mlx_rs::{Array, Dtype};
use rand::Rng;
use serde::Serialize;

use super::gen::{rng, Stream};
use super::skew::{normalized_entropy, top_share};
use crate::model::{DtypeChoice, Model};
use crate::slots::{RouterSlot, Routing};

/// Sequences × positions of the measurement pass: 1024 tokens (128 selections per expert of a
/// 64-expert top-8 layer), positions up to 256 as a prompt or a short decode reaches.
pub const SEQUENCES: i32 = 4;
pub const POSITIONS: i32 = 256;

/// One MoE layer's routing during the pass.
pub struct Recorded {
    pub layer: usize,
    /// The router's input `[B, L, D]` (the post-attention norm's output).
    pub input: Array,
    /// Chosen experts `[B, L, k]`.
    pub indices: Array,
    /// The router that chose them (the stock one).
    pub router: Rc<dyn RouterSlot>,
}

struct Recorder {
    inner: Rc<dyn RouterSlot>,
    layer: usize,
    log: Rc<RefCell<Vec<Recorded>>>,
}

impl RouterSlot for Recorder {
    fn route(&self, x: &Array) -> Result<Routing> {
        let r = self.inner.route(x)?;
        self.log.borrow_mut().push(Recorded {
            layer: self.layer,
            input: x.clone(),
            indices: r.indices.clone(),
            router: self.inner.clone(),
        });
        Ok(r)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The measurement tokens `[SEQUENCES, POSITIONS]`: uniform random ids from the seed.
pub fn tokens(seed: u64, vocab: i32) -> Array {
    let mut r = rng(seed, "zmlx_synth.routing", 0, Stream::Tokens);
    let ids: Vec<u32> = (0..SEQUENCES * POSITIONS).map(|_| r.random_range(0..vocab as u32)).collect();
    Array::from_slice(&ids, &[SEQUENCES, POSITIONS])
}

/// Runs `tokens` through `model` with every router recorded (the routers are stock again after).
pub fn record(model: &mut Model, tokens: &Array) -> Result<Vec<Recorded>> {
    let log = Rc::new(RefCell::new(Vec::new()));
    for (layer, b) in model.moe_blocks_mut() {
        let inner = b.router.get_rc().clone();
        b.router.swap(Rc::new(Recorder { inner, layer, log: log.clone() }), "zmlx_synth.routing");
    }
    let run = || -> Result<()> {
        let mut caches = model.new_cache();
        let h = model.hidden(tokens, &mut caches)?;
        h.eval()?;
        Ok(())
    };
    let result = run();
    for (_, b) in model.moe_blocks_mut() {
        b.router.restore();
    }
    result?;
    let recorded = std::mem::take(&mut *log.borrow_mut());
    Ok(recorded)
}

/// Selections per expert of one recorded layer.
pub fn counts(r: &Recorded, experts: i32) -> Result<Vec<f64>> {
    let idx = r.indices.as_dtype(Dtype::Uint32)?;
    let mut c = vec![0f64; experts as usize];
    for &i in idx.as_slice::<u32>() {
        c[i as usize] += 1.0;
    }
    Ok(c)
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
    pub fn of_counts(layer: usize, counts: &[f64]) -> LayerSummary {
        LayerSummary {
            layer,
            top10: top_share(counts, 0.10),
            top25: top_share(counts, 0.25),
            entropy: normalized_entropy(counts),
            max: top_share(counts, 0.0),
        }
    }
}

/// The routing of a checkpoint over [`tokens`].
#[derive(Debug, Clone, Serialize)]
pub struct RoutingSummary {
    pub tokens: usize,
    /// Means over the MoE layers.
    pub top10: f64,
    pub top25: f64,
    pub entropy: f64,
    pub layers: Vec<LayerSummary>,
}

impl RoutingSummary {
    pub fn new(tokens: usize, layers: Vec<LayerSummary>) -> RoutingSummary {
        let n = layers.len().max(1) as f64;
        let mean = |f: fn(&LayerSummary) -> f64| layers.iter().map(f).sum::<f64>() / n;
        RoutingSummary {
            tokens,
            top10: mean(|l| l.top10),
            top25: mean(|l| l.top25),
            entropy: mean(|l| l.entropy),
            layers,
        }
    }
}

/// The routing summary of `model` over the seed's measurement tokens.
pub fn summarize(model: &mut Model, seed: u64) -> Result<RoutingSummary> {
    let e = model.config.num_experts;
    let recorded = record(model, &tokens(seed, model.config.vocab_size))?;
    let layers =
        recorded.iter().map(|r| Ok(LayerSummary::of_counts(r.layer, &counts(r, e)?))).collect::<Result<_>>()?;
    Ok(RoutingSummary::new((SEQUENCES * POSITIONS) as usize, layers))
}

/// Loads the checkpoint in `dir` and summarises its routing.
pub fn measure(dir: &Path, seed: u64) -> Result<RoutingSummary> {
    let (mut model, _) = Model::load(dir, DtypeChoice::Auto, crate::mlx_env::backend())?;
    summarize(&mut model, seed)
}
