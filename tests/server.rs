//! `zmlx serve` end to end: the built binary on a tiny synthesized checkpoint, spoken to over
//! loopback with hyper's HTTP/1.1 client. Every wait is bounded, so a hung server fails a test
//! instead of hanging it.
mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use common::{synth_into, synth_opts, zmlx_cmd};
use zmlx::config::Family;

const WAIT: Duration = Duration::from_secs(60);

/// The tiny qwen3_moe checkpoint (4-bit, with the synthesized chat template), made once.
fn checkpoint() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        synth_into(&dir, &synth_opts(Family::Qwen3Moe, Some(4), 11));
        dir
    })
}

/// A fresh copy of the tiny checkpoint, for a test to edit.
fn checkpoint_copy() -> PathBuf {
    let dir = tempfile::tempdir().unwrap().keep();
    for e in std::fs::read_dir(checkpoint()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    dir
}

/// A copy of the checkpoint with a 256-token context and no chat template.
fn strict_checkpoint() -> PathBuf {
    let dir = checkpoint_copy();
    let edit = |name: &str, f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let p = dir.join(name);
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        f(v.as_object_mut().unwrap());
        std::fs::write(&p, v.to_string()).unwrap();
    };
    edit("config.json", &|c| {
        c.insert("max_position_embeddings".into(), json!(256));
    });
    edit("tokenizer_config.json", &|c| {
        c.remove("chat_template");
    });
    let _ = std::fs::remove_file(dir.join("chat_template.jinja"));
    dir
}

struct Server {
    child: Child,
    url: String,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    /// Starts `zmlx serve --port 0` and waits for its URL line and for /health to say ready.
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut cmd = zmlx_cmd();
        cmd.arg("serve").arg("--model").arg(model).args(["--port", "0"]).args(extra);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn zmlx serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let _ = tx.send(line.unwrap_or_default());
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let log = stderr.clone();
        let mut err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                log.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let line =
            rx.recv_timeout(WAIT).unwrap_or_else(|_| panic!("no URL line from zmlx serve: {}", stderr.lock().unwrap()));
        let url = line.split_whitespace().find(|w| w.starts_with("http://")).expect("URL in the first line").to_owned();
        let server = Server { child, url, stderr };
        let deadline = Instant::now() + WAIT;
        loop {
            let (status, body) = server.get("/health");
            if status == 200 {
                assert_eq!(body["status"], "ready");
                break;
            }
            assert_eq!(status, 503, "health while loading: {body}");
            assert_eq!(body["status"], "loading");
            assert!(Instant::now() < deadline, "server not ready in time: {}", server.stderr.lock().unwrap());
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn get(&self, path: &str) -> (u16, Value) {
        json_reply(request(&self.url, "GET", path, &[], ""))
    }

    fn text(&self, path: &str) -> String {
        let mut r = request(&self.url, "GET", path, &[], "").expect("GET");
        let mut text = String::new();
        r.body.read_to_string(&mut text).unwrap();
        text
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, &body.to_string(), &[])
    }

    fn post_raw(&self, path: &str, body: &str, headers: &[(&str, &str)]) -> (u16, Value) {
        json_reply(request(&self.url, "POST", path, headers, body))
    }

    /// Starts a streamed request: its body, positioned after the headers.
    fn open_stream(&self, path: &str, body: &Value, headers: &[(&str, &str)]) -> Box<dyn BufRead + Send> {
        let r = request(&self.url, "POST", path, headers, &body.to_string()).expect("stream request");
        assert_eq!((r.status, r.content_type.as_str()), (200, "text/event-stream"));
        r.body
    }

    /// A streamed request: every `data:` payload until `[DONE]` (which must come).
    fn stream(&self, path: &str, body: &Value) -> Vec<Value> {
        let mut out = vec![];
        for line in self.open_stream(path, body, &[]).lines() {
            let line = line.expect("stream read");
            if line.is_empty() {
                continue;
            }
            let data = line.strip_prefix("data: ").unwrap_or_else(|| panic!("not an SSE data line: {line:?}"));
            if data == "[DONE]" {
                return out;
            }
            out.push(serde_json::from_str(data).expect("chunk JSON"));
        }
        panic!("stream ended without [DONE]: {out:?}");
    }

