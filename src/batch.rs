//! Batched generation with continuous batching: sequences join and leave a running batch between
//! steps. Each step prefills one chunk of one waiting sequence (alone, in mlx-lm's chunks, so its
//! cache is exactly its batch-1 cache), then decodes every running sequence in one model pass
//! (`Model::forward_batch`: tokens `[B, 1]`, one KV cache per sequence and layer), pipelined one
//! step ahead like `generate`.
//!
//! Batch invariance: a sequence's tokens do not depend on what else is in the batch where every
//! op a decode step runs computes each row on its own. The attention core runs per sequence
//! (`cache::per_sequence`); what remains are row-wise ops (embedding, norms, projections, routers,
//! experts, combine, log-softmax, argmax). On the CPU backend every one of those computes a row's
//! sums in an order that does not depend on the number of rows (MLX's quantized matmuls and the
//! wheel's reference BLAS sum each output in K order; the zmlx row kernels compute each
//! (token, row) as one fixed sequence of operations in their 1-, 2- and 4-token blocks), which
//! tests/batch.rs checks per family. On CUDA it does not hold: MLX picks different matmul
//! kernels by row count (and its qmm kernel races, HANDOFF).
use std::collections::VecDeque;
use std::time::Instant;

use anyhow::{bail, Result};
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::transforms::{async_eval, eval};
use mlx_rs::{ops, Array};
use serde::Serialize;

use crate::cache::KvCache;
use crate::generate::{check_prompt_ids, last_logprobs, GenerateOptions, Sampler, SamplerConfig};
use crate::model::Model;

/// Largest batch an engine accepts: past this, per-sequence attention calls dominate a step.
pub const MAX_BATCH: usize = 1024;

/// Most alternatives a sequence may ask log-probabilities for (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: usize = 20;

/// One sequence to generate.
#[derive(Debug, Clone)]
pub struct SequenceRequest {
    pub prompt: Vec<u32>,
    /// At least 1.
    pub max_tokens: usize,
    pub sampler: SamplerConfig,
    /// Keep going through EOS.
    pub ignore_eos: bool,
    pub eos_token_ids: Vec<u32>,
    /// Report each emitted token's log-probability and this many most likely alternatives
    /// (0..=MAX_TOP_LOGPROBS); None: no log-probabilities (nothing extra is read back).
    pub logprobs: Option<usize>,
}

impl SequenceRequest {
    /// `prompt` with `generate`'s settings (token budget, sampler, EOS handling).
    pub fn from_options(prompt: Vec<u32>, opts: &GenerateOptions) -> SequenceRequest {
        SequenceRequest {
            prompt,
            max_tokens: opts.max_tokens,
            sampler: opts.sampler,
            ignore_eos: opts.ignore_eos,
            eos_token_ids: opts.eos_token_ids.clone(),
            logprobs: None,
        }
    }

