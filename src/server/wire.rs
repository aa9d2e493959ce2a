//! The OpenAI wire format: request bodies parsed and checked field by field (every error names
//! the field, the value and the fix, as an OpenAI error object with the right HTTP status), and
//! the response / stream-chunk objects.
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

use crate::batch::MAX_TOP_LOGPROBS;

/// `max_tokens` when a request gives none (mlx_lm.server's default), cut to `--max-tokens-limit`.
pub const DEFAULT_MAX_TOKENS: usize = 512;
/// Most stop strings per request (OpenAI allows 4; llama-server more).
pub const MAX_STOP_STRINGS: usize = 16;

/// An error as OpenAI sends it: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 about one field of the request.
    pub fn invalid(param: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.into()),
            code: Some("invalid_value"),
        }
    }

    /// 400 about the request as a whole.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: Some(code),
        }
    }

    pub fn new(status: StatusCode, kind: &'static str, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), kind, param: None, code: Some(code) }
    }

    pub fn server(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "internal_error", message)
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// What to generate from: raw text or token ids (`/v1/completions`), or chat messages.
#[derive(Debug, Clone)]
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
    Chat(Vec<crate::chat_template::ChatMessage>),
}

/// The checked sampling and output fields shared by both generation endpoints.
#[derive(Debug, Clone)]
pub struct GenerationParams {
    pub max_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// None: no log-probabilities; Some(k): the chosen token's and k alternatives.
    pub logprobs: Option<usize>,
    /// Extension (vLLM's name): put the prompt's and the completion's token ids in the response.
    pub return_token_ids: bool,
    /// Extension (vLLM's name): keep generating through EOS.
    pub ignore_eos: bool,
    /// Extension (vLLM's name, default true): leave special tokens out of the text.
    pub skip_special_tokens: bool,
}

#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub model: Option<String>,
    pub prompt: PromptInput,
    pub params: GenerationParams,
}

/// Server-side limits a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_tokens: usize,
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Short rendering of a bad value for an error message.
fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

fn wrong_type(name: &str, want: &str, v: &Value) -> ApiError {
    ApiError::invalid(name, format!("`{name}` must be {want}, got {} {}", type_name(v), show(v)))
        .with_code("invalid_type")
}

/// A field, with JSON null treated as absent (clients send `"stop": null` etc.).
fn field<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    obj.get(name).filter(|v| !v.is_null())
}

fn opt_bool(obj: &Map<String, Value>, name: &str) -> Result<Option<bool>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(wrong_type(name, "true or false", v)),
    }
}

fn opt_int(obj: &Map<String, Value>, name: &str) -> Result<Option<i64>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(i) => Ok(Some(i)),
            None if n.as_u64().is_some() => Err(ApiError::invalid(name, format!("`{name}` {n} is too large"))),
            None => Err(wrong_type(name, "a whole number", &Value::Number(n.clone()))),
        },
        Some(v) => Err(wrong_type(name, "a whole number", v)),
    }
}

fn opt_number(obj: &Map<String, Value>, name: &str) -> Result<Option<f64>, ApiError> {
    match field(obj, name) {
        None => Ok(None),
        Some(Value::Number(n)) => Ok(n.as_f64()),
        Some(v) => Err(wrong_type(name, "a number", v)),
    }
}

/// The body as a JSON object.
pub fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request("invalid_json", format!("the request body is not valid JSON ({e}); send a JSON object"))
    })?;
    match v {
        Value::Object(m) => Ok(m),
        other => Err(ApiError::bad_request(
            "invalid_json",
            format!("the request body must be a JSON object, got {}", type_name(&other)),
        )),
    }
}

/// A `/v1/chat/completions` body.
pub fn parse_chat(body: &[u8], limits: Limits) -> Result<GenerationRequest, ApiError> {
    let obj = parse_object(body)?;
    let messages = parse_messages(&obj)?;
    let max_tokens = match opt_int(&obj, "max_completion_tokens")? {
        Some(n) => Some(("max_completion_tokens", n)),
        None => opt_int(&obj, "max_tokens")?.map(|n| ("max_tokens", n)),
    };
    let logprobs = match (opt_bool(&obj, "logprobs")?, opt_int(&obj, "top_logprobs")?) {
        (Some(true), k) => Some(top_count("top_logprobs", k.unwrap_or(0))?),
        (_, Some(k)) if k > 0 => {
            return Err(ApiError::invalid("top_logprobs", "`top_logprobs` needs `\"logprobs\": true`"));
        }
        _ => None,
    };
    let params = parse_params(&obj, limits, max_tokens, logprobs)?;
    Ok(GenerationRequest { model: parse_model(&obj)?, prompt: PromptInput::Chat(messages), params })
}

/// A `/v1/completions` body.
pub fn parse_completion(body: &[u8], limits: Limits) -> Result<GenerationRequest, ApiError> {
    let obj = parse_object(body)?;
    let prompt = match obj.get("prompt") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid("prompt", "`prompt` is missing: give a string or an array of token ids"))
        }
        Some(Value::String(s)) => PromptInput::Text(s.clone()),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            PromptInput::Text(a[0].as_str().unwrap_or("").into())
        }
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(|x| x.is_string()) => {
            return Err(ApiError::invalid(
                "prompt",
                format!("`prompt` has {} strings: this server takes one prompt per request", a.len()),
            ))
        }
        Some(Value::Array(a)) => {
            let ids = a
                .iter()
                .map(|x| x.as_u64().and_then(|i| u32::try_from(i).ok()))
                .collect::<Option<Vec<u32>>>()
                .ok_or_else(|| {
                    ApiError::invalid("prompt", "`prompt` as an array must hold token ids (whole numbers >= 0)")
                        .with_code("invalid_type")
                })?;
            PromptInput::Ids(ids)
        }
        Some(v) => return Err(wrong_type("prompt", "a string or an array of token ids", v)),
    };
    let logprobs = opt_int(&obj, "logprobs")?.map(|k| top_count("logprobs", k)).transpose()?;
    let max_tokens = opt_int(&obj, "max_tokens")?.map(|n| ("max_tokens", n));
    let params = parse_params(&obj, limits, max_tokens, logprobs)?;
    Ok(GenerationRequest { model: parse_model(&obj)?, prompt, params })
}

