//! `zmlx generate`: load, patch (preset by default), stream or print JSON.
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};

use super::args::{at_least_one, parse_batch_size, parse_temp, parse_top_p, parse_warmup, OffloadArgs, PatternArgs};
use crate::batch::{generate_batch, BatchOptions, SequenceRequest};
use crate::chat_template::{ChatMessage, ChatTemplate};
use crate::generate::{generate, GenerateOptions, SamplerConfig};
use crate::mlx_env;
use crate::model::{dtype_name, DtypeChoice, Model};
use crate::patterns;
use crate::tokenizer::TextTokenizer;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Checkpoint directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value = super::DEFAULT_GENERATE_PROMPT, conflicts_with = "prompts_file")]
    pub prompt: String,
    /// Generate for every prompt of this file (one per line, each a sequence of its own),
    /// decoding them together in batches (`--batch-size`).
    #[arg(long)]
    pub prompts_file: Option<PathBuf>,
    /// Sequences decoding at once with `--prompts-file` (more wait and join as others finish);
    /// default: all of the file's prompts (at most 1024).
    #[arg(long, requires = "prompts_file", value_parser = parse_batch_size)]
    pub batch_size: Option<usize>,
    #[arg(long, default_value_t = 100, value_parser = at_least_one)]
    pub max_tokens: usize,
    /// Sampling temperature: a finite number >= 0; 0 = greedy.
    #[arg(long, default_value_t = 0.0, value_parser = parse_temp)]
    pub temp: f32,
    /// Nucleus sampling mass in (0, 1]; 1 = off (mlx-lm's convention; it also ignores 0, zmlx refuses it).
    #[arg(long, default_value_t = 1.0, value_parser = parse_top_p)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Compute dtype (auto = f32 on CPU, the checkpoint's dtype on a GPU).
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: DtypeChoice,
    /// Do not stop at EOS.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object (ids, text, statistics) instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Greedy warm-up generations (5 tokens on `generate::WARMUP_TEXT`) before the timed one, as `zmlx run` and
    /// mlx-lm's benchmarks do: the statistics then leave out first-call costs.
    #[arg(long, default_value_t = 0, value_parser = parse_warmup)]
    pub warmup: usize,
    /// Apply the checkpoint's chat template (chat_template.jinja or tokenizer_config.json's
    /// chat_template) to the prompt, as mlx_lm.generate does: the prompt (each line with
    /// --prompts-file) is the user message, then the assistant turn is opened.
    #[arg(long)]
    pub chat: bool,
    /// A system message before the user message (with --chat).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[command(flatten)]
    pub patterns: PatternArgs,
    #[command(flatten)]
    pub offload: OffloadArgs,
}

impl GenerateArgs {
    /// Greedy generation of `max_tokens` through EOS with the default selection (the demo).
    pub fn greedy(model: PathBuf, max_tokens: usize) -> GenerateArgs {
        GenerateArgs {
            model,
            prompt: super::DEFAULT_GENERATE_PROMPT.into(),
            prompts_file: None,
            batch_size: None,
            max_tokens,
            temp: 0.0,
            top_p: 1.0,
            seed: 0,
            dtype: DtypeChoice::Auto,
            ignore_eos: true,
            json: false,
            warmup: 0,
            chat: false,
            system: None,
            patterns: PatternArgs::default(),
            offload: OffloadArgs::default(),
        }
    }
}

/// The checkpoint's chat template for `--chat`; a checkpoint without one is an error.
fn load_chat_template(model: &Path) -> Result<ChatTemplate> {
    ChatTemplate::load(model)?.ok_or_else(|| {
        anyhow!(
            "--chat: {} has no chat template (no chat_template.jinja, no chat_template in tokenizer_config.json); \
             drop --chat to use the prompt as raw text, or add a chat template to the checkpoint",
            model.display()
        )
    })
}

/// A prompt's ids: raw text, or with `--chat` the rendered template (optional system message,
/// the prompt as the user message, generation prompt on), encoded as transformers does.
fn encode_prompt(a: &GenerateArgs, tok: &TextTokenizer, chat: Option<&ChatTemplate>, prompt: &str) -> Result<Vec<u32>> {
    let Some(template) = chat else {
        return tok.encode(prompt);
    };
    let mut messages = Vec::new();
    if let Some(system) = &a.system {
        messages.push(ChatMessage::new("system", system.as_str()));
    }
    messages.push(ChatMessage::new("user", prompt));
    tok.encode_chat(&template.render(&messages, true)?)
}