    pub fn greedy(prompt: Vec<u32>, max_tokens: usize, eos_token_ids: Vec<u32>) -> SequenceRequest {
        SequenceRequest {
            prompt,
            max_tokens,
            sampler: SamplerConfig::default(),
            ignore_eos: false,
            eos_token_ids,
            logprobs: None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct BatchOptions {
    /// Sequences decoding at once (1..=MAX_BATCH); more wait in a queue.
    pub max_batch: usize,
    /// Prompt tokens per prefill chunk (mlx-lm's prefill_step_size).
    pub prefill_step: usize,
}

impl BatchOptions {
    pub fn new(max_batch: usize) -> BatchOptions {
        BatchOptions { max_batch, prefill_step: 2048 }
    }

    pub fn check(&self) -> Result<()> {
        if !(1..=MAX_BATCH).contains(&self.max_batch) {
            bail!("batch size {} is not allowed: use 1..={MAX_BATCH}", self.max_batch);
        }
        if self.prefill_step == 0 {
            bail!("prefill_step must be at least 1");
        }
        Ok(())
    }
}

pub type SeqId = u64;

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An EOS token (not emitted).
    Stop,
    /// `max_tokens` reached.
    Length,
    /// Removed by [`BatchEngine::cancel`].
    Cancelled,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct SequenceStats {
    pub prompt_tokens: usize,
    pub generation_tokens: usize,
    pub finish_reason: FinishReason,
    /// From `add` to the first token (queueing and prefill included); 0 if none came.
    pub first_token_seconds: f64,
    /// (tokens + 1 if stopped by EOS) / time since the first token, as `generate` counts it.
    pub generation_tps: f64,
}

/// What one step produced: new tokens in sequence order, and the sequences that ended.
#[derive(Debug, Default)]
pub struct StepOutput {
    pub tokens: Vec<(SeqId, u32)>,
    pub finished: Vec<(SeqId, SequenceStats)>,
    /// For the sequences that asked (`SequenceRequest::logprobs`), one entry per token of
    /// `tokens`, in the same order.
    pub logprobs: Vec<(SeqId, TokenLogprobs)>,
}

/// An emitted token's log-probability under the model (before temperature and top-p, as
/// OpenAI and mlx-lm report it) and the most likely tokens with theirs, best first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

struct Entry {
    id: SeqId,
    req: SequenceRequest,
    added: Instant,
}

struct Prefill {
    entry: Entry,
    caches: Vec<KvCache>,
    done: usize,
}

struct Running {
    entry: Entry,
    sampler: Sampler,
    /// The next input token as (array, row): a row of a step's sampled tokens, or the last
    /// prompt token; possibly not evaluated yet.
    input: (Array, i32),
    /// `input` is a sampled token not yet read (emitted or checked for EOS).
    unread: bool,
    /// The log-probabilities `[1, V]` `input` was sampled from, kept only for a sequence that
    /// asked for them.
    input_logprobs: Option<Array>,
    emitted: usize,
    first_token: Option<Instant>,
}

/// Totals since the engine was made.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EngineTotals {
    pub steps: usize,
    /// Seconds in prefill chunks and in decode steps.
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Largest number of sequences in one decode step.
    pub max_batch_seen: usize,
}

pub struct BatchEngine<'m> {
    model: &'m Model,
    opts: BatchOptions,
    next_id: SeqId,
    waiting: VecDeque<Entry>,
    prefilling: Option<Prefill>,
    running: Vec<Running>,
    /// `caches[layer][i]` belongs to `running[i]`.
    caches: Vec<Vec<KvCache>>,
    /// The last step's sampled tokens `[B]` while `running[i]`'s input is still its row i.
    aligned: Option<Array>,
    totals: EngineTotals,
}

impl<'m> BatchEngine<'m> {
    pub fn new(model: &'m Model, opts: BatchOptions) -> Result<BatchEngine<'m>> {
        opts.check()?;
        Ok(BatchEngine {
            model,
            opts,
            next_id: 0,
            waiting: VecDeque::new(),
            prefilling: None,
            running: vec![],
            caches: (0..model.layers.len()).map(|_| vec![]).collect(),
            aligned: None,
            totals: EngineTotals::default(),
        })
    }

    /// Queues a sequence; it joins the running batch after its prefill.
    pub fn add(&mut self, req: SequenceRequest) -> Result<SeqId> {
        if req.prompt.is_empty() {
            bail!("the prompt is empty: give at least one token");
        }
        if req.max_tokens == 0 {
            bail!("max_tokens must be at least 1");
        }
        if req.logprobs.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            bail!("top logprobs {:?} is not allowed: use 0..={MAX_TOP_LOGPROBS}", req.logprobs);
        }
        req.sampler.check()?;
        check_prompt_ids(self.model, &req.prompt)?;
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back(Entry { id, req, added: Instant::now() });
        Ok(id)
    }

    /// Removes a sequence wherever it is (queued, prefilling or running); its cache is freed.
    /// Returns its statistics, or None for an unknown or already finished id.
    pub fn cancel(&mut self, id: SeqId) -> Option<SequenceStats> {
        if let Some(i) = self.waiting.iter().position(|e| e.id == id) {
            let e = self.waiting.remove(i)?;
            return Some(stats_of(&e, 0, None, FinishReason::Cancelled));
        }
        if self.prefilling.as_ref().is_some_and(|p| p.entry.id == id) {
            let p = self.prefilling.take()?;
            return Some(stats_of(&p.entry, 0, None, FinishReason::Cancelled));
        }
        let drop: Vec<bool> = self.running.iter().map(|r| r.entry.id == id).collect();
        let r = self.remove_running(&drop).pop()?;
        Some(stats_of(&r.entry, r.emitted, r.first_token, FinishReason::Cancelled))
    }