    /// One value of a /metrics line (`name` with its labels, as printed).
    fn metric(&self, name: &str) -> f64 {
        let text = self.text("/metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no metric {name} in:\n{text}"))
    }

    fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap()
    }

    /// SIGTERM, then the exit code (bounded wait).
    fn terminate(mut self) -> Option<i32> {
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            assert!(Instant::now() < deadline, "server did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request per connection through hyper's client connection API, driven by a
/// small tokio runtime that the reply owns: dropping the reply drops the connection (a test
/// leaves a stream mid-way that way), and every wait is bounded by `WAIT`.
struct Reply {
    status: u16,
    content_type: String,
    body: Box<dyn BufRead + Send>,
}

fn request(base: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> std::io::Result<Reply> {
    let addr = base.strip_prefix("http://").expect("http:// URL");
    let addr: std::net::SocketAddr = addr.parse().expect("host:port");
    let mut req = hyper::Request::builder().method(method).uri(path).header(hyper::header::HOST, addr.to_string());
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::from(body.to_owned()))).expect("a valid request");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let res = rt.block_on(bounded(async move {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(io_err)?;
        // Runs while the runtime runs, i.e. during the reads below; gone with the runtime.
        tokio::spawn(conn);
        sender.send_request(req).await.map_err(io_err)
    }))?;
    let status = res.status().as_u16();
    let content_type = res
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    let body = Body { rt, body: res.into_body(), buf: Bytes::new() };
    Ok(Reply { status, content_type, body: Box::new(BufReader::new(body)) })
}

fn io_err(e: hyper::Error) -> std::io::Error {
    std::io::Error::other(e)
}

/// `f`, or a `TimedOut` error after `WAIT`.
async fn bounded<T>(f: impl std::future::Future<Output = std::io::Result<T>>) -> std::io::Result<T> {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time")))
}

/// A response body read frame by frame, each frame awaited on the reply's runtime.
struct Body {
    rt: tokio::runtime::Runtime,
    body: hyper::body::Incoming,
    buf: Bytes,
}

impl Read for Body {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let Body { rt, body, buf } = self;
        while buf.is_empty() {
            match rt.block_on(bounded(async { body.frame().await.transpose().map_err(io_err) }))? {
                None => return Ok(0),
                Some(frame) => *buf = frame.into_data().unwrap_or_default(),
            }
        }
        let n = out.len().min(buf.len());
        out[..n].copy_from_slice(&buf.split_to(n));
        Ok(n)
    }
}

/// Status and JSON body of a whole reply.
fn json_reply(r: std::io::Result<Reply>) -> (u16, Value) {
    let mut r = r.expect("HTTP request");
    let mut text = String::new();
    r.body.read_to_string(&mut text).expect("reading the body");
    (r.status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("{}: body is not JSON: {text:?}", r.status)))
}

/// The shared server: default flags (safe preset), 8 sequences per batch.
fn server() -> &'static Server {
    static S: OnceLock<Server> = OnceLock::new();
    S.get_or_init(|| Server::start(checkpoint(), &["--max-concurrency", "8"]))
}

