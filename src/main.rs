//! The `zmlx` command line: parses arguments, calls the library, maps errors to exit codes.
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};
use zmlx::config::Family;
use zmlx::generate::{generate, GenerateOptions, SamplerConfig};
use zmlx::mlx_env;
use zmlx::model::{dtype_name, DtypeChoice, Model};
use zmlx::patterns::{self, SelectionRequest};
use zmlx::run::RunOptions;
use zmlx::synth::{synthesize, Layout, Preset, StoreDtype, SynthOptions};
use zmlx::tokenizer::TextTokenizer;
use zmlx::validate::{render, validate, ValidateOptions, DEFAULT_PROMPT};

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
    /// Prove the patched model emits the same greedy tokens as the unpatched one (exit 0 PASS, 1 FAIL, 2 error).
    Validate(ValidateArgs),
    /// Validate and record: one ledger line per run (+ a repro capsule with --capsule).
    Run(RunArgs),
    /// Review the ledger.
    History(HistoryArgs),
    /// Print a repro capsule.
    Report { capsule: PathBuf },
    /// Compare the latest entries of two ledgers per (model, hardware, patterns).
    Diff { a: PathBuf, b: PathBuf },
    /// Export the latest ledger entries as CSV.
    Csv {
        #[arg(long)]
        ledger: Option<PathBuf>,
    },
    /// Check every fused kernel against its reference on this backend (prints JSON lines).
    Selftest,
    /// Per-token decode profile, stock vs patched: MLX operations per step and ms per slot.
    Profile(ProfileArgs),
    /// List the pattern registry.
    Patterns {
        #[arg(long)]
        json: bool,
    },
    /// The main job on the built-in default: synthesize the default checkpoint (once), generate
    /// with the family preset, then validate the preset against the stock model and record it.
    Demo {
        /// Where the default checkpoint is kept (qwen3_moe, bench shapes, 4-bit).
        #[arg(long, default_value = "target/zmlx-default/qwen3_moe-bench-4bit")]
        dir: PathBuf,
        #[arg(long, default_value_t = 64, value_parser = at_least_one)]
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
    #[arg(long, default_value_t = 100, value_parser = at_least_one)]
    max_tokens: usize,
    /// Sampling temperature: a finite number >= 0; 0 = greedy.
    #[arg(long, default_value_t = 0.0, value_parser = parse_temp)]
    temp: f32,
    /// Nucleus sampling mass in (0, 1]; 1 = off (mlx-lm's convention; it also ignores 0, zmlx refuses it).
    #[arg(long, default_value_t = 1.0, value_parser = parse_top_p)]
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
    /// Patterns to apply (`none` for none); default: ZMLX_PATTERNS, else the family preset.
    #[arg(long, num_args = 1..)]
    patterns: Option<Vec<String>>,
    #[arg(long, num_args = 1..)]
    exclude: Vec<String>,
    /// Allow patterns of class `unsafe`.
    #[arg(long)]
    allow_unsafe: bool,
}

#[derive(clap::Args)]
struct ProfileArgs {
    /// Checkpoint directory.
    model: PathBuf,
    /// Patterns for the patched side (default: ZMLX_PATTERNS, else the family preset).
    #[arg(long, num_args = 1..)]
    patterns: Option<Vec<String>>,
    /// Decode steps to time.
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    tokens: usize,
    #[arg(long, default_value = "Explain the key differences between TCP and UDP.")]
    prompt: String,
    #[arg(long, value_enum, default_value = "auto")]
    dtype: DtypeChoice,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Clone)]
struct ValidateArgs {
    /// Checkpoint directory.
    model: PathBuf,
    /// Patterns to apply (`none` for no patches); default: ZMLX_PATTERNS, else the family preset.
    #[arg(long, num_args = 1..)]
    patterns: Option<Vec<String>>,
    #[arg(long, num_args = 1..)]
    exclude: Vec<String>,
    #[arg(long, default_value_t = 200, value_parser = at_least_one)]
    max_tokens: usize,
    #[arg(long, default_value_t = 3, value_parser = at_least_one)]
    runs: usize,
    #[arg(long, conflicts_with = "prompt_file")]
    prompt: Option<String>,
    #[arg(long)]
    prompt_file: Option<PathBuf>,
    /// Seconds to sleep between runs (0 to 3600).
    #[arg(long, default_value_t = 0.0, value_parser = parse_cooldown)]
    cooldown: f64,
    /// Generate exactly --max-tokens per run, through EOS (benchmarks: equal token counts).
    #[arg(long)]
    ignore_eos: bool,
    /// Untimed warm-up generations per configuration before the runs.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, value_enum, default_value = "auto")]
    dtype: DtypeChoice,
    #[arg(long)]
    json: bool,
    /// Allow patterns of class `unsafe`.
    #[arg(long)]
    allow_unsafe: bool,
    /// Report the max |logit difference| per step up to the first divergence.
    #[arg(long)]
    logits: bool,
    /// At a divergence, ask an all-float32 unpatched model which side it agrees with.
    #[arg(long, value_parser = ["f32"])]
    arbiter: Option<String>,
}

