//! `zmlx run`: validate, then record the result — one ledger line (always, PASS or FAIL) and,
//! on request, a repro capsule with the raw per-run numbers, token ids, command line and env.
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::capsule::{self, Capsule, CapsuleMeta, ConfigStats, Fidelity, PatchedStats, Summary, VariantResult};
use crate::hardware;
use crate::ledger::{sorted_patterns, Ledger, MatrixEntry};
use crate::mlx_env;
use crate::validate::{validate, ConfigResult, ValidateOptions, ValidationReport};

pub struct RunOptions {
    pub validate: ValidateOptions,
    pub notes: String,
    pub ledger: PathBuf,
    /// Write a capsule: a `.json` path or a directory for a generated name.
    pub capsule: Option<PathBuf>,
    pub command_line: Vec<String>,
}

pub struct RunOutcome {
    pub report: ValidationReport,
    pub entry: MatrixEntry,
    pub capsule: Option<PathBuf>,
}

/// Commit zmlx was built from (`+dirty` when the tree had changes).
pub const GIT_COMMIT: &str = env!("ZMLX_GIT_COMMIT");

/// The original's family names, from model_type.
fn family_name(model_type: &str) -> &'static str {
    for (needle, fam) in
        [("glm", "glm"), ("qwen", "qwen"), ("deepseek", "deepseek"), ("kimi", "kimi"), ("mixtral", "mixtral")]
    {
        if model_type.contains(needle) {
            return fam;
        }
    }
    "unknown"
}

fn r2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn r4(x: f64) -> f64 {
    (x * 10000.0).round() / 10000.0
}

fn stats(c: &ConfigResult) -> ConfigStats {
    ConfigStats {
        prefill_tok_s: c.runs.iter().map(|r| r2(r.prompt_tps)).collect(),
        decode_tok_s: c.runs.iter().map(|r| r2(r.decode_tps)).collect(),
        median_prefill: r2(c.median_prompt_tps),
        median_decode: r2(c.median_decode_tps),
        peak_mem_gb: r2(c.peak_mem_gb),
        token_ids: Some(c.runs.iter().map(|r| r.token_ids.clone()).collect()),
        ..Default::default()
    }
}

pub fn entry_for(
    r: &ValidationReport,
    notes: &str,
    cooldown_s: f64,
    hw: &hardware::Hardware,
    capsule: Option<&Path>,
) -> MatrixEntry {
    let commit = GIT_COMMIT.to_owned();
    MatrixEntry {
        model_id: r.model.display().to_string(),
        model_family: family_name(&r.family).to_owned(),
        architecture: "moe".into(),
        patterns_applied: sorted_patterns(&r.selection.names),
        hardware: hw.hardware.clone(),
        notes: notes.to_owned(),
        mlx_version: mlx_env::runtime_mlx_version(),
        zmlx_version: env!("CARGO_PKG_VERSION").into(),
        zmlx_commit: commit.chars().take(7).collect(),
        timestamp: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, false),
        fidelity: r.fidelity.verdict.clone(),
        fidelity_detail: r.fidelity.detail(),
        modules_patched: r.patch_report.modules_patched() as u64,
        decode_tps_baseline: r2(r.baseline.median_decode_tps),
        decode_tps_patched: r2(r.patched.median_decode_tps),
        decode_speedup: r4(r.decode_speedup),
        decode_runs_baseline: r.baseline.runs.iter().map(|x| r2(x.decode_tps)).collect(),
        decode_runs_patched: r.patched.runs.iter().map(|x| r2(x.decode_tps)).collect(),
        prefill_tps_baseline: r2(r.baseline.median_prompt_tps),
        prefill_tps_patched: r2(r.patched.median_prompt_tps),
        prefill_change: r4(r.prefill_change),
        peak_mem_baseline_gb: r2(r.baseline.peak_mem_gb),
        peak_mem_patched_gb: r2(r.patched.peak_mem_gb),
        max_tokens: r.max_tokens as u64,
        gen_tokens: r.patched.runs.first().map_or(0, |x| x.token_ids.len() as u64),
        runs: r.runs as u64,
        backend: Some(r.backend.name().into()),
        device: Some(hw.device.clone()),
        mlx_rs_version: Some(mlx_env::MLX_RS_VERSION.into()),
        libmlx_version: Some(mlx_env::runtime_mlx_version()),
        git_commit: Some(commit),
        prompt_source: Some(r.prompt_source.clone()),
        cooldown_s: Some(cooldown_s),
        capsule: capsule.map(|p| p.display().to_string()),
        threads: Some(hardware::kernel_threads()),
        logit_max_abs: r.logit_stats.as_ref().map(|l| l.max_abs),
        logit_kl_max: r.logit_stats.as_ref().map(|l| l.kl_max),
        load_seconds: Some(r4(r.load_seconds)),
        peak_rss_bytes: Some(hardware::peak_rss_bytes()),
        batch_size: Some(r.batch_size as u64),
        expert_cache: r.expert_cache.clone(),
        ..Default::default()
    }
}

