//! Shared helpers for the end-to-end tests: synthesized checkpoints, zmlx greedy runs, and the
//! mlx-lm oracle (a pinned Python venv made by `scripts/setup.sh --oracle`).
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};

use zmlx::config::Family;
use zmlx::generate::greedy_ids;
use zmlx::mlx_env;
use zmlx::model::{DtypeChoice, Model};
use zmlx::synth::{synthesize, SynthOptions};
use zmlx::tokenizer::TextTokenizer;

/// MLX graphs are built on the calling thread's stream; keep one model run at a time per process.
static MLX: Mutex<()> = Mutex::new(());

pub fn mlx_lock() -> MutexGuard<'static, ()> {
    let g = MLX.lock().unwrap_or_else(|e| e.into_inner());
    mlx_env::init().expect("MLX runtime");
    g
}

pub const PROMPTS: [&str; 2] =
    ["Explain the key differences between TCP and UDP protocols.", "Once upon a time, in a kitchen full of bread,"];

/// The mlx-lm release that is numerical truth (scripts/setup.sh installs it).
pub const ORACLE_MLX_LM_VERSION: &str = "0.32.0";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A `zmlx` command with a clean environment: no inherited `ZMLX_*` variable (so the caller's
/// environment cannot change what is tested) and `RUST_BACKTRACE=0` (a panic shows as such).
pub fn zmlx_cmd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zmlx"));
    for (k, _) in std::env::vars_os() {
        if k.as_encoded_bytes().starts_with(b"ZMLX_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("RUST_BACKTRACE", "0");
    cmd
}

/// The oracle's Python: `$ZMLX_ORACLE_PYTHON` or the venv scripts/setup.sh --oracle creates.
pub fn oracle_python() -> PathBuf {
    if let Some(p) = std::env::var_os("ZMLX_ORACLE_PYTHON") {
        return PathBuf::from(p);
    }
    let p = repo_root().join(".mlx/oracle-venv/bin/python");
    assert!(
        p.exists(),
        "the mlx-lm oracle is not installed ({}); run `bash scripts/setup.sh --oracle` (the README's test command does)",
        p.display()
    );
    p
}

pub struct OracleRun {
    pub prompt_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
}

/// Greedy tokens from mlx-lm 0.32.0 for each prompt (`--ignore-eos`: exactly `max_tokens`).
pub fn oracle(model: &Path, prompts: &[&str], max_tokens: usize, dtype: &str) -> Vec<OracleRun> {
    oracle_wait(model, oracle_spawn(model, prompts, max_tokens, dtype))
}

/// Starts the oracle in its own process, so zmlx can run on the other core meanwhile.
pub fn oracle_spawn(model: &Path, prompts: &[&str], max_tokens: usize, dtype: &str) -> std::process::Child {
    let script = repo_root().join("tests/oracle/mlx_lm_oracle.py");
    let mut cmd = Command::new(oracle_python());
    cmd.arg(&script).arg("--model").arg(model).arg("--max-tokens").arg(max_tokens.to_string());
    cmd.arg("--dtype").arg(dtype).arg("--ignore-eos");
    for p in prompts {
        cmd.arg("--prompt").arg(p);
    }
    cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    cmd.spawn().expect("running the mlx-lm oracle")
}

pub fn oracle_wait(model: &Path, child: std::process::Child) -> Vec<OracleRun> {
    let out = child.wait_with_output().expect("waiting for the mlx-lm oracle");
    assert!(
        out.status.success(),
        "mlx-lm oracle failed on {}:\n{}",
        model.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("oracle JSON");
    assert_eq!(v["mlx_version"], "0.32.2", "oracle must run the same libmlx version");
    assert_eq!(v["mlx_lm_version"], ORACLE_MLX_LM_VERSION, "the oracle must be the pinned mlx-lm (scripts/setup.sh)");
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let ids = |k: &str| r[k].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            OracleRun { prompt_ids: ids("prompt_ids"), token_ids: ids("token_ids") }
        })
        .collect()
}

pub fn load(model_dir: &Path, dtype: DtypeChoice) -> (Model, TextTokenizer) {
    let backend = mlx_env::Backend::detect();
    let (model, _) = Model::load(model_dir, dtype, backend).expect("zmlx loads the checkpoint");
    let tok = TextTokenizer::load(model_dir, &model.config).expect("tokenizer");
    (model, tok)
}

/// zmlx greedy tokens (ignoring EOS, like the oracle call) for each prompt.
pub fn zmlx_greedy(
    model: &Model,
    tok: &TextTokenizer,
    prompts: &[&str],
    max_tokens: usize,
) -> Vec<(Vec<u32>, Vec<u32>)> {
    prompts
        .iter()
        .map(|p| {
            let ids = tok.encode(p).unwrap();
            let out = greedy_ids(model, &ids, max_tokens, true).unwrap();
            (ids, out)
        })
        .collect()
}

pub fn synth_into(dir: &Path, opts: &SynthOptions) {
    synthesize(opts, dir).unwrap_or_else(|e| panic!("synth {:?} failed: {e:#}", opts));
}

pub fn synth_opts(family: Family, quantize: Option<i32>, seed: u64) -> SynthOptions {
    let mut o = SynthOptions::new(family);
    o.quantize = quantize;
    o.seed = seed;
    o
}

/// Index of the first differing token, for readable assertion messages.
pub fn first_divergence(a: &[u32], b: &[u32]) -> Option<usize> {
    (0..a.len().max(b.len())).find(|&i| a.get(i) != b.get(i))
}

/// Restores every slot, then applies `preset`: `none`, `safe` (the family preset) or `fast`.
pub fn patch_preset(model: &mut Model, preset: &str) {
    model.restore_all_slots();
    let names = match preset {
        "none" => vec![],
        "safe" => zmlx::patterns::family_preset(model.family()),
        "fast" => zmlx::patterns::family_fast_preset(model.family()),
        other => panic!("unknown preset {other}"),
    };
    let sel = zmlx::patterns::Selection { names: names.iter().map(|s| s.to_string()).collect(), source: "test".into() };
    zmlx::patterns::patch(model, &sel).unwrap();
}