impl ValidateArgs {
    fn options(&self) -> Result<ValidateOptions> {
        let config = zmlx::config::ModelConfig::load(&zmlx::config::checkpoint_dir(&self.model)?)?;
        let env = patterns::relevant_env()?;
        let selection = patterns::resolve(&SelectionRequest {
            patterns: self.patterns.as_deref(),
            exclude: &self.exclude,
            family: config.family,
            allow_unsafe: self.allow_unsafe,
            env: &env,
        })?;
        let (prompt, prompt_source) = match (&self.prompt, &self.prompt_file) {
            (Some(p), _) => (p.clone(), "--prompt".to_string()),
            (None, Some(f)) => (
                std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("cannot read --prompt-file {}: {e}", f.display()))?,
                f.display().to_string(),
            ),
            (None, None) => (DEFAULT_PROMPT.to_string(), "default".to_string()),
        };
        Ok(ValidateOptions {
            selection,
            max_tokens: self.max_tokens,
            runs: self.runs,
            prompt,
            prompt_source,
            cooldown_s: self.cooldown,
            dtype: self.dtype,
            logits: self.logits,
            arbiter_f32: self.arbiter.is_some(),
            ignore_eos: self.ignore_eos,
            warmup: self.warmup,
        })
    }
}

/// Exit status of validate/run: 0 PASS, 1 FAIL, 3 SKIP (nothing compared); 2 is any error.
fn run_validate(a: &ValidateArgs) -> Result<i32> {
    let report = validate(&a.model, &a.options()?)?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(report.fidelity.exit_code())
}

fn run_patterns(json: bool) -> Result<i32> {
    let infos: Vec<_> = patterns::registry().iter().map(|p| p.info().clone()).collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&infos)?);
        return Ok(0);
    }
    println!("{:<20} {:<13} {:<12} {:<7} {:<34} families", "pattern", "slot", "class", "decode", "env");
    for i in &infos {
        let mut env = vec![i.switch_var()];
        env.extend(i.env.iter().map(|s| s.to_string()));
        let fams: Vec<_> = i.families.iter().map(|f| f.model_type()).collect();
        println!(
            "{:<20} {:<13} {:<12} {:<7} {:<34} {}",
            i.name,
            format!("{:?}", i.slot).to_lowercase(),
            format!("{:?}", i.class).to_lowercase(),
            if i.decode_only { "only" } else { "all" },
            env.join(" "),
            fams.join(", ")
        );
        println!("    {}", i.description);
    }
    Ok(0)
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    v: ValidateArgs,
    #[arg(long, default_value = "")]
    notes: String,
    /// Ledger file (default: $ZMLX_LEDGER, else benchmarks/matrix.jsonl).
    #[arg(long)]
    ledger: Option<PathBuf>,
    /// Write a repro capsule (a .json path, or a directory; default repro_capsules/).
    #[arg(long, num_args = 0..=1, default_missing_value = "repro_capsules")]
    capsule: Option<PathBuf>,
}

#[derive(clap::Args)]
struct HistoryArgs {
    /// Substring of the model id.
    query: Option<String>,
    #[arg(long)]
    hardware: Option<String>,
    #[arg(long)]
    pattern: Option<String>,
    /// Only entries at or after this date (YYYY-MM-DD or an RFC 3339 time).
    #[arg(long)]
    since: Option<String>,
    #[arg(long, value_parser = ["PASS", "FAIL", "SKIP", "EXCLUDED"])]
    fidelity: Option<String>,
    #[arg(long)]
    ledger: Option<PathBuf>,
    #[arg(long)]
    json: bool,
    /// Draw decode tok/s over time per pattern set (.svg).
    #[arg(long)]
    plot: Option<PathBuf>,
}

fn ledger_path(explicit: Option<&Path>) -> PathBuf {
    zmlx::ledger::resolve_ledger_path(explicit, Path::new("."))
}

