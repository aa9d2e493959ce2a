//! The HTTP side: routes, API-key and request accounting middleware, and the two generation
//! endpoints turning a checked request into an engine job and its events into an OpenAI
//! response or SSE stream.
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::engine::{Command, Event, Job};
use super::wire::{self, ApiError, GenerationRequest, PromptInput};
use super::{AppState, Loaded};
use crate::batch::{SequenceRequest, TokenLogprobs};
use crate::generate::SamplerConfig;

/// Largest request body accepted (413 beyond): far above any real prompt's JSON.
pub const MAX_BODY_BYTES: usize = 4 << 20;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), auth_and_count))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The endpoint label of a path for /metrics (unknown paths share one label).
fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/completions" => "/v1/completions",
        "/v1/models" => "/v1/models",
        "/health" => "/health",
        "/metrics" => "/metrics",
        _ => "other",
    }
}

/// Checks the API key on /v1/ routes (health and metrics stay open, as llama-server's do),
/// gives 405s an OpenAI error body, and counts every response by endpoint and status.
async fn auth_and_count(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let endpoint = endpoint_label(req.uri().path());
    let method = req.method().clone();
    let response = match (&st.api_key, req.uri().path().starts_with("/v1/")) {
        (Some(key), true) if !has_key(&req, key) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_api_key",
            "missing or wrong API key: send the server's --api-key as `Authorization: Bearer <key>`",
        )
        .into_response(),
        _ => {
            let r = next.run(req).await;
            if r.status() == StatusCode::METHOD_NOT_ALLOWED {
                ApiError::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "invalid_request_error",
                    "method_not_allowed",
                    format!("{method} is not allowed on {endpoint}"),
                )
                .into_response()
            } else {
                r
            }
        }
    };
    st.metrics.request(endpoint, response.status().as_u16());
    response
}

fn has_key(req: &Request, key: &str) -> bool {
    let given =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    // Constant-time compare: the key is a secret.
    given
        .is_some_and(|g| g.len() == key.len() && g.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        format!(
            "no route {} {}: this server has POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health, GET /metrics",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    let state = st.state_name();
    let status = if state == "ready" { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json!({"status": state, "model": st.model_id}))).into_response()
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let text = st.metrics.render(&st.model_id, st.state_name());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": st.model_id, "object": "model", "created": st.created, "owned_by": "zmlx"}],
    }))
}

/// The loaded model, or 503 while it loads or once the server drains.
fn ready(st: &AppState) -> Result<&Loaded, ApiError> {
    if st.draining.load(Ordering::Acquire) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "shutting_down",
            "the server is shutting down and takes no new requests",
        ));
    }
    st.loaded.get().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "loading",
            "the model is still loading: retry when GET /health says ready",
        )
    })
}

fn body_or_error(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
                format!("the request body is over this server's limit of {MAX_BODY_BYTES} bytes"),
            )
        } else {
            ApiError::new(
                e.status(),
                "invalid_request_error",
                "invalid_body",
                format!("cannot read the request body: {e}"),
            )
        }
    })
}

fn check_model(st: &AppState, req: &GenerationRequest) -> Result<(), ApiError> {
    if let (true, Some(asked)) = (st.model_id_strict, &req.model) {
        if *asked != st.model_id {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "model `{asked}` is not served here: this server serves `{}` (GET /v1/models)",
                    st.model_id
                ),
                kind: "invalid_request_error",
                param: Some("model".into()),
                code: Some("model_not_found"),
            });
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat_completions(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match prepare(&st, body, Kind::Chat) {
        Ok((req, prompt)) => run_generation(st, req, prompt, Kind::Chat).await,
        Err(e) => e.into_response(),
    }
}

async fn completions(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    match prepare(&st, body, Kind::Completion) {
        Ok((req, prompt)) => run_generation(st, req, prompt, Kind::Completion).await,
        Err(e) => e.into_response(),
    }
}