pub fn run(a: &GenerateArgs) -> Result<i32> {
    // The chat template before the (possibly long) model load, so a checkpoint without one fails fast.
    let chat = if a.chat { Some(load_chat_template(&a.model)?) } else { None };
    let offload = a.offload.config()?;
    if offload.is_some_and(|o| o.pin > 0) && a.warmup == 0 {
        anyhow::bail!("--expert-cache-pin pins the experts the warm-up selected most: add --warmup 1 (or more)");
    }
    let backend = mlx_env::init()?;
    let (mut model, info) = Model::load_with(&a.model, a.dtype, backend, offload)?;
    let selection = a.patterns.select(model.family())?;
    let report = patterns::patch(&mut model, &selection)?;
    if !a.json {
        let names = if selection.names.is_empty() { "none".into() } else { selection.names.join(", ") };
        eprintln!("[zmlx] patterns ({}): {names}", selection.source);
        if !selection.names.is_empty() {
            eprintln!("[zmlx] {}", report.summary().replace('\n', "\n[zmlx] "));
        }
    }
    crate::fallbacks::reset();
    let tok = TextTokenizer::load(&a.model, &model.config)?;
    // Read the prompts before the (possibly long) warm-up, so a bad file fails fast.
    let prompts = match &a.prompts_file {
        Some(path) => Some(read_prompts(path)?),
        None => None,
    };
    let prompt = encode_prompt(a, &tok, chat.as_ref(), &a.prompt)?;
    let mut opts = GenerateOptions::greedy(a.max_tokens, tok.eos_token_ids.clone());
    opts.sampler = SamplerConfig { temperature: a.temp, top_p: a.top_p, seed: a.seed };
    opts.ignore_eos = a.ignore_eos;
    if !a.json {
        eprintln!(
            "[zmlx] {} ({}{}), backend {}, compute dtype {} (stored {}), loaded in {:.2} s",
            a.model.display(),
            model.family(),
            if info.quantized { ", quantized" } else { "" },
            backend.name(),
            dtype_name(model.dtype),
            dtype_name(info.stored_dtype),
            info.seconds
        );
    }
    if a.warmup > 0 {
        let hello = tok.encode(crate::generate::WARMUP_TEXT)?;
        let warm = GenerateOptions::greedy(5, tok.eos_token_ids.clone());
        for _ in 0..a.warmup {
            generate(&model, &hello, &warm, |_| Ok(()))?;
        }
        if let Some(c) = &model.offload {
            c.pin_after_warmup()?;
        }
        crate::fallbacks::reset();
    }
    if let Some(prompts) = prompts {
        let ctx = BatchRun {
            args: a,
            model: &model,
            tok: &tok,
            chat: chat.as_ref(),
            selection: &selection.names,
            report: &report,
            load_seconds: info.seconds,
        };
        return ctx.run(&prompts, &opts);
    }
    let mut stream = tok.stream();
    let mut out = std::io::stdout();
    let cache_before = model.offload.as_ref().map(|c| c.stats());
    let (tokens, stats) = generate(&model, &prompt, &opts, |t| {
        if !a.json {
            if let Some(piece) = stream.step(t)? {
                write!(out, "{piece}")?;
                out.flush()?;
            }
        }
        Ok(())
    })?;
    if !a.json {
        write!(out, "{}", stream.finish()?)?;
    }
    // The timed generation's expert-cache counters (the warm-up's left out).
    let cache = model.offload.as_ref().zip(cache_before).map(|(c, before)| c.stats().since(&before));
    if a.json {
        let v = serde_json::json!({
            "model": a.model, "family": model.family().model_type(), "backend": backend.name(),
            "dtype": dtype_name(model.dtype), "prompt_ids": prompt, "token_ids": tokens,
            "text": tok.decode(&tokens)?, "stats": stats, "load_seconds": info.seconds,
            "peak_rss_bytes": crate::hardware::peak_rss_bytes(),
            "patterns": selection.names, "patch_report": report, "pattern_calls": crate::fallbacks::snapshot(),
            "expert_cache": cache,
        });
        println!("{v}");
    } else {
        println!();
        println!("==========");
        println!("Prompt: {} tokens, {:.3} tokens-per-sec", stats.prompt_tokens, stats.prompt_tps);
        println!(
            "Generation: {} tokens, {:.3} tokens-per-sec ({})",
            stats.generation_tokens, stats.generation_tps, stats.finish_reason
        );
        println!("Peak memory: {:.3} GB", stats.peak_memory_gb);
        println!("Peak RSS: {:.3} GB (load {:.2} s)", crate::hardware::peak_rss_bytes() as f64 / 1e9, info.seconds);
        if let Some(c) = &cache {
            println!("Expert cache: {}", c.summary());
        }
        for line in crate::fallbacks::summary() {
            println!("Pattern calls: {line}");
        }
    }
    Ok(0)
}