fn run_run(a: &RunArgs) -> Result<i32> {
    let opts = RunOptions {
        validate: a.v.options()?,
        notes: a.notes.clone(),
        ledger: ledger_path(a.ledger.as_deref()),
        capsule: a.capsule.clone(),
        command_line: std::env::args().collect(),
    };
    let out = zmlx::run::run(&a.v.model, &opts)?;
    if a.v.json {
        println!("{}", serde_json::json!({"report": out.report, "ledger_line": out.entry, "capsule": out.capsule}));
    } else {
        print!("{}", render(&out.report));
        println!("[matrix] appended to {}", opts.ledger.display());
        if let Some(c) = &out.capsule {
            println!("[matrix] capsule {}", c.display());
        }
        // The ledger line's own values, so text and --json agree.
        let e = &out.entry;
        if out.report.fidelity.skipped() {
            println!("[matrix] Result: SKIP | {}", e.fidelity_detail);
        } else {
            println!(
                "[matrix] Result: {} | decode {}x | {} tok/s | {}",
                e.fidelity,
                zmlx::ledger::py_float_repr(e.decode_speedup),
                zmlx::ledger::py_float_repr(e.decode_tps_patched),
                e.fidelity_detail
            );
        }
    }
    Ok(out.report.fidelity.exit_code())
}

fn read_ledger(path: &Path) -> Result<Vec<zmlx::ledger::MatrixEntry>> {
    let read = zmlx::ledger::Ledger::new(path).read()?;
    for (line, why) in &read.bad_lines {
        eprintln!("[matrix] warning: {}:{line}: skipped unreadable line ({why})", path.display());
    }
    Ok(read.into_entries())
}

fn run_history(a: &HistoryArgs) -> Result<i32> {
    use std::io::IsTerminal;
    use zmlx::history;
    let entries = read_ledger(&ledger_path(a.ledger.as_deref()))?;
    let q = history::HistoryQuery {
        query: a.query.clone(),
        hardware: a.hardware.clone(),
        pattern: a.pattern.clone(),
        since: a.since.as_deref().map(history::parse_since).transpose()?,
        fidelity: a.fidelity.clone(),
    };
    let rows = history::filter(&entries, &q);
    if let Some(p) = &a.plot {
        history::plot(&rows, p)?;
        eprintln!("[matrix] plot written to {}", p.display());
    }
    if a.json {
        println!("{}", history::render_json(&rows));
    } else {
        print!("{}", history::render_table(&rows, &q, std::io::stdout().is_terminal()));
    }
    Ok(0)
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
    /// MLX affine quantization bits: 2, 3, 4, 5, 6 or 8 (omit for a float checkpoint).
    #[arg(long, value_parser = parse_bits)]
    quantize: Option<i32>,
    /// Quantization group size: 32, 64 or 128.
    #[arg(long, default_value_t = 64, value_parser = parse_group_size)]
    group_size: i32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Tensor naming: mlx-community (stacked experts) or Hugging Face (per-expert tensors).
    #[arg(long, value_enum, default_value = "mlx")]
    layout: Layout,
    /// Shard weights into files of at most this many MiB (1 to 1048576).
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    max_shard_mb: u64,
}

/// A count that must be at least 1 (tokens, runs, steps).
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("must be at least 1".into()),
        Err(_) => Err(format!("`{s}` is not a whole number >= 1")),
    }
}

fn finite(s: &str) -> Result<f64, String> {
    let x: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !x.is_finite() {
        return Err(format!("`{s}` is not a finite number"));
    }
    Ok(x)
}

fn parse_temp(s: &str) -> Result<f32, String> {
    let t = finite(s)?;
    if t < 0.0 {
        return Err("must be >= 0 (0 = greedy)".into());
    }
    Ok(t as f32)
}

fn parse_top_p(s: &str) -> Result<f32, String> {
    let p = finite(s)?;
    if !(p > 0.0 && p <= 1.0) {
        return Err("must be in (0, 1]; 1 turns nucleus sampling off".into());
    }
    Ok(p as f32)
}

fn parse_cooldown(s: &str) -> Result<f64, String> {
    let c = finite(s)?;
    if !(0.0..=zmlx::validate::MAX_COOLDOWN_S).contains(&c) {
        return Err(format!("must be between 0 and {} seconds", zmlx::validate::MAX_COOLDOWN_S));
    }
    Ok(c)
}

fn parse_bits(s: &str) -> Result<i32, String> {
    match s.trim().parse::<i32>() {
        Ok(b) if [2, 3, 4, 5, 6, 8].contains(&b) => Ok(b),
        _ => Err(format!("`{s}`: MLX affine quantization supports 2, 3, 4, 5, 6 or 8 bits")),
    }
}

