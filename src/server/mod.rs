//! `zmlx serve`: an OpenAI-compatible HTTP server over the batch engine.
//!
//! Threads: the model lives on one engine thread (`engine`: MLX arrays are not Send) that runs
//! continuous batching; the HTTP side (`routes`, on tokio + axum) checks and tokenizes requests
//! (`wire`), admits them (429 past `--max-concurrency + --max-queue`), sends them to the engine
//! over a channel and turns each request's event channel into a response or an SSE stream.
//! `metrics` is shared by both. The port is bound and announced before the model loads, so
//! `/health` answers 503 while loading.
//!
//! Greedy output does not depend on the batch: the engine decodes each sequence with
//! batch-invariant kernels on the CPU backend (src/batch.rs), so a request's tokens equal
//! `zmlx generate`'s whatever else runs (tests/server.rs checks it); on CUDA they may differ.
pub mod engine;
pub mod metrics;
pub mod routes;
pub mod wire;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};

use crate::batch::BatchOptions;
use crate::chat_template::ChatTemplate;
use crate::config::Family;
use crate::model::{DtypeChoice, Model};
use crate::patterns::Selection;
use crate::tokenizer::TextTokenizer;

pub struct ServeOptions {
    pub model: PathBuf,
    pub host: String,
    /// 0 = any free port.
    pub port: u16,
    pub dtype: DtypeChoice,
    /// The pattern selection for the loaded model's family (the CLI's `--patterns` rules).
    pub select_patterns: Box<dyn FnOnce(Family) -> Result<Selection> + Send>,
    /// Sequences decoding at once.
    pub max_concurrency: usize,
    /// Requests waiting beyond those; more get 429.
    pub max_queue: usize,
    pub max_tokens_limit: usize,
    pub api_key: Option<String>,
    /// The name served in /v1/models; when given, requests naming another model get 404.
    pub model_id: Option<String>,
    /// How long in-flight requests may take to finish after SIGINT/SIGTERM.
    pub drain_timeout: Duration,
    /// Expert offloading (`--expert-cache*`).
    pub offload: Option<crate::offload::OffloadConfig>,
}

/// What the HTTP side needs of the loaded model.
pub struct Loaded {
    pub tokenizer: Arc<TextTokenizer>,
    pub template: Option<ChatTemplate>,
    pub eos_token_ids: Vec<u32>,
    pub vocab_size: usize,
    /// max_position_embeddings, when the config gives one.
    pub context: Option<usize>,
}

pub struct AppState {
    pub model_id: String,
    /// `--model-id` was given: requests must name it.
    pub model_id_strict: bool,
    pub api_key: Option<String>,
    pub limits: wire::Limits,
    /// Requests admitted at once (running + queued).
    pub capacity: usize,
    pub created: u64,
    pub loaded: OnceLock<Loaded>,
    pub draining: AtomicBool,
    pub commands: std::sync::mpsc::Sender<engine::Command>,
    pub metrics: Arc<metrics::Metrics>,
    pub next_request: AtomicU64,
}

impl AppState {
    pub fn state_name(&self) -> &'static str {
        if self.draining.load(Ordering::Acquire) {
            "draining"
        } else if self.loaded.get().is_some() {
            "ready"
        } else {
            "loading"
        }
    }
}

/// Serves until SIGINT/SIGTERM, then drains (bounded by `drain_timeout`) and returns 0.
pub fn serve(opts: ServeOptions) -> Result<i32> {
    let backend = crate::mlx_env::init()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve_async(opts, backend))
}

