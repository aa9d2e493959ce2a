//! `zmlx serve`: the OpenAI-compatible server (src/server/).
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};

use super::args::{at_least_one, parse_batch_size, OffloadArgs, PatternArgs};
use crate::model::DtypeChoice;
use crate::server::{serve, ServeOptions};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// Checkpoint directory (config.json, *.safetensors, tokenizer.json; a chat template for
    /// /v1/chat/completions).
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// TCP port; 0 picks a free one (the URL line on stdout names it).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences decoded together in one batch (1..=1024).
    #[arg(long, default_value_t = 8, value_parser = parse_batch_size)]
    pub max_concurrency: usize,
    /// Requests that may wait for a batch slot; beyond them requests get 429.
    #[arg(long, default_value_t = 64)]
    pub max_queue: usize,
    /// Largest `max_tokens` a request may ask for (400 beyond).
    #[arg(long, default_value_t = 4096, value_parser = at_least_one)]
    pub max_tokens_limit: usize,
    /// Require `Authorization: Bearer KEY` on /v1/ routes (401 otherwise).
    #[arg(long)]
    pub api_key: Option<String>,
    /// The model name served in /v1/models (default: the checkpoint directory's name); when
    /// given, requests naming another model get 404.
    #[arg(long)]
    pub model_id: Option<String>,
    /// Seconds in-flight requests may take to finish after SIGINT/SIGTERM.
    #[arg(long, default_value_t = 30, value_parser = at_least_one)]
    pub drain_timeout: usize,
    /// Compute dtype (auto = f32 on CPU, the checkpoint's dtype on a GPU).
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: DtypeChoice,
    #[command(flatten)]
    pub patterns: PatternArgs,
    #[command(flatten)]
    pub offload: OffloadArgs,
}

pub fn run(a: &ServeArgs) -> Result<i32> {
    if a.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
        bail!("--api-key is empty: give a non-empty key, or leave the flag out for an open server");
    }
    if a.model_id.as_deref().is_some_and(|m| m.trim().is_empty()) {
        bail!("--model-id is empty: give a name, or leave the flag out to use the directory name");
    }
    if !a.model.join("config.json").is_file() {
        bail!("--model {}: no config.json there; give a checkpoint directory", a.model.display());
    }
    let patterns = a.patterns.clone();
    let offload = a.offload.config()?;
    serve(ServeOptions {
        model: a.model.clone(),
        host: a.host.clone(),
        port: a.port,
        dtype: a.dtype,
        select_patterns: Box::new(move |family| patterns.select(family)),
        max_concurrency: a.max_concurrency,
        max_queue: a.max_queue,
        max_tokens_limit: a.max_tokens_limit,
        api_key: a.api_key.clone(),
        model_id: a.model_id.clone(),
        drain_timeout: Duration::from_secs(a.drain_timeout as u64),
        offload,
    })
}