pub fn capsule_for(r: &ValidationReport, notes: &str, hw: &hardware::Hardware, command_line: &[String]) -> Capsule {
    let variant = if r.selection.names.is_empty() { "none".to_string() } else { r.selection.names.join("+") };
    let mut meta = CapsuleMeta {
        date: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        device: hw.device.clone(),
        memory_gb: hw.memory_gb,
        mlx_version: mlx_env::runtime_mlx_version(),
        zmlx_version: env!("CARGO_PKG_VERSION").into(),
        git_commit: GIT_COMMIT.into(),
        backend: Some(r.backend.name().into()),
        mlx_rs_version: Some(mlx_env::MLX_RS_VERSION.into()),
        libmlx_version: Some(mlx_env::runtime_mlx_version()),
        command_line: command_line.to_vec(),
        env: capsule::capture_env(),
        threads: Some(hardware::kernel_threads()),
        load_seconds: Some(r.load_seconds),
        peak_rss_bytes: Some(hardware::peak_rss_bytes()),
        ..Default::default()
    };
    meta.set_command(&variant, capsule::shell_join(command_line));
    let result = VariantResult {
        model: r.model.display().to_string(),
        variant: variant.clone(),
        max_tokens: r.max_tokens as u64,
        gen_tokens: r.patched.runs.first().map_or(0, |x| x.token_ids.len() as u64),
        runs: r.runs as u64,
        fidelity: Fidelity {
            matched: r.fidelity.matched as u64,
            total: r.fidelity.total as u64,
            verdict: r.fidelity.verdict.clone(),
            first_divergence: r.fidelity.first_divergence.as_ref().map(|d| d.index as u64),
            ..Default::default()
        },
        baseline: stats(&r.baseline),
        patched: PatchedStats {
            patterns: r.selection.names.clone(),
            modules_patched: r.patch_report.modules_patched() as u64,
            stats: stats(&r.patched),
        },
        summary: Summary {
            decode_speedup: r4(r.decode_speedup),
            prefill_change: r4(r.prefill_change),
            ..Default::default()
        },
        notes: notes.to_owned(),
        ..Default::default()
    };
    Capsule { meta, variants: vec![(variant, result)], ..Default::default() }
}

/// Validates, writes the capsule (if asked), then appends the ledger line that points at it.
/// If the append fails, the capsule is removed again: no capsule names a line never written.
pub fn run(model_dir: &Path, opts: &RunOptions) -> Result<RunOutcome> {
    let report = validate(model_dir, &opts.validate)?;
    let hw = hardware::describe(report.backend);
    let capsule = match &opts.capsule {
        Some(dest) => Some(capsule::write_capsule(dest, &capsule_for(&report, &opts.notes, &hw, &opts.command_line))?),
        None => None,
    };
    let entry = entry_for(&report, &opts.notes, opts.validate.cooldown_s, &hw, capsule.as_deref());
    if let Err(e) = Ledger::new(&opts.ledger).append(&entry) {
        if let Some(c) = &capsule {
            let _ = std::fs::remove_file(c);
        }
        return Err(e);
    }
    Ok(RunOutcome { report, entry, capsule })
}
