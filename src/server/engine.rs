//! The engine thread: the only thread that touches the model (MLX arrays are not Send). It owns
//! the `Model` and a `BatchEngine`, takes jobs from a channel, steps the batch, detokenizes each
//! sequence's tokens, applies stop strings, and sends each request's events back on its own
//! channel. A request whose receiver is gone (the client disconnected) is cancelled before the
//! next step, so its KV cache is freed.
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;

use anyhow::Result;
use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use crate::batch::{BatchEngine, BatchOptions, FinishReason, SeqId, SequenceRequest, SequenceStats, TokenLogprobs};
use crate::model::Model;
use crate::tokenizer::{TextStream, TextTokenizer};

/// One generation request, checked and tokenized by the HTTP side.
pub struct Job {
    pub request: SequenceRequest,
    pub stop: Vec<String>,
    /// Leave special tokens out of the text (false: write them, as mlx-lm does).
    pub skip_special_tokens: bool,
    pub events: UnboundedSender<Event>,
}

/// What a request hears back, in order: deltas, then exactly one `Done`, `Rejected` or `Failed`.
#[derive(Debug)]
pub enum Event {
    /// New text (possibly empty while a multi-byte character or a possible stop string is held
    /// back) and the tokens that produced it since the last delta.
    Delta {
        text: String,
        tokens: Vec<u32>,
        logprobs: Vec<TokenLogprobs>,
    },
    Done {
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The engine refused the request (a 400: checked on the HTTP side first, so rare).
    Rejected(String),
    /// The engine failed while the request ran (a 500).
    Failed(String),
}

pub enum Command {
    Submit(Job),
    /// Stop now; requests still running get their channel closed without `Done`.
    Shutdown,
}

/// A sequence in the engine and where its output goes.
struct Live<'t> {
    events: UnboundedSender<Event>,
    detok: TextStream<'t>,
    stop: Vec<String>,
    /// Everything generated so far; `text[..sent]` has been sent.
    text: String,
    sent: usize,
    /// Tokens (and their log-probabilities) since the last delta.
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprobs>,
    completion_tokens: usize,
    prompt_tokens: usize,
}

impl Live<'_> {
    /// Takes one token: returns true when a stop string ended the sequence (its text is sent; the
    /// caller sends `Done` once the sequence is accounted for).
    fn push(&mut self, token: u32, logprobs: Option<TokenLogprobs>) -> Result<bool> {
        self.completion_tokens += 1;
        self.tokens.push(token);
        self.logprobs.extend(logprobs);
        if let Some(piece) = self.detok.step(token)? {
            self.text.push_str(&piece);
        }
        if let Some(at) = self.find_stop() {
            self.send_delta(at);
            return Ok(true);
        }
        // Hold back a tail that could still grow into a stop string, so the client never sees
        // text the stop string later removes.
        let safe = self.text.len() - self.partial_stop_len();
        if safe > self.sent {
            self.send_delta(safe);
        }
        Ok(false)
    }

    /// Where the earliest stop string starts in the unsent text (a match may begin in text
    /// already sent only if it ends after it; the hold-back makes that impossible).
    fn find_stop(&self) -> Option<usize> {
        let from = floor_boundary(&self.text, self.sent);
        self.stop.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min()
    }

    /// Bytes at the end of `text` (unsent) that are a proper prefix of some stop string.
    fn partial_stop_len(&self) -> usize {
        let unsent = &self.text[self.sent..];
        let mut best = 0;
        for s in &self.stop {
            for (k, _) in s.char_indices().skip(1) {
                if k > best && unsent.ends_with(&s[..k]) {
                    best = k;
                }
            }
        }
        best
    }

    fn send_delta(&mut self, upto: usize) {
        let text = self.text[self.sent..upto].to_owned();
        self.sent = upto;
        let tokens = std::mem::take(&mut self.tokens);
        let logprobs = std::mem::take(&mut self.logprobs);
        let _ = self.events.send(Event::Delta { text, tokens, logprobs });
    }

    fn done(&mut self, finish_reason: &'static str) {
        let _ = self.events.send(Event::Done {
            finish_reason,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
        });
    }

    /// The sequence ended on its own (EOS or length): everything held back goes out, incl. the
    /// detokenizer's pending bytes (a stop string in them still cuts the text).
    fn finish(&mut self, reason: FinishReason) {
        if let Ok(tail) = self.detok.finish() {
            self.text.push_str(&tail);
        }
        if let Some(at) = self.find_stop() {
            self.send_delta(at);
            self.done("stop");
            return;
        }
        if self.sent < self.text.len() || !self.tokens.is_empty() {
            self.send_delta(self.text.len());
        }
        self.done(if reason == FinishReason::Length { "length" } else { "stop" });
    }
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Runs until `Shutdown` or until every sender is gone. `metrics` is updated after every step.
pub fn run(model: &Model, tok: &TextTokenizer, opts: BatchOptions, commands: Receiver<Command>, metrics: Arc<Metrics>) {
    let mut engine = match BatchEngine::new(model, opts) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("[zmlx] serve: cannot start the batch engine: {e:#}");
            return;
        }
    };
    let mut live: HashMap<SeqId, Live<'_>> = HashMap::new();
    loop {
        // Idle: block for work. Busy: take what has arrived and keep stepping.
        if engine.is_idle() {
            match commands.recv() {
                Ok(Command::Submit(job)) => submit(&mut engine, &mut live, tok, job, &metrics),
                Ok(Command::Shutdown) | Err(_) => return,
            }
        }
        loop {
            match commands.try_recv() {
                Ok(Command::Submit(job)) => submit(&mut engine, &mut live, tok, job, &metrics),
                Ok(Command::Shutdown) | Err(TryRecvError::Disconnected) => return,
                Err(TryRecvError::Empty) => break,
            }
        }
        let gone: Vec<SeqId> = live.iter().filter(|(_, l)| l.events.is_closed()).map(|(&id, _)| id).collect();
        for id in gone {
            engine.cancel(id);
            live.remove(&id);
            metrics.sequence_ended(None);
            metrics.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        if engine.is_idle() {
            metrics.set_engine_state(0, 0);
            continue;
        }
        match engine.step() {
            Ok(out) => route(&mut engine, &mut live, out, &metrics),
            Err(e) => {
                // A failed step leaves the batch in an unknown state: fail every request in it
                // and start over with an empty engine; the server keeps serving.
                let msg = format!("{e:#}");
                eprintln!("[zmlx] serve: engine step failed: {msg}");
                for (_, l) in live.drain() {
                    metrics.sequence_ended(None);
                    let _ = l.events.send(Event::Failed(msg.clone()));
                }
                match BatchEngine::new(model, opts) {
                    Ok(e) => engine = e,
                    Err(e) => {
                        eprintln!("[zmlx] serve: cannot restart the batch engine: {e:#}");
                        return;
                    }
                }
            }
        }
        metrics.set_engine_state(engine.queued(), engine.running());
        metrics.max_batch_seen.fetch_max(engine.totals().max_batch_seen, Ordering::Relaxed);
        metrics.peak_memory_bytes.store(crate::mlx_env::peak_memory() as u64, Ordering::Relaxed);
    }
}

