//! The matrix ledger: one benchmark run per line of JSONL, append-only.
//!
//! The line format is the Python original's `MatrixEntry.to_dict()` written with
//! `json.dumps(d, separators=(",", ":"))`, so the two tools can share one file. We write
//! lines exactly as Python would (same key order, Python `repr` floats, `ensure_ascii`
//! escapes), which makes a Python line read and re-written by us byte-identical.
//! Our extra fields come after the original ones and are omitted when absent.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

/// Ledger location relative to the repository root (as in the original).
pub const DEFAULT_LEDGER: &str = "benchmarks/matrix.jsonl";
/// Environment variable that overrides the default ledger path.
pub const LEDGER_ENV: &str = "ZMLX_LEDGER";

/// One benchmark result: a (model, patterns, hardware) combination.
///
/// Field names, order and types follow the original `matrix/schema.py`; a missing key
/// takes the original's default (see `Default`). Floats that Python may have written as
/// `NaN`/`Infinity` are not JSON and make the line unreadable (reported as a bad line);
/// we write non-finite floats as `null` and read `null` back as NaN.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MatrixEntry {
    // Identity
    pub model_id: String,
    pub model_family: String,
    /// "moe" or "dense".
    pub architecture: String,
    /// Sorted by the writer in the original, but kept as stored: old rows exist unsorted.
    pub patterns_applied: Vec<String>,
    /// e.g. "Apple M4 Max 36GB".
    pub hardware: String,
    pub notes: String,

    // Environment
    pub macos_version: String,
    pub mlx_version: String,
    pub zmlx_version: String,
    pub zmlx_commit: String,
    pub python_version: String,
    pub custom_mlx: bool,
    /// ISO 8601, UTC.
    pub timestamp: String,

    // Results
    /// "PASS", "FAIL", "SKIP" or "EXCLUDED".
    pub fidelity: String,
    pub fidelity_detail: String,
    pub modules_patched: u64,

    #[serde(deserialize_with = "f64_or_null")]
    pub decode_tps_baseline: f64,
    #[serde(deserialize_with = "f64_or_null")]
    pub decode_tps_patched: f64,
    #[serde(deserialize_with = "f64_or_null")]
    pub decode_speedup: f64,
    #[serde(deserialize_with = "vec_f64_or_null")]
    pub decode_runs_baseline: Vec<f64>,
    #[serde(deserialize_with = "vec_f64_or_null")]
    pub decode_runs_patched: Vec<f64>,

    #[serde(deserialize_with = "f64_or_null")]
    pub prefill_tps_baseline: f64,
    #[serde(deserialize_with = "f64_or_null")]
    pub prefill_tps_patched: f64,
    /// patched/baseline − 1; −1.0 when the patched run was skipped.
    #[serde(deserialize_with = "f64_or_null")]
    pub prefill_change: f64,

    #[serde(deserialize_with = "f64_or_null")]
    pub peak_mem_baseline_gb: f64,
    #[serde(deserialize_with = "f64_or_null")]
    pub peak_mem_patched_gb: f64,

    pub max_tokens: u64,
    pub gen_tokens: u64,
    pub runs: u64,

    // Ours (absent from Python lines, so omitted when None to keep those lines intact).
    /// "cpu", "cuda" or "metal" (a string, not an enum, so a future backend does not make
    /// older builds reject the line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mlx_rs_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub libmlx_version: Option<String>,
    /// Full commit hash (the original's `zmlx_commit` is the short one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub git_commit: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", deserialize_with = "opt_f64_or_null")]
    pub cooldown_s: Option<f64>,
    /// Path of the repro capsule written for this run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capsule: Option<String>,
    /// Threads of zmlx's CPU kernels (MLX's own CPU ops are single-threaded).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
    /// Teacher-forced logit differences patched vs unpatched (`validate --logits`; always for
    /// `validated` patterns): max |diff| and max KL(baseline || patched) over the positions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logit_max_abs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logit_kl_max: Option<f64>,
    /// Seconds the checkpoint took to load.
    #[serde(skip_serializing_if = "Option::is_none", deserialize_with = "opt_f64_or_null")]
    pub load_seconds: Option<f64>,
    /// Peak resident set size of the run's process (`getrusage`), bytes: the checkpoint's mapped
    /// or copied weights, the KV cache and everything else (the `peak_mem_*_gb` fields are MLX's
    /// allocator only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
    /// Sequences decoded together per run (`--batch-size`; speeds are the batch's totals).
    /// Lines without it (the Python original's, older zmlx) were batch 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<u64>,
    /// With expert offloading (`--expert-cache*`): the cache's shape and counters over the
    /// patched runs (hits, misses, prefetches, bytes read, stall seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expert_cache: Option<crate::offload::StatsSnapshot>,

    /// Keys neither tool knows, kept in file order and written back after ours.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for MatrixEntry {
    fn default() -> Self {
        MatrixEntry {
            model_id: String::new(),
            model_family: String::new(),
            architecture: String::new(),
            patterns_applied: Vec::new(),
            hardware: String::new(),
            notes: String::new(),
            macos_version: String::new(),
            mlx_version: String::new(),
            zmlx_version: String::new(),
            zmlx_commit: String::new(),
            python_version: String::new(),
            custom_mlx: false,
            timestamp: String::new(),
            // The one non-zero default of the original schema.
            fidelity: "SKIP".to_string(),
            fidelity_detail: String::new(),
            modules_patched: 0,
            decode_tps_baseline: 0.0,
            decode_tps_patched: 0.0,
            decode_speedup: 0.0,
            decode_runs_baseline: Vec::new(),
            decode_runs_patched: Vec::new(),
            prefill_tps_baseline: 0.0,
            prefill_tps_patched: 0.0,
            prefill_change: 0.0,
            peak_mem_baseline_gb: 0.0,
            peak_mem_patched_gb: 0.0,
            max_tokens: 0,
            gen_tokens: 0,
            runs: 0,
            backend: None,
            device: None,
            mlx_rs_version: None,
            libmlx_version: None,
            git_commit: None,
            prompt_source: None,
            cooldown_s: None,
            capsule: None,
            threads: None,
            logit_max_abs: None,
            logit_kl_max: None,
            load_seconds: None,
            peak_rss_bytes: None,
            batch_size: None,
            expert_cache: None,
            extra: Map::new(),
        }
    }
}