/// `zmlx generate --json` token ids for a raw prompt.
fn generate_ids(model: &Path, prompt: &str, max_tokens: usize) -> Vec<u64> {
    let out = zmlx_cmd()
        .arg("generate")
        .arg("--model")
        .arg(model)
        .args(["--prompt", prompt, "--max-tokens", &max_tokens.to_string(), "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "generate failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    ids(&v["token_ids"])
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array().unwrap_or_else(|| panic!("not an id array: {v}")).iter().map(|x| x.as_u64().unwrap()).collect()
}

fn completion(prompt: &str, max_tokens: usize) -> Value {
    json!({"prompt": prompt, "max_tokens": max_tokens, "return_token_ids": true})
}

const PROMPTS: [&str; 8] = [
    "Explain the key differences between TCP and UDP.",
    "Once upon a time, in a kitchen full of bread,",
    "The capital of France is",
    "def fibonacci(n):",
    "A long time ago in a galaxy far, far away, there was a small ship carrying three passengers",
    "Hi",
    "List three colors:",
    "Write a haiku about the sea and the wind and the salt on the rocks at dawn.",
];

#[test]
fn completions_match_generate_alone_and_eight_at_once() {
    let s = server();
    let reference: Vec<Vec<u64>> = PROMPTS[..2].iter().map(|p| generate_ids(checkpoint(), p, 12)).collect();
    let tok = tokenizers::Tokenizer::from_file(checkpoint().join("tokenizer.json")).unwrap();
    // Alone.
    let mut alone = vec![];
    for p in PROMPTS {
        let (status, v) = s.post("/v1/completions", &completion(p, 12));
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["object"], "text_completion");
        let c = &v["choices"][0];
        let toks = ids(&c["token_ids"]);
        assert_eq!(v["usage"]["completion_tokens"].as_u64(), Some(toks.len() as u64));
        assert_eq!(v["usage"]["prompt_tokens"].as_u64(), Some(ids(&v["prompt_token_ids"]).len() as u64));
        assert_eq!(
            v["usage"]["total_tokens"].as_u64(),
            Some(v["usage"]["prompt_tokens"].as_u64().unwrap() + toks.len() as u64)
        );
        let reason = c["finish_reason"].as_str().unwrap();
        assert!(reason == "length" && toks.len() == 12 || reason == "stop" && toks.len() < 12, "{v}");
        // The whole text, incl. the tail of a character the last token left incomplete.
        let t32: Vec<u32> = toks.iter().map(|&t| t as u32).collect();
        assert_eq!(c["text"], tok.decode(&t32, true).unwrap(), "prompt {p:?}");
        alone.push(toks);
    }
    assert_eq!(alone[..2], reference[..], "server tokens differ from zmlx generate --json");
    // Eight at once: the same tokens (batch invariance, CPU backend).
    let together: Vec<Vec<u64>> = std::thread::scope(|sc| {
        let hs: Vec<_> = PROMPTS
            .iter()
            .map(|p| {
                sc.spawn(move || {
                    let (status, v) = s.post("/v1/completions", &completion(p, 12));
                    assert_eq!(status, 200, "{v}");
                    ids(&v["choices"][0]["token_ids"])
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone, "tokens changed when 8 requests ran together");
    // A token-id prompt gives the same as its text.
    let (_, v) = s.post("/v1/completions", &completion(PROMPTS[0], 12));
    let prompt_ids = v["prompt_token_ids"].clone();
    let (status, w) =
        s.post("/v1/completions", &json!({"prompt": prompt_ids, "max_tokens": 12, "return_token_ids": true}));
    assert_eq!(status, 200, "{w}");
    assert_eq!(ids(&w["choices"][0]["token_ids"]), alone[0]);
    assert_eq!(w["choices"][0]["text"], v["choices"][0]["text"]);
}

#[test]
fn streaming_equals_non_streaming_with_usage() {
    let s = server();
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let mut body = if path == "/v1/completions" {
            completion(PROMPTS[1], 10)
        } else {
            json!({"messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 10, "return_token_ids": true})
        };
        let (status, whole) = s.post(path, &body);
        assert_eq!(status, 200, "{whole}");
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
        let chunks = s.stream(path, &body);
        let (mut text, mut toks) = (String::new(), vec![]);
        let mut finish = None;
        for c in &chunks[..chunks.len() - 1] {
            let ch = &c["choices"][0];
            let piece = if path == "/v1/completions" { &ch["text"] } else { &ch["delta"]["content"] };
            text.push_str(piece.as_str().unwrap_or(""));
            if let Some(t) = ch.get("token_ids") {
                toks.extend(ids(t));
            }
            if let Some(r) = ch["finish_reason"].as_str() {
                finish = Some(r.to_owned());
            }
        }
        let usage = &chunks.last().unwrap()["usage"];
        assert_eq!(chunks.last().unwrap()["choices"], json!([]));
        assert_eq!(usage, &whole["usage"], "{path}");
        let wc = &whole["choices"][0];
        assert_eq!(toks, ids(&wc["token_ids"]), "{path}");
        assert_eq!(finish.as_deref(), wc["finish_reason"].as_str(), "{path}");
        let whole_text = if path == "/v1/completions" { &wc["text"] } else { &wc["message"]["content"] };
        assert_eq!(text, whole_text.as_str().unwrap(), "{path}");
        if path == "/v1/chat/completions" {
            assert_eq!(chunks[0]["object"], "chat.completion.chunk");
            assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
            assert_eq!(whole["object"], "chat.completion");
            assert_eq!(wc["message"]["role"], "assistant");
        }
    }
}

#[test]
fn chat_renders_the_template_and_equals_completion_on_its_ids() {
    let s = server();
    let (status, v) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
                "max_completion_tokens": 8, "return_token_ids": true}),
    );
    assert_eq!(status, 200, "{v}");
    let prompt = v["prompt_token_ids"].clone();
    assert!(prompt.as_array().unwrap().len() > 4);
    let (_, w) = s.post("/v1/completions", &json!({"prompt": prompt, "max_tokens": 8, "return_token_ids": true}));
    assert_eq!(ids(&v["choices"][0]["token_ids"]), ids(&w["choices"][0]["token_ids"]));
    // Content parts are joined text.
    let (status, p) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                             {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}],
                "max_tokens": 8, "return_token_ids": true}),
    );
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["prompt_token_ids"], v["prompt_token_ids"]);
}