fn top_count(name: &str, k: i64) -> Result<usize, ApiError> {
    if !(0..=MAX_TOP_LOGPROBS as i64).contains(&k) {
        return Err(ApiError::invalid(name, format!("`{name}` {k} is out of range: use 0..={MAX_TOP_LOGPROBS}")));
    }
    Ok(k as usize)
}

fn parse_model(obj: &Map<String, Value>) -> Result<Option<String>, ApiError> {
    match field(obj, "model") {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(wrong_type("model", "a string", v)),
    }
}

fn parse_messages(obj: &Map<String, Value>) -> Result<Vec<crate::chat_template::ChatMessage>, ApiError> {
    let list = match obj.get("messages") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                "messages",
                "`messages` is missing: give an array of {\"role\", \"content\"} objects",
            ))
        }
        Some(Value::Array(a)) => a,
        Some(v) => return Err(wrong_type("messages", "an array of {\"role\", \"content\"} objects", v)),
    };
    if list.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` is empty: give at least one message"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let name = format!("messages[{i}]");
            let m = m.as_object().ok_or_else(|| wrong_type(&name, "an object with `role` and `content`", m))?;
            let role = match m.get("role") {
                Some(Value::String(r)) if !r.is_empty() => r.clone(),
                Some(v) => return Err(wrong_type(&format!("{name}.role"), "a non-empty string", v)),
                None => return Err(ApiError::invalid(&format!("{name}.role"), format!("`{name}.role` is missing"))),
            };
            let content = match m.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                // OpenAI's content parts: the text parts, joined (no images here).
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.iter().enumerate() {
                        match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            _ => {
                                return Err(ApiError::invalid(
                                    &format!("{name}.content[{j}]"),
                                    format!("`{name}.content[{j}]` must be {{\"type\": \"text\", \"text\": …}}: only text is supported"),
                                ))
                            }
                        }
                    }
                    text
                }
                Some(v) => return Err(wrong_type(&format!("{name}.content"), "a string or an array of text parts", v)),
            };
            Ok(crate::chat_template::ChatMessage { role, content })
        })
        .collect()
}

fn parse_params(
    obj: &Map<String, Value>,
    limits: Limits,
    max_tokens: Option<(&str, i64)>,
    logprobs: Option<usize>,
) -> Result<GenerationParams, ApiError> {
    if let Some(n) = opt_int(obj, "n")? {
        if n != 1 {
            return Err(ApiError::invalid(
                "n",
                format!("`n` {n} is not supported: this server returns one choice (n = 1)"),
            ));
        }
    }
    let max_tokens = match max_tokens {
        None => DEFAULT_MAX_TOKENS.min(limits.max_tokens),
        Some((name, n)) if n <= 0 => {
            return Err(ApiError::invalid(name, format!("`{name}` {n} is not allowed: use at least 1")));
        }
        Some((name, n)) if n as u64 > limits.max_tokens as u64 => {
            return Err(ApiError::invalid(
                name,
                format!("`{name}` {n} is over this server's limit {} (--max-tokens-limit)", limits.max_tokens),
            ));
        }
        Some((_, n)) => n as usize,
    };
    let temperature = opt_number(obj, "temperature")?.unwrap_or(0.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("`temperature` {temperature} is out of range: use 0 to 2 (0 = greedy)"),
        ));
    }
    let top_p = opt_number(obj, "top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid("top_p", format!("`top_p` {top_p} is out of range: use a number in (0, 1]")));
    }
    let seed = match opt_int(obj, "seed")? {
        Some(s) if s < 0 => return Err(ApiError::invalid("seed", format!("`seed` {s} is negative: use 0 or more"))),
        Some(s) => s as u64,
        // Unseeded sampling differs per request, as OpenAI's does.
        None => {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
        }
    };
    let stop = match field(obj, "stop") {
        None => vec![],
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str().map(str::to_owned).ok_or_else(|| wrong_type("stop", "a string or an array of strings", x))
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(v) => return Err(wrong_type("stop", "a string or an array of strings", v)),
    };
    if stop.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid(
            "stop",
            format!("`stop` has {} strings: use at most {MAX_STOP_STRINGS}", stop.len()),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "`stop` strings must not be empty"));
    }
    let stream = opt_bool(obj, "stream")?.unwrap_or(false);
    let include_usage = match field(obj, "stream_options") {
        None => false,
        Some(Value::Object(o)) => opt_bool(o, "include_usage")
            .map_err(|_| wrong_type("stream_options.include_usage", "true or false", &o["include_usage"]))?
            .unwrap_or(false),
        Some(v) => return Err(wrong_type("stream_options", "an object", v)),
    };
    Ok(GenerationParams {
        max_tokens,
        temperature: temperature as f32,
        top_p: top_p as f32,
        seed,
        stop,
        stream,
        include_usage,
        logprobs,
        return_token_ids: opt_bool(obj, "return_token_ids")?.unwrap_or(false),
        ignore_eos: opt_bool(obj, "ignore_eos")?.unwrap_or(false),
        skip_special_tokens: opt_bool(obj, "skip_special_tokens")?.unwrap_or(true),
    })
}

/// Seconds since the Unix epoch (OpenAI's `created`).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}