/// Identity of a result for "latest wins": model, hardware and the patterns as a set.
pub type EntryKey = (String, String, Vec<String>);

impl MatrixEntry {
    /// `(model_id, hardware, sorted patterns)`; the original keyed by model and hardware
    /// only, so two pattern sets of one model overwrote each other.
    pub fn key(&self) -> EntryKey {
        (self.model_id.clone(), self.hardware.clone(), sorted_patterns(&self.patterns_applied))
    }

    /// The ledger line (without the trailing newline), byte-compatible with Python's
    /// `json.dumps(entry.to_dict(), separators=(",", ":"))`.
    pub fn to_line(&self) -> String {
        to_python_json(self).expect("MatrixEntry always serializes")
    }

    /// Parse one ledger line.
    pub fn from_line(line: &str) -> Result<MatrixEntry, serde_json::Error> {
        serde_json::from_str(line)
    }
}

/// Patterns sorted and de-duplicated, the canonical form of a pattern set.
pub fn sorted_patterns(patterns: &[String]) -> Vec<String> {
    let mut p = patterns.to_vec();
    p.sort();
    p.dedup();
    p
}

// `null` stands for NaN/inf (serde_json writes non-finite floats as null).
fn f64_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn opt_f64_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
    Ok(Some(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN)))
}

fn vec_f64_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
    let v = Vec::<Option<f64>>::deserialize(d)?;
    Ok(v.into_iter().map(|x| x.unwrap_or(f64::NAN)).collect())
}

// ---------------------------------------------------------------------------
// Python-compatible JSON text
// ---------------------------------------------------------------------------

/// serde_json formatter that writes what CPython's `json.dumps` writes: floats as
/// `repr(float)` and strings with `ensure_ascii=True`. Separators are serde_json's compact
/// ones, which equal Python's `(",", ":")`.
struct PyFormatter;

