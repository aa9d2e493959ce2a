//! Per-token profile of the decode step (issue #6), and of one prefill (issue #15): how many MLX
//! operations it builds (from MLX's own graph export, by primitive), and where its time goes
//! (each slot evaluated behind a barrier: attention incl. its input norm, router, experts +
//! combine, shared expert, dense MLP, head incl. the final norm). Barriers change scheduling, not
//! values; totals are therefore a little above an unprofiled step (the prefill profile also
//! reports the unbarriered time).
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use mlx_rs::{transforms::eval, Array};
use serde::Serialize;

use crate::cache::KvCache;
use crate::model::Model;

thread_local! {
    static TIMES: RefCell<Option<BTreeMap<&'static str, (f64, u64)>>> = const { RefCell::new(None) };
}

fn active() -> bool {
    TIMES.with(|t| t.borrow().is_some())
}

/// Runs `f`; while a timing profile is active, evaluates its result and charges the wall time
/// to `name`.
pub fn span(name: &'static str, f: impl FnOnce() -> Result<Array>) -> Result<Array> {
    if !active() {
        return f();
    }
    let t0 = Instant::now();
    let out = f()?;
    out.eval()?;
    let dt = t0.elapsed().as_secs_f64();
    TIMES.with(|t| {
        if let Some(m) = t.borrow_mut().as_mut() {
            let e = m.entry(name).or_insert((0.0, 0));
            e.0 += dt;
            e.1 += 1;
        }
    });
    Ok(out)
}

/// While a timing profile is active, evaluates `a` (built earlier) and charges the time to `name`.
pub fn barrier(name: &'static str, a: &Array) -> Result<()> {
    span(name, || Ok(a.clone())).map(|_| ())
}

#[derive(Debug, Clone, Serialize)]
pub struct DecodeProfile {
    /// MLX operations (graph nodes with a primitive) in one decode step, total and by primitive.
    pub ops_total: usize,
    pub ops_per_layer: f64,
    pub ops_by_primitive: BTreeMap<String, usize>,
    /// Milliseconds per decode token, by slot (barriered), and their sum.
    pub ms_by_slot: BTreeMap<String, f64>,
    pub ms_total: f64,
    pub tokens: usize,
}

/// A prompt `profile` can run: at least 2 tokens, every id a row of the embedding.
fn check_prompt(model: &Model, prompt: &[u32]) -> Result<()> {
    if prompt.len() < 2 {
        bail!("profile: the prompt needs at least 2 tokens");
    }
    crate::generate::check_prompt_ids(model, prompt).map_err(|e| anyhow!("profile: {e}"))
}

/// Runs `f` with slot timing active; its milliseconds per slot divided by `per`.
fn timed_slots(per: usize, f: impl FnOnce() -> Result<()>) -> Result<BTreeMap<String, f64>> {
    TIMES.with(|t| *t.borrow_mut() = Some(BTreeMap::new()));
    let run = f();
    let times = TIMES.with(|t| t.borrow_mut().take()).unwrap_or_default();
    run?;
    Ok(times.iter().map(|(k, (s, _))| (k.to_string(), s * 1e3 / per.max(1) as f64)).collect())
}

fn prefill(model: &Model, prompt: &[u32]) -> Result<(Vec<KvCache>, u32)> {
    check_prompt(model, prompt)?;
    let mut caches = model.new_cache();
    let ids = Array::from_slice(&prompt[..prompt.len() - 1], &[1, prompt.len() as i32 - 1]);
    let logits = model.forward(&ids, &mut caches)?;
    let mut outs = vec![&logits];
    for c in &caches {
        outs.extend(c.state());
    }
    eval(outs)?;
    Ok((caches, prompt[prompt.len() - 1]))
}

fn argmax_last(logits: &Array) -> Result<u32> {
    use mlx_rs::ops::indexing::TryIndexOp;
    let last = logits.try_index((.., -1, ..))?;
    Ok(mlx_rs::ops::indexing::argmax_axis(&last, -1, None)?.item_cast::<u32>())
}

/// Counts primitive nodes in MLX's DOT export of the graph of `outs`.
fn op_histogram(outs: &[&Array]) -> Result<BTreeMap<String, usize>> {
    let path = std::env::temp_dir().join(format!("zmlx-profile-{}.dot", std::process::id()));
    let cpath = std::ffi::CString::new(path.to_string_lossy().as_bytes())?;
    let status = unsafe {
        let f = libc::fopen(cpath.as_ptr(), c"w".as_ptr());
        if f.is_null() {
            bail!("profile: cannot write {}", path.display());
        }
        let v = mlx_sys::mlx_vector_array_new();
        for out in outs {
            mlx_sys::mlx_vector_array_append_value(v, out.as_ptr());
        }
        let namer = mlx_sys::mlx_node_namer_new();
        let s = mlx_sys::mlx_export_to_dot(f as *mut _, namer, v);
        mlx_sys::mlx_node_namer_free(namer);
        mlx_sys::mlx_vector_array_free(v);
        libc::fclose(f);
        s
    };
    if status != 0 {
        bail!("profile: MLX could not export the graph");
    }
    let text = std::fs::read_to_string(&path)?;
    let _ = std::fs::remove_file(&path);
    let mut hist = BTreeMap::new();
    // Primitive nodes are drawn as rectangles: `{id} [label ="Name", shape=rectangle]`.
    for line in text.lines().filter(|l| l.contains("shape=rectangle")) {
        if let Some(label) = line.split("label =\"").nth(1).and_then(|r| r.split('"').next()) {
            *hist.entry(label.to_owned()).or_insert(0) += 1;
        }
    }
    Ok(hist)
}

