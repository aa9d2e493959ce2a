//! The `zmlx` command line: argument types (clap), one module per command, exit codes. The
//! binary (`src/main.rs`) only calls `main`; commands call the library and print.
mod args;
mod demo;
mod generate;
mod ledger;
mod profile;
mod selftest;
mod serve;
mod synth;
mod validate;

use clap::{Parser, Subcommand};

pub use args::PatternArgs;

/// The prompt `generate`, `profile` and the demo use when none is given.
pub const DEFAULT_GENERATE_PROMPT: &str = "Explain the key differences between TCP and UDP.";

#[derive(Parser)]
#[command(name = "zmlx", version, about = "Run, patch, validate and benchmark MoE LLMs on MLX")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a checkpoint directory.
    Generate(generate::GenerateArgs),
    /// Write a deterministic random-weight checkpoint that mlx-lm loads unchanged.
    Synth(synth::SynthArgs),
    /// Prove the patched model emits the same greedy tokens as the unpatched one (exit 0 PASS, 1 FAIL, 2 error, 3 SKIP).
    Validate(validate::ValidateArgs),
    /// Validate and record: one ledger line per run (+ a repro capsule with --capsule).
    Run(validate::RunArgs),
    /// Review the ledger.
    History(ledger::HistoryArgs),
    /// Print a repro capsule.
    Report { capsule: std::path::PathBuf },
    /// Compare the latest entries of two ledgers per (model, hardware, patterns).
    Diff { a: std::path::PathBuf, b: std::path::PathBuf },
    /// Export the latest ledger entries as CSV.
    Csv {
        #[arg(long)]
        ledger: Option<std::path::PathBuf>,
    },
    /// Check every fused kernel against its reference on this backend (prints JSON lines).
    Selftest,
    /// Per-token decode profile, stock vs patched: MLX operations per step and ms per slot.
    Profile(profile::ProfileArgs),
    /// List the pattern registry.
    Patterns {
        #[arg(long)]
        json: bool,
    },
    /// Serve the model over an OpenAI-compatible HTTP API (continuous batching, /health, /metrics).
    Serve(serve::ServeArgs),
    /// The main job on the built-in default: synthesize the default checkpoint (once), generate
    /// with the family preset, then validate the preset against the stock model and record it.
    Demo(demo::DemoArgs),
}

/// Parses the command line, runs the command and returns the process exit code: the command's
/// own (validate/run: 0 PASS, 1 FAIL, 3 SKIP) or 2 for any error, printed with its causes.
pub fn main() -> i32 {
    // Writing to a closed pipe (`zmlx history | head -1`) ends the process quietly, as it does
    // for other Unix tools, instead of a panic in `println!`.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = crate::settings::check_env().and_then(|()| match &cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Demo(a) => demo::run(a),
        Command::Serve(a) => serve::run(a),
        Command::Validate(a) => validate::run_validate(a),
        Command::Run(a) => validate::run_run(a),
        Command::Patterns { json } => args::list_patterns(*json),
        Command::Profile(a) => profile::run(a),
        Command::Selftest => selftest::run(),
        Command::History(a) => ledger::history(a),
        Command::Report { capsule } => ledger::report(capsule),
        Command::Diff { a, b } => ledger::diff(a, b),
        Command::Csv { ledger } => ledger::csv(ledger.as_deref()),
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", format_error(&e));
            2
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