/// The prompts of a `--prompts-file`: one per line (a final newline is not a prompt); an empty
/// line is an error, as an empty `--prompt` is.
fn read_prompts(path: &std::path::Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read --prompts-file {}: {e}", path.display()))?;
    let lines: Vec<String> = text.lines().map(|l| l.trim_end_matches('\r').to_owned()).collect();
    if lines.is_empty() {
        anyhow::bail!("--prompts-file {} has no prompts: write one prompt per line", path.display());
    }
    if let Some(i) = lines.iter().position(|l| l.trim().is_empty()) {
        anyhow::bail!(
            "--prompts-file {} line {} is empty: every line is a prompt (remove blank lines)",
            path.display(),
            i + 1
        );
    }
    Ok(lines)
}

struct BatchRun<'a> {
    args: &'a GenerateArgs,
    model: &'a Model,
    tok: &'a TextTokenizer,
    chat: Option<&'a ChatTemplate>,
    selection: &'a [String],
    report: &'a patterns::PatchReport,
    load_seconds: f64,
}

impl BatchRun<'_> {
    /// Every prompt of the file through the batch engine: JSON lines (one per sequence, then one
    /// with the batch's statistics) or each sequence's text in order.
    fn run(&self, prompts: &[String], opts: &GenerateOptions) -> Result<i32> {
        let a = self.args;
        let requests = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let ids = encode_prompt(a, self.tok, self.chat, p)
                    .map_err(|e| e.context(format!("--prompts-file line {}", i + 1)))?;
                Ok(SequenceRequest::from_options(ids, opts))
            })
            .collect::<Result<Vec<_>>>()?;
        let batch = a.batch_size.unwrap_or(prompts.len().min(crate::batch::MAX_BATCH));
        let (outputs, stats) = generate_batch(self.model, &requests, BatchOptions::new(batch), |_, _| Ok(()))?;
        for (i, (o, r)) in outputs.iter().zip(&requests).enumerate() {
            let text = self.tok.decode(&o.token_ids)?;
            if a.json {
                let v = serde_json::json!({
                    "index": i, "prompt": prompts[i], "prompt_ids": r.prompt, "token_ids": o.token_ids,
                    "text": text, "stats": o.stats,
                });
                println!("{v}");
            } else {
                println!(
                    "========== sequence {i} ({} tokens, {})",
                    o.stats.generation_tokens,
                    o.stats.finish_reason.as_str()
                );
                println!("{text}");
            }
        }
        if a.json {
            let v = serde_json::json!({
                "model": a.model, "family": self.model.family().model_type(),
                "backend": crate::mlx_env::backend().name(), "dtype": dtype_name(self.model.dtype),
                "batch_stats": stats, "load_seconds": self.load_seconds,
                "peak_rss_bytes": crate::hardware::peak_rss_bytes(), "patterns": self.selection,
                "patch_report": self.report, "pattern_calls": crate::fallbacks::snapshot(),
            });
            println!("{v}");
        } else {
            println!("==========");
            println!(
                "Batch: {} sequences, batch size {}, prompt {} tokens at {:.3} tokens-per-sec",
                stats.sequences, stats.batch_size, stats.prompt_tokens, stats.prompt_tps
            );
            println!(
                "Generation: {} tokens, {:.3} tokens-per-sec (all sequences)",
                stats.generated_tokens, stats.generation_tps
            );
            println!("Peak memory: {:.3} GB", stats.peak_memory_gb);
            println!("Peak RSS: {:.3} GB", crate::hardware::peak_rss_bytes() as f64 / 1e9);
            for line in crate::fallbacks::summary() {
                println!("Pattern calls: {line}");
            }
        }
        Ok(0)
    }
}
