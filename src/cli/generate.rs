//! `zmlx generate`: load, patch (preset by default), stream or print JSON.
use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;

use super::args::{at_least_one, parse_temp, parse_top_p, parse_warmup, PatternArgs};
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
    #[arg(long, default_value = super::DEFAULT_GENERATE_PROMPT)]
    pub prompt: String,
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
    /// Greedy warm-up generations (5 tokens on "Hello") before the timed one, as `zmlx run` and
    /// mlx-lm's benchmarks do: the statistics then leave out first-call costs.
    #[arg(long, default_value_t = 0, value_parser = parse_warmup)]
    pub warmup: usize,
    #[command(flatten)]
    pub patterns: PatternArgs,
}

impl GenerateArgs {
    /// Greedy generation of `max_tokens` through EOS with the default selection (the demo).
    pub fn greedy(model: PathBuf, max_tokens: usize) -> GenerateArgs {
        GenerateArgs {
            model,
            prompt: super::DEFAULT_GENERATE_PROMPT.into(),
            max_tokens,
            temp: 0.0,
            top_p: 1.0,
            seed: 0,
            dtype: DtypeChoice::Auto,
            ignore_eos: true,
            json: false,
            warmup: 0,
            patterns: PatternArgs::default(),
        }
    }
}

pub fn run(a: &GenerateArgs) -> Result<i32> {
    let backend = mlx_env::init()?;
    let (mut model, info) = Model::load(&a.model, a.dtype, backend)?;
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
    let prompt = tok.encode(&a.prompt)?;
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
        let hello = tok.encode("Hello")?;
        let warm = GenerateOptions::greedy(5, tok.eos_token_ids.clone());
        for _ in 0..a.warmup {
            generate(&model, &hello, &warm, |_| Ok(()))?;
        }
        crate::fallbacks::reset();
    }
    let mut stream = tok.stream();
    let mut out = std::io::stdout();
    let (tokens, stats) = generate(&model, &prompt, &opts, |t| {
        if !a.json {
            if let Some(piece) = stream.step(t)? {
                write!(out, "{piece}")?;
                out.flush()?;
            }
        }
        Ok(())
    })?;
    if a.json {
        let v = serde_json::json!({
            "model": a.model, "family": model.family().model_type(), "backend": backend.name(),
            "dtype": dtype_name(model.dtype), "prompt_ids": prompt, "token_ids": tokens,
            "text": tok.decode(&tokens)?, "stats": stats, "load_seconds": info.seconds,
            "peak_rss_bytes": crate::hardware::peak_rss_bytes(),
            "patterns": selection.names, "patch_report": report, "pattern_calls": crate::fallbacks::snapshot(),
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
        for line in crate::fallbacks::summary() {
            println!("Pattern calls: {line}");
        }
    }
    Ok(0)
}