/// Parses and checks a request and tokenizes its prompt (chat: through the template).
fn prepare(
    st: &AppState,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Result<(GenerationRequest, Vec<u32>), ApiError> {
    let loaded = ready(st)?;
    let body = body_or_error(body)?;
    let req = match kind {
        Kind::Chat => wire::parse_chat(&body, st.limits)?,
        Kind::Completion => wire::parse_completion(&body, st.limits)?,
    };
    check_model(st, &req)?;
    let prompt = match &req.prompt {
        PromptInput::Text(s) => loaded
            .tokenizer
            .encode(s)
            .map_err(|e| ApiError::invalid("prompt", format!("cannot tokenize `prompt`: {e:#}")))?,
        PromptInput::Ids(ids) => ids.clone(),
        PromptInput::Chat(messages) => {
            let template = loaded.template.as_ref().ok_or_else(|| {
                ApiError::bad_request(
                    "chat_template_missing",
                    format!(
                        "model `{}` has no chat template (no chat_template.jinja and no `chat_template` in \
                         tokenizer_config.json): add one to the checkpoint, or use /v1/completions with a raw prompt",
                        st.model_id
                    ),
                )
            })?;
            let text = template.render(messages, true).map_err(|e| {
                ApiError::invalid("messages", format!("the chat template failed on these messages: {e:#}"))
            })?;
            loaded
                .tokenizer
                .encode_chat(&text)
                .map_err(|e| ApiError::invalid("messages", format!("cannot tokenize the rendered chat: {e:#}")))?
        }
    };
    let field = if kind == Kind::Chat { "messages" } else { "prompt" };
    if prompt.is_empty() {
        return Err(ApiError::invalid(field, format!("`{field}` gives no tokens: send a non-empty prompt")));
    }
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= loaded.vocab_size) {
        return Err(ApiError::invalid(
            field,
            format!("token id {bad} is out of range: the model's vocabulary has {} ids", loaded.vocab_size),
        ));
    }
    if let Some(ctx) = loaded.context {
        if prompt.len() >= ctx {
            return Err(ApiError::invalid(
                field,
                format!(
                    "the prompt has {} tokens, over the model's context of {ctx} (max_position_embeddings): shorten it",
                    prompt.len()
                ),
            )
            .with_code("context_length_exceeded"));
        }
    }
    Ok((req, prompt))
}

/// Admits the request (429 when the batch and the queue are full), hands it to the engine and
/// answers from its events.
async fn run_generation(st: Arc<AppState>, req: GenerationRequest, prompt: Vec<u32>, kind: Kind) -> Response {
    let loaded = match ready(&st) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    let p = &req.params;
    // Past the context the cache has no room: generation ends there with finish_reason length.
    let max_tokens = match loaded.context {
        Some(ctx) => p.max_tokens.min(ctx - prompt.len()),
        None => p.max_tokens,
    };
    if !st.metrics.try_admit(st.capacity) {
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "rate_limit_exceeded",
            format!(
                "the server is full: {} requests running or queued (--max-concurrency + --max-queue); retry later",
                st.capacity
            ),
        )
        .into_response();
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let job = Job {
        request: SequenceRequest {
            prompt: prompt.clone(),
            max_tokens,
            sampler: SamplerConfig { temperature: p.temperature, top_p: p.top_p, seed: p.seed },
            ignore_eos: p.ignore_eos,
            eos_token_ids: loaded.eos_token_ids.clone(),
            logprobs: p.logprobs,
        },
        stop: p.stop.clone(),
        skip_special_tokens: p.skip_special_tokens,
        events: tx,
    };
    if st.commands.send(Command::Submit(job)).is_err() {
        st.metrics.sequence_ended(None);
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "engine_stopped",
            "the engine has stopped",
        )
        .into_response();
    }
    let n = st.next_request.fetch_add(1, Ordering::Relaxed);
    let out = Output {
        kind,
        id: format!("{}-{n}", if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }),
        created: wire::unix_now(),
        model: st.model_id.clone(),
        tokenizer: loaded.tokenizer.clone(),
        prompt,
        return_token_ids: p.return_token_ids,
        logprobs: p.logprobs.is_some(),
    };
    if p.stream {
        stream_response(out, rx, p.include_usage)
    } else {
        whole_response(out, rx).await
    }
}

/// How a request's events are written out.
struct Output {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    tokenizer: Arc<crate::tokenizer::TextTokenizer>,
    prompt: Vec<u32>,
    return_token_ids: bool,
    logprobs: bool,
}

impl Output {
    fn token_text(&self, id: u32) -> String {
        self.tokenizer.decode(&[id]).unwrap_or_default()
    }

    /// The `logprobs` object of a choice for these tokens (OpenAI's chat or legacy form).
    fn logprobs_json(&self, lps: &[TokenLogprobs], text_offset: &mut usize) -> Value {
        if !self.logprobs {
            return Value::Null;
        }
        match self.kind {
            Kind::Chat => {
                let entry = |id: u32, lp: f32| {
                    let t = self.token_text(id);
                    json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
                };
                let content: Vec<Value> = lps
                    .iter()
                    .map(|l| {
                        let mut e = entry(l.token, l.logprob);
                        e["top_logprobs"] = Value::Array(l.top.iter().map(|&(id, lp)| entry(id, lp)).collect());
                        e
                    })
                    .collect();
                json!({"content": content})
            }
            Kind::Completion => {
                let mut offsets = vec![];
                for l in lps {
                    offsets.push(*text_offset);
                    *text_offset += self.token_text(l.token).len();
                }
                json!({
                    "tokens": lps.iter().map(|l| self.token_text(l.token)).collect::<Vec<_>>(),
                    "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
                    "top_logprobs": lps.iter().map(|l| {
                        l.top.iter().map(|&(id, lp)| (self.token_text(id), json!(lp))).collect::<serde_json::Map<_, _>>()
                    }).collect::<Vec<_>>(),
                    "text_offset": offsets,
                })
            }
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model, "choices": choices})
    }

    /// One choice of a response (`chunk` false) or of a stream chunk.
    fn choice(&self, chunk: bool, text: &str, logprobs: Value, finish_reason: Option<&str>, first: bool) -> Value {
        match (self.kind, chunk) {
            (Kind::Chat, false) => json!({
                "index": 0, "message": {"role": "assistant", "content": text},
                "logprobs": logprobs, "finish_reason": finish_reason,
            }),
            (Kind::Chat, true) => {
                let delta = match (first, finish_reason) {
                    (true, _) => json!({"role": "assistant", "content": text}),
                    (false, Some(_)) if text.is_empty() => json!({}),
                    _ => json!({"content": text}),
                };
                json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})
            }
            (Kind::Completion, _) => {
                json!({"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason})
            }
        }
    }
}

