//! The offsets `--route-skew` writes, and their calibration.
//!
//! Before writing, the offsets are solved on simulated router scores (`skew.rs`). Where the
//! checkpoint is measured, they are solved again on the router inputs of a forward pass (each
//! token's own router scores, and for softmax routers the shared direction's signal in its
//! input), and the router tensors are rewritten in place. A softmax-router checkpoint too large
//! to run is calibrated on its first layers, the rest extrapolated ([`SkewPlan::extrapolate`]).
use std::any::Any;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use anyhow::{anyhow, bail, Result};
use mlx_rs::ops::indexing::{Ellipsis, TryIndexOp};
use mlx_rs::{ops, Array, Dtype};

use super::gen::{rng, Stream};
use super::routing::host;
use super::skew::{self, Sample, Selector};
use crate::config::ModelConfig;
use crate::model::Model;
use crate::moe::{group_expert_select, softmax_route, SigmoidGroupRouter, SoftmaxRouter};
use crate::slots::{RouterSlot, Routing};

/// Softmax routers read the skew from a direction every router input carries: the first `cols`
/// hidden coordinates, where every embedding row gets `value` added.
#[derive(Debug, Clone, Copy)]
pub struct SharedDirection {
    pub cols: usize,
    pub value: f32,
}

/// What `--route-skew` writes.
#[derive(Debug, Clone)]
pub struct SkewPlan {
    pub shared: Option<SharedDirection>,
    /// Per MoE layer, per expert: `e_score_correction_bias` (sigmoid routers) or the shift of the
    /// gate row on the shared columns (softmax routers).
    pub layers: BTreeMap<i32, Vec<f32>>,
}

/// What calibration saw in one MoE layer.
#[derive(Debug, Clone, Copy)]
pub struct LayerStats {
    pub layer: i32,
    /// Mean over tokens of the shared direction's part of the router input (softmax routers).
    pub signal: f64,
    /// Standard deviation of the router scores without the offsets.
    pub sigma: f64,
}

/// MoE layers a too-large softmax-router checkpoint is calibrated on before extrapolating.
pub const PREFIX_MOE_LAYERS: usize = 3;

/// Simulated tokens per layer for the solves without a forward pass.
const SIM_TOKENS: usize = 2048;

/// Standard deviation of the synthesized gate logits: the gate rows' init std · sqrt(D) against
/// an RMS-normed input (norm ≈ sqrt(D)).
const SIGMOID_LOGIT_SIGMA: f64 = 2.0;
const SOFTMAX_LOGIT_SIGMA: f64 = 4.0;

