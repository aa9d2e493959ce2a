//! Token generation as mlx-lm's `generate_step` / `stream_generate` do it: all prompt tokens but
//! the last are prefilled in chunks, the last one produces the first sample, and decode is
//! pipelined one step ahead with async_eval. Speeds use mlx-lm's definitions.
use std::time::Instant;

use anyhow::{bail, Result};
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::transforms::{async_eval, eval};
use mlx_rs::{ops, random, Array};

use crate::cache::KvCache;
use crate::model::Model;

/// The warm-up prompt of `generate --warmup`, `run`/`validate` and the benchmarks' mlx-lm side
/// (benchmarks/mlx_lm_bench.py): longer than the GPU decode kernels' limit (`qmv_swiglu::
/// GPU_MAX_TOKENS`), so the prefill kernels are JIT-compiled and loaded in the warm-up, not in the
/// measured prefill.
pub const WARMUP_TEXT: &str = "Hello, world. Hello, world. Hello, world. Hello, world. Hello, world. Hello, world.";

/// How the next token is chosen.
#[derive(Debug, Clone, Copy)]
pub struct SamplerConfig {
    /// 0 = greedy (argmax of log-probabilities).
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    pub seed: u64,
}

impl SamplerConfig {
    /// Rejects nonsense before any work: `temperature` finite and >= 0; `top_p` in (0, 1]
    /// (1 = off). mlx-lm applies top-p only for 0 < p < 1 and silently treats other values as
    /// off; zmlx follows that for p = 1 and refuses p <= 0, p > 1 and NaN instead of ignoring them.
    pub fn check(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            bail!("temperature {} is not allowed: use a finite number >= 0 (0 = greedy)", self.temperature);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            bail!("top_p {} is not allowed: use a number in (0, 1] (1 = no nucleus filtering)", self.top_p);
        }
        Ok(())
    }
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig { temperature: 0.0, top_p: 1.0, seed: 0 }
    }
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Prompt tokens per prefill chunk (mlx-lm's prefill_step_size).
    pub prefill_step: usize,
    /// Keep going through EOS (benchmarks, long fidelity comparisons).
    pub ignore_eos: bool,
    pub eos_token_ids: Vec<u32>,
}

