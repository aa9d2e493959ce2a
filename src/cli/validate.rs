//! `zmlx validate` and `zmlx run` (validate + ledger line + capsule).
use std::path::PathBuf;

use anyhow::Result;

use super::args::{at_least_one, parse_batch_size, parse_cooldown, parse_warmup, OffloadArgs, PatternArgs};
use crate::model::DtypeChoice;
use crate::run::RunOptions;
use crate::validate::{render, validate, ValidateOptions, DEFAULT_PROMPT};

#[derive(clap::Args, Clone)]
pub struct ValidateArgs {
    /// Checkpoint directory.
    pub model: PathBuf,
    #[command(flatten)]
    pub patterns: PatternArgs,
    #[arg(long, default_value_t = 200, value_parser = at_least_one)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 3, value_parser = at_least_one)]
    pub runs: usize,
    #[arg(long, conflicts_with = "prompt_file")]
    pub prompt: Option<String>,
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
    /// Seconds to sleep between runs (0 to 3600).
    #[arg(long, default_value_t = 0.0, value_parser = parse_cooldown)]
    pub cooldown: f64,
    /// Generate exactly --max-tokens per run, through EOS (benchmarks: equal token counts).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Untimed warm-up generations per configuration before the runs (0 to 100).
    #[arg(long, default_value_t = 2, value_parser = parse_warmup)]
    pub warmup: usize,
    /// Decode this many copies of the prompt together per run (batched decode, src/batch.rs):
    /// throughput is the batch's total; every copy must match the others and the baseline.
    #[arg(long, default_value_t = 1, value_parser = parse_batch_size)]
    pub batch_size: usize,
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: DtypeChoice,
    #[arg(long)]
    pub json: bool,
    /// Report the max |logit difference| per step up to the first divergence.
    #[arg(long)]
    pub logits: bool,
    /// At a divergence, ask an all-float32 unpatched model which side it agrees with.
    #[arg(long, value_parser = ["f32"])]
    pub arbiter: Option<String>,
    #[command(flatten)]
    pub offload: OffloadArgs,
}

impl ValidateArgs {
    fn options(&self) -> Result<ValidateOptions> {
        let config = crate::config::ModelConfig::load(&crate::config::checkpoint_dir(&self.model)?)?;
        let selection = self.patterns.select(config.family)?;
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
            batch_size: self.batch_size,
            offload: self.offload.config()?,
        })
    }
}

/// Exit status of validate/run: 0 PASS, 1 FAIL, 3 SKIP (nothing compared); 2 is any error.
pub fn run_validate(a: &ValidateArgs) -> Result<i32> {
    let report = validate(&a.model, &a.options()?)?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(report.fidelity.exit_code())
}

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub v: ValidateArgs,
    #[arg(long, default_value = "")]
    pub notes: String,
    /// Ledger file (default: $ZMLX_LEDGER, else benchmarks/matrix.jsonl).
    #[arg(long)]
    pub ledger: Option<PathBuf>,
    /// Write a repro capsule (a .json path, or a directory; default repro_capsules/).
    #[arg(long, num_args = 0..=1, default_missing_value = "repro_capsules")]
    pub capsule: Option<PathBuf>,
}

pub fn run_run(a: &RunArgs) -> Result<i32> {
    let opts = RunOptions {
        validate: a.v.options()?,
        notes: a.notes.clone(),
        ledger: super::ledger::ledger_path(a.ledger.as_deref()),
        capsule: a.capsule.clone(),
        command_line: std::env::args().collect(),
    };
    let out = crate::run::run(&a.v.model, &opts)?;
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
                crate::ledger::py_float_repr(e.decode_speedup),
                crate::ledger::py_float_repr(e.decode_tps_patched),
                e.fidelity_detail
            );
        }
    }
    Ok(out.report.fidelity.exit_code())
}
