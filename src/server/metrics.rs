//! Server counters and their Prometheus text exposition (format 0.0.4), written by hand: a few
//! counters, gauges and fixed-bucket histograms do not need a metrics framework.
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::batch::SequenceStats;

struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), plus +Inf.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: vec![0; bounds.len() + 1], sum: 0.0, count: 0 }
    }

    fn observe(&mut self, x: f64) {
        if !x.is_finite() {
            return;
        }
        let i = self.bounds.iter().position(|&b| x <= b).unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += x;
        self.count += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

const SECONDS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const RATES: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0];

struct Histograms {
    ttft: Histogram,
    prompt_tps: Histogram,
    decode_tps: Histogram,
}

pub struct Metrics {
    /// (endpoint, HTTP status) → responses.
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    pub tokens_generated: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Sequences cancelled because their client went away.
    pub cancelled: AtomicU64,
    /// Requests admitted to the engine and not finished (running + queued + in transit): the
    /// admission count the 429 limit is checked against.
    in_flight: AtomicUsize,
    queue_depth: AtomicUsize,
    active_sequences: AtomicUsize,
    pub peak_memory_bytes: AtomicU64,
    /// With `--expert-cache*`: the expert cache's counters (set once the model is loaded).
    pub expert_cache: std::sync::OnceLock<crate::offload::LiveStats>,
    /// Most sequences decoded in one step so far.
    pub max_batch_seen: AtomicUsize,
    hist: Mutex<Histograms>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            tokens_generated: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            queue_depth: AtomicUsize::new(0),
            active_sequences: AtomicUsize::new(0),
            peak_memory_bytes: AtomicU64::new(0),
            expert_cache: std::sync::OnceLock::new(),
            max_batch_seen: AtomicUsize::new(0),
            hist: Mutex::new(Histograms {
                ttft: Histogram::new(SECONDS),
                prompt_tps: Histogram::new(RATES),
                decode_tps: Histogram::new(RATES),
            }),
        }
    }
}

impl Metrics {
    pub fn request(&self, endpoint: &str, status: u16) {
        let mut m = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((endpoint.to_owned(), status)).or_default() += 1;
    }