    /// Nothing queued, prefilling or running.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.prefilling.is_none() && self.running.is_empty()
    }

    /// Sequences decoding now.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Sequences waiting for (or in) prefill.
    pub fn queued(&self) -> usize {
        self.waiting.len() + usize::from(self.prefilling.is_some())
    }

    pub fn totals(&self) -> &EngineTotals {
        &self.totals
    }

    /// One prefill chunk (if a sequence waits and the batch has room), then one decode step of
    /// every running sequence.
    pub fn step(&mut self) -> Result<StepOutput> {
        self.totals.steps += 1;
        self.prefill_chunk()?;
        let mut out = StepOutput::default();
        if self.running.is_empty() {
            return Ok(out);
        }
        let start = Instant::now();
        // A sequence whose unread token is its last one is only read this step: it leaves the
        // batch (and its cache is freed) before the model runs.
        let last: Vec<bool> =
            self.running.iter().map(|r| r.emitted + usize::from(r.unread) >= r.entry.req.max_tokens).collect();
        let mut draining = self.remove_running(&last);
        // Queue the next decode step before reading this one's tokens, so the model's work
        // overlaps the host's.
        let sampled = if self.running.is_empty() { None } else { Some(self.decode()?) };
        let mut ended = vec![false; self.running.len()];
        for (i, r) in self.running.iter_mut().chain(draining.iter_mut()).enumerate() {
            if r.unread {
                let token = read_token(&r.input)?;
                r.unread = false;
                r.first_token.get_or_insert_with(Instant::now);
                if !r.entry.req.ignore_eos && r.entry.req.eos_token_ids.contains(&token) {
                    out.finished.push((r.entry.id, stats_of(&r.entry, r.emitted, r.first_token, FinishReason::Stop)));
                    if let Some(e) = ended.get_mut(i) {
                        *e = true;
                    }
                    continue;
                }
                r.emitted += 1;
                self.totals.generated_tokens += 1;
                out.tokens.push((r.entry.id, token));
                if let (Some(k), Some(lp)) = (r.entry.req.logprobs, r.input_logprobs.take()) {
                    out.logprobs.push((r.entry.id, token_logprobs(&lp, token, k)?));
                }
            }
            if r.emitted == r.entry.req.max_tokens {
                out.finished.push((r.entry.id, stats_of(&r.entry, r.emitted, r.first_token, FinishReason::Length)));
            }
        }
        if let Some((ys, batch, rows)) = sampled {
            for ((r, y), row) in self.running.iter_mut().zip(ys).zip(rows) {
                r.input = y;
                r.unread = true;
                r.input_logprobs = r.entry.req.logprobs.map(|_| row);
            }
            self.aligned = batch;
        }
        self.remove_running(&ended);
        if self.totals.steps % 256 == 0 {
            mlx_rs::memory::clear_cache()?;
        }
        self.totals.decode_seconds += start.elapsed().as_secs_f64();
        Ok(out)
    }

    /// Takes the running sequences marked in `drop` out of the batch (their caches freed) and
    /// returns them in order.
    fn remove_running(&mut self, drop: &[bool]) -> Vec<Running> {
        if !drop.iter().any(|&d| d) {
            return vec![];
        }
        for layer in &mut self.caches {
            let mut d = drop.iter();
            layer.retain(|_| !d.next().copied().unwrap_or(false));
        }
        let mut d = drop.iter();
        let (gone, kept): (Vec<Running>, Vec<Running>) =
            std::mem::take(&mut self.running).into_iter().partition(|_| d.next().copied().unwrap_or(false));
        self.running = kept;
        self.aligned = None;
        gone
    }

