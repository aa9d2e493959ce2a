//! `--route-skew zipf:S`: routers that prefer some experts, as trained routers do.
//!
//! Random-weight routers pick experts almost uniformly, so an expert cache sees no reuse beyond
//! chance. With a skew, the experts of each MoE layer get ranks from a per-layer permutation
//! (seeded) and the expert of rank r is selected with a share ∝ 1/r^S of the layer's selections,
//! capped at 1/k (a token picks k distinct experts, so no expert can take more than every
//! token's one slot): [`target_shares`].
//!
//! The skew is a per-expert offset added to the selection scores, solved by [`solve_offsets`]
//! on simulated tokens (their scores drawn as the synthesized router's are) so that each expert's
//! selection rate matches its target:
//! - sigmoid routers (glm4_moe, glm4_moe_lite, deepseek_v3): the offset *is*
//!   `e_score_correction_bias`, mlx-lm's selection-only bias;
//! - softmax routers (mixtral, qwen2_moe, qwen3_moe) have no bias: every embedding row gets a
//!   shared constant on the first [`SharedDirection::cols`] coordinates (a direction RMSNorm keeps
//!   and every router input carries), and gate row e gets `offset_e / signal` added on those
//!   coordinates, `signal` being that direction's part of the router input of the layer
//!   (measured after writing; see `calibrate.rs`).
use rand::Rng;
use rand_distr::StandardNormal;
use rand_xoshiro::Xoshiro256PlusPlus;

use super::gen::{rng, Stream};

/// The routing skew of a synthesized checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum RouteSkew {
    /// Whatever random routers do (about uniform).
    #[default]
    None,
    /// Expert of rank r selected with a share ∝ 1/r^S.
    Zipf(f64),
}

/// The largest exponent accepted (beyond it every layer would use its top-k experts only).
pub const MAX_ZIPF_S: f64 = 10.0;

impl RouteSkew {
    /// `none` or `zipf:S` (0 < S ≤ 10).
    pub fn parse(s: &str) -> Result<RouteSkew, String> {
        let t = s.trim();
        if t == "none" {
            return Ok(RouteSkew::None);
        }
        let bad = || format!("`{s}`: expected `none` or `zipf:S` with S a number in (0, {MAX_ZIPF_S}] (e.g. zipf:1.0)");
        let v: f64 = t.strip_prefix("zipf:").ok_or_else(bad)?.trim().parse().map_err(|_| bad())?;
        if !(v > 0.0 && v <= MAX_ZIPF_S) {
            return Err(bad());
        }
        Ok(RouteSkew::Zipf(v))
    }

    /// The exponent, None for no skew.
    pub fn exponent(self) -> Option<f64> {
        match self {
            RouteSkew::None => None,
            RouteSkew::Zipf(s) => Some(s),
        }
    }
}

impl std::fmt::Display for RouteSkew {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RouteSkew::None => f.write_str("none"),
            RouteSkew::Zipf(s) => write!(f, "zipf:{s}"),
        }
    }
}

/// Share of a layer's expert selections per rank (rank 1 first; sums to 1): Zipf(S) capped at
/// 1/k, the capped mass spread over the lower ranks in the same proportions.
pub fn target_shares(experts: usize, k: usize, s: f64) -> Vec<f64> {
    let w: Vec<f64> = (1..=experts).map(|r| (r as f64).powf(-s)).collect();
    let cap = 1.0 / k as f64;
    // The first `m` ranks are capped; the rest share 1 - m/k in proportion to w.
    for m in 0..experts {
        let rest: f64 = w[m..].iter().sum();
        let scale = (1.0 - m as f64 * cap) / rest;
        if w[m] * scale <= cap * (1.0 + 1e-12) {
            return (0..experts).map(|r| if r < m { cap } else { w[r] * scale }).collect();
        }
    }
    vec![cap; experts]
}

/// Share of the selections that the top `frac` of experts (at least one) take, from per-expert
/// shares or counts in any order.
pub fn top_share(values: &[f64], frac: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| b.total_cmp(a));
    let n = ((v.len() as f64 * frac).round() as usize).clamp(1, v.len());
    let total: f64 = v.iter().sum();
    if total > 0.0 {
        v[..n].iter().sum::<f64>() / total
    } else {
        0.0
    }
}

/// Entropy of the distribution (nats), normalised by ln(E): 1 = uniform.
pub fn normalized_entropy(values: &[f64]) -> f64 {
    let total: f64 = values.iter().sum();
    if total <= 0.0 || values.len() < 2 {
        return 1.0;
    }
    let h: f64 = values.iter().filter(|&&c| c > 0.0).map(|&c| -(c / total) * (c / total).ln()).sum();
    h / (values.len() as f64).ln()
}