fn submit<'t>(
    engine: &mut BatchEngine<'_>,
    live: &mut HashMap<SeqId, Live<'t>>,
    tok: &'t TextTokenizer,
    job: Job,
    metrics: &Metrics,
) {
    let prompt_tokens = job.request.prompt.len();
    match engine.add(job.request) {
        Ok(id) => {
            live.insert(
                id,
                Live {
                    events: job.events,
                    detok: tok.stream_with(job.skip_special_tokens),
                    stop: job.stop,
                    text: String::new(),
                    sent: 0,
                    tokens: vec![],
                    logprobs: vec![],
                    completion_tokens: 0,
                    prompt_tokens,
                },
            );
        }
        Err(e) => {
            metrics.sequence_ended(None);
            let _ = job.events.send(Event::Rejected(format!("{e:#}")));
        }
    }
}

fn route(
    engine: &mut BatchEngine<'_>,
    live: &mut HashMap<SeqId, Live<'_>>,
    out: crate::batch::StepOutput,
    metrics: &Metrics,
) {
    let mut logprobs: HashMap<SeqId, std::collections::VecDeque<TokenLogprobs>> = HashMap::new();
    for (id, lp) in out.logprobs {
        logprobs.entry(id).or_default().push_back(lp);
    }
    metrics.tokens_generated.fetch_add(out.tokens.len() as u64, Ordering::Relaxed);
    // (sequence, None: a stop string ended it; Some(error): the detokenizer failed).
    let mut stopped = vec![];
    for (id, token) in out.tokens {
        let Some(l) = live.get_mut(&id) else { continue };
        let lp = logprobs.get_mut(&id).and_then(|q| q.pop_front());
        match l.push(token, lp) {
            Ok(false) => {}
            Ok(true) => stopped.push((id, None)),
            Err(e) => stopped.push((id, Some(format!("{e:#}")))),
        }
    }
    let mut finished: HashMap<SeqId, SequenceStats> = out.finished.into_iter().collect();
    // Each request is accounted as ended before its client hears `Done`, so a client that sends
    // its next request on the answer never finds its old one still counted against capacity.
    for (id, error) in stopped {
        // A stop string (or a detokenizer error) ended it: the engine runs it until cancelled
        // (unless it also ended on its own this step).
        if let Some(mut l) = live.remove(&id) {
            let stats = engine.cancel(id).or_else(|| finished.remove(&id));
            metrics.sequence_ended(stats.as_ref());
            match error {
                None => l.done("stop"),
                Some(msg) => {
                    let _ = l.events.send(Event::Failed(msg));
                }
            }
        }
        finished.remove(&id);
    }
    for (id, stats) in finished {
        if let Some(mut l) = live.remove(&id) {
            metrics.sequence_ended(Some(&stats));
            l.finish(stats.finish_reason);
        }
    }
}