/// Profiles `tokens` greedy decode steps after prefilling `prompt`.
pub fn decode_profile(model: &Model, prompt: &[u32], tokens: usize) -> Result<DecodeProfile> {
    let (mut caches, mut next) = prefill(model, prompt)?;
    // 1. The graph of one decode step (built, not evaluated, then evaluated to move on).
    let step = model.forward(&Array::from_slice(&[next], &[1, 1]), &mut caches)?;
    let hist = op_histogram(&[&step])?;
    next = argmax_last(&step)?;
    // 2. Barriered timing of the following steps.
    let ms_by_slot = timed_slots(tokens, || {
        for _ in 0..tokens {
            let logits = model.forward(&Array::from_slice(&[next], &[1, 1]), &mut caches)?;
            next = argmax_last(&logits)?;
        }
        Ok(())
    })?;
    let ops_total = hist.values().sum();
    Ok(DecodeProfile {
        ops_total,
        ops_per_layer: ops_total as f64 / model.layers.len().max(1) as f64,
        ops_by_primitive: hist,
        ms_total: ms_by_slot.values().sum(),
        ms_by_slot,
        tokens,
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct PrefillProfile {
    /// Tokens prefilled (the prompt but its last token, as `generate` prefills).
    pub prompt_tokens: usize,
    /// MLX operations in the prefill graph (what `generate` evaluates: the KV caches), by primitive.
    pub ops_total: usize,
    pub ops_by_primitive: BTreeMap<String, usize>,
    /// Milliseconds per prefill by slot (barriered), and their sum. `head` is there only because
    /// the barrier evaluates it: `generate`'s prefill never computes the prompt's logits.
    pub ms_by_slot: BTreeMap<String, f64>,
    pub ms_total: f64,
    /// Unbarriered milliseconds per prefill (median of `runs`, after one warm-up) and tok/s.
    pub ms_unbarriered: f64,
    pub tokens_per_second: f64,
    pub runs: usize,
    /// The first prefill of this prompt length in the process, graph building included: what a
    /// first prompt pays for kernel compilation, allocation (and, on CUDA, graph capture).
    pub ms_first: f64,
}

/// Profiles prefilling `prompt` (all but its last token, fresh caches each time) `runs` times.
pub fn prefill_profile(model: &Model, prompt: &[u32], runs: usize) -> Result<PrefillProfile> {
    check_prompt(model, prompt)?;
    let runs = runs.max(1);
    let n = prompt.len() - 1;
    let ids = Array::from_slice(&prompt[..n], &[1, n as i32]);
    let once = || -> Result<f64> {
        let mut caches = model.new_cache();
        let t0 = Instant::now();
        let _ = model.forward(&ids, &mut caches)?;
        eval(caches.iter().flat_map(|c| c.state()))?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    };
    // The graph, then a warm-up (first-call costs: kernel compilation, allocation).
    let (hist, ms_first) = {
        let t0 = Instant::now();
        let mut caches = model.new_cache();
        let _ = model.forward(&ids, &mut caches)?;
        let states: Vec<&Array> = caches.iter().flat_map(|c| c.state()).collect();
        let t_hist = Instant::now();
        let h = op_histogram(&states)?;
        let hist_s = t_hist.elapsed();
        eval(states)?;
        (h, (t0.elapsed() - hist_s).as_secs_f64() * 1e3)
    };
    once()?;
    let mut times: Vec<f64> = (0..runs).map(|_| once()).collect::<Result<_>>()?;
    times.sort_by(f64::total_cmp);
    let ms_unbarriered = times[times.len() / 2];
    let ms_by_slot = timed_slots(runs, || (0..runs).try_for_each(|_| once().map(|_| ())))?;
    Ok(PrefillProfile {
        prompt_tokens: n,
        ops_total: hist.values().sum(),
        ops_by_primitive: hist,
        ms_total: ms_by_slot.values().sum(),
        ms_by_slot,
        ms_unbarriered,
        tokens_per_second: n as f64 / (ms_unbarriered / 1e3),
        runs,
        ms_first,
    })
}