impl serde_json::ser::Formatter for PyFormatter {
    fn write_f64<W: ?Sized + Write>(&mut self, w: &mut W, value: f64) -> io::Result<()> {
        // Only finite values get here; serde_json writes NaN/inf as `null` itself.
        w.write_all(py_float_repr(value).as_bytes())
    }

    fn write_f32<W: ?Sized + Write>(&mut self, w: &mut W, value: f32) -> io::Result<()> {
        self.write_f64(w, f64::from(value))
    }

    fn write_string_fragment<W: ?Sized + Write>(&mut self, w: &mut W, s: &str) -> io::Result<()> {
        // serde_json already escaped `"`, `\` and C0 controls; Python additionally escapes
        // DEL and everything non-ASCII as \uXXXX (UTF-16 surrogate pairs above the BMP).
        let mut start = 0;
        for (i, c) in s.char_indices() {
            if c.is_ascii() && c != '\x7f' {
                continue;
            }
            w.write_all(&s.as_bytes()[start..i])?;
            let mut units = [0u16; 2];
            for u in c.encode_utf16(&mut units) {
                write!(w, "\\u{:04x}", u)?;
            }
            start = i + c.len_utf8();
        }
        w.write_all(&s.as_bytes()[start..])
    }
}

/// Serialize anything to compact JSON exactly as Python's `json.dumps(v,
/// separators=(",", ":"))` would (given the same key order).
pub fn to_python_json<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<String> {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, PyFormatter);
    value.serialize(&mut ser)?;
    Ok(String::from_utf8(out).expect("the formatter writes ASCII only"))
}

/// CPython's `repr(float)`: shortest round-trip digits, scientific notation when the
/// decimal exponent is < −4 or ≥ 16, exponent with a sign and at least two digits
/// (`1e-05`, `1e+16`), and a `.0` on integral values.
///
/// Rust's `{:?}` for f64 uses the same digits and the same switch-over points, so only the
/// exponent needs rewriting. Non-finite values follow Python (`nan`, `inf`).
pub fn py_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "nan".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let s = format!("{x:?}");
    match s.split_once('e') {
        None => s,
        Some((mantissa, exp)) => {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            format!("{mantissa}e{sign}{digits:0>2}")
        }
    }
}

// ---------------------------------------------------------------------------
// Paths
// ---------------------------------------------------------------------------

/// Where the ledger lives when no path is given: `$ZMLX_LEDGER` if set and non-empty,
/// else `<repo_root>/benchmarks/matrix.jsonl`. (The original derived the root from its
/// install location, which put the ledger in site-packages for pip installs.)
pub fn default_ledger_path(repo_root: &Path) -> PathBuf {
    ledger_path_from(repo_root, std::env::var_os(LEDGER_ENV))
}

/// An explicit path wins over `$ZMLX_LEDGER`, which wins over the repository default.
pub fn resolve_ledger_path(explicit: Option<&Path>, repo_root: &Path) -> PathBuf {
    match explicit {
        Some(p) => p.to_path_buf(),
        None => default_ledger_path(repo_root),
    }
}

// Split out so tests need not mutate the process environment (racy across test threads).
fn ledger_path_from(repo_root: &Path, env: Option<OsString>) -> PathBuf {
    match env {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => repo_root.join(DEFAULT_LEDGER),
    }
}

// ---------------------------------------------------------------------------
// Reading and appending
// ---------------------------------------------------------------------------

/// An append-only JSONL ledger file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ledger {
    pub path: PathBuf,
}

/// What `Ledger::read` found. Line numbers are 1-based physical lines of the file.
#[derive(Debug, Clone, Default)]
pub struct LedgerRead {
    pub entries: Vec<(usize, MatrixEntry)>,
    /// Lines that could not be read, with the reason; they stay in the file untouched.
    pub bad_lines: Vec<(usize, String)>,
}

impl LedgerRead {
    /// The entries in file order, without line numbers.
    pub fn into_entries(self) -> Vec<MatrixEntry> {
        self.entries.into_iter().map(|(_, e)| e).collect()
    }
}