/// Expert of each rank in layer `layer` (`perm[r]` is the expert of rank r+1).
pub fn rank_order(seed: u64, layer: i32, experts: usize) -> Vec<usize> {
    let mut r = rng(seed, "zmlx_synth.route_skew", layer as u64, Stream::Calibration);
    let mut perm: Vec<usize> = (0..experts).collect();
    for i in (1..experts).rev() {
        perm.swap(i, r.random_range(0..=i));
    }
    perm
}

/// Per-expert target selection rate (probability that a token selects it) of layer `layer`.
pub fn target_rates(seed: u64, layer: i32, experts: usize, k: usize, s: f64) -> Vec<f64> {
    let shares = target_shares(experts, k, s);
    let mut rates = vec![0.0; experts];
    for (rank, &e) in rank_order(seed, layer, experts).iter().enumerate() {
        rates[e] = (shares[rank] * k as f64).min(1.0);
    }
    rates
}

/// How a router turns scores into a selection (mlx-lm's semantics).
#[derive(Debug, Clone, Copy)]
pub struct Selector {
    pub k: usize,
    /// Group-limited selection (DeepSeek-V3): groups of E/n_group experts, the `topk_group`
    /// groups with the largest top-2 sums kept, the others' scores set to 0.
    pub n_group: usize,
    pub topk_group: usize,
}

impl Selector {
    /// Writes the k selected experts of one token's `scores` into `out` (any order); `work` is
    /// scratch of E entries.
    fn select(&self, scores: &[f32], work: &mut Vec<(f32, usize)>, out: &mut Vec<usize>) {
        let e = scores.len();
        work.clear();
        work.extend(scores.iter().copied().zip(0..e));
        if self.n_group > 1 && self.topk_group < self.n_group {
            let per = e / self.n_group;
            let mut groups: Vec<(f32, usize)> = (0..self.n_group)
                .map(|g| {
                    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                    for &s in &scores[g * per..(g + 1) * per] {
                        if s > a {
                            b = a;
                            a = s;
                        } else if s > b {
                            b = s;
                        }
                    }
                    (a + b, g)
                })
                .collect();
            groups.sort_by(|x, y| x.0.total_cmp(&y.0));
            for &(_, g) in &groups[..self.n_group - self.topk_group] {
                for w in &mut work[g * per..(g + 1) * per] {
                    w.0 = 0.0;
                }
            }
        }
        work.select_nth_unstable_by(self.k - 1, |a, b| b.0.total_cmp(&a.0));
        out.clear();
        out.extend(work[..self.k].iter().map(|w| w.1));
    }
}

/// Simulated tokens' router scores before the offsets: `base[t·E + e]`, and per token the factor
/// the offsets are scaled by (1 for a bias; the shared direction's signal for a gate shift).
pub struct Sample {
    pub experts: usize,
    pub base: Vec<f32>,
    pub scale: Vec<f32>,
}

impl Sample {
    /// `tokens` draws of `score(z)` with z ~ N(0, sigma²) per expert, scale 1 (iid router logits:
    /// a random gate row against a normalised hidden state).
    pub fn gaussian(
        r: &mut Xoshiro256PlusPlus,
        tokens: usize,
        experts: usize,
        sigma: f64,
        score: impl Fn(f64) -> f64,
    ) -> Sample {
        let base = (0..tokens * experts)
            .map(|_| {
                let z: f64 = r.sample(StandardNormal);
                score(sigma * z) as f32
            })
            .collect();
        Sample { experts, base, scale: vec![1.0; tokens] }
    }

    fn tokens(&self) -> usize {
        self.scale.len()
    }

    /// Selection rate of each expert with `offsets` added (scaled per token).
    pub fn rates(&self, sel: &Selector, offsets: &[f64]) -> Vec<f64> {
        let e = self.experts;
        let mut counts = vec![0usize; e];
        let (mut scores, mut work, mut chosen) = (vec![0f32; e], Vec::new(), Vec::new());
        for t in 0..self.tokens() {
            self.scores(t, offsets, &mut scores);
            sel.select(&scores, &mut work, &mut chosen);
            chosen.iter().for_each(|&i| counts[i] += 1);
        }
        counts.iter().map(|&c| c as f64 / self.tokens() as f64).collect()
    }

    fn scores(&self, t: usize, offsets: &[f64], out: &mut [f32]) {
        let e = self.experts;
        for (i, o) in out.iter_mut().enumerate() {
            *o = self.base[t * e + i] + (offsets[i] * self.scale[t] as f64) as f32;
        }
    }
}