#[test]
fn stop_strings_cut_the_text_and_end_the_sequence() {
    let s = server();
    let (_, free) = s.post("/v1/completions", &json!({"prompt": PROMPTS[0], "max_tokens": 24, "ignore_eos": true}));
    let text = free["choices"][0]["text"].as_str().unwrap().to_owned();
    // A stop string from the middle of the free-running text (three characters starting at a
    // char boundary past the first few characters).
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    assert!(chars.len() > 8, "text too short to cut: {text:?}");
    let start = chars[chars.len() / 2].0;
    let end = chars.get(chars.len() / 2 + 3).map_or(text.len(), |c| c.0);
    let stop = &text[start..end];
    let want = &text[..text.find(stop).unwrap()];
    for stream in [false, true] {
        let body = json!({"prompt": PROMPTS[0], "max_tokens": 24, "ignore_eos": true, "stop": [ "@@never@@", stop ], "stream": stream,
                          "stream_options": {"include_usage": true}});
        let (got, reason, used) = if stream {
            let chunks = s.stream("/v1/completions", &body);
            let t: String = chunks.iter().filter_map(|c| c["choices"][0]["text"].as_str()).collect();
            let r = chunks.iter().find_map(|c| c["choices"][0]["finish_reason"].as_str()).unwrap().to_owned();
            (t, r, chunks.last().unwrap()["usage"]["completion_tokens"].as_u64().unwrap())
        } else {
            let (status, v) = s.post("/v1/completions", &body);
            assert_eq!(status, 200, "{v}");
            let c = &v["choices"][0];
            (
                c["text"].as_str().unwrap().to_owned(),
                c["finish_reason"].as_str().unwrap().to_owned(),
                v["usage"]["completion_tokens"].as_u64().unwrap(),
            )
        };
        assert_eq!(got, want, "stream {stream}: stop {stop:?} in {text:?}");
        assert_eq!(reason, "stop");
        assert!(used < 24, "the sequence ran on after its stop string ({used} tokens)");
    }
}

#[test]
fn logprobs_are_reported_and_consistent() {
    let s = server();
    let (status, v) = s.post(
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "logprobs": true, "top_logprobs": 3, "ignore_eos": true}),
    );
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 5);
    for e in content {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3);
        let lp = e["logprob"].as_f64().unwrap();
        assert!(lp <= 0.0);
        // Greedy: the chosen token is the most likely one.
        assert_eq!(top[0]["logprob"].as_f64().unwrap(), lp, "{e}");
        assert!(top.windows(2).all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64()));
    }
    let (status, v) =
        s.post("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 4, "logprobs": 2, "ignore_eos": true}));
    assert_eq!(status, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 4);
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 4);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    assert_eq!(lp["text_offset"][0], 0);
}

#[test]
fn models_health_metrics_and_sampling() {
    let s = server();
    let (status, v) = s.get("/v1/models");
    assert_eq!(status, 200);
    assert_eq!(v["object"], "list");
    let id = v["data"][0]["id"].as_str().unwrap().to_owned();
    let (status, h) = s.get("/health");
    assert_eq!((status, h["model"].as_str()), (200, Some(id.as_str())));
    // Any model name is accepted without --model-id.
    let (status, _) = s.post("/v1/completions", &json!({"model": "whatever", "prompt": "Hi", "max_tokens": 2}));
    assert_eq!(status, 200);
    // Seeded sampling repeats itself.
    let body = json!({"prompt": "Hi", "max_tokens": 8, "temperature": 0.9, "top_p": 0.9, "seed": 5, "ignore_eos": true, "return_token_ids": true});
    let (_, a) = s.post("/v1/completions", &body);
    let (_, b) = s.post("/v1/completions", &body);
    assert_eq!(a["choices"][0]["token_ids"], b["choices"][0]["token_ids"]);
    let m = s.text("/metrics");
    for name in [
        "zmlx_requests_total{endpoint=\"/v1/completions\",status=\"200\"}",
        "zmlx_generated_tokens_total",
        "zmlx_time_to_first_token_seconds_bucket",
        "zmlx_prompt_tokens_per_second_count",
        "zmlx_decode_tokens_per_second_sum",
        "zmlx_queue_depth",
        "zmlx_active_sequences",
        "zmlx_peak_memory_bytes",
        "zmlx_pattern_fused_calls_total{pattern=",
    ] {
        assert!(m.contains(name), "/metrics lacks {name}:\n{m}");
    }
    assert!(s.metric("zmlx_generated_tokens_total") >= 2.0);
}