fn parse_group_size(s: &str) -> Result<i32, String> {
    match s.trim().parse::<i32>() {
        Ok(g) if [32, 64, 128].contains(&g) => Ok(g),
        _ => Err(format!("`{s}`: the group size must be 32, 64 or 128")),
    }
}

fn parse_family(s: &str) -> Result<Family, String> {
    Family::from_model_type(s).ok_or_else(|| {
        let all: Vec<_> = Family::ALL.iter().map(|f| f.model_type()).collect();
        format!("unknown family `{s}`; expected one of: {}", all.join(", "))
    })
}

fn run_generate(a: &GenerateArgs) -> Result<i32> {
    let backend = mlx_env::init()?;
    let (mut model, info) = Model::load(&a.model, a.dtype, backend)?;
    let env = patterns::relevant_env()?;
    let selection = patterns::resolve(&SelectionRequest {
        patterns: a.patterns.as_deref(),
        exclude: &a.exclude,
        family: model.family(),
        allow_unsafe: a.allow_unsafe,
        env: &env,
    })?;
    let report = patterns::patch(&mut model, &selection)?;
    if !a.json {
        eprintln!(
            "[zmlx] patterns ({}): {}",
            selection.source,
            if selection.names.is_empty() { "none".into() } else { selection.names.join(", ") }
        );
        if !selection.names.is_empty() {
            eprintln!("[zmlx] {}", report.summary().replace('\n', "\n[zmlx] "));
        }
    }
    zmlx::fallbacks::reset();
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
            "patterns": selection.names, "patch_report": report, "pattern_calls": zmlx::fallbacks::snapshot(),
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
        for line in zmlx::fallbacks::summary() {
            println!("Pattern calls: {line}");
        }
    }
    Ok(0)
}

fn run_profile(a: &ProfileArgs) -> Result<i32> {
    let backend = mlx_env::init()?;
    let (mut model, _) = Model::load(&a.model, a.dtype, backend)?;
    let tok = TextTokenizer::load(&a.model, &model.config)?;
    let prompt = tok.encode(&a.prompt)?;
    let env = patterns::relevant_env()?;
    let selection = patterns::resolve(&SelectionRequest {
        patterns: a.patterns.as_deref(),
        exclude: &[],
        family: model.family(),
        allow_unsafe: false,
        env: &env,
    })?;
    let stock = zmlx::profile::decode_profile(&model, &prompt, a.tokens)?;
    patterns::patch(&mut model, &selection)?;
    let patched = zmlx::profile::decode_profile(&model, &prompt, a.tokens)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"model": a.model, "patterns": selection.names, "stock": stock, "patched": patched})
        );
        return Ok(0);
    }
    println!(
        "decode-step profile of {} ({} layers), patched = {}",
        a.model.display(),
        model.layers.len(),
        selection.names.join(", ")
    );
    println!(
        "MLX operations per step: stock {} ({:.1}/layer), patched {} ({:.1}/layer)",
        stock.ops_total, stock.ops_per_layer, patched.ops_total, patched.ops_per_layer
    );
    println!("{:<18} {:>10} {:>10}", "slot (ms/token)", "stock", "patched");
    let keys: std::collections::BTreeSet<&String> = stock.ms_by_slot.keys().chain(patched.ms_by_slot.keys()).collect();
    for k in keys {
        let f = |m: &std::collections::BTreeMap<String, f64>| m.get(k).map_or("-".into(), |v| format!("{v:.2}"));
        println!("{:<18} {:>10} {:>10}", k, f(&stock.ms_by_slot), f(&patched.ms_by_slot));
    }
    println!("{:<18} {:>10.2} {:>10.2}", "total", stock.ms_total, patched.ms_total);
    let mut ops: Vec<(&String, &usize)> = stock.ops_by_primitive.iter().collect();
    ops.sort_by(|x, y| y.1.cmp(x.1));
    let top: Vec<String> = ops.iter().take(8).map(|(k, v)| format!("{k} {v}")).collect();
    println!("most frequent stock ops: {}", top.join(", "));
    Ok(0)
}

fn run_synth(a: &SynthArgs) -> Result<i32> {
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
    Ok(0)
}