    /// Admits one request if fewer than `capacity` are in flight.
    pub fn try_admit(&self, capacity: usize) -> bool {
        self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < capacity).then_some(n + 1)).is_ok()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// A request admitted by `try_admit` is over (finished, stopped, cancelled or refused);
    /// `stats` when the engine ran it.
    pub fn sequence_ended(&self, stats: Option<&SequenceStats>) {
        let _ = self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| Some(n.saturating_sub(1)));
        let Some(s) = stats else { return };
        self.prompt_tokens.fetch_add(s.prompt_tokens as u64, Ordering::Relaxed);
        if s.generation_tokens == 0 && s.first_token_seconds == 0.0 {
            return;
        }
        let mut h = self.hist.lock().unwrap_or_else(|p| p.into_inner());
        h.ttft.observe(s.first_token_seconds);
        if s.first_token_seconds > 0.0 {
            h.prompt_tps.observe(s.prompt_tokens as f64 / s.first_token_seconds);
        }
        if s.generation_tps > 0.0 {
            h.decode_tps.observe(s.generation_tps);
        }
    }

    pub fn set_engine_state(&self, queued: usize, running: usize) {
        self.queue_depth.store(queued, Ordering::Relaxed);
        self.active_sequences.store(running, Ordering::Relaxed);
    }

    /// The exposition text. `state`: the server state (loading / ready / draining).
    pub fn render(&self, model_id: &str, state: &str) -> String {
        let mut out = String::new();
        let model = escape(model_id);
        let _ = writeln!(out, "# HELP zmlx_info The served model and server state.\n# TYPE zmlx_info gauge");
        let _ = writeln!(out, "zmlx_info{{model=\"{model}\",state=\"{state}\"}} 1");
        let _ = writeln!(
            out,
            "# HELP zmlx_requests_total HTTP responses by endpoint and status.\n# TYPE zmlx_requests_total counter"
        );
        for ((ep, status), n) in self.requests.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let _ = writeln!(out, "zmlx_requests_total{{endpoint=\"{}\",status=\"{status}\"}} {n}", escape(ep));
        }
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        counter(
            &mut out,
            "zmlx_generated_tokens_total",
            "Tokens generated.",
            self.tokens_generated.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "zmlx_prompt_tokens_total",
            "Prompt tokens of finished sequences.",
            self.prompt_tokens.load(Ordering::Relaxed),
        );
        counter(
            &mut out,
            "zmlx_cancelled_sequences_total",
            "Sequences cancelled because the client went away.",
            self.cancelled.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "zmlx_queue_depth",
            "Sequences waiting for or in prefill.",
            self.queue_depth.load(Ordering::Relaxed) as u64,
        );
        gauge(
            &mut out,
            "zmlx_active_sequences",
            "Sequences in the running decode batch.",
            self.active_sequences.load(Ordering::Relaxed) as u64,
        );
        gauge(
            &mut out,
            "zmlx_requests_in_flight",
            "Generation requests admitted and not finished.",
            self.in_flight() as u64,
        );
        gauge(
            &mut out,
            "zmlx_max_batch_seen",
            "Most sequences decoded together in one step.",
            self.max_batch_seen.load(Ordering::Relaxed) as u64,
        );
        gauge(
            &mut out,
            "zmlx_peak_memory_bytes",
            "MLX allocator peak memory.",
            self.peak_memory_bytes.load(Ordering::Relaxed),
        );
        gauge(&mut out, "zmlx_resident_memory_bytes", "Process resident set size.", current_rss_bytes());
        if let Some(c) = self.expert_cache.get().map(crate::offload::LiveStats::snapshot) {
            counter(&mut out, "zmlx_expert_cache_hits_total", "Selected experts found in the expert cache.", c.hits);
            counter(
                &mut out,
                "zmlx_expert_cache_misses_total",
                "Selected experts read from the checkpoint files.",
                c.misses,
            );
            counter(
                &mut out,
                "zmlx_expert_cache_prefetch_loads_total",
                "Experts the prefetch thread read (predicted from the next layer's router).",
                c.prefetch_loads,
            );
            counter(
                &mut out,
                "zmlx_expert_cache_prefetch_hits_total",
                "Hits on experts the prefetch thread loaded.",
                c.prefetch_hits,
            );
            counter(&mut out, "zmlx_expert_cache_read_bytes_total", "Expert bytes read from the files.", c.bytes_read);
            let _ = writeln!(
                out,
                "# HELP zmlx_expert_cache_stall_seconds_total Time decoding waited for expert bytes.\n# TYPE \
                 zmlx_expert_cache_stall_seconds_total counter\nzmlx_expert_cache_stall_seconds_total {}",
                c.stall_seconds
            );
            let _ = writeln!(
                out,
                "# HELP zmlx_expert_cache_hit_ratio Hits / (hits + misses) since start.\n# TYPE \
                 zmlx_expert_cache_hit_ratio gauge\nzmlx_expert_cache_hit_ratio {}",
                c.hit_rate()
            );
            gauge(
                &mut out,
                "zmlx_expert_cache_slots_per_layer",
                "Experts each MoE layer keeps in memory.",
                c.slots_per_layer as u64,
            );
            gauge(&mut out, "zmlx_expert_cache_pool_bytes", "Bytes of all expert pools.", c.pool_bytes);
        }
        gauge(
            &mut out,
            "zmlx_peak_resident_memory_bytes",
            "Process peak resident set size.",
            crate::hardware::peak_rss_bytes(),
        );
        {
            let h = self.hist.lock().unwrap_or_else(|p| p.into_inner());
            h.ttft.write(
                &mut out,
                "zmlx_time_to_first_token_seconds",
                "From admission to the first token (queueing and prefill included).",
            );
            h.prompt_tps.write(
                &mut out,
                "zmlx_prompt_tokens_per_second",
                "Per request: prompt tokens / time to first token.",
            );
            h.decode_tps.write(
                &mut out,
                "zmlx_decode_tokens_per_second",
                "Per request: generated tokens / time since the first token.",
            );
        }
        let calls = crate::fallbacks::snapshot();
        let _ = writeln!(out, "# HELP zmlx_pattern_fused_calls_total Pattern calls that ran the fused kernel.\n# TYPE zmlx_pattern_fused_calls_total counter");
        for (p, c) in &calls {
            let _ = writeln!(out, "zmlx_pattern_fused_calls_total{{pattern=\"{}\"}} {}", escape(p), c.fused);
        }
        let _ = writeln!(out, "# HELP zmlx_pattern_fallback_calls_total Pattern calls that fell back to the stock slot, by reason.\n# TYPE zmlx_pattern_fallback_calls_total counter");
        for (p, c) in &calls {
            for (reason, n) in &c.fallback {
                let _ = writeln!(
                    out,
                    "zmlx_pattern_fallback_calls_total{{pattern=\"{}\",reason=\"{}\"}} {n}",
                    escape(p),
                    escape(reason)
                );
            }
        }
        out
    }
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// VmRSS of /proc/self/status (0 where there is none).
fn current_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        })
        .map_or(0, |k| k * 1024)
}
