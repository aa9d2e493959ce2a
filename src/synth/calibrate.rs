//! The tensors `--route-skew` changes, and their calibration.
//!
//! Before writing, the offsets are solved on simulated router scores (`skew.rs`). After writing,
//! where the checkpoint is measured, they are solved again on the real router inputs of a
//! forward pass (the router's own scores of each token, and for softmax routers the shared
//! direction's signal in each token's input), and the changed tensors are rewritten in place.
use std::collections::BTreeMap;

use anyhow::Result;
use mlx_rs::Dtype;

use super::gen::{rng, Stream};
use super::routing::Recorded;
use super::skew::{self, Sample, Selector};
use crate::config::ModelConfig;
use crate::moe::{SigmoidGroupRouter, SoftmaxRouter};

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

/// Simulated tokens per layer for the solve before writing.
const SIM_TOKENS: usize = 2048;

/// Standard deviation of the synthesized gate logits: the gate rows' init std · sqrt(D) against an
/// RMS-normed input (norm ≈ sqrt(D)).
fn gate_logit_sigma(sigmoid: bool) -> f64 {
    if sigmoid {
        2.0
    } else {
        4.0
    }
}

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

impl SkewPlan {
    /// The plan from simulated scores. `cols`: the shared direction's width (a multiple of every
    /// group size the embedding and gates are quantized with).
    pub fn initial(c: &ModelConfig, seed: u64, s: f64, cols: usize, embed_std: f32) -> SkewPlan {
        let sigmoid_router = c.family.module().sigmoid_router();
        let (e, k) = (c.num_experts as usize, c.num_experts_per_tok as usize);
        let sel = selector(c);
        let shared = (!sigmoid_router).then(|| {
            // As much energy on the shared columns as the embedding's random part has.
            let d = c.hidden_size as f32;
            SharedDirection { cols, value: embed_std * (d / cols as f32).sqrt() }
        });
        let mut layers = BTreeMap::new();
        for l in (0..c.num_hidden_layers).filter(|&l| c.is_moe_layer(l)) {
            let mut r = rng(seed, "zmlx_synth.route_skew.sim", l as u64, Stream::Calibration);
            let sample = if sigmoid_router {
                Sample::gaussian(&mut r, SIM_TOKENS, e, gate_logit_sigma(true), sigmoid)
            } else {
                Sample::gaussian(&mut r, SIM_TOKENS, e, gate_logit_sigma(false), |z| z)
            };
            let rates = skew::target_rates(seed, l, e, k, s);
            let off = skew::solve_offsets(&sample, &sel, &rates);
            let unit = match shared {
                Some(sh) => nominal_signal(c, sh),
                None => 1.0,
            };
            layers.insert(l, off.iter().map(|&o| (o / unit) as f32).collect());
        }
        SkewPlan { shared, layers }
    }

    /// Solves the offsets again on the recorded router inputs of a forward pass.
    pub fn refine(&mut self, c: &ModelConfig, seed: u64, s: f64, recorded: &[Recorded]) -> Result<()> {
        let (e, k) = (c.num_experts as usize, c.num_experts_per_tok as usize);
        let sel = selector(c);
        for r in recorded {
            let l = r.layer as i32;
            let Some(current) = self.layers.get(&l) else { continue };
            let sample = real_sample(r, self.shared, current, e)?;
            let rates = skew::target_rates(seed, l, e, k, s);
            let off = skew::solve_offsets(&sample, &sel, &rates);
            self.layers.insert(l, off.iter().map(|&o| o as f32).collect());
        }
        Ok(())
    }
}

/// The shared direction's expected part of a router input (Σ of the input over the shared
/// columns) before any measurement: the embedding's share of an RMS-normed residual.
fn nominal_signal(c: &ModelConfig, sh: SharedDirection) -> f64 {
    let d = c.hidden_size as f64;
    let g = sh.cols as f64;
    let v = f64::from(sh.value);
    let rms = ((g * v * v + d * 1.0) / d).sqrt();
    g * v / rms
}

/// The recorded tokens' router scores with the current offsets taken out, and the per-token
/// factor the offsets act with (the shared signal for a gate shift, 1 for a bias).
fn real_sample(r: &Recorded, shared: Option<SharedDirection>, current: &[f32], e: usize) -> Result<Sample> {
    let x = r.input.as_dtype(Dtype::Float32)?;
    let d = *x.shape().last().unwrap() as usize;
    let any = r.router.as_any();
    if let Some(g) = any.downcast_ref::<SigmoidGroupRouter>() {
        let z = g.logits(&r.input)?.as_dtype(Dtype::Float32)?;
        let scores = mlx_rs::ops::sigmoid(&z)?;
        scores.eval()?;
        let base = scores.as_slice::<f32>().to_vec();
        let tokens = base.len() / e;
        return Ok(Sample { experts: e, base, scale: vec![1.0; tokens] });
    }
    let Some(router) = any.downcast_ref::<SoftmaxRouter>() else {
        anyhow::bail!("internal: layer {} has a router route skew does not know", r.layer);
    };
    let sh = shared.ok_or_else(|| anyhow::anyhow!("internal: softmax router without a shared direction"))?;
    let logits = router.gate.forward(&r.input)?.as_dtype(Dtype::Float32)?;
    logits.eval()?;
    x.eval()?;
    let xs = x.as_slice::<f32>();
    let tokens = xs.len() / d;
    let scale: Vec<f32> = (0..tokens).map(|t| xs[t * d..t * d + sh.cols].iter().sum()).collect();
    let mut base = logits.as_slice::<f32>().to_vec();
    for t in 0..tokens {
        for i in 0..e {
            base[t * e + i] -= current[i] * scale[t];
        }
    }
    Ok(Sample { experts: e, base, scale })
}
