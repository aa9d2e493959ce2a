//! Per-call accounting for patterns that apply only to some calls (decode-only kernels, dtype
//! or bit-width limits): how often each ran fused and how often it fell back to the stock slot,
//! with the reason. `ZMLX_DEBUG_FALLBACK=1` also logs each new (pattern, reason) to stderr.
use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::Serialize;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub fused: u64,
    /// reason → calls
    pub fallback: BTreeMap<String, u64>,
}

static STATS: Mutex<BTreeMap<&'static str, Counts>> = Mutex::new(BTreeMap::new());

fn with<R>(f: impl FnOnce(&mut BTreeMap<&'static str, Counts>) -> R) -> R {
    let mut g = STATS.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut g)
}

pub fn fused(pattern: &'static str) {
    with(|m| m.entry(pattern).or_default().fused += 1);
}

pub fn fallback(pattern: &'static str, reason: &str) {
    let first = with(|m| {
        let c = m.entry(pattern).or_default().fallback.entry(reason.to_owned()).or_default();
        *c += 1;
        *c == 1
    });
    if first && crate::settings::switch_var("ZMLX_DEBUG_FALLBACK", false) {
        eprintln!("[zmlx] {pattern}: falling back to the stock slot ({reason})");
    }
}

/// The counts so far, by pattern.
pub fn snapshot() -> BTreeMap<String, Counts> {
    with(|m| m.iter().map(|(k, v)| (k.to_string(), v.clone())).collect())
}

pub fn reset() {
    with(|m| m.clear());
}

/// One line per pattern, e.g. `downproj_combine: 126 fused, 2 stock (prefill: 2)`.
pub fn summary() -> Vec<String> {
    summary_of(&snapshot())
}

/// `summary` of recorded counts.
pub fn summary_of(counts: &BTreeMap<String, Counts>) -> Vec<String> {
    counts
        .iter()
        .map(|(p, c)| {
            let stock: u64 = c.fallback.values().sum();
            let reasons: Vec<String> = c.fallback.iter().map(|(r, n)| format!("{r}: {n}")).collect();
            if stock == 0 {
                format!("{p}: {} fused", c.fused)
            } else {
                format!("{p}: {} fused, {stock} stock ({})", c.fused, reasons.join("; "))
            }
        })
        .collect()
}