/// Per-expert offsets (mean zero) for which the tokens of `sample` select expert e at rate
/// `rates[e]`. Fixed-point iteration: with the others' scores fixed, each token has a
/// threshold the expert must beat (the k-th score if it is not selected, the best unselected one
/// if it is); the offset that puts the target fraction of tokens above it is a quantile, exact
/// for plain top-k and close for group-limited selection. Damped, 60 rounds.
pub fn solve_offsets(sample: &Sample, sel: &Selector, rates: &[f64]) -> Vec<f64> {
    let (e, t) = (sample.experts, sample.tokens());
    let mut off = vec![0f64; e];
    let (mut scores, mut work, mut chosen) = (vec![0f32; e], Vec::new(), Vec::new());
    let mut need: Vec<Vec<f64>> = vec![Vec::with_capacity(t); e];
    for _ in 0..60 {
        need.iter_mut().for_each(Vec::clear);
        for tok in 0..t {
            sample.scores(tok, &off, &mut scores);
            sel.select(&scores, &mut work, &mut chosen);
            let mut sorted: Vec<f32> = chosen.iter().map(|&i| scores[i]).collect();
            sorted.sort_by(|a, b| a.total_cmp(b));
            let kth = sorted[0];
            let best_out = (0..e).filter(|i| !chosen.contains(i)).map(|i| scores[i]).fold(f32::NEG_INFINITY, f32::max);
            let s = f64::from(sample.scale[tok]).max(1e-6);
            for (i, n) in need.iter_mut().enumerate() {
                let threshold = if chosen.contains(&i) { best_out } else { kth };
                // Expert i is selected for this token when its offset exceeds this.
                n.push(off[i] + f64::from(threshold - scores[i]) / s);
            }
        }
        for (i, n) in need.iter_mut().enumerate() {
            n.sort_by(|a, b| a.total_cmp(b));
            let want = (rates[i] * t as f64).round() as usize;
            let target = match want {
                0 => n[0] - 1.0,
                w if w >= t => n[t - 1] + 1.0,
                w => 0.5 * (n[w - 1] + n[w]),
            };
            off[i] += 0.5 * (target - off[i]);
        }
        let mean = off.iter().sum::<f64>() / e as f64;
        off.iter_mut().for_each(|o| *o -= mean);
    }
    off
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_none_and_zipf_and_refuses_the_rest() {
        assert_eq!(RouteSkew::parse("none"), Ok(RouteSkew::None));
        assert_eq!(RouteSkew::parse("zipf:1.2"), Ok(RouteSkew::Zipf(1.2)));
        assert_eq!(RouteSkew::Zipf(1.0).to_string(), "zipf:1");
        for bad in ["zipf:0", "zipf:-1", "zipf:nan", "zipf:inf", "zipf:11", "zipf:", "zipf", "1.0", "uniform"] {
            let e = RouteSkew::parse(bad).unwrap_err();
            assert!(e.contains(bad) && e.contains("zipf:S"), "{bad}: {e}");
        }
    }

    #[test]
    fn target_shares_are_capped_zipf() {
        let s = target_shares(64, 8, 1.2);
        assert!((s.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        assert!(s.windows(2).all(|w| w[0] >= w[1] - 1e-12));
        assert!((s[0] - 1.0 / 8.0).abs() < 1e-12, "rank 1 is capped: {}", s[0]);
        // Below the cap, the Zipf ratio holds.
        let r = s[10] / s[20];
        assert!((r - (21f64 / 11.0).powf(1.2)).abs() < 1e-9);
        // Uncapped case: Mixtral's 8 experts, top-2, S = 0.5.
        let m = target_shares(8, 2, 0.5);
        assert!((m[0] / m[3] - 2.0).abs() < 1e-9);
    }

    #[test]
    fn offsets_reach_the_target_rates() {
        let mut r = rng(0, "test", 0, Stream::Calibration);
        for (e, k, groups) in [(64usize, 8usize, (1usize, 1usize)), (8, 2, (1, 1)), (16, 4, (4, 2))] {
            let sample = Sample::gaussian(&mut r, 2048, e, 2.0, |z| 1.0 / (1.0 + (-z).exp()));
            let sel = Selector { k, n_group: groups.0, topk_group: groups.1 };
            let rates = target_rates(3, 0, e, k, 1.0);
            let off = solve_offsets(&sample, &sel, &rates);
            let got = sample.rates(&sel, &off);
            let err = got.iter().zip(&rates).map(|(g, w)| (g - w).abs()).fold(0.0, f64::max);
            assert!(err < 0.05, "E={e} k={k}: max rate error {err}\n{got:?}\n{rates:?}");
        }
    }
}