impl Ledger {
    pub fn new(path: impl Into<PathBuf>) -> Ledger {
        Ledger { path: path.into() }
    }

    /// Append one entry as one line.
    ///
    /// Concurrent zmlx writers are serialized by an exclusive advisory lock (flock; Python
    /// writers do not take it, so mixing live Python and Rust writers is not protected).
    /// The line goes out in a single `write_all` on an O_APPEND descriptor, then
    /// `sync_data`, so a crash loses at most this line. If a killed writer left a last line
    /// without its newline, we start with a newline so the torn line stays alone on its
    /// line (readers report it) and ours is intact.
    pub fn append(&self, entry: &MatrixEntry) -> Result<()> {
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating ledger directory {}", dir.display()))?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&self.path)
            .with_context(|| format!("opening ledger {}", self.path.display()))?;
        // Fully qualified: std has an inherent `File::lock` since Rust 1.89, and our MSRV
        // is older; fs4 gives the same flock on every supported toolchain.
        fs4::FileExt::lock(&file).with_context(|| format!("locking ledger {}", self.path.display()))?;

        let mut buf = Vec::with_capacity(1024);
        if !ends_with_newline(&mut file).with_context(|| format!("reading ledger {}", self.path.display()))? {
            buf.push(b'\n');
        }
        buf.extend_from_slice(entry.to_line().as_bytes());
        buf.push(b'\n');
        // Under the lock nobody else appends, so the length now is where our line starts.
        let before = file.metadata().with_context(|| format!("reading ledger {}", self.path.display()))?.len();
        if let Err(e) = file.write_all(&buf).and_then(|()| file.sync_data()) {
            // A full disk or a size limit can leave part of the line: cut the file back so no
            // partial bytes remain (the earlier lines are untouched).
            let restored = file.set_len(before).and_then(|()| file.sync_data());
            let note = match restored {
                Ok(()) => "the ledger is unchanged".to_string(),
                Err(t) => format!("and truncating it back to {before} bytes failed too: {t}"),
            };
            return Err(
                anyhow::Error::new(e).context(format!("appending to ledger {} failed; {note}", self.path.display()))
            );
        }
        // Closing the file releases the lock.
        Ok(())
    }

    /// Read every line. A missing file is an error (a mistyped path must not read as an empty
    /// history). Blank lines are skipped; a line
    /// that does not parse (torn by a killed writer, hand-edited, …) is reported in
    /// `bad_lines` and skipped. The file is never rewritten.
    pub fn read(&self) -> Result<LedgerRead> {
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
                "no ledger at {}: nothing has been recorded there (`zmlx run` appends to it); \
                 pass --ledger FILE or set {LEDGER_ENV}",
                self.path.display()
            ),
            Err(e) => return Err(e).with_context(|| format!("opening ledger {}", self.path.display())),
        };
        // Shared lock: never observe a zmlx writer's line half-written.
        fs4::FileExt::lock_shared(&file).with_context(|| format!("locking ledger {}", self.path.display()))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).with_context(|| format!("reading ledger {}", self.path.display()))?;
        drop(file);
        Ok(parse_ledger(&bytes))
    }
}

