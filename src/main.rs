//! The `zmlx` command line: parses arguments, calls the library, maps errors to exit codes.
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};
use zmlx::config::Family;
use zmlx::generate::{generate, GenerateOptions, SamplerConfig};
use zmlx::mlx_env;
use zmlx::model::{dtype_name, DtypeChoice, Model};
use zmlx::synth::{synthesize, Layout, Preset, StoreDtype, SynthOptions};
use zmlx::tokenizer::TextTokenizer;

#[derive(Parser)]
#[command(name = "zmlx", version, about = "Run, patch, validate and benchmark MoE LLMs on MLX")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a checkpoint directory.
    Generate(GenerateArgs),
    /// Write a deterministic random-weight checkpoint that mlx-lm loads unchanged.
    Synth(SynthArgs),
    /// The main job on the built-in default: synthesize the default checkpoint (once) and generate.
    Demo {
        /// Where the default checkpoint is kept.
        #[arg(long, default_value = "target/zmlx-default/qwen3_moe-tiny-4bit")]
        dir: PathBuf,
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
    },
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Checkpoint directory (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value = "Explain the key differences between TCP and UDP.")]
    prompt: String,
    #[arg(long, default_value_t = 100)]
    max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temp: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute dtype (auto = f32 on CPU, the checkpoint's dtype on a GPU).
    #[arg(long, value_enum, default_value = "auto")]
    dtype: DtypeChoice,
    /// Do not stop at EOS.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object (ids, text, statistics) instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct SynthArgs {
    /// Model family (config.json model_type).
    #[arg(long, value_parser = parse_family)]
    family: Family,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "tiny")]
    preset: Preset,
    /// Stored float dtype.
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: StoreDtype,
    /// MLX affine quantization bits (omit for a float checkpoint).
    #[arg(long)]
    quantize: Option<i32>,
    #[arg(long, default_value_t = 64)]
    group_size: i32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tensor naming: mlx-community (stacked experts) or Hugging Face (per-expert tensors).
    #[arg(long, value_enum, default_value = "mlx")]
    layout: Layout,
    /// Shard weights into files of at most this many MiB.
    #[arg(long, default_value_t = 2048)]
    max_shard_mb: u64,
}

fn parse_family(s: &str) -> Result<Family, String> {
    Family::from_model_type(s).ok_or_else(|| {
        let all: Vec<_> = Family::ALL.iter().map(|f| f.model_type()).collect();
        format!("unknown family `{s}`; expected one of: {}", all.join(", "))
    })
}

fn run_generate(a: &GenerateArgs) -> Result<()> {
    let backend = mlx_env::init()?;
    let (model, info) = Model::load(&a.model, a.dtype, backend)?;
    let tok = TextTokenizer::load(&a.model, &model.config.eos_token_ids)?;
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
    // Stream text: decode the whole sequence and print what is new (handles multi-byte tokens).
    let mut ids = Vec::new();
    let mut printed = 0usize;
    let mut out = std::io::stdout();
    let (tokens, stats) = generate(&model, &prompt, &opts, |t| {
        if !a.json {
            ids.push(t);
            let text = tok.decode(&ids)?;
            if text.len() > printed && text.is_char_boundary(printed) {
                write!(out, "{}", &text[printed..])?;
                out.flush()?;
                printed = text.len();
            }
        }
        Ok(())
    })?;
    let text = tok.decode(&tokens)?;
    if a.json {
        let v = serde_json::json!({
            "model": a.model, "family": model.family().model_type(), "backend": backend.name(),
            "dtype": dtype_name(model.dtype), "prompt_ids": prompt, "token_ids": tokens, "text": text,
            "stats": stats, "load_seconds": info.seconds,
        });
        println!("{v}");
    } else {
        println!();
        println!("==========");
        println!("Prompt: {} tokens, {:.3} tokens-per-sec", stats.prompt_tokens, stats.prompt_tps);
        println!("Generation: {} tokens, {:.3} tokens-per-sec ({})", stats.generation_tokens, stats.generation_tps, stats.finish_reason);
        println!("Peak memory: {:.3} GB", stats.peak_memory_gb);
    }
    Ok(())
}

fn run_synth(a: &SynthArgs) -> Result<()> {
    mlx_env::init()?;
    let o = SynthOptions {
        family: a.family,
        preset: a.preset,
        dtype: a.dtype,
        quantize: a.quantize,
        group_size: a.group_size,
        seed: a.seed,
        layout: a.layout,
        max_shard_bytes: a.max_shard_mb << 20,
    };
    let files = synthesize(&o, &a.out)?;
    eprintln!("[zmlx] wrote {} ({} safetensors file(s))", a.out.display(), files.len());
    Ok(())
}

fn run_demo(dir: &Path, max_tokens: usize) -> Result<()> {
    mlx_env::init()?;
    if !dir.join("config.json").exists() {
        eprintln!("[zmlx] synthesizing the default checkpoint (qwen3_moe tiny, 4-bit) into {}", dir.display());
        let mut o = SynthOptions::new(Family::Qwen3Moe);
        o.quantize = Some(4);
        synthesize(&o, dir)?;
    } else {
        eprintln!("[zmlx] using the default checkpoint in {}", dir.display());
    }
    run_generate(&GenerateArgs {
        model: dir.to_path_buf(),
        prompt: "Explain the key differences between TCP and UDP.".into(),
        max_tokens,
        temp: 0.0,
        top_p: 1.0,
        seed: 0,
        dtype: DtypeChoice::Auto,
        ignore_eos: true,
        json: false,
    })
}

fn main() {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Generate(a) => run_generate(a),
        Command::Synth(a) => run_synth(a),
        Command::Demo { dir, max_tokens } => run_demo(dir, *max_tokens),
    };
    if let Err(e) = result {
        eprintln!("error: {}", format_error(&e));
        std::process::exit(2);
    }
}

fn format_error(e: &anyhow::Error) -> String {
    let mut s = e.to_string();
    for cause in e.chain().skip(1) {
        s.push_str(&format!("\n  caused by: {cause}"));
    }
    s
}