fn selector(c: &ModelConfig) -> Selector {
    Selector {
        k: c.num_experts_per_tok as usize,
        n_group: c.n_group.max(1) as usize,
        topk_group: c.topk_group.max(1) as usize,
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Offsets (in score units) for layer `l` from simulated scores `score(z)`, z ~ N(0, sigma²).
fn simulated(c: &ModelConfig, seed: u64, s: f64, l: i32, sigma: f64, score: fn(f64) -> f64) -> Vec<f64> {
    let (e, k) = (c.num_experts as usize, c.num_experts_per_tok as usize);
    let mut r = rng(seed, "zmlx_synth.route_skew.sim", l as u64, Stream::Calibration);
    let sample = Sample::gaussian(&mut r, SIM_TOKENS, e, sigma, score);
    skew::solve_offsets(&sample, &selector(c), &skew::target_rates(seed, l, e, k, s))
}

impl SkewPlan {
    /// The plan from simulated scores. `cols`: the shared direction's width (a multiple of every
    /// group size the embedding and gates are quantized with); `embed_std`: the embedding's;
    /// `means`: per MoE layer, each gate row's mean over the shared columns without a skew
    /// (softmax routers; the shift cancels it).
    pub fn initial(
        c: &ModelConfig,
        seed: u64,
        s: f64,
        cols: usize,
        embed_std: f32,
        means: &BTreeMap<i32, Vec<f32>>,
    ) -> SkewPlan {
        let sigmoid_router = c.family.module().sigmoid_router();
        // As much energy on the shared columns as the embedding's random part has.
        let shared = (!sigmoid_router)
            .then(|| SharedDirection { cols, value: embed_std * (c.hidden_size as f32 / cols as f32).sqrt() });
        let mut layers = BTreeMap::new();
        for l in (0..c.num_hidden_layers).filter(|&l| c.is_moe_layer(l)) {
            let off = match shared {
                None => simulated(c, seed, s, l, SIGMOID_LOGIT_SIGMA, sigmoid),
                Some(sh) => {
                    let signal = nominal_signal(c, sh, embed_std, l);
                    let off = simulated(c, seed, s, l, SOFTMAX_LOGIT_SIGMA, |z| z);
                    gate_shift(&off, signal, means.get(&l))
                }
            };
            layers.insert(l, off.iter().map(|&o| o as f32).collect());
        }
        SkewPlan { shared, layers }
    }

    /// Offsets of the MoE layers from `from` on, for a softmax-router skew calibrated on the
    /// layers before (`stats`): 1/signal² (the residual's energy, to which every layer adds
    /// about the same) extrapolated linearly in the layer index; the logits' spread is the
    /// measured mean.
    pub fn extrapolate(
        &mut self,
        c: &ModelConfig,
        seed: u64,
        s: f64,
        stats: &[LayerStats],
        from: i32,
        means: &BTreeMap<i32, Vec<f32>>,
    ) {
        let Some(last) = stats.last() else { return };
        if self.shared.is_none() {
            return;
        }
        let n = stats.len() as f64;
        let sigma = stats.iter().map(|t| t.sigma).sum::<f64>() / n;
        let pts: Vec<(f64, f64)> = stats.iter().map(|t| (f64::from(t.layer), 1.0 / (t.signal * t.signal))).collect();
        let (mx, my) = (pts.iter().map(|p| p.0).sum::<f64>() / n, pts.iter().map(|p| p.1).sum::<f64>() / n);
        let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
        // The residual does not shrink: a noisy negative slope is read as flat.
        let slope =
            if sxx > 0.0 { pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum::<f64>() / sxx } else { 0.0 }.max(0.0);
        let at_last = 1.0 / (last.signal * last.signal);
        for l in (from..c.num_hidden_layers).filter(|&l| c.is_moe_layer(l)) {
            let signal = (at_last + slope * f64::from(l - last.layer)).sqrt().recip();
            let off = simulated(c, seed, s, l, sigma, |z| z);
            self.layers.insert(l, gate_shift(&off, signal, means.get(&l)).iter().map(|&o| o as f32).collect());
        }
    }
}

/// The gate shift for logit offsets `off` where the shared signal is `signal`, less each row's
/// own mean over the shared columns (`means`).
fn gate_shift(off: &[f64], signal: f64, means: Option<&Vec<f32>>) -> Vec<f64> {
    off.iter().enumerate().map(|(e, o)| o / signal - means.map_or(0.0, |m| f64::from(m[e]))).collect()
}

/// The shared direction's expected part of a router input (Σ of the input over the shared
/// columns) in layer `l` before any measurement: the embedding's share of the RMS-normed
/// residual, whose energy per coordinate is the shared part's, the embedding's (`embed_std`²),
/// ~0.05 from the first attention and ~0.75 more per layer (measured on a 12-layer qwen3_moe
/// checkpoint of hidden size 1024).
fn nominal_signal(c: &ModelConfig, sh: SharedDirection, embed_std: f32, l: i32) -> f64 {
    let (d, g, v) = (c.hidden_size as f64, sh.cols as f64, f64::from(sh.value));
    let energy = g * v * v / d + f64::from(embed_std).powi(2) + 0.05 + 0.75 * f64::from(l);
    g * v / energy.sqrt()
}

fn std_dev(v: &[f32]) -> f64 {
    let n = v.len().max(1) as f64;
    let m = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
    (v.iter().map(|&x| (f64::from(x) - m).powi(2)).sum::<f64>() / n).sqrt()
}

/// Solves the offsets of every MoE layer of `plan` on the router inputs of one forward pass of
/// `model` (written with `plan`) over `tokens`: each router, on its input, solves its layer's
/// offsets and routes with them, so later layers see the calibrated routing of earlier ones.
/// Returns what each layer showed.
pub fn calibrate(model: &mut Model, plan: &mut SkewPlan, seed: u64, s: f64, tokens: &Array) -> Result<Vec<LayerStats>> {
    let c = model.config.clone();
    let state = Rc::new(RefCell::new(State { plan: plan.clone(), stats: Vec::new() }));
    super::routing::forward_with_routers(model, tokens, "zmlx_synth.route_skew", |layer, inner| {
        let layer = layer as i32;
        state.borrow().plan.layers.contains_key(&layer).then(|| {
            Rc::new(Calibrating { inner, layer, config: c.clone(), seed, s, state: state.clone() })
                as Rc<dyn RouterSlot>
        })
    })?;
    let st = std::mem::replace(&mut *state.borrow_mut(), State { plan: plan.clone(), stats: Vec::new() });
    *plan = st.plan;
    Ok(st.stats)
}

struct State {
    plan: SkewPlan,
    stats: Vec<LayerStats>,
}

/// A router that solves its layer's offsets on the input it gets, then routes with them.
struct Calibrating {
    inner: Rc<dyn RouterSlot>,
    layer: i32,
    config: ModelConfig,
    seed: u64,
    s: f64,
    state: Rc<RefCell<State>>,
}

impl RouterSlot for Calibrating {
    fn route(&self, x: &Array) -> Result<Routing> {
        let c = &self.config;
        let (e, k) = (c.num_experts as usize, c.num_experts_per_tok as usize);
        let (shared, current) = {
            let st = self.state.borrow();
            (st.plan.shared, st.plan.layers[&self.layer].clone())
        };
        let (sample, stats) = real_sample(self.inner.as_any(), x, self.layer, shared, &current, e)?;
        let rates = skew::target_rates(self.seed, self.layer, e, k, self.s);
        let new: Vec<f32> = skew::solve_offsets(&sample, &selector(c), &rates).iter().map(|&o| o as f32).collect();
        {
            let mut st = self.state.borrow_mut();
            st.plan.layers.insert(self.layer, new.clone());
            st.stats.push(stats);
        }
        let any = self.inner.as_any();
        let (indices, weights) = if let Some(g) = any.downcast_ref::<SigmoidGroupRouter>() {
            group_expert_select(&g.logits(x)?, &Array::from_slice(&new, &[e as i32]), &g.params)?
        } else {
            let r = any.downcast_ref::<SoftmaxRouter>().ok_or_else(|| anyhow!("internal: unknown router"))?;
            let sh = shared.ok_or_else(|| anyhow!("internal: softmax router without a shared direction"))?;
            let delta: Vec<f32> = new.iter().zip(&current).map(|(n, c)| n - c).collect();
            let signal = ops::sum_axis(x.try_index((Ellipsis, ..sh.cols as i32))?, -1, true)?;
            let logits = r.gate.forward(x)?.add(signal.multiply(Array::from_slice(&delta, &[e as i32]))?)?;
            softmax_route(&logits, r.kind, r.k)?
        };
        Ok(Routing { indices, weights })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The router scores of the tokens in `x` with the current offsets taken out, and the per-token
/// factor the offsets act with (the shared signal for a gate shift, 1 for a bias).
fn real_sample(
    router: &dyn Any,
    x: &Array,
    layer: i32,
    shared: Option<SharedDirection>,
    current: &[f32],
    e: usize,
) -> Result<(Sample, LayerStats)> {
    if let Some(g) = router.downcast_ref::<SigmoidGroupRouter>() {
        // mlx-lm's selection scores: sigmoid of the f32 logits.
        let base = host::<f32>(&ops::sigmoid(g.logits(x)?.as_dtype(Dtype::Float32)?)?)?;
        let tokens = base.len() / e;
        let st = LayerStats { layer, signal: 1.0, sigma: std_dev(&base) };
        return Ok((Sample { experts: e, base, scale: vec![1.0; tokens] }, st));
    }
    let Some(r) = router.downcast_ref::<SoftmaxRouter>() else {
        bail!("internal: layer {layer} has a router --route-skew does not know");
    };
    let sh = shared.ok_or_else(|| anyhow!("internal: softmax router without a shared direction"))?;
    let d = *x.shape().last().unwrap() as usize;
    let mut base = host::<f32>(&r.gate.forward(x)?)?;
    let xs = host::<f32>(x)?;
    let tokens = xs.len() / d;
    let scale: Vec<f32> = (0..tokens).map(|t| xs[t * d..t * d + sh.cols].iter().sum()).collect();
    for t in 0..tokens {
        for i in 0..e {
            base[t * e + i] -= current[i] * scale[t];
        }
    }
    let signal = scale.iter().map(|&x| f64::from(x)).sum::<f64>() / tokens.max(1) as f64;
    let st = LayerStats { layer, signal, sigma: std_dev(&base) };
    Ok((Sample { experts: e, base, scale }, st))
}