fn ends_with_newline(file: &mut File) -> io::Result<bool> {
    if file.metadata()?.len() == 0 {
        return Ok(true);
    }
    file.seek(SeekFrom::End(-1))?;
    let mut last = [0u8; 1];
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// Parse ledger bytes line by line (see `Ledger::read`).
pub fn parse_ledger(bytes: &[u8]) -> LedgerRead {
    let mut out = LedgerRead::default();
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    // `split` yields an empty tail after a final newline; that is not a line.
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    let unterminated = !bytes.is_empty() && !bytes.ends_with(b"\n");
    let n = lines.len();
    for (i, raw) in lines.into_iter().enumerate() {
        let line_no = i + 1;
        let text = match std::str::from_utf8(raw) {
            Ok(t) => t.trim(),
            Err(e) => {
                out.bad_lines.push((line_no, format!("not UTF-8: {e}")));
                continue;
            }
        };
        if text.is_empty() {
            continue;
        }
        match MatrixEntry::from_line(text) {
            Ok(entry) => out.entries.push((line_no, entry)),
            Err(e) => {
                let torn = if unterminated && line_no == n {
                    " (last line has no newline: probably torn by a killed writer)"
                } else {
                    ""
                };
                out.bad_lines.push((line_no, format!("{e}{torn}")));
            }
        }
    }
    out
}

/// The latest entry per `MatrixEntry::key`; later lines win. Keys keep the position of
/// their first appearance, like the original's dict.
pub fn latest(entries: &[MatrixEntry]) -> Vec<MatrixEntry> {
    let mut index: HashMap<EntryKey, usize> = HashMap::new();
    let mut out: Vec<MatrixEntry> = Vec::new();
    for e in entries {
        match index.get(&e.key()) {
            Some(&i) => out[i] = e.clone(),
            None => {
                index.insert(e.key(), out.len());
                out.push(e.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::process::{Command, Stdio};

    /// Line 1 of the original's benchmarks/matrix.jsonl (reference §9).
    pub(crate) const EXAMPLE_LINE: &str = r#"{"model_id":"mlx-community/GLM-4.7-Flash-4bit","model_family":"glm","architecture":"moe","patterns_applied":["moe_mlp","swiglu_mlp"],"hardware":"Apple M4 Max 36GB","notes":"Control: current best patch set (no RoPE fusion). capsule=benchmarks/repro_capsules/glm47_flash_control_m4max_20260205.json","macos_version":"26.1","mlx_version":"0.30.4.dev20260204+2f324cc","zmlx_version":"0.8.0","zmlx_commit":"c6df299","python_version":"3.14.2","custom_mlx":true,"timestamp":"2026-02-05T01:01:40.104915+00:00","fidelity":"PASS","fidelity_detail":"200/200 tokens identical","modules_patched":47,"decode_tps_baseline":86.6,"decode_tps_patched":92.4,"decode_speedup":1.067,"decode_runs_baseline":[86.4,86.6,86.8],"decode_runs_patched":[92.5,92.4,92.0],"prefill_tps_baseline":275.5,"prefill_tps_patched":279.4,"prefill_change":0.0142,"peak_mem_baseline_gb":16.91,"peak_mem_patched_gb":16.91,"max_tokens":200,"gen_tokens":200,"runs":3}"#;

    /// A SKIP row of the original ledger: unsorted patterns, 0.0 floats, −1.0, empty list.
    const SKIP_LINE: &str = r#"{"model_id":"mlx-community/GLM-4.7-Flash-4bit","model_family":"glm","architecture":"moe","patterns_applied":["swiglu_mlp","moe_mlp"],"hardware":"Apple M4 Max 36GB","notes":"Experimental: fuse down-proj + combine for decode-like shapes (GLM only; token-fidelity-sensitive). capsule=benchmarks/repro_capsules/glm47_flash_downproj_combine_m4max_20260205.json","macos_version":"26.1","mlx_version":"0.30.4.dev20260204+2f324cc","zmlx_version":"0.8.0","zmlx_commit":"8c00216","python_version":"3.14.2","custom_mlx":true,"timestamp":"2026-02-05T09:14:16.829819+00:00","fidelity":"SKIP","fidelity_detail":"SKIPPED: unsafe variant (pass --allow-unsafe to run; may crash with Metal OOM)","modules_patched":0,"decode_tps_baseline":87.6,"decode_tps_patched":0.0,"decode_speedup":0.0,"decode_runs_baseline":[86.4,87.6,87.6],"decode_runs_patched":[],"prefill_tps_baseline":274.4,"prefill_tps_patched":0.0,"prefill_change":-1.0,"peak_mem_baseline_gb":16.91,"peak_mem_patched_gb":0.0,"max_tokens":200,"gen_tokens":0,"runs":3}"#;

    pub(crate) fn entry(model: &str, patterns: &[&str], ts: &str, tps: f64) -> MatrixEntry {
        MatrixEntry {
            model_id: model.into(),
            model_family: "glm".into(),
            architecture: "moe".into(),
            patterns_applied: patterns.iter().map(|s| s.to_string()).collect(),
            hardware: "Apple M4 Max 36GB".into(),
            timestamp: ts.into(),
            fidelity: "PASS".into(),
            decode_tps_baseline: 80.0,
            decode_tps_patched: tps,
            decode_speedup: tps / 80.0,
            ..MatrixEntry::default()
        }
    }

    #[test]
    fn example_line_round_trips_byte_exact() {
        let e = MatrixEntry::from_line(EXAMPLE_LINE).unwrap();
        assert_eq!(e.decode_tps_baseline, 86.6);
        assert_eq!(e.decode_speedup, 1.067);
        assert_eq!(e.prefill_change, 0.0142);
        assert_eq!(e.peak_mem_patched_gb, 16.91);
        assert_eq!(e.decode_runs_patched, vec![92.5, 92.4, 92.0]);
        assert!(e.custom_mlx && e.backend.is_none() && e.extra.is_empty());
        assert_eq!(e.to_line(), EXAMPLE_LINE);
        let skip = MatrixEntry::from_line(SKIP_LINE).unwrap();
        assert_eq!(skip.to_line(), SKIP_LINE);
    }

    #[test]
    fn missing_keys_take_original_defaults() {
        let e = MatrixEntry::from_line(r#"{"model_id":"m"}"#).unwrap();
        assert_eq!(e.fidelity, "SKIP");
        assert_eq!(e.runs, 0);
        assert_eq!(e.decode_speedup, 0.0);
        assert!(e.patterns_applied.is_empty() && e.notes.is_empty() && !e.custom_mlx);
        // Written back in full, as Python's to_dict would.
        assert!(e.to_line().contains(r#""fidelity":"SKIP","fidelity_detail":"","#));
    }

    #[test]
    fn our_fields_and_unknown_fields_round_trip_in_order() {
        let mut e = MatrixEntry::from_line(EXAMPLE_LINE).unwrap();
        e.backend = Some("cpu".into());
        e.cooldown_s = Some(2.5);
        e.capsule = Some("repro_capsules/x.json".into());
        let line = e.to_line();
        assert!(line.ends_with(r#""runs":3,"backend":"cpu","cooldown_s":2.5,"capsule":"repro_capsules/x.json"}"#));
        assert_eq!(MatrixEntry::from_line(&line).unwrap(), e);

        let future = EXAMPLE_LINE.replace(r#""runs":3}"#, r#""runs":3,"zeta":{"b":1,"a":[1.5e-07]},"alpha":null}"#);
        let f = MatrixEntry::from_line(&future).unwrap();
        assert_eq!(f.extra.keys().collect::<Vec<_>>(), ["zeta", "alpha"]);
        assert_eq!(f.to_line(), future);
    }

    #[test]
    fn python_float_repr_and_ascii_escapes() {
        // Expected strings produced by CPython 3 `json.dumps(..., separators=(",", ":"))`.
        let vals = [
            86.6,
            1.067,
            0.0142,
            16.91,
            1e-5,
            0.0001,
            1e16,
            1e15,
            123456789012345680.0,
            -0.0,
            0.1 + 0.2,
            5e-324,
            f64::MAX,
            2.5e-7,
            92.0,
            -1.0,
        ];
        assert_eq!(
            to_python_json(&vals[..]).unwrap(),
            "[86.6,1.067,0.0142,16.91,1e-05,0.0001,1e+16,1000000000000000.0,\
             1.2345678901234568e+17,-0.0,0.30000000000000004,5e-324,\
             1.7976931348623157e+308,2.5e-07,92.0,-1.0]"
        );
        let mut m = Map::new();
        m.insert("n".into(), Value::from("a\u{2014}b\x7f\x01\"\\/\n\u{1F600}"));
        assert_eq!(to_python_json(&m).unwrap(), r#"{"n":"a\u2014b\u007f\u0001\"\\/\n\ud83d\ude00"}"#);
        // ...and serde_json reads the escapes back.
        let back: Map<String, Value> = serde_json::from_str(&to_python_json(&m).unwrap()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn any_finite_f64_round_trips_bit_exact() {
        // Needs serde_json's `float_roundtrip`: its default parser may be 1 ulp off for
        // 17-digit values, which would change the text on the next write.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let f = f64::from_bits(x);
            if !f.is_finite() {
                continue;
            }
            let e = MatrixEntry { decode_tps_patched: f, ..MatrixEntry::default() };
            let back = MatrixEntry::from_line(&e.to_line()).unwrap();
            assert_eq!(back.decode_tps_patched.to_bits(), f.to_bits(), "{f:e}");
        }
    }

    #[test]
    fn non_finite_floats_are_written_as_null_and_read_back_as_nan() {
        let e = MatrixEntry { decode_speedup: f64::INFINITY, ..MatrixEntry::default() };
        let line = e.to_line();
        assert!(line.contains(r#""decode_speedup":null"#));
        assert!(MatrixEntry::from_line(&line).unwrap().decode_speedup.is_nan());
    }

    #[test]
    fn ledger_path_resolution() {
        let root = Path::new("/repo");
        assert_eq!(ledger_path_from(root, None), PathBuf::from("/repo/benchmarks/matrix.jsonl"));
        assert_eq!(ledger_path_from(root, Some("".into())), PathBuf::from("/repo/benchmarks/matrix.jsonl"));
        assert_eq!(ledger_path_from(root, Some("/x/l.jsonl".into())), PathBuf::from("/x/l.jsonl"));
        assert_eq!(resolve_ledger_path(Some(Path::new("a.jsonl")), root), PathBuf::from("a.jsonl"));
    }

    #[test]
    fn latest_is_keyed_by_model_hardware_and_pattern_set() {
        let a1 = entry("m/a", &["moe_mlp", "swiglu_mlp"], "2026-01-01T00:00:00", 90.0);
        let b = entry("m/a", &["moe_mlp"], "2026-01-02T00:00:00", 85.0);
        let a2 = entry("m/a", &["swiglu_mlp", "moe_mlp"], "2026-01-03T00:00:00", 95.0);
        let l = latest(&[a1, b.clone(), a2.clone()]);
        assert_eq!(l, vec![a2, b]);
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.jsonl");
        let e = Ledger::new(&path).read().unwrap_err().to_string();
        assert!(e.contains(&format!("no ledger at {}", path.display())) && e.contains("--ledger"), "{e}");
    }

    #[test]
    fn torn_last_line_is_reported_and_next_append_is_intact() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(dir.path().join("sub/matrix.jsonl"));
        for i in 0..3 {
            ledger.append(&entry("m/a", &[], "t", i as f64)).unwrap();
        }
        // A writer killed mid-line: half a line, no newline.
        let line = entry("m/torn", &[], "t", 9.0).to_line();
        let mut f = OpenOptions::new().append(true).open(&ledger.path).unwrap();
        f.write_all(&line.as_bytes()[..line.len() / 2]).unwrap();
        drop(f);
        let before = std::fs::read(&ledger.path).unwrap();

        let r = ledger.read().unwrap();
        assert_eq!(r.entries.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(r.bad_lines.len(), 1);
        assert_eq!(r.bad_lines[0].0, 4);
        assert!(r.bad_lines[0].1.contains("torn"), "{}", r.bad_lines[0].1);

        let next = entry("m/next", &["moe_mlp"], "t", 7.0);
        ledger.append(&next).unwrap();
        let after = std::fs::read(&ledger.path).unwrap();
        assert!(after.starts_with(&before), "earlier bytes must never be rewritten");
        assert!(after.ends_with(b"\n"));
        let r = ledger.read().unwrap();
        assert_eq!(r.entries.len(), 4);
        assert_eq!(r.entries[3], (5, next));
        assert_eq!(r.bad_lines.len(), 1);
        assert_eq!(r.bad_lines[0].0, 4);
        assert!(!r.bad_lines[0].1.contains("torn"), "line 4 is no longer the last line");
    }

    #[test]
    fn corrupt_middle_line_is_reported_and_the_rest_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("matrix.jsonl");
        let good = |i: usize| entry("m/a", &[], "t", i as f64).to_line();
        let text = format!("{}\n{}\n{{\"model_id\":\"x\",\"runs\":\n\n{}\n{}\n", good(1), good(2), good(4), good(5));
        std::fs::write(&path, &text).unwrap();
        let r = Ledger::new(&path).read().unwrap();
        // Line 4 is blank: skipped, not an error.
        assert_eq!(r.entries.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2, 5, 6]);
        assert_eq!(r.entries[2].1.decode_tps_patched, 4.0);
        assert_eq!(r.bad_lines.len(), 1);
        assert_eq!(r.bad_lines[0].0, 3);
        assert!(r.bad_lines[0].1.contains("EOF"), "{}", r.bad_lines[0].1);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }

    // --- a failed append leaves no partial bytes ---------------------------------------

    const FULL_ENV: &str = "ZMLX_LEDGER_TEST_FULL_CHILD";

    /// Child half of `failed_append_leaves_the_file_unchanged`: a no-op in a normal test run.
    #[test]
    fn full_disk_worker() {
        let Some(path) = std::env::var_os(FULL_ENV) else {
            return;
        };
        let mut e = entry("m/full", &["moe_mlp"], "t", 1.0);
        e.notes = "y".repeat(4000);
        let err = Ledger::new(PathBuf::from(path)).append(&e).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("the ledger is unchanged"), "{msg}");
    }

    #[test]
    fn failed_append_leaves_the_file_unchanged() {
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("matrix.jsonl");
        let before = format!("{}\n", entry("m/a", &[], "t", 1.0).to_line());
        std::fs::write(&path, &before).unwrap();
        // A file-size limit 100 bytes past the current end: the first write goes through in part,
        // the next fails with EFBIG, as a disk that fills up mid-line would.
        let limit = before.len() as u64 + 100;
        let name = format!("{}::full_disk_worker", module_path!().split_once("::").unwrap().1);
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", &name, "--nocapture", "--test-threads=1"]).env(FULL_ENV, &path);
        unsafe {
            cmd.pre_exec(move || {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let lim = libc::rlimit { rlim_cur: limit, rlim_max: limit };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "worker failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), before, "no partial line may remain");
    }

    // --- concurrent appends from separate processes -------------------------------------

    const CHILD_ENV: &str = "ZMLX_LEDGER_TEST_CHILD";
    const WORKERS: usize = 8;
    const LINES_PER_WORKER: usize = 50;

    /// Child half of `concurrent_processes_lose_no_line`; a no-op in a normal test run.
    #[test]
    fn append_worker() {
        let Ok(spec) = std::env::var(CHILD_ENV) else {
            return;
        };
        let (worker, path) = spec.split_once(':').unwrap();
        let ledger = Ledger::new(path);
        // Long notes make a line span several write-sized chunks, so interleaving without
        // the lock would show up.
        let pad = "x".repeat(3000);
        for seq in 0..LINES_PER_WORKER {
            let mut e = entry("m/concurrent", &["moe_mlp"], "t", seq as f64);
            e.notes = format!("worker={worker} seq={seq} {pad}");
            ledger.append(&e).unwrap();
        }
    }

    #[test]
    fn concurrent_processes_lose_no_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("matrix.jsonl");
        // Test names omit the crate name that module_path! starts with.
        let name = format!("{}::append_worker", module_path!().split_once("::").unwrap().1);
        let exe = std::env::current_exe().unwrap();
        let children: Vec<_> = (0..WORKERS)
            .map(|w| {
                Command::new(&exe)
                    .args(["--exact", &name, "--nocapture", "--test-threads=1"])
                    .env(CHILD_ENV, format!("{w}:{}", path.display()))
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in children {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "worker failed:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let r = Ledger::new(&path).read().unwrap();
        assert!(r.bad_lines.is_empty(), "{:?}", r.bad_lines);
        assert_eq!(r.entries.len(), WORKERS * LINES_PER_WORKER);
        let seen: BTreeSet<(String, String)> = r
            .entries
            .iter()
            .map(|(_, e)| {
                let mut it = e.notes.split(' ');
                (it.next().unwrap().to_string(), it.next().unwrap().to_string())
            })
            .collect();
        assert_eq!(seen.len(), WORKERS * LINES_PER_WORKER);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), WORKERS * LINES_PER_WORKER);
    }
}