/// Every bad request gets an OpenAI error with the right status, naming the culprit; the server
/// keeps serving. Also: API key, --model-id, context, no chat template, 429, disconnect.
#[test]
fn bad_requests_are_openai_errors_and_the_server_keeps_serving() {
    let dir = strict_checkpoint();
    let s = Server::start(
        &dir,
        &[
            "--api-key",
            "sekret",
            "--model-id",
            "tiny",
            "--max-concurrency",
            "1",
            "--max-queue",
            "1",
            "--max-tokens-limit",
            "300",
        ],
    );
    let auth = [("Authorization", "Bearer sekret")];
    let post = |path: &str, body: &str| s.post_raw(path, body, &auth);
    let ok = json!({"model": "tiny", "prompt": "Hi", "max_tokens": 2}).to_string();
    let long_prompt = "word ".repeat(400);
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/completions", "{not json".into(), 400, "not valid JSON"),
        ("/v1/completions", "[1, 2]".into(), 400, "JSON object"),
        ("/v1/completions", r#"{"max_tokens": 2}"#.into(), 400, "prompt"),
        ("/v1/completions", r#"{"prompt": 5}"#.into(), 400, "prompt"),
        ("/v1/completions", r#"{"prompt": ""}"#.into(), 400, "no tokens"),
        ("/v1/completions", r#"{"prompt": [1, -2]}"#.into(), 400, "token ids"),
        ("/v1/completions", r#"{"prompt": [100000]}"#.into(), 400, "out of range"),
        ("/v1/completions", r#"{"prompt": "Hi", "max_tokens": 0}"#.into(), 400, "max_tokens"),
        ("/v1/completions", r#"{"prompt": "Hi", "max_tokens": -3}"#.into(), 400, "max_tokens"),
        ("/v1/completions", r#"{"prompt": "Hi", "max_tokens": 301}"#.into(), 400, "--max-tokens-limit"),
        ("/v1/completions", r#"{"prompt": "Hi", "max_tokens": "ten"}"#.into(), 400, "max_tokens"),
        ("/v1/completions", r#"{"prompt": "Hi", "temperature": 2.5}"#.into(), 400, "temperature"),
        ("/v1/completions", r#"{"prompt": "Hi", "temperature": "hot"}"#.into(), 400, "temperature"),
        ("/v1/completions", r#"{"prompt": "Hi", "top_p": 0}"#.into(), 400, "top_p"),
        ("/v1/completions", r#"{"prompt": "Hi", "top_p": 1.5}"#.into(), 400, "top_p"),
        ("/v1/completions", r#"{"prompt": "Hi", "n": 2}"#.into(), 400, "`n`"),
        ("/v1/completions", r#"{"prompt": "Hi", "stop": 7}"#.into(), 400, "stop"),
        ("/v1/completions", r#"{"prompt": "Hi", "stream": "yes"}"#.into(), 400, "stream"),
        ("/v1/completions", r#"{"prompt": "Hi", "seed": -1}"#.into(), 400, "seed"),
        ("/v1/completions", r#"{"prompt": "Hi", "logprobs": 50}"#.into(), 400, "logprobs"),
        ("/v1/completions", r#"{"prompt": "Hi", "model": "gpt-4"}"#.into(), 404, "gpt-4"),
        ("/v1/completions", json!({"prompt": long_prompt}).to_string(), 400, "context"),
        ("/v1/chat/completions", r#"{"max_tokens": 2}"#.into(), 400, "messages"),
        ("/v1/chat/completions", r#"{"messages": []}"#.into(), 400, "empty"),
        ("/v1/chat/completions", r#"{"messages": "hi"}"#.into(), 400, "messages"),
        ("/v1/chat/completions", r#"{"messages": [{"content": "hi"}]}"#.into(), 400, "role"),
        ("/v1/chat/completions", r#"{"messages": [{"role": "user", "content": 5}]}"#.into(), 400, "content"),
        (
            "/v1/chat/completions",
            r#"{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}"#.into(),
            400,
            "logprobs",
        ),
        ("/v1/chat/completions", r#"{"messages": [{"role": "user", "content": "hi"}]}"#.into(), 400, "chat template"),
        ("/v1/nope", "{}".into(), 404, "no route"),
    ];
    for (path, body, status, needle) in &cases {
        let (got, v) = post(path, body);
        assert_eq!(got, *status, "{path} {body}: {v}");
        let e = &v["error"];
        let msg = e["message"].as_str().unwrap_or_else(|| panic!("no error.message: {v}"));
        assert!(msg.contains(needle), "{path} {body}: {msg:?} lacks {needle:?}");
        assert!(e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some(), "{v}");
        // Still serving.
        let (st, v) = post("/v1/completions", &ok);
        assert_eq!(st, 200, "after {body}: {v}");
    }
    // Body over the size limit.
    let huge = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(5 << 20));
    assert_eq!(post("/v1/completions", &huge).0, 413);
    // API key.
    for headers in [&[][..], &[("Authorization", "Bearer wrong")][..]] {
        let (st, v) = s.post_raw("/v1/completions", &ok, headers);
        assert_eq!(st, 401, "{v}");
        assert_eq!(v["error"]["type"], "authentication_error");
    }
    assert_eq!(s.get("/health").0, 200, "health needs no key");
    // Wrong method.
    let (st, v) = json_reply(request(&s.url, "GET", "/v1/completions", &auth, ""));
    assert_eq!(st, 405, "{v}");

    // Queue full → 429, and a client that disconnects mid-stream frees its sequence.
    let long = json!({"prompt": "Hi", "max_tokens": 250, "ignore_eos": true, "stream": true});
    let mut reader = s.open_stream("/v1/completions", &long, &auth);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("data: {"), "{line:?}");
    let queued = std::thread::scope(|sc| {
        // One more fits the queue (capacity 2); the third is refused.
        let waiting = sc.spawn(|| post("/v1/completions", &ok));
        let deadline = Instant::now() + WAIT;
        while s.metric("zmlx_requests_in_flight") < 2.0 {
            assert!(Instant::now() < deadline, "second request never admitted");
            std::thread::sleep(Duration::from_millis(10));
        }
        let (st, v) = post("/v1/completions", &ok);
        assert_eq!(st, 429, "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("--max-queue"));
        drop(reader);
        waiting.join().unwrap()
    });
    assert_eq!(queued.0, 200, "the queued request must run once the stream's client left: {}", queued.1);
    let deadline = Instant::now() + WAIT;
    while s.metric("zmlx_active_sequences") != 0.0 || s.metric("zmlx_requests_in_flight") != 0.0 {
        assert!(Instant::now() < deadline, "the disconnected sequence was never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.metric("zmlx_cancelled_sequences_total"), 1.0);
    assert!(
        s.metric("zmlx_generated_tokens_total") < 250.0 + 2.0 * cases.len() as f64 + 10.0,
        "the cancelled sequence ran to its end"
    );
    assert!(s.metric("zmlx_requests_total{endpoint=\"/v1/completions\",status=\"400\"}") >= 20.0);
    assert_eq!(s.terminate(), Some(0));
}

#[test]
fn sigterm_drains_the_request_in_flight_and_exits_0() {
    let s = Server::start(checkpoint(), &[]);
    let url = s.url.clone();
    let body = json!({"prompt": "Hi", "max_tokens": 40, "ignore_eos": true, "stream": true});
    let mut reader = s.open_stream("/v1/completions", &body, &[]);
    let mut first = String::new();
    reader.read_line(&mut first).unwrap();
    assert!(first.starts_with("data: {"), "{first:?}");
    let pid = s.pid();
    let code = std::thread::scope(|sc| {
        let waiter = sc.spawn(move || s.terminate());
        let mut rest = String::new();
        reader.read_to_string(&mut rest).unwrap();
        assert!(rest.trim_end().ends_with("data: [DONE]"), "the drained stream did not complete: {rest}");
        let texts: Vec<Value> = rest
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect();
        assert_eq!(texts.last().unwrap()["choices"][0]["finish_reason"], "length");
        waiter.join().unwrap()
    });
    assert_eq!(code, Some(0), "exit code after SIGTERM (pid {pid})");
    assert!(request(&url, "GET", "/health", &[], "").is_err(), "still accepting after shutdown");
}

/// 32 clients × 4 requests, mixed prompts, lengths, stream and non-stream: all complete and
/// well-formed, greedy tokens equal to the sequential runs, none lost, RSS flat across rounds.
#[test]
fn load_test_32_clients_greedy_results_equal_sequential() {
    let s = Server::start(checkpoint(), &["--max-concurrency", "8", "--max-queue", "64"]);
    let job = |i: usize| (PROMPTS[i % PROMPTS.len()], 2 + (i * 7) % 11, i % 2 == 0);
    // Reference: every (prompt, max_tokens) alone, one request at a time.
    let mut reference = std::collections::HashMap::new();
    for i in 0..128 {
        let (p, n, _) = job(i);
        reference.entry((p, n)).or_insert_with(|| {
            let (status, v) = s.post("/v1/completions", &completion(p, n));
            assert_eq!(status, 200, "{v}");
            ids(&v["choices"][0]["token_ids"])
        });
    }
    let mut rss = vec![];
    for round in 0..2 {
        let done = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|sc| {
            for client in 0..32 {
                let (s, reference, done) = (&s, &reference, &done);
                sc.spawn(move || {
                    for k in 0..4 {
                        let i = client * 4 + k + round;
                        let (p, n, stream) = job(i);
                        let mut body = completion(p, n);
                        let toks = if stream {
                            body["stream"] = json!(true);
                            let chunks = s.stream("/v1/completions", &body);
                            assert!(chunks.iter().any(|c| c["choices"][0]["finish_reason"].is_string()));
                            chunks
                                .iter()
                                .filter_map(|c| c["choices"][0].get("token_ids"))
                                .flat_map(ids)
                                .collect::<Vec<_>>()
                        } else {
                            let (status, v) = s.post("/v1/completions", &body);
                            assert_eq!(status, 200, "{v}");
                            assert_eq!(
                                v["usage"]["completion_tokens"].as_u64(),
                                Some(ids(&v["choices"][0]["token_ids"]).len() as u64)
                            );
                            ids(&v["choices"][0]["token_ids"])
                        };
                        assert_eq!(
                            &toks,
                            &reference[&(p, n)],
                            "client {client} request {k}: tokens differ from the sequential run"
                        );
                        done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
        });
        assert_eq!(done.into_inner(), 128, "requests lost");
        rss.push(s.rss_kib());
    }
    // Every request is accounted as ended before its client hears the end; the engine's gauges
    // are updated after its step, so they may lag the last answer by a step.
    assert_eq!(s.metric("zmlx_requests_in_flight"), 0.0);
    let deadline = Instant::now() + WAIT;
    while s.metric("zmlx_active_sequences") != 0.0 {
        assert!(Instant::now() < deadline, "sequences still active after every request ended");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(s.metric("zmlx_max_batch_seen") >= 4.0, "the load never batched: the test proves nothing");
    // After the first round the allocator's caches are warm: the second must not grow much.
    assert!(rss[1] <= rss[0] + rss[0] / 10 + 16 * 1024, "RSS grew across rounds: {rss:?} KiB");
    assert_eq!(s.terminate(), Some(0));
}

#[test]
fn openai_python_client_chat_completion_streaming() {
    let python = common::oracle_python();
    let s = server();
    let reference = generate_ids(checkpoint(), PROMPTS[2], 10);
    let script = common::repo_root().join("tests/server/openai_client.py");
    let out = std::process::Command::new(python)
        .arg(&script)
        .args(["--base-url", &format!("{}/v1", s.url), "--prompt", PROMPTS[2], "--max-tokens", "10"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openai client script failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("script JSON");
    assert_eq!(ids(&v["completion_token_ids"]), reference, "openai client completion vs zmlx generate");
    assert_eq!(ids(&v["stream_token_ids"]), reference, "openai client streamed completion vs zmlx generate");
    assert_eq!(v["stream_text"], v["completion_text"]);
    assert_eq!(ids(&v["chat_token_ids"]), ids(&v["chat_stream_token_ids"]));
    assert_eq!(v["chat_text"], v["chat_stream_text"]);
    assert!(v["chat_usage_completion_tokens"].as_u64().unwrap() > 0);
}

#[test]
fn logprobs_are_the_same_alone_and_batched() {
    let s = server();
    let body =
        |p: &str| json!({"prompt": p, "max_tokens": 6, "logprobs": 3, "ignore_eos": true, "return_token_ids": true});
    let alone: Vec<Value> = PROMPTS
        .iter()
        .map(|p| {
            let (status, v) = s.post("/v1/completions", &body(p));
            assert_eq!(status, 200, "{v}");
            v["choices"][0].clone()
        })
        .collect();
    let together: Vec<Value> = std::thread::scope(|sc| {
        let hs: Vec<_> = PROMPTS
            .iter()
            .map(|p| {
                sc.spawn(move || {
                    let (status, v) = s.post("/v1/completions", &body(p));
                    assert_eq!(status, 200, "{v}");
                    v["choices"][0].clone()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a["token_ids"], b["token_ids"], "prompt {i}: tokens changed in the batch");
        // Bitwise: the same per-row arithmetic, so the same f32 log-probabilities and alternatives.
        assert_eq!(a["logprobs"], b["logprobs"], "prompt {i}: log-probabilities changed in the batch");
        assert_eq!(a["logprobs"]["token_logprobs"].as_array().unwrap().len(), 6);
    }
}

/// A copy of the checkpoint whose tokenizer declares `id` (a plain vocabulary token) special.
fn checkpoint_with_special(id: u32) -> PathBuf {
    let dir = checkpoint_copy();
    let p = dir.join("tokenizer.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    let content =
        v["model"]["vocab"].as_object().unwrap().iter().find(|(_, i)| i.as_u64() == Some(id as u64)).unwrap().0.clone();
    v["added_tokens"].as_array_mut().unwrap().push(json!({
        "id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": true
    }));
    std::fs::write(&p, v.to_string()).unwrap();
    dir
}

#[test]
fn skip_special_tokens_false_writes_them_as_text() {
    // Make the first token of a greedy completion special, so its text is skipped by default.
    let prompt_ids = {
        let (_, v) = server().post("/v1/completions", &completion(PROMPTS[0], 1));
        v["prompt_token_ids"].clone()
    };
    let (_, v) = server().post(
        "/v1/completions",
        &json!({"prompt": prompt_ids, "max_tokens": 12, "ignore_eos": true, "return_token_ids": true}),
    );
    let first = ids(&v["choices"][0]["token_ids"])[0] as u32;
    let dir = checkpoint_with_special(first);
    let s = Server::start(&dir, &[]);
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let mut body = json!({"prompt": prompt_ids, "max_tokens": 12, "ignore_eos": true, "return_token_ids": true});
    let (_, skipped) = s.post("/v1/completions", &body);
    body["skip_special_tokens"] = json!(false);
    let (status, kept) = s.post("/v1/completions", &body);
    assert_eq!(status, 200, "{kept}");
    let toks: Vec<u32> = ids(&kept["choices"][0]["token_ids"]).iter().map(|&t| t as u32).collect();
    assert_eq!(toks[0], first);
    assert_eq!(ids(&skipped["choices"][0]["token_ids"]), ids(&kept["choices"][0]["token_ids"]));
    assert_eq!(kept["choices"][0]["text"], tok.decode(&toks, false).unwrap());
    assert_eq!(skipped["choices"][0]["text"], tok.decode(&toks, true).unwrap());
    assert_ne!(kept["choices"][0]["text"], skipped["choices"][0]["text"], "the special token's text must differ");
    // Streamed, the same texts.
    for (skip, whole) in [(true, &skipped), (false, &kept)] {
        body["skip_special_tokens"] = json!(skip);
        body["stream"] = json!(true);
        let text: String = s
            .stream("/v1/completions", &body)
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(text, whole["choices"][0]["text"].as_str().unwrap(), "streamed, skip_special_tokens={skip}");
    }
    let (status, v) = s.post("/v1/completions", &json!({"prompt": "Hi", "skip_special_tokens": 1}));
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "skip_special_tokens");
    assert_eq!(s.terminate(), Some(0));
}

/// A client that leaves a non-streamed request before its answer frees the sequence too (the
/// handler is dropped with the connection, which drops the engine's event channel).
#[test]
fn non_streamed_request_is_cancelled_when_its_client_leaves() {
    use std::io::Write;
    let s = Server::start(checkpoint(), &["--max-concurrency", "2"]);
    let addr = s.url.strip_prefix("http://").unwrap().to_owned();
    let body = json!({"prompt": "Hi", "max_tokens": 4000, "ignore_eos": true}).to_string();
    let mut conn = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        conn,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let deadline = Instant::now() + WAIT;
    while s.metric("zmlx_active_sequences") < 1.0 {
        assert!(Instant::now() < deadline, "the request never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(conn);
    while s.metric("zmlx_active_sequences") != 0.0 || s.metric("zmlx_requests_in_flight") != 0.0 {
        assert!(Instant::now() < deadline, "the abandoned non-streamed sequence was never freed");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(s.metric("zmlx_cancelled_sequences_total"), 1.0);
    assert!(s.metric("zmlx_generated_tokens_total") < 4000.0, "the abandoned sequence ran to its end");
    // The server still answers.
    let (status, v) = s.post("/v1/completions", &completion("Hi", 2));
    assert_eq!(status, 200, "{v}");
    assert_eq!(s.terminate(), Some(0));
}

/// `zmlx serve --expert-cache-experts k`: every expert read from the files into a pool of k
/// per layer; 8 concurrent requests get `zmlx generate`'s tokens (resident) and /metrics shows
/// the cache's counters.
#[test]
fn expert_cache_serves_the_resident_tokens_and_reports_metrics() {
    let s = Server::start(checkpoint(), &["--max-concurrency", "4", "--expert-cache-experts", "4"]);
    let want: Vec<Vec<u64>> = PROMPTS.iter().map(|p| generate_ids(checkpoint(), p, 10)).collect();
    let replies: Vec<(u16, Value)> = std::thread::scope(|sc| {
        let hs: Vec<_> = PROMPTS.iter().map(|p| sc.spawn(|| s.post("/v1/completions", &completion(p, 10)))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, ((status, v), w)) in replies.iter().zip(&want).enumerate() {
        assert_eq!(*status, 200, "{v}");
        assert_eq!(&ids(&v["choices"][0]["token_ids"]), w, "prompt {i}: offloaded server differs from generate");
    }
    assert!(s.metric("zmlx_expert_cache_misses_total") > 0.0);
    assert!(s.metric("zmlx_expert_cache_hits_total") > 0.0);
    assert!(s.metric("zmlx_expert_cache_read_bytes_total") > 0.0);
    assert_eq!(s.metric("zmlx_expert_cache_slots_per_layer"), 4.0);
    let r = s.metric("zmlx_expert_cache_hit_ratio");
    assert!((0.0..=1.0).contains(&r));
}
