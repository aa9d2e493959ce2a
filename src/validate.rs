//! `zmlx validate`: the patched model must emit the same greedy tokens as the unpatched one.
//! Baseline and patched runs are interleaved ABBA on one loaded model (patching swaps slots, so
//! both configurations see the same weights), peak memory is reset per run, and fidelity is
//! judged on the token ids of every run.
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{ops, Array};
use serde::Serialize;

use crate::batch::{generate_batch, BatchOptions, SequenceRequest};
use crate::generate::{generate, GenerateOptions, GenerationStats};
use crate::mlx_env::{self, Backend};
use crate::model::{dtype_name, DtypeChoice, Model};
use crate::patterns::{self, PatchReport, Selection};
use crate::tokenizer::TextTokenizer;

/// The original's default validation prompt.
pub const DEFAULT_PROMPT: &str =
    "Explain the key differences between TCP and UDP protocols, including their use cases, \
reliability guarantees, and performance characteristics. Be thorough and precise.";

#[derive(Debug, Clone)]
pub struct ValidateOptions {
    pub selection: Selection,
    pub max_tokens: usize,
    pub runs: usize,
    pub prompt: String,
    /// "default", "--prompt" or the prompt file's path.
    pub prompt_source: String,
    pub cooldown_s: f64,
    pub dtype: DtypeChoice,
    /// Teacher-forced max |logit difference| per step up to the divergence.
    pub logits: bool,
    /// Also consult an all-float32 unpatched model at the divergence.
    pub arbiter_f32: bool,
    /// Generate exactly `max_tokens` per run, through EOS (benchmarks compare equal counts).
    pub ignore_eos: bool,
    /// Untimed warm-up generations (5 tokens on `generate::WARMUP_TEXT`) per configuration before the runs.
    pub warmup: usize,
    /// Copies of the prompt decoded together per run (1 = `generate`, else the batch engine).
    pub batch_size: usize,
    /// Expert offloading for both configurations (`--expert-cache*`).
    pub offload: Option<crate::offload::OffloadConfig>,
}

/// Upper bound for `--cooldown` (an hour between runs is already more than any GPU needs).
pub const MAX_COOLDOWN_S: f64 = 3600.0;