fn event_error(ev: Option<Event>) -> ApiError {
    match ev {
        Some(Event::Rejected(m)) => ApiError::bad_request("invalid_request", m),
        Some(Event::Failed(m)) => ApiError::server(format!("generation failed: {m}")),
        _ => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "shutting_down",
            "the server stopped before the request finished",
        ),
    }
}

async fn whole_response(out: Output, mut rx: mpsc::UnboundedReceiver<Event>) -> Response {
    let (mut text, mut tokens, mut lps) = (String::new(), vec![], vec![]);
    loop {
        match rx.recv().await {
            Some(Event::Delta { text: t, tokens: ids, logprobs }) => {
                text.push_str(&t);
                tokens.extend(ids);
                lps.extend(logprobs);
            }
            Some(Event::Done { finish_reason, prompt_tokens, completion_tokens }) => {
                let mut offset = 0;
                let mut choice =
                    out.choice(false, &text, out.logprobs_json(&lps, &mut offset), Some(finish_reason), false);
                let mut body = out.envelope(false, json!([]));
                if out.return_token_ids {
                    choice["token_ids"] = json!(tokens);
                    body["prompt_token_ids"] = json!(out.prompt);
                }
                body["choices"] = json!([choice]);
                body["usage"] = wire::usage(prompt_tokens, completion_tokens);
                return Json(body).into_response();
            }
            other => return event_error(other).into_response(),
        }
    }
}

/// An SSE response: a task turns engine events into `data:` lines; the client going away drops
/// the body, which ends the task and drops the event receiver, which cancels the sequence.
fn stream_response(out: Output, mut rx: mpsc::UnboundedReceiver<Event>, include_usage: bool) -> Response {
    let (body_tx, body_rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let send = |v: &Value| Bytes::from(format!("data: {v}\n\n"));
        let with_usage = |mut v: Value| {
            if include_usage {
                v["usage"] = Value::Null;
            }
            v
        };
        let mut offset = 0;
        let mut first = true;
        if out.kind == Kind::Chat {
            let chunk = with_usage(out.envelope(true, json!([out.choice(true, "", Value::Null, None, true)])));
            if body_tx.send(send(&chunk)).await.is_err() {
                return;
            }
            first = false;
        }
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                _ = body_tx.closed() => return,
            };
            let chunk = match ev {
                Some(Event::Delta { text, tokens, logprobs }) => {
                    let mut choice = out.choice(true, &text, out.logprobs_json(&logprobs, &mut offset), None, first);
                    if out.return_token_ids {
                        choice["token_ids"] = json!(tokens);
                    }
                    first = false;
                    with_usage(out.envelope(true, json!([choice])))
                }
                Some(Event::Done { finish_reason, prompt_tokens, completion_tokens }) => {
                    let choice = out.choice(true, "", Value::Null, Some(finish_reason), first);
                    let mut last = with_usage(out.envelope(true, json!([choice])));
                    if out.return_token_ids {
                        last["prompt_token_ids"] = json!(out.prompt);
                    }
                    if body_tx.send(send(&last)).await.is_err() {
                        return;
                    }
                    if include_usage {
                        let mut u = out.envelope(true, json!([]));
                        u["usage"] = wire::usage(prompt_tokens, completion_tokens);
                        if body_tx.send(send(&u)).await.is_err() {
                            return;
                        }
                    }
                    let _ = body_tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                    return;
                }
                other => {
                    let _ = body_tx.send(send(&event_error(other).body())).await;
                    let _ = body_tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                    return;
                }
            };
            if body_tx.send(send(&chunk)).await.is_err() {
                return;
            }
        }
    });
    let stream =
        futures_util::stream::unfold(
            body_rx,
            |mut rx| async move { rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx)) },
        );
    let mut r = Response::new(Body::from_stream(stream));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