async fn serve_async(opts: ServeOptions, backend: crate::mlx_env::Backend) -> Result<i32> {
    let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port))
        .await
        .with_context(|| format!("cannot listen on {}:{} (--host/--port)", opts.host, opts.port))?;
    let addr = listener.local_addr()?;
    let model_id = opts.model_id.clone().unwrap_or_else(|| default_model_id(&opts.model));
    let (commands, command_rx) = std::sync::mpsc::channel();
    let metrics = Arc::new(metrics::Metrics::default());
    let state = Arc::new(AppState {
        model_id,
        model_id_strict: opts.model_id.is_some(),
        api_key: opts.api_key.clone(),
        limits: wire::Limits { max_tokens: opts.max_tokens_limit },
        capacity: opts.max_concurrency + opts.max_queue,
        created: wire::unix_now(),
        loaded: OnceLock::new(),
        draining: AtomicBool::new(false),
        commands,
        metrics: metrics.clone(),
        next_request: AtomicU64::new(0),
    });
    // One line on stdout with the URL (scripts and tests read it); the rest goes to stderr.
    println!("zmlx serve: listening on http://{addr}");
    let _ = std::io::stdout().flush();

    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<()>>();
    let (engine_done_tx, engine_done_rx) = tokio::sync::oneshot::channel::<()>();
    let engine_state = state.clone();
    let batch = BatchOptions::new(opts.max_concurrency);
    let (model_dir, dtype, select, offload) = (opts.model.clone(), opts.dtype, opts.select_patterns, opts.offload);
    std::thread::Builder::new()
        .name("zmlx-engine".into())
        .spawn(move || {
            match load(&model_dir, dtype, backend, select, offload) {
                Ok((model, tok, loaded)) => {
                    if let Some(c) = &model.offload {
                        let _ = metrics.expert_cache.set(c.live());
                    }
                    let _ = engine_state.loaded.set(loaded);
                    let _ = ready_tx.send(Ok(()));
                    engine::run(&model, &tok, batch, command_rx, metrics);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
            let _ = engine_done_tx.send(());
        })
        .context("cannot start the engine thread")?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let app = routes::router(state.clone());
    let mut stop_for_server = stop_rx.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stop_for_server.wait_for(|s| *s).await;
            })
            .await
    });

    let signal = shutdown_signal();
    tokio::pin!(signal);
    tokio::select! {
        r = ready_rx => match r {
            Ok(Ok(())) => eprintln!("[zmlx] serve: model `{}` ready on http://{addr}", state.model_id),
            Ok(Err(e)) => { let _ = stop_tx.send(true); return Err(e.context(format!("loading {}", opts.model.display()))); }
            Err(_) => { let _ = stop_tx.send(true); return Err(anyhow!("the engine thread ended while loading the model")); }
        },
        _ = &mut signal => {
            eprintln!("[zmlx] serve: stopped while loading");
            return Ok(0);
        }
    }
    signal.await;
    let in_flight = state.metrics.in_flight();
    eprintln!(
        "[zmlx] serve: shutting down: no new requests; waiting up to {:.0} s for {in_flight} in flight",
        opts.drain_timeout.as_secs_f64()
    );
    state.draining.store(true, Ordering::Release);
    let _ = stop_tx.send(true);
    match tokio::time::timeout(opts.drain_timeout, server).await {
        Ok(Ok(Ok(()))) => eprintln!("[zmlx] serve: drained"),
        Ok(Ok(Err(e))) => eprintln!("[zmlx] serve: server error while draining: {e}"),
        Ok(Err(e)) => eprintln!("[zmlx] serve: server task failed: {e}"),
        Err(_) => eprintln!("[zmlx] serve: drain timeout: {} requests cut off", state.metrics.in_flight()),
    }
    let _ = state.commands.send(engine::Command::Shutdown);
    // The engine stops between steps; a step is short, but do not hang on a stuck one.
    let _ = tokio::time::timeout(Duration::from_secs(10), engine_done_rx).await;
    Ok(0)
}

/// The served name when `--model-id` is not given: the checkpoint directory's name.
fn default_model_id(dir: &std::path::Path) -> String {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "zmlx".into())
}

/// Loads and patches the model as `zmlx generate` does, with its tokenizer and chat template.
fn load(
    dir: &std::path::Path,
    dtype: DtypeChoice,
    backend: crate::mlx_env::Backend,
    select: Box<dyn FnOnce(Family) -> Result<Selection> + Send>,
    offload: Option<crate::offload::OffloadConfig>,
) -> Result<(Model, Arc<TextTokenizer>, Loaded)> {
    let (mut model, info) = Model::load_with(dir, dtype, backend, offload)?;
    if let Some(c) = &model.offload {
        if offload.is_some_and(|o| o.pin > 0) {
            // What to pin is measured on generate's warm-up prompt (the server has no other).
            let tok = TextTokenizer::load(dir, &model.config)?;
            let warm = crate::generate::GenerateOptions::greedy(5, tok.eos_token_ids.clone());
            crate::generate::generate(&model, &tok.encode(crate::generate::WARMUP_TEXT)?, &warm, |_| Ok(()))?;
            c.pin_after_warmup()?;
        }
    }
    let selection = select(model.family())?;
    let report = crate::patterns::patch(&mut model, &selection)?;
    let names = if selection.names.is_empty() { "none".into() } else { selection.names.join(", ") };
    eprintln!("[zmlx] patterns ({}): {names}", selection.source);
    if !selection.names.is_empty() {
        eprintln!("[zmlx] {}", report.summary().replace('\n', "\n[zmlx] "));
    }
    crate::fallbacks::reset();
    let tokenizer = Arc::new(TextTokenizer::load(dir, &model.config)?);
    let template = ChatTemplate::load(dir)?;
    if template.is_none() {
        eprintln!("[zmlx] serve: {} has no chat template: /v1/chat/completions will answer 400", dir.display());
    }
    eprintln!(
        "[zmlx] {} ({}), backend {}, loaded in {:.2} s",
        dir.display(),
        model.family(),
        backend.name(),
        info.seconds
    );
    let loaded = Loaded {
        tokenizer: tokenizer.clone(),
        template,
        eos_token_ids: tokenizer.eos_token_ids.clone(),
        vocab_size: model.config.vocab_size as usize,
        context: model.config.max_position_embeddings.and_then(|c| usize::try_from(c).ok()).filter(|&c| c > 0),
    };
    Ok((model, tokenizer, loaded))
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term => {},
    }
}