    /// Runs the model on every running sequence's input token and samples the next ones
    /// (queued, not evaluated): `(array, row)` per sequence, the `[B]` array of them all when
    /// there is one, and each sequence's log-probabilities `[1, V]`.
    #[allow(clippy::type_complexity)]
    fn decode(&mut self) -> Result<(Vec<(Array, i32)>, Option<Array>, Vec<Array>)> {
        let b = self.running.len();
        self.totals.max_batch_seen = self.totals.max_batch_seen.max(b);
        let tokens = match self.aligned.take() {
            Some(ys) if ys.size() == b => ys,
            _ => batch_inputs(&self.running)?,
        };
        let tokens = tokens.reshape(&[b as i32, 1])?;
        let logits = self.model.forward_batch(&tokens, &mut self.caches)?;
        // Each row normalised on its own with generate's very expression (a logsumexp over all
        // axes of `[1, V]`), so a sequence's log-probabilities are bit-identical to its batch-1
        // run's (MLX's per-axis logsumexp is a different kernel).
        let rows = if b == 1 {
            vec![last_logprobs(&logits)?]
        } else {
            (0..b as i32).map(|i| last_logprobs(&logits.try_index(i..i + 1)?)).collect::<Result<Vec<_>>>()?
        };
        if self.running.iter().all(|r| r.sampler.is_greedy()) {
            let all = if b == 1 { rows[0].clone() } else { ops::concatenate(&rows, 0)? };
            let ys = ops::indexing::argmax_axis(&all, -1, None)?;
            async_eval([&ys])?;
            return Ok(((0..b as i32).map(|i| (ys.clone(), i)).collect(), Some(ys), rows));
        }
        let mut ys = Vec::with_capacity(b);
        for (r, row) in self.running.iter_mut().zip(&rows) {
            ys.push((r.sampler.sample(row)?, 0));
        }
        async_eval(ys.iter().map(|(a, _)| a))?;
        Ok((ys, None, rows))
    }

    /// Advances the sequence in prefill by one chunk (starting the next waiting one if the batch
    /// has room); a sequence whose prompt is in its cache but for the last token joins the batch.
    fn prefill_chunk(&mut self) -> Result<()> {
        if self.prefilling.is_none() && self.running.len() < self.opts.max_batch {
            if let Some(entry) = self.waiting.pop_front() {
                self.prefilling = Some(Prefill { entry, caches: self.model.new_cache(), done: 0 });
            }
        }
        let Some(p) = self.prefilling.as_mut() else { return Ok(()) };
        let prompt = &p.entry.req.prompt;
        if prompt.len() - p.done > 1 {
            let start = Instant::now();
            let n = self.opts.prefill_step.min(prompt.len() - p.done - 1);
            let chunk = Array::from_slice(&prompt[p.done..p.done + n], &[1, n as i32]);
            let _ = self.model.forward(&chunk, &mut p.caches)?;
            eval(p.caches.iter().flat_map(|c| c.state()))?;
            mlx_rs::memory::clear_cache()?;
            p.done += n;
            self.totals.prefill_seconds += start.elapsed().as_secs_f64();
        }
        if prompt.len() - p.done == 1 {
            let Some(p) = self.prefilling.take() else { return Ok(()) };
            let last = *p.entry.req.prompt.last().unwrap_or(&0);
            for (layer, cache) in self.caches.iter_mut().zip(p.caches) {
                layer.push(cache);
            }
            self.aligned = None;
            self.totals.prompt_tokens += p.entry.req.prompt.len();
            self.running.push(Running {
                sampler: Sampler::new(p.entry.req.sampler)?,
                entry: p.entry,
                input: (Array::from_slice(&[last], &[1]), 0),
                unread: false,
                input_logprobs: None,
                emitted: 0,
                first_token: None,
            });
        }
        Ok(())
    }
}

/// The running sequences' input tokens gathered into one `[B]` array.
fn batch_inputs(running: &[Running]) -> Result<Array> {
    let rows = running.iter().map(|r| r.input.0.try_index(r.input.1..r.input.1 + 1)).collect::<Result<Vec<_>, _>>()?;
    Ok(ops::concatenate(&rows, 0)?)
}

/// `token`'s log-probability in `logprobs` `[1, V]` and the `k` largest (ties: lower id first),
/// read on the host: one row of V floats per token, only for sequences that asked.
fn token_logprobs(logprobs: &Array, token: u32, k: usize) -> Result<TokenLogprobs> {
    let row = logprobs.as_dtype(mlx_rs::Dtype::Float32)?;
    eval([&row])?;
    let v = row.as_slice::<f32>();
    let logprob = *v.get(token as usize).ok_or_else(|| anyhow::anyhow!("token {token} is past the vocabulary"))?;
    let mut order: Vec<u32> = (0..v.len() as u32).collect();
    let better = |a: &u32, b: &u32| v[*b as usize].total_cmp(&v[*a as usize]).then(a.cmp(b));
    if k > 0 && k < order.len() {
        order.select_nth_unstable_by(k - 1, better);
    }
    order.truncate(k);
    order.sort_by(better);
    Ok(TokenLogprobs { token, logprob, top: order.into_iter().map(|i| (i, v[i as usize])).collect() })
}