fn run_demo(dir: &Path, max_tokens: usize) -> Result<i32> {
    mlx_env::init()?;
    if !dir.join("config.json").exists() {
        eprintln!(
            "[zmlx] synthesizing the default checkpoint (qwen3_moe: Qwen3-30B-A3B's per-layer shapes, 2 layers, \
             4-bit) into {}",
            dir.display()
        );
        let mut o = SynthOptions::new(Family::Qwen3Moe);
        o.preset = Preset::Bench;
        o.quantize = Some(4);
        synthesize(&o, dir)?;
    } else {
        eprintln!("[zmlx] using the default checkpoint in {}", dir.display());
    }
    println!("== zmlx generate (family preset)");
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
        patterns: None,
        exclude: vec![],
        allow_unsafe: false,
    })?;
    // Validate the preset against the stock model and record the run in a ledger next to the
    // default checkpoint (ZMLX_LEDGER overrides), then show that ledger's history.
    let ledger = zmlx::settings::var(zmlx::ledger::LEDGER_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.parent().unwrap_or(dir).join("matrix.jsonl"));
    println!("\n== zmlx run {} (family preset vs stock: validate + ledger)", dir.display());
    let args = RunArgs {
        v: ValidateArgs {
            model: dir.to_path_buf(),
            patterns: None,
            exclude: vec![],
            max_tokens,
            runs: 2,
            prompt: None,
            prompt_file: None,
            cooldown: 0.0,
            ignore_eos: true,
            warmup: 1,
            dtype: DtypeChoice::Auto,
            json: false,
            allow_unsafe: false,
            logits: false,
            arbiter: None,
        },
        notes: "zmlx demo (default checkpoint, family preset)".into(),
        ledger: Some(ledger.clone()),
        capsule: None,
    };
    let code = run_run(&args)?;
    if mlx_env::Backend::detect() == mlx_env::Backend::Cpu {
        println!(
            "\nWhere the speed comes from: MLX's CPU quantized mat-vec is single-threaded scalar; the preset's \
             kernels compute each output row in MLX's exact order (so the tokens are identical) but run many \
             rows per SIMD vector on all cores ({} threads here). Tiny shapes show no gain: per-op overhead \
             dominates there.",
            zmlx::hardware::kernel_threads()
        );
    }
    println!("\n== zmlx history --ledger {}", ledger.display());
    run_history(&HistoryArgs {
        query: None,
        hardware: None,
        pattern: None,
        since: None,
        fidelity: None,
        ledger: Some(ledger),
        json: false,
        plot: None,
    })?;
    Ok(code)
}

fn main() {
    // Writing to a closed pipe (`zmlx history | head -1`) ends the process quietly, as it does
    // for other Unix tools, instead of a panic in `println!`.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    if let Err(e) = zmlx::settings::check_env() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    let result = match &cli.command {
        Command::Generate(a) => run_generate(a),
        Command::Synth(a) => run_synth(a),
        Command::Demo { dir, max_tokens } => run_demo(dir, *max_tokens),
        Command::Validate(a) => run_validate(a),
        Command::Patterns { json } => run_patterns(*json),
        Command::Profile(a) => run_profile(a),
        Command::Run(a) => run_run(a),
        Command::Selftest => (|| {
            let backend = mlx_env::init()?;
            let results = zmlx::selftest::run()?;
            let exact = results.iter().filter(|r| r.bit_exact).count();
            for r in &results {
                println!("{}", serde_json::to_string(r)?);
            }
            let broken: Vec<_> =
                results.iter().filter(|r| r.error.is_some() || (r.claims_exact && !r.bit_exact)).collect();
            eprintln!(
                "[selftest] backend {}: {exact}/{} cases bit-exact; {} of the {} cases claimed exact differ or failed",
                backend.name(),
                results.len(),
                broken.len(),
                results.iter().filter(|r| r.claims_exact).count()
            );
            for r in &broken {
                eprintln!(
                    "[selftest] FAILED {} {}: {}",
                    r.kernel,
                    r.case,
                    r.error.as_deref().unwrap_or("not bit-exact")
                );
            }
            Ok(if broken.is_empty() { 0 } else { 1 })
        })(),
        Command::History(a) => run_history(a),
        Command::Report { capsule } => zmlx::capsule::read_capsule(capsule).map(|c| {
            print!("{}", zmlx::capsule::render_report(&c));
            0
        }),
        Command::Diff { a, b } => (|| {
            print!("{}", zmlx::history::diff(&read_ledger(a)?, &read_ledger(b)?));
            Ok(0)
        })(),
        Command::Csv { ledger } => read_ledger(&ledger_path(ledger.as_deref())).map(|e| {
            print!("{}", zmlx::history::csv(&e));
            0
        }),
    };
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {}", format_error(&e));
            std::process::exit(2);
        }
    }
}

fn format_error(e: &anyhow::Error) -> String {
    let mut s = e.to_string();
    for cause in e.chain().skip(1) {
        s.push_str(&format!("\n  caused by: {cause}"));
    }
    s
}