impl GenerateOptions {
    pub fn greedy(max_tokens: usize, eos_token_ids: Vec<u32>) -> Self {
        GenerateOptions {
            max_tokens,
            sampler: SamplerConfig::default(),
            prefill_step: 2048,
            ignore_eos: false,
            eos_token_ids,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    /// prompt tokens / time until the first token is available (includes the first sample).
    pub prompt_tps: f64,
    pub generation_tokens: usize,
    /// (n + 1) / time since the first token, as mlx-lm counts it.
    pub generation_tps: f64,
    /// Process peak memory in decimal GB (MLX's allocator).
    pub peak_memory_gb: f64,
    /// "stop" (EOS) or "length".
    pub finish_reason: String,
    /// Seconds in the chunked prefill (every prompt token but the last, cache evaluated) and
    /// until the first token (time to first token): where a slow `prompt_tps` comes from.
    pub prefill_seconds: f64,
    pub first_token_seconds: f64,
}

pub(crate) struct Sampler {
    config: SamplerConfig,
    state: Option<random::RandomState>,
}

impl Sampler {
    pub(crate) fn new(config: SamplerConfig) -> Result<Sampler> {
        let state = if config.temperature > 0.0 { Some(random::RandomState::with_seed(config.seed)?) } else { None };
        Ok(Sampler { config, state })
    }

    /// Whether this sampler picks the argmax (no random state).
    pub(crate) fn is_greedy(&self) -> bool {
        self.state.is_none()
    }

    /// `logprobs` `[1, V]` → token `[1]`.
    pub(crate) fn sample(&mut self, logprobs: &Array) -> Result<Array> {
        let Some(state) = self.state.as_mut() else {
            return Ok(ops::indexing::argmax_axis(logprobs, -1, None)?);
        };
        let mut lp = logprobs.clone();
        if self.config.top_p > 0.0 && self.config.top_p < 1.0 {
            lp = apply_top_p(&lp, self.config.top_p)?;
        }
        let key = state.next_key()?;
        let scaled = lp.multiply(Array::from_f32(1.0 / self.config.temperature).as_dtype(lp.dtype())?)?;
        Ok(random::categorical(&scaled, -1, None, &key)?)
    }
}

/// Keeps the smallest set of most likely tokens whose probability reaches `top_p` (mlx-lm's
/// apply_top_p); the rest get -inf.
fn apply_top_p(logprobs: &Array, top_p: f32) -> Result<Array> {
    let probs = ops::exp(logprobs)?;
    let order = ops::argsort_axis(logprobs, -1)?; // ascending
    let sorted = probs.take_along_axis(&order, -1)?;
    let cum = ops::cumsum(&sorted, -1, None, None)?;
    let keep_sorted = ops::gt(&cum, Array::from_f32(1.0 - top_p))?;
    // Scatter the keep mask back to vocabulary order.
    let keep = ops::indexing::put_along_axis(ops::zeros_like(&keep_sorted)?, &order, &keep_sorted, -1)?;
    let neg_inf = Array::from_f32(f32::NEG_INFINITY).as_dtype(logprobs.dtype())?;
    Ok(ops::select(&keep, logprobs, &neg_inf)?)
}

/// Log-probabilities of the last position of logits `[1, L, V]`, as mlx-lm's generate_step:
/// `logits - logsumexp(logits)` over all axes — so only for one sequence (batch.rs applies it
/// to each row).
pub(crate) fn last_logprobs(logits: &Array) -> Result<Array> {
    let logits = logits.try_index((.., -1, ..))?;
    Ok(logits.subtract(ops::logsumexp(&logits, true)?)?)
}

/// One model step on `tokens` `[L]`: returns (sampled token `[1]`, logprobs `[1, V]`).
fn step(model: &Model, caches: &mut [KvCache], tokens: &Array, sampler: &mut Sampler) -> Result<(Array, Array)> {
    let logprobs = last_logprobs(&model.forward(&tokens.expand_dims(0)?, caches)?)?;
    let y = sampler.sample(&logprobs)?;
    Ok((y, logprobs))
}

/// Every id of `prompt` is a row of the model's embedding: an id past it must never reach the
/// gather (MLX does not bounds-check it).
pub fn check_prompt_ids(model: &Model, prompt: &[u32]) -> Result<()> {
    let rows = model.config.vocab_size as u32;
    if let Some(bad) = prompt.iter().find(|&&t| t >= rows) {
        bail!("prompt token id {bad} is out of range: the model's embedding has {rows} rows (config.json vocab_size)");
    }
    Ok(())
}

/// Generates from `prompt` token ids, calling `on_token` with each new token as it is produced.
/// Returns the generated ids (without EOS) and mlx-lm-style statistics.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<(Vec<u32>, GenerationStats)> {
    if prompt.is_empty() {
        bail!("the prompt is empty: give at least one token");
    }
    opts.sampler.check()?;
    if opts.prefill_step == 0 {
        bail!("prefill_step must be at least 1");
    }
    check_prompt_ids(model, prompt)?;
    let start = Instant::now();
    let mut caches = model.new_cache();
    let mut sampler = Sampler::new(opts.sampler)?;
    let all = Array::from_slice(prompt, &[prompt.len() as i32]);

    // Prefill every prompt token but the last, in chunks.
    let mut done = 0usize;
    while prompt.len() - done > 1 {
        let n = opts.prefill_step.min(prompt.len() - done - 1);
        let chunk = all.try_index(done as i32..(done + n) as i32)?;
        let _ = model.forward(&chunk.expand_dims(0)?, &mut caches)?;
        eval(caches.iter().flat_map(|c| c.state()))?;
        mlx_rs::memory::clear_cache()?;
        done += n;
    }
    let prefill_seconds = start.elapsed().as_secs_f64();

    let mut tokens = Vec::new();
    let mut finish = "length";
    let mut gen_start = start;
    let mut prompt_tps = 0.0;
    let mut first_token_seconds = 0.0;
    if opts.max_tokens > 0 {
        let last = all.try_index((done as i32)..)?;
        let (mut y, lp) = step(model, &mut caches, &last, &mut sampler)?;
        async_eval([&y, &lp])?;
        // ZMLX_DECODE_PIPELINE=0: finish each step before building the next (a diagnostic for
        // scheduling-dependent results; costs the overlap of host and device work).
        let pipeline = crate::settings::switch_var("ZMLX_DECODE_PIPELINE", true);
        let mut n = 0usize;
        loop {
            if !pipeline {
                eval([&y])?;
            }
            // Queue the next step before reading this one, so compute overlaps the host work.
            let next = if n + 1 < opts.max_tokens {
                let (ny, nlp) = step(model, &mut caches, &y, &mut sampler)?;
                async_eval([&ny, &nlp])?;
                Some(ny)
            } else {
                None
            };
            if n == 0 {
                eval([&y])?;
                let t = start.elapsed().as_secs_f64();
                first_token_seconds = t;
                prompt_tps = prompt.len() as f64 / t;
                gen_start = Instant::now();
            }
            let token = y.try_index(0)?.item_cast::<u32>();
            if !opts.ignore_eos && opts.eos_token_ids.contains(&token) {
                finish = "stop";
                break;
            }
            tokens.push(token);
            on_token(token)?;
            if n % 256 == 0 {
                mlx_rs::memory::clear_cache()?;
            }
            match next {
                Some(ny) => y = ny,
                None => break,
            }
            n += 1;
        }
    }
    let elapsed = gen_start.elapsed().as_secs_f64();
    let counted = tokens.len() + usize::from(finish == "stop");
    let stats = GenerationStats {
        prompt_tokens: prompt.len(),
        prompt_tps,
        generation_tokens: tokens.len(),
        generation_tps: if elapsed > 0.0 { counted as f64 / elapsed } else { 0.0 },
        peak_memory_gb: crate::mlx_env::peak_memory() as f64 / 1e9,
        finish_reason: finish.to_owned(),
        prefill_seconds,
        first_token_seconds,
    };
    Ok((tokens, stats))
}

/// Greedy ids for `prompt` (tests, validation): `max_tokens` tokens unless EOS stops earlier.
pub fn greedy_ids(model: &Model, prompt: &[u32], max_tokens: usize, ignore_eos: bool) -> Result<Vec<u32>> {
    let mut opts = GenerateOptions::greedy(max_tokens, model.config.eos_token_ids.clone());
    opts.ignore_eos = ignore_eos;
    Ok(generate(model, prompt, &opts, |_| Ok(()))?.0)
}

#[cfg(test)]
mod warmup_text_tests {
    /// The mlx-lm side of the benchmarks warms up on the same text (like with like).
    #[test]
    fn mlx_lm_bench_warms_up_on_the_same_text() {
        let script = include_str!("../benchmarks/mlx_lm_bench.py");
        assert!(script.contains(&format!("WARMUP_TEXT = \"{}\"", super::WARMUP_TEXT)));
    }
}
