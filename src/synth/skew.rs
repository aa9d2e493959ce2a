//! `--route-skew zipf:S`: routers that prefer some experts, as trained routers do.
//!
//! Random-weight routers pick experts almost uniformly, so an expert cache sees no reuse beyond
//! chance. With a skew, the experts of each MoE layer get ranks from a per-layer permutation
//! (seeded) and the expert of rank r is selected with a share ∝ 1/r^S of the layer's selections,
//! capped at 1/k (a token picks k distinct experts, so no expert can take more than every
//! token's one slot): [`target_shares`].
//!
//! The skew is a per-expert offset added to the selection scores, solved by [`solve_offsets`] on
//! a sample of tokens' scores so that each expert's selection rate matches its target:
//! - sigmoid routers (glm4_moe, glm4_moe_lite, deepseek_v3): the offset *is*
//!   `e_score_correction_bias`, mlx-lm's selection-only bias;
//! - softmax routers (mixtral, qwen2_moe, qwen3_moe) have no bias: every embedding row gets a
//!   constant on the first few hidden coordinates (a direction RMSNorm keeps, which only the
//!   gates read), and gate row e gets `offset_e / signal` added on those coordinates, `signal`
//!   being that direction's part of the layer's router input (`calibrate.rs`).
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
    /// The experts one token's `scores` select (mlx-lm's order of operations) as a mask
    /// (`chosen`), and for every expert the score it must exceed to be selected, the others'
    /// unchanged (`need`): the k-th selected score if it is not selected, the best unselected one
    /// if it is; under group-limited selection also what brings its group in (or keeps it): a
    /// top-2 sum above the weakest kept (the strongest dropped) group's. `work`: scratch.
    fn select(&self, scores: &[f32], work: &mut Vec<(f32, usize)>, chosen: &mut [bool], need: &mut [f32]) {
        let e = scores.len();
        let grouped = self.n_group > 1 && self.topk_group < self.n_group;
        let per = e / self.n_group.max(1);
        // Per group: (top-2 sum, best score, its expert, second score), and whether it is kept.
        let mut groups: Vec<(f32, f32, usize, f32)> = Vec::new();
        let mut kept = vec![true; if grouped { self.n_group } else { 0 }];
        let (mut weakest_kept, mut strongest_dropped) = (f32::INFINITY, f32::NEG_INFINITY);
        if grouped {
            for g in 0..self.n_group {
                let (mut a, mut ai, mut b) = (f32::NEG_INFINITY, g * per, f32::NEG_INFINITY);
                for (i, &s) in scores.iter().enumerate().skip(g * per).take(per) {
                    if s > a {
                        (b, a, ai) = (a, s, i);
                    } else if s > b {
                        b = s;
                    }
                }
                groups.push((a + b, a, ai, b));
            }
            let mut order: Vec<usize> = (0..self.n_group).collect();
            order.sort_by(|&x, &y| groups[x].0.total_cmp(&groups[y].0));
            for &g in &order[..self.n_group - self.topk_group] {
                kept[g] = false;
                strongest_dropped = strongest_dropped.max(groups[g].0);
            }
            for &g in &order[self.n_group - self.topk_group..] {
                weakest_kept = weakest_kept.min(groups[g].0);
            }
        }
        work.clear();
        work.extend(scores.iter().enumerate().map(|(i, &s)| (if grouped && !kept[i / per] { 0.0 } else { s }, i)));
        work.select_nth_unstable_by(self.k - 1, |a, b| b.0.total_cmp(&a.0));
        chosen.iter_mut().for_each(|c| *c = false);
        let mut kth = f32::INFINITY;
        for &(s, i) in &work[..self.k] {
            chosen[i] = true;
            kth = kth.min(s);
        }
        let best_out = work[self.k..].iter().map(|w| w.0).fold(f32::NEG_INFINITY, f32::max);
        for i in 0..e {
            need[i] = if chosen[i] { best_out } else { kth };
            if grouped {
                let (_, a, ai, b) = groups[i / per];
                // The best other score of its group.
                let other = if ai == i { b } else { a };
                if chosen[i] {
                    need[i] = need[i].max(strongest_dropped - other);
                } else if !kept[i / per] {
                    need[i] = need[i].max(weakest_kept - other);
                }
            }
        }
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
        let (mut scores, mut work, mut chosen, mut need) = (vec![0f32; e], Vec::new(), vec![false; e], vec![0f32; e]);
        for t in 0..self.tokens() {
            self.scores(t, offsets, &mut scores);
            sel.select(&scores, &mut work, &mut chosen, &mut need);
            counts.iter_mut().zip(&chosen).for_each(|(c, &x)| *c += usize::from(x));
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
    let (mut scores, mut work, mut chosen, mut need) = (vec![0f32; e], Vec::new(), vec![false; e], vec![0f32; e]);
    let mut needs: Vec<Vec<f64>> = vec![Vec::with_capacity(t); e];
    for _ in 0..60 {
        needs.iter_mut().for_each(Vec::clear);
        for tok in 0..t {
            sample.scores(tok, &off, &mut scores);
            sel.select(&scores, &mut work, &mut chosen, &mut need);
            let s = f64::from(sample.scale[tok]).max(1e-6);
            for (i, n) in needs.iter_mut().enumerate() {
                // Expert i is selected for this token when its offset exceeds this.
                n.push(off[i] + f64::from(need[i] - scores[i]) / s);
            }
        }
        for (i, n) in needs.iter_mut().enumerate() {
            n.sort_by(|a, b| a.total_cmp(b));
            // An expert wanted by every token (or none) sits just past the extreme need: a
            // margin relative to the needs' spread, never a fixed amount (gate units scale).
            let margin = 0.02 * (n[t - 1] - n[0]) + 1e-6;
            let want = (rates[i] * t as f64).round() as usize;
            let target = match want {
                0 => n[0] - margin,
                w if w >= t => n[t - 1] + margin,
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
        // (E, k, groups, kept groups, largest rate error): group-limited selection is solved
        // approximately.
        for (e, k, n_group, topk_group, tolerance) in [(64, 8, 1, 1, 0.05), (8, 2, 1, 1, 0.05), (16, 4, 4, 2, 0.1)] {
            let sample = Sample::gaussian(&mut r, 2048, e, 2.0, |z| 1.0 / (1.0 + (-z).exp()));
            let sel = Selector { k, n_group, topk_group };
            let rates = target_rates(3, 0, e, k, 1.0);
            let off = solve_offsets(&sample, &sel, &rates);
            let got = sample.rates(&sel, &off);
            let err = got.iter().zip(&rates).map(|(g, w)| (g - w).abs()).fold(0.0, f64::max);
            assert!(err < tolerance, "E={e} k={k}: max rate error {err}\n{got:?}\n{rates:?}");
            let (a, b) = (top_share(&got, 0.25), top_share(&rates, 0.25));
            assert!((a - b).abs() < 0.03, "E={e} k={k}: top-25 % share {a}, target {b}");
        }
    }
}