impl ValidateOptions {
    /// Rejects options that cannot give a meaningful run.
    pub fn check(&self) -> Result<()> {
        if self.runs == 0 {
            bail!("--runs must be at least 1");
        }
        if self.max_tokens == 0 {
            bail!("--max-tokens must be at least 1: validation compares generated tokens");
        }
        BatchOptions::new(self.batch_size).check()?;
        if self.offload.is_some_and(|o| o.pin > 0) && self.warmup == 0 {
            bail!("--expert-cache-pin pins the experts the warm-up selected most: add --warmup 1 (or more)");
        }
        if !(self.cooldown_s.is_finite() && (0.0..=MAX_COOLDOWN_S).contains(&self.cooldown_s)) {
            bail!("--cooldown {} is not allowed: use seconds from 0 to {MAX_COOLDOWN_S}", self.cooldown_s);
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub token_ids: Vec<u32>,
    pub prompt_tps: f64,
    pub decode_tps: f64,
    pub peak_mem_gb: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigResult {
    pub patterns: Vec<String>,
    pub modules_patched: usize,
    pub runs: Vec<RunResult>,
    pub median_prompt_tps: f64,
    pub median_decode_tps: f64,
    /// Max over this configuration's runs (reset before each run).
    pub peak_mem_gb: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Arbiter {
    pub f32_argmax: u32,
    pub baseline_logit: f32,
    pub patched_logit: f32,
    /// "baseline", "patched" or "tie": whose token the float32 reference prefers.
    pub closer: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Divergence {
    /// 0-based run index and token index.
    pub run: usize,
    pub index: usize,
    pub baseline_token: Option<u32>,
    pub patched_token: Option<u32>,
    pub baseline_text: String,
    pub patched_text: String,
    /// A few tokens of context from each side, as a readable diff.
    pub context_diff: String,
    pub logit_max_abs_diff: Option<Vec<f32>>,
    pub arbiter: Option<Arbiter>,
}

/// The fidelity verdict: `PASS` (every compared token identical), `FAIL`, or `SKIP` when
/// nothing could be compared (nothing patched, or no token generated on either side).
#[derive(Debug, Clone, Serialize)]
pub struct Fidelity {
    pub matched: usize,
    pub total: usize,
    pub verdict: String,
    pub runs_compared: usize,
    /// Why the verdict is SKIP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_reason: Option<String>,
    pub first_divergence: Option<Divergence>,
}

impl Fidelity {
    pub fn passed(&self) -> bool {
        self.verdict == "PASS"
    }

    pub fn skipped(&self) -> bool {
        self.verdict == "SKIP"
    }

    /// Judges compared runs: PASS iff tokens were compared and all matched; SKIP if none were.
    pub fn judge(matched: usize, total: usize, runs: usize, diverged: bool) -> Fidelity {
        let (verdict, skip_reason) = if diverged {
            ("FAIL", None)
        } else if total == 0 {
            (
                "SKIP",
                Some("no tokens compared: both sides ended at EOS before the first token (use --ignore-eos)".into()),
            )
        } else {
            ("PASS", None)
        };
        Fidelity { matched, total, verdict: verdict.into(), runs_compared: runs, skip_reason, first_divergence: None }
    }

    /// Nothing was patched, so nothing was run or compared.
    pub fn skip(reason: String) -> Fidelity {
        Fidelity {
            matched: 0,
            total: 0,
            verdict: "SKIP".into(),
            runs_compared: 0,
            skip_reason: Some(reason),
            first_divergence: None,
        }
    }

    /// One line that always states how many tokens were compared.
    pub fn detail(&self) -> String {
        match &self.skip_reason {
            Some(why) => format!("SKIPPED: {why} (0 tokens compared)"),
            None => format!(
                "{}/{} tokens identical over {} run pair{}",
                self.matched,
                self.total,
                self.runs_compared,
                if self.runs_compared == 1 { "" } else { "s" }
            ),
        }
    }

    /// Exit status of validate/run: 0 PASS, 1 FAIL, 3 SKIP (2 is any error).
    pub fn exit_code(&self) -> i32 {
        match self.verdict.as_str() {
            "PASS" => 0,
            "SKIP" => 3,
            _ => 1,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ValidationReport {
    pub model: PathBuf,
    pub family: String,
    pub backend: Backend,
    pub dtype: String,
    pub prompt_source: String,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    pub runs: usize,
    /// Whether runs went through EOS (exactly max_tokens each).
    pub ignore_eos: bool,
    /// Untimed warm-up generations per configuration.
    pub warmup: usize,
    /// Copies of the prompt decoded together per run (speeds are the batch's totals).
    pub batch_size: usize,
    /// Threads of zmlx's CPU kernels (MLX's own CPU ops are single-threaded).
    pub threads: u32,
    /// Seconds `Model::load` took.
    pub load_seconds: f64,
    pub selection: Selection,
    pub patch_report: PatchReport,
    pub baseline: ConfigResult,
    pub patched: ConfigResult,
    pub fidelity: Fidelity,
    pub decode_speedup: f64,
    pub prefill_change: f64,
    /// Fused and stock (fallback) calls per pattern during the patched runs.
    pub pattern_calls: std::collections::BTreeMap<String, crate::fallbacks::Counts>,
    /// Logit differences patched vs unpatched over the baseline's first run (teacher-forced):
    /// with `--logits`, and always when a `validated` pattern is selected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logit_stats: Option<LogitStats>,
    /// With `--expert-cache*`: the expert cache's counters over the patched configuration's
    /// timed runs.
    pub expert_cache: Option<crate::offload::StatsSnapshot>,
}

/// How far the patched model's logits are from the unpatched model's, position by position,
/// on the same token sequence (the prompt's last position and every generated one).
#[derive(Debug, Clone, Serialize)]
pub struct LogitStats {
    pub positions: usize,
    /// max over positions and vocabulary of |logit_patched - logit_baseline|.
    pub max_abs: f64,
    /// KL(baseline || patched) of the next-token distributions: mean and max over positions.
    pub kl_mean: f64,
    pub kl_max: f64,
    /// The baseline's smallest top-1 / top-2 logit gap over these positions (how close the
    /// checkpoint came to a tie; a max_abs near it would risk a different token).
    pub min_margin: f64,
    /// The median top-1 / top-2 gap.
    pub median_margin: f64,
}

/// The top-1 minus top-2 logit of every row of `logits` `[.., V]` (float32), unsorted.
pub fn top2_gaps(logits: &Array) -> Result<Vec<f64>> {
    let v = logits.dim(-1).max(1) as usize;
    Ok(logits
        .as_slice::<f32>()
        .chunks(v)
        .map(|row| {
            let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
            for &x in row {
                if x > a {
                    b = a;
                    a = x;
                } else if x > b {
                    b = x;
                }
            }
            (a - b) as f64
        })
        .collect())
}

/// Teacher-forced logit comparison of the two configurations on `seq` (positions from `start`).
fn logit_stats(baseline: &Array, patched: &Array, start: i32) -> Result<LogitStats> {
    let lb = baseline.try_index(start..)?;
    let lp = patched.try_index(start..)?;
    let max_abs = ops::abs(lb.subtract(&lp)?)?.max(None)?.item_cast::<f32>() as f64;
    let lsb = lb.subtract(ops::logsumexp_axis(&lb, -1, true)?)?;
    let lsp = lp.subtract(ops::logsumexp_axis(&lp, -1, true)?)?;
    let kl = ops::exp(&lsb)?.multiply(lsb.subtract(&lsp)?)?.sum_axis(-1, None)?;
    let kl = kl.as_slice::<f32>().to_vec();
    let positions = kl.len();
    let mut margins = top2_gaps(&lb)?;
    margins.sort_by(|a, b| a.total_cmp(b));
    Ok(LogitStats {
        positions,
        max_abs,
        kl_mean: kl.iter().map(|&k| k as f64).sum::<f64>() / positions.max(1) as f64,
        kl_max: kl.iter().fold(0.0f64, |m, &k| m.max(k as f64)),
        min_margin: margins.first().copied().unwrap_or(0.0),
        median_margin: median(&margins),
    })
}

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// One timed generation; with `batch > 1`, `batch` copies of the prompt decoded together: the
/// speeds are the batch's totals and every copy must equal the first (batch invariance).
fn one_run(model: &Model, prompt: &[u32], opts: &GenerateOptions, batch: usize) -> Result<RunResult> {
    mlx_env::reset_peak_memory();
    if batch > 1 {
        let req = SequenceRequest::from_options(prompt.to_vec(), opts);
        let mut bopts = BatchOptions::new(batch);
        bopts.prefill_step = opts.prefill_step;
        let (outs, stats) = generate_batch(model, &vec![req; batch], bopts, |_, _| Ok(()))?;
        let first = &outs[0].token_ids;
        if let Some((i, o)) = outs.iter().enumerate().find(|(_, o)| &o.token_ids != first) {
            bail!(
                "batch invariance broken: copy {i} of the prompt differs from copy 0 at token {:?} in a batch of {batch}",
                (0..first.len().max(o.token_ids.len())).find(|&j| first.get(j) != o.token_ids.get(j))
            );
        }
        return Ok(RunResult {
            token_ids: first.clone(),
            prompt_tps: stats.prompt_tps,
            decode_tps: stats.generation_tps,
            peak_mem_gb: stats.peak_memory_gb,
        });
    }
    let (ids, stats): (Vec<u32>, GenerationStats) = generate(model, prompt, opts, |_| Ok(()))?;
    Ok(RunResult {
        token_ids: ids,
        prompt_tps: stats.prompt_tps,
        decode_tps: stats.generation_tps,
        peak_mem_gb: stats.peak_memory_gb,
    })
}

fn config_result(patterns: Vec<String>, modules_patched: usize, runs: Vec<RunResult>) -> ConfigResult {
    let prompt: Vec<f64> = runs.iter().map(|r| r.prompt_tps).collect();
    let decode: Vec<f64> = runs.iter().map(|r| r.decode_tps).collect();
    ConfigResult {
        patterns,
        modules_patched,
        median_prompt_tps: median(&prompt),
        median_decode_tps: median(&decode),
        peak_mem_gb: runs.iter().map(|r| r.peak_mem_gb).fold(0.0, f64::max),
        runs,
    }
}

/// Compares token ids of every run pair. PASS iff every run is identical (same length, same ids).
pub fn compare_runs(baseline: &[Vec<u32>], patched: &[Vec<u32>]) -> (usize, usize, Option<(usize, usize)>) {
    let (mut matched, mut total, mut first) = (0, 0, None);
    for (r, (b, p)) in baseline.iter().zip(patched).enumerate() {
        total += b.len().max(p.len());
        matched += b.iter().zip(p).filter(|(x, y)| x == y).count();
        if first.is_none() {
            if let Some(i) = (0..b.len().max(p.len())).find(|&i| b.get(i) != p.get(i)) {
                first = Some((r, i));
            }
        }
    }
    (matched, total, first)
}

/// Token-level diff of a window around `index`, one token per line with its id and text.
fn context_diff(tok: &TextTokenizer, b: &[u32], p: &[u32], index: usize) -> String {
    let lo = index.saturating_sub(4);
    let window = |s: &[u32]| s[lo.min(s.len())..(index + 4).min(s.len())].to_vec();
    let (bw, pw) = (window(b), window(p));
    let text = |t: u32| format!("{t:>6} {:?}", tok.decode(&[t]).unwrap_or_default());
    let mut out = String::new();
    for op in similar::capture_diff_slices(similar::Algorithm::Myers, &bw, &pw) {
        for change in op.iter_changes(&bw, &pw) {
            let sign = match change.tag() {
                similar::ChangeTag::Equal => ' ',
                similar::ChangeTag::Delete => '-',
                similar::ChangeTag::Insert => '+',
            };
            out.push_str(&format!("  {sign} {}\n", text(change.value())));
        }
    }
    out
}

/// Logits `[L, V]` (float32) of a full-sequence forward pass with a fresh cache.
pub fn teacher_forced_logits(model: &Model, seq: &[u32]) -> Result<Array> {
    let mut cache = model.new_cache();
    let tokens = Array::from_slice(seq, &[1, seq.len() as i32]);
    let logits = model.forward(&tokens, &mut cache)?.try_index(0)?;
    Ok(logits.as_dtype(mlx_rs::Dtype::Float32)?)
}

pub fn validate(model_dir: &Path, opts: &ValidateOptions) -> Result<ValidationReport> {
    opts.check()?;
    let backend = mlx_env::init()?;
    let (mut model, load) = Model::load_with(model_dir, opts.dtype, backend, opts.offload)?;
    let tok = TextTokenizer::load(model_dir, &model.config)?;
    let prompt = tok.encode(&opts.prompt)?;
    if prompt.is_empty() {
        bail!("the prompt ({}) encodes to no tokens: give a non-empty prompt", opts.prompt_source);
    }
    let mut gen = GenerateOptions::greedy(opts.max_tokens, tok.eos_token_ids.clone());
    gen.ignore_eos = opts.ignore_eos;
    let warm = GenerateOptions::greedy(5, tok.eos_token_ids.clone());
    let hello = tok.encode(crate::generate::WARMUP_TEXT)?;
    let cooldown = || {
        if opts.cooldown_s > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(opts.cooldown_s));
        }
    };

    // Patch once to learn what the selection does; the runs below toggle it.
    let report = patterns::patch(&mut model, &opts.selection)?;
    patterns::unpatch(&mut model);
    let (family, dtype) = (model.family().model_type().to_owned(), dtype_name(model.dtype).to_owned());
    let empty = |patterns: Vec<String>| config_result(patterns, 0, vec![]);
    let skipped = |fidelity: Fidelity, report: PatchReport| ValidationReport {
        model: model_dir.to_path_buf(),
        family: family.clone(),
        backend,
        dtype: dtype.clone(),
        prompt_source: opts.prompt_source.clone(),
        prompt_tokens: prompt.len(),
        max_tokens: opts.max_tokens,
        runs: 0,
        ignore_eos: opts.ignore_eos,
        warmup: opts.warmup,
        batch_size: opts.batch_size,
        threads: crate::hardware::kernel_threads(),
        load_seconds: load.seconds,
        selection: opts.selection.clone(),
        patch_report: report,
        baseline: empty(vec![]),
        patched: empty(opts.selection.names.clone()),
        fidelity,
        decode_speedup: 0.0,
        prefill_change: -1.0,
        pattern_calls: Default::default(),
        logit_stats: None,
        expert_cache: None,
    };
    // Patched == unpatched when nothing was swapped: there is nothing to validate or time.
    if report.modules_patched() == 0 {
        let why = if opts.selection.names.is_empty() {
            "no patterns selected".to_string()
        } else {
            let reasons: Vec<String> = report
                .patterns
                .iter()
                .flat_map(|(n, o)| o.skipped.first().map(|(_, why)| format!("{n}: {why}")))
                .collect();
            if reasons.is_empty() {
                format!("{} patched no module", opts.selection.names.join(", "))
            } else {
                format!("nothing patched ({})", reasons.join("; "))
            }
        };
        return Ok(skipped(Fidelity::skip(why), report));
    }

    let set = |model: &mut Model, patched: bool| -> Result<()> {
        if patched {
            patterns::patch(model, &opts.selection)?;
        } else {
            patterns::unpatch(model);
        }
        Ok(())
    };
    for patched in [false, true] {
        set(&mut model, patched)?;
        for _ in 0..opts.warmup {
            generate(&model, &hello, &warm, |_| Ok(()))?;
        }
    }
    if let Some(c) = &model.offload {
        c.pin_after_warmup()?;
    }
    let (mut base_runs, mut patched_runs) = (vec![], vec![]);
    let mut expert_cache: Option<crate::offload::StatsSnapshot> = None;
    // Hidden automatically when stderr is not a terminal.
    let bar = indicatif::ProgressBar::new(2 * opts.runs as u64).with_style(
        indicatif::ProgressStyle::with_template("runs {bar:30} {pos}/{len} {msg} {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    crate::fallbacks::reset();
    for r in 0..opts.runs {
        // ABBA: alternate which configuration goes first, so drift hits both alike.
        let order = if r % 2 == 0 { [false, true] } else { [true, false] };
        for patched in order {
            set(&mut model, patched)?;
            bar.set_message(if patched { "patched" } else { "baseline" });
            let cache_before = model.offload.as_ref().map(|c| c.stats());
            let run = one_run(&model, &prompt, &gen, opts.batch_size)?;
            bar.inc(1);
            if patched {
                if let (Some(c), Some(before)) = (&model.offload, cache_before) {
                    let delta = c.stats().since(&before);
                    expert_cache = Some(match expert_cache.take() {
                        Some(acc) => delta.plus(&acc),
                        None => delta,
                    });
                }
                patched_runs.push(run)
            } else {
                base_runs.push(run)
            }
            cooldown();
        }
    }
    bar.finish_and_clear();
    patterns::unpatch(&mut model);

    let b_ids: Vec<Vec<u32>> = base_runs.iter().map(|r| r.token_ids.clone()).collect();
    let p_ids: Vec<Vec<u32>> = patched_runs.iter().map(|r| r.token_ids.clone()).collect();
    let (matched, total, first) = compare_runs(&b_ids, &p_ids);
    let pattern_calls = crate::fallbacks::snapshot();
    let mut fidelity = Fidelity::judge(matched, total, b_ids.len(), first.is_some());
    fidelity.first_divergence = match first {
        None => None,
        Some((run, index)) => {
            let (b, p) = (&b_ids[run], &p_ids[run]);
            let text =
                |t: Option<&u32>| t.map(|t| tok.decode(&[*t]).unwrap_or_default()).unwrap_or_else(|| "<end>".into());
            let mut d = Divergence {
                run,
                index,
                baseline_token: b.get(index).copied(),
                patched_token: p.get(index).copied(),
                baseline_text: text(b.get(index)),
                patched_text: text(p.get(index)),
                context_diff: context_diff(&tok, b, p, index),
                logit_max_abs_diff: None,
                arbiter: None,
            };
            // The shared prefix plus the divergent position, fed identically to both sides.
            let mut seq = prompt.clone();
            seq.extend_from_slice(&b[..index.min(b.len())]);
            if opts.logits {
                let start = prompt.len() as i32 - 1;
                let lb = teacher_forced_logits(&model, &seq)?;
                set(&mut model, true)?;
                let lp = teacher_forced_logits(&model, &seq)?;
                patterns::unpatch(&mut model);
                let diff = ops::abs(lb.subtract(&lp)?)?.max_axis(-1, None)?.try_index(start..)?;
                d.logit_max_abs_diff = Some(diff.as_slice::<f32>().to_vec());
            }
            if opts.arbiter_f32 {
                d.arbiter = Some(arbiter(model_dir, backend, &seq, d.baseline_token, d.patched_token)?);
            }
            Some(d)
        }
    };
    let validated = patterns::registry().iter().any(|p| {
        p.info().class == patterns::SafetyClass::Validated && opts.selection.names.iter().any(|n| n == p.info().name)
    });
    let logit_stats = match b_ids.first() {
        Some(first) if (opts.logits || validated) && report.modules_patched() > 0 => {
            let mut seq = prompt.clone();
            seq.extend_from_slice(&first[..first.len().saturating_sub(1)]);
            let lb = teacher_forced_logits(&model, &seq)?;
            set(&mut model, true)?;
            let lp = teacher_forced_logits(&model, &seq)?;
            patterns::unpatch(&mut model);
            Some(logit_stats(&lb, &lp, prompt.len() as i32 - 1)?)
        }
        _ => None,
    };
    let baseline = config_result(vec![], 0, base_runs);
    let patched = config_result(opts.selection.names.clone(), report.modules_patched(), patched_runs);
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let (decode_speedup, prefill_change) = if fidelity.skipped() {
        (0.0, -1.0)
    } else {
        (
            ratio(patched.median_decode_tps, baseline.median_decode_tps),
            ratio(patched.median_prompt_tps, baseline.median_prompt_tps) - 1.0,
        )
    };
    Ok(ValidationReport {
        model: model_dir.to_path_buf(),
        family: model.family().model_type().to_owned(),
        backend,
        dtype: dtype_name(model.dtype).to_owned(),
        prompt_source: opts.prompt_source.clone(),
        prompt_tokens: prompt.len(),
        max_tokens: opts.max_tokens,
        runs: opts.runs,
        ignore_eos: opts.ignore_eos,
        warmup: opts.warmup,
        batch_size: opts.batch_size,
        threads: crate::hardware::kernel_threads(),
        load_seconds: load.seconds,
        selection: opts.selection.clone(),
        patch_report: report,
        decode_speedup,
        prefill_change,
        baseline,
        patched,
        fidelity,
        pattern_calls,
        logit_stats,
        expert_cache,
    })
}

/// Which side's token an unpatched float32 model prefers at the divergence.
fn arbiter(dir: &Path, backend: Backend, seq: &[u32], b: Option<u32>, p: Option<u32>) -> Result<Arbiter> {
    let (reference, _) = Model::load(dir, DtypeChoice::F32, backend)?;
    let logits = teacher_forced_logits(&reference, seq)?.try_index(-1)?;
    let f32_argmax = ops::indexing::argmax_axis(&logits, -1, None)?.item_cast::<u32>();
    let values = logits.as_slice::<f32>();
    let at = |t: Option<u32>| t.map(|t| values[t as usize]).unwrap_or(f32::NEG_INFINITY);
    let (bl, pl) = (at(b), at(p));
    let closer = if bl > pl {
        "baseline"
    } else if pl > bl {
        "patched"
    } else {
        "tie"
    };
    Ok(Arbiter { f32_argmax, baseline_logit: bl, patched_logit: pl, closer: closer.into() })
}

/// The human-readable report (the original's layout, plus the divergence detail).
pub fn render(r: &ValidationReport) -> String {
    let bar = "=".repeat(60);
    let pats = if r.selection.names.is_empty() { "none".to_string() } else { r.selection.names.join(", ") };
    let mut s = format!("{bar}\nVALIDATION REPORT\n{bar}\nModel: {}\nPatterns: {pats}\n", r.model.display());
    s += &format!("Backend: {}, compute dtype {}\n", r.backend.name(), r.dtype);
    s += &format!(
        "Tokens: {} greedy (temp=0), {} runs, prompt {} tokens ({}){}\n\n",
        r.max_tokens,
        r.runs,
        r.prompt_tokens,
        r.prompt_source,
        if r.batch_size > 1 { format!(", batches of {} copies (total tok/s)", r.batch_size) } else { String::new() }
    );
    let f = &r.fidelity;
    s += &format!("FIDELITY: {}  [{}]\n", f.detail(), f.verdict);
    if let Some(c) = &r.expert_cache {
        s += &format!("EXPERT CACHE (patched runs): {}\n", c.summary());
    }
    if let Some(l) = &r.logit_stats {
        s += &format!(
            "LOGITS (teacher-forced, {} positions): max |diff| {:.3e}, KL mean {:.3e} max {:.3e}; baseline top-1/top-2 gap min {:.3} median {:.3}\n",
            l.positions, l.max_abs, l.kl_mean, l.kl_max, l.min_margin, l.median_margin
        );
    }
    if let Some(d) = &f.first_divergence {
        let token = |t: Option<u32>, text: &str| match t {
            Some(t) => format!("{t} {text:?}"),
            None => "<end of output>".to_string(),
        };
        s += &format!(
            "  First divergence at token {} (run {}): baseline {} vs patched {}\n{}",
            d.index,
            d.run + 1,
            token(d.baseline_token, &d.baseline_text),
            token(d.patched_token, &d.patched_text),
            d.context_diff
        );
        if let Some(l) = &d.logit_max_abs_diff {
            let shown: Vec<String> = l.iter().map(|x| format!("{x:.3e}")).collect();
            s += &format!("  max |logit diff| per step up to the divergence: [{}]\n", shown.join(", "));
        }
        if let Some(a) = &d.arbiter {
            s += &format!(
                "  float32 arbiter: argmax {}, logit of baseline token {:.4}, of patched token {:.4} -> {} side is closer\n",
                a.f32_argmax, a.baseline_logit, a.patched_logit, a.closer
            );
        }
    }
    if f.skipped() && r.runs == 0 {
        s += &format!("\nPERFORMANCE: not measured ({})\n", f.skip_reason.as_deref().unwrap_or("skipped"));
        s += &format!("{}\n", r.patch_report.summary());
        return s;
    }
    s += &format!("\nPERFORMANCE (median of {} runs):\n", r.runs);
    s += &format!("  {:<10} | {:>12} | {:>12} | {:>9}\n", "Config", "Prompt tok/s", "Decode tok/s", "Peak Mem");
    for (name, c) in [("Baseline", &r.baseline), ("Patched", &r.patched)] {
        s += &format!(
            "  {name:<10} | {:>12.1} | {:>12.1} | {:>6.3} GB\n",
            c.median_prompt_tps, c.median_decode_tps, c.peak_mem_gb
        );
    }
    s += &format!("  {:<10} | decode {:.3}x, prefill {:+.1}%\n", "Speedup", r.decode_speedup, r.prefill_change * 100.0);
    s += &format!("{}\n", r.patch_report.summary());
    for line in crate::fallbacks::summary_of(&r.pattern_calls) {
        s += &format!("Pattern calls: {line}\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fidelity_uses_every_run_and_lengths() {
        let same = vec![vec![1, 2, 3], vec![4, 5]];
        assert_eq!(compare_runs(&same, &same), (5, 5, None));
        let later = vec![vec![1, 2, 3], vec![4, 6]];
        assert_eq!(compare_runs(&same, &later), (4, 5, Some((1, 1))), "a divergence in run 2 counts");
        let shorter = vec![vec![1, 2], vec![4, 5]];
        assert_eq!(compare_runs(&same, &shorter), (4, 5, Some((0, 2))), "an early stop is a divergence");
    }

    #[test]
    fn verdicts_say_how_many_tokens_were_compared() {
        let pass = Fidelity::judge(10, 10, 2, false);
        assert_eq!((pass.verdict.as_str(), pass.exit_code()), ("PASS", 0));
        assert_eq!(pass.detail(), "10/10 tokens identical over 2 run pairs");
        let fail = Fidelity::judge(9, 10, 2, true);
        assert_eq!((fail.verdict.as_str(), fail.exit_code()), ("FAIL", 1));
        // Both sides stopped at EOS at once: nothing was compared, which is neither PASS nor FAIL.
        let none = Fidelity::judge(0, 0, 3, false);
        assert_eq!((none.verdict.as_str(), none.exit_code()), ("SKIP", 3));
        assert!(none.detail().contains("no tokens compared") && none.detail().contains("0 tokens compared"));
        let skip = Fidelity::skip("no patterns selected".into());
        assert_eq!(skip.detail(), "SKIPPED: no patterns selected (0 tokens compared)");
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