fn read_token(input: &(Array, i32)) -> Result<u32> {
    let (a, i) = input;
    eval([a])?;
    let v = a.as_slice::<u32>();
    v.get(*i as usize).copied().ok_or_else(|| anyhow::anyhow!("sampled token row {i} missing"))
}

fn stats_of(e: &Entry, emitted: usize, first: Option<Instant>, reason: FinishReason) -> SequenceStats {
    let counted = emitted + usize::from(reason == FinishReason::Stop);
    let (first_token_seconds, generation_tps) = match first {
        Some(t) => {
            let elapsed = t.elapsed().as_secs_f64();
            ((t - e.added).as_secs_f64(), if elapsed > 0.0 { counted as f64 / elapsed } else { 0.0 })
        }
        None => (0.0, 0.0),
    };
    SequenceStats {
        prompt_tokens: e.req.prompt.len(),
        generation_tokens: emitted,
        finish_reason: reason,
        first_token_seconds,
        generation_tps,
    }
}

/// One finished sequence of [`generate_batch`].
#[derive(Debug, Clone, Serialize)]
pub struct SequenceOutput {
    pub token_ids: Vec<u32>,
    pub stats: SequenceStats,
}

/// Statistics of a whole [`generate_batch`] run.
#[derive(Debug, Clone, Serialize)]
pub struct BatchStats {
    pub sequences: usize,
    pub batch_size: usize,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Prompt tokens / prefill seconds (every sequence's prefill, one at a time).
    pub prompt_tps: f64,
    /// Generated tokens of all sequences / decode seconds: the batch's throughput.
    pub generation_tps: f64,
    pub wall_seconds: f64,
    pub peak_memory_gb: f64,
}

/// Generates every request through one engine of `opts.max_batch` sequences (requests beyond it
/// wait and join as others finish); `on_token(request index, token)` sees tokens as they come.
/// Outputs are in request order.
pub fn generate_batch(
    model: &Model,
    requests: &[SequenceRequest],
    opts: BatchOptions,
    mut on_token: impl FnMut(usize, u32) -> Result<()>,
) -> Result<(Vec<SequenceOutput>, BatchStats)> {
    let start = Instant::now();
    let mut engine = BatchEngine::new(model, opts)?;
    let mut ids = Vec::with_capacity(requests.len());
    for (i, r) in requests.iter().enumerate() {
        ids.push(engine.add(r.clone()).map_err(|e| e.context(format!("sequence {i}")))?);
    }
    let slot: std::collections::HashMap<SeqId, usize> = ids.iter().enumerate().map(|(i, &id)| (id, i)).collect();
    let index = |id: SeqId| slot.get(&id).copied().unwrap_or(0);
    let mut tokens: Vec<Vec<u32>> = vec![vec![]; requests.len()];
    let mut stats: Vec<Option<SequenceStats>> = vec![None; requests.len()];
    while !engine.is_idle() {
        let out = engine.step()?;
        for (id, t) in out.tokens {
            let i = index(id);
            tokens[i].push(t);
            on_token(i, t)?;
        }
        for (id, s) in out.finished {
            stats[index(id)] = Some(s);
        }
    }
    let t = engine.totals().clone();
    let outputs = tokens
        .into_iter()
        .zip(stats)
        .map(|(token_ids, s)| {
            let stats = s.ok_or_else(|| anyhow::anyhow!("a sequence ended without statistics"))?;
            Ok(SequenceOutput { token_ids, stats })
        })
        .collect::<Result<Vec<_>>>()?;
    let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
    let stats = BatchStats {
        sequences: requests.len(),
        batch_size: opts.max_batch,
        prompt_tokens: t.prompt_tokens,
        generated_tokens: t.generated_tokens,
        prefill_seconds: t.prefill_seconds,
        decode_seconds: t.decode_seconds,
        prompt_tps: rate(t.prompt_tokens, t.prefill_seconds),
        generation_tps: rate(t.generated_tokens, t.decode_seconds),
        wall_seconds: start.elapsed().as_secs_f64(),
        peak_memory_gb: crate::mlx_env::peak_memory() as f64 / 1e9,
    };
    Ok((outputs, stats))
}
