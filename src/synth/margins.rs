//! Logit margins of a synthesized checkpoint: the gap between the top-1 and top-2 logits over a
//! few dozen positions of one forward pass (zmlx's own `Model::load`, random prompt tokens from
//! the seed). A trained model's greedy choice is usually clear by several nats; random weights
//! with a unit-scale head give gaps of a fraction of a nat, so token-identity tests would measure
//! near-ties instead of kernels. synth scales the output head so the median gap is
//! [`TARGET_MEDIAN_GAP`] and reports what it got.
use anyhow::Result;
use mlx_rs::{Array, Dtype};
use rand::Rng;
use serde::Serialize;

use super::gen::{rng, Stream};
use crate::model::Model;

/// The median top-1/top-2 gap the output head is scaled for (nats).
pub const TARGET_MEDIAN_GAP: f64 = 4.0;

/// Standard deviation of the logits for which the median top-1/top-2 gap of a `vocab`-way head
/// is [`TARGET_MEDIAN_GAP`]. Given the final hidden state (RMS-normed: norm ≈ sqrt(D)), the
/// logits of a gaussian head are V independent normals of std σ; the top two differ by about
/// Exp(1)·σ/sqrt(2 ln V) (extreme-value spacing, median ln 2 times that). That asymptote is
/// 25 % off at V = 512, so the median of the unit-σ gap is measured by Monte Carlo (64 draws of
/// V normals, seeded) and σ = target / median.
pub fn logit_sigma(seed: u64, vocab: i32) -> f64 {
    let v = vocab.max(2) as usize;
    let mut r = rng(seed, "lm_head.weight", 0, Stream::Calibration);
    let mut gaps: Vec<f64> = (0..64)
        .map(|_| {
            let (mut a, mut b) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
            for _ in 0..v {
                let x: f64 = r.sample(rand_distr::StandardNormal);
                if x > a {
                    b = a;
                    a = x;
                } else if x > b {
                    b = x;
                }
            }
            a - b
        })
        .collect();
    gaps.sort_by(|a, b| a.total_cmp(b));
    TARGET_MEDIAN_GAP / ((gaps[31] + gaps[32]) / 2.0)
}

/// Distribution of the top-1 − top-2 logit gap (nats).
#[derive(Debug, Clone, Serialize)]
pub struct Margins {
    pub positions: usize,
    pub median: f64,
    pub p10: f64,
    pub p90: f64,
    pub min: f64,
}

/// Positions a default measurement runs.
pub const POSITIONS: usize = 64;

/// Measures the gap at `positions` positions of one forward pass of the loaded checkpoint over
/// random tokens.
pub fn measure(model: &Model, seed: u64, positions: usize) -> Result<Margins> {
    let v = model.config.vocab_size;
    let mut r = rng(seed, "zmlx_synth.margins", 0, Stream::Tokens);
    let ids: Vec<u32> = (0..positions).map(|_| r.random_range(0..v as u32)).collect();
    let tokens = Array::from_slice(&ids, &[1, positions as i32]);
    let mut caches = model.new_cache();
    let logits = model.forward(&tokens, &mut caches)?.as_dtype(Dtype::Float32)?;
    logits.eval()?;
    let mut gaps = crate::validate::top2_gaps(&logits)?;
    gaps.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| gaps[((gaps.len() - 1) as f64 * p).round() as usize];
    Ok(Margins { positions: gaps.len(), median: q(0.5), p10: q(0.1), p90: q(0.9), min: gaps[0] })
}
