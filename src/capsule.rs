//! Repro capsules: the full record of one benchmark run, one JSON file per run.
//!
//! Layout A of the original (`benchmarks/repro_capsules/*.json`, rendered by
//! `python -m zmlx.bench.report`): `{"meta": {...}, "<variant>": {...}, ...}`. We read the
//! original's files and write the same layout plus our extras (per-run token ids, the
//! exact argv, the ZMLX_* environment), so the Python report can still render ours.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use chrono::Utc;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// Decode changes within ±2 % are "neutral" (as in the original report).
pub const DECODE_NEUTRAL_PCT: f64 = 2.0;
/// Prefill is noisier (short, batch-sensitive), so its neutral band is ±3 %.
pub const PREFILL_NEUTRAL_PCT: f64 = 3.0;

/// One capsule: `meta` plus one section per variant, in file order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Capsule {
    pub meta: CapsuleMeta,
    /// (section key, result); the key is the variant name, e.g. "control_swiglu_moe".
    pub variants: Vec<(String, VariantResult)>,
    /// Top-level keys that are neither `meta` nor a variant object, kept as found.
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CapsuleMeta {
    /// Run date, `YYYY-MM-DD` in the original.
    pub date: String,
    pub device: String,
    pub memory_gb: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub macos: Option<String>,
    pub mlx_version: String,
    pub zmlx_version: String,
    pub git_commit: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub python: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub has_gather_qmm_swiglu: Option<bool>,
    // Ours.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mlx_rs_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub libmlx_version: Option<String>,
    /// The exact argv of the run (the `command_<variant>` strings are for people).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub command_line: Vec<String>,
    /// ZMLX_* and LD_LIBRARY_PATH at run time: they change kernels and the libmlx loaded.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Threads of zmlx's CPU kernels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads: Option<u32>,
    /// Seconds the checkpoint took to load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_seconds: Option<f64>,
    /// Peak resident set size of the run's process (`getrusage`), bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Everything else, including the original's `command_<variant>` keys.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl CapsuleMeta {
    /// Record the command for one variant under the original's `command_<variant>` key.
    pub fn set_command(&mut self, variant: &str, command: impl Into<String>) {
        self.extra.insert(format!("command_{variant}"), Value::String(command.into()));
    }

    /// `(key, command)` for every `command*` key, in file order.
    pub fn commands(&self) -> Vec<(&str, &str)> {
        self.extra
            .iter()
            .filter(|(k, _)| k.starts_with("command"))
            .filter_map(|(k, v)| Some((k.as_str(), v.as_str()?)))
            .collect()
    }
}

/// The environment worth recording: `ZMLX_*` switches and `LD_LIBRARY_PATH`.
pub fn capture_env() -> BTreeMap<String, String> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.to_string_lossy().into_owned())))
        .filter(|(k, _)| k.starts_with("ZMLX_") || k == "LD_LIBRARY_PATH")
        .collect()
}

/// Join argv into one POSIX-shell command line, quoting where needed.
pub fn shell_join(argv: &[String]) -> String {
    let quote = |a: &String| {
        let plain = !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
        if plain {
            a.clone()
        } else {
            format!("'{}'", a.replace('\'', r"'\''"))
        }
    };
    argv.iter().map(quote).collect::<Vec<_>>().join(" ")
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VariantResult {
    pub model: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub variant: String,
    pub max_tokens: u64,
    pub gen_tokens: u64,
    pub runs: u64,
    pub fidelity: Fidelity,
    pub baseline: ConfigStats,
    pub patched: PatchedStats,
    pub summary: Summary,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub notes: String,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Fidelity {
    pub matched: u64,
    pub total: u64,
    /// "PASS" or "FAIL".
    pub verdict: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_divergence: Option<u64>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Measurements of one configuration (baseline or patched).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConfigStats {
    pub prefill_tok_s: Vec<f64>,
    pub decode_tok_s: Vec<f64>,
    pub median_prefill: f64,
    pub median_decode: f64,
    pub peak_mem_gb: f64,
    /// Generated token ids, one list per run (ours: fidelity can be re-checked later).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<Vec<u32>>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PatchedStats {
    pub patterns: Vec<String>,
    pub modules_patched: u64,
    #[serde(flatten)]
    pub stats: ConfigStats,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Summary {
    pub decode_speedup: f64,
    pub prefill_change: f64,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Median as Python's `statistics.median` (mean of the middle two for even counts);
/// 0.0 for no values. NaNs sort last.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

// `meta` first, then the variants in order: a struct cannot have a variable set of keys,
// and a map type would lose the order people read the file in.
impl Serialize for Capsule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(1 + self.variants.len() + self.extra.len()))?;
        m.serialize_entry("meta", &self.meta)?;
        for (k, v) in &self.variants {
            m.serialize_entry(k, v)?;
        }
        for (k, v) in &self.extra {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for Capsule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut top = Map::<String, Value>::deserialize(d)?;
        // Without `meta` this is another layout (suite summary, truth set, …), whose objects
        // would otherwise read as empty variants.
        let meta = match top.remove("meta") {
            Some(m @ Value::Object(_)) => CapsuleMeta::deserialize(m).map_err(D::Error::custom)?,
            _ => return Err(D::Error::custom("not a per-run capsule (layout A): no \"meta\" object")),
        };
        let mut capsule = Capsule { meta, ..Capsule::default() };
        for (k, v) in top {
            if v.is_object() {
                let r = VariantResult::deserialize(v).map_err(|e| D::Error::custom(format!("section \"{k}\": {e}")))?;
                capsule.variants.push((k, r));
            } else {
                capsule.extra.insert(k, v);
            }
        }
        if capsule.variants.is_empty() {
            return Err(D::Error::custom("not a per-run capsule: a \"meta\" object but no result section"));
        }
        Ok(capsule)
    }
}

/// Lower-case file-name slug: runs of anything but [a-z0-9_] become one '-'.
fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.to_lowercase().chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    out.trim_matches('-').to_string()
}

/// Write a capsule as pretty JSON. `dir_or_path` ending in `.json` is the file; anything
/// else is a directory (created if needed) that gets
/// `<model-slug>_<variant>_<UTC yyyymmddThhmmss>.json`, with `-2`, `-3`, … appended
/// rather than overwriting an existing capsule. Returns the path written.
pub fn write_capsule(dir_or_path: &Path, capsule: &Capsule) -> Result<PathBuf> {
    let mut text = serde_json::to_string_pretty(capsule).context("serializing capsule")?;
    text.push('\n');
    let is_file = dir_or_path.extension().is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if is_file {
        if let Some(dir) = dir_or_path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating capsule directory {}", dir.display()))?;
        }
        std::fs::write(dir_or_path, &text).with_context(|| format!("writing capsule {}", dir_or_path.display()))?;
        return Ok(dir_or_path.to_path_buf());
    }

    let Some((key, first)) = capsule.variants.first() else {
        bail!("capsule has no variant section, so there is no model to name the file after");
    };
    let model = first.model.rsplit('/').next().unwrap_or(&first.model);
    let variant = if first.variant.is_empty() { key } else { &first.variant };
    let stem = format!("{}_{}_{}", slug(model), slug(variant), Utc::now().format("%Y%m%dT%H%M%S"));
    std::fs::create_dir_all(dir_or_path)
        .with_context(|| format!("creating capsule directory {}", dir_or_path.display()))?;
    for n in 1.. {
        let name = if n == 1 { format!("{stem}.json") } else { format!("{stem}-{n}.json") };
        let path = dir_or_path.join(name);
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                f.write_all(text.as_bytes())
                    .and_then(|()| f.sync_data())
                    .with_context(|| format!("writing capsule {}", path.display()))?;
                return Ok(path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e).with_context(|| format!("creating capsule {}", path.display())),
        }
    }
    unreachable!("the name loop only ends by returning")
}

/// Read a capsule; every error names the file.
pub fn read_capsule(path: &Path) -> Result<Capsule> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading capsule {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing capsule {}", path.display()))
}

fn fmt_change(baseline: f64, patched: f64, neutral_pct: f64) -> String {
    if baseline <= 0.0 {
        return "\u{2014}".into();
    }
    let pct = (patched / baseline - 1.0) * 100.0;
    if pct.abs() < neutral_pct {
        format!("{pct:+.1}% (neutral)")
    } else {
        format!("**{pct:+.1}%**")
    }
}

/// The report of the original `python -m zmlx.bench.report`, as text. Differences: the
/// prefill neutral band is ±3 % (decode ±2 %); all `command*` keys are listed (the
/// original only when `command_4bit` existed); macOS/Python lines only when recorded; our
/// backend, argv and environment when present; baseline and patched peak memory.
pub fn render_report(c: &Capsule) -> String {
    let m = &c.meta;
    let or_q = |s: &str| {
        if s.is_empty() {
            "?".to_string()
        } else {
            s.to_string()
        }
    };
    let mut out = String::new();
    let bar = "=".repeat(62);
    let _ = writeln!(out, "{bar}\n  ZMLX Benchmark Report\n{bar}");
    let _ = writeln!(out, "  Date:    {}", or_q(&m.date));
    let _ = writeln!(out, "  Device:  {} ({} GB)", or_q(&m.device), m.memory_gb);
    if let Some(v) = &m.macos {
        let _ = writeln!(out, "  macOS:   {v}");
    }
    let _ = writeln!(out, "  MLX:     {}", or_q(&m.mlx_version));
    let _ = writeln!(out, "  ZMLX:    {}", or_q(&m.zmlx_version));
    if let Some(v) = &m.python {
        let _ = writeln!(out, "  Python:  {v}");
    }
    if let Some(b) = &m.backend {
        let mut line = format!("  Backend: {b}");
        if let Some(v) = &m.mlx_rs_version {
            let _ = write!(line, " (mlx-rs {v}");
            if let Some(l) = &m.libmlx_version {
                let _ = write!(line, ", libmlx {l}");
            }
            line.push(')');
        }
        let _ = writeln!(out, "{line}");
    }
    let _ = writeln!(out, "  Commit:  {}", or_q(&m.git_commit.chars().take(7).collect::<String>()));

    let commands = m.commands();
    if !commands.is_empty() || !m.command_line.is_empty() {
        out.push_str("\n  Commands:\n");
        for (_, cmd) in &commands {
            let _ = writeln!(out, "    $ {cmd}");
        }
        if commands.is_empty() {
            let _ = writeln!(out, "    $ {}", shell_join(&m.command_line));
        }
    }
    if !m.env.is_empty() {
        out.push_str("\n  Environment:\n");
        for (k, v) in &m.env {
            let _ = writeln!(out, "    {k}={v}");
        }
    }

    for (key, v) in &c.variants {
        let model = if v.model.is_empty() { key } else { &v.model };
        let (b, p) = (&v.baseline, &v.patched.stats);
        let _ = writeln!(out, "\n  {model}");
        let _ = writeln!(out, "  {:<14} {:>12} {:>12} {:>18}", "Metric", "Baseline", "Patched", "Change");
        let _ = writeln!(out, "  {}", "-".repeat(58));
        let rows = [
            ("Decode", b.median_decode, p.median_decode, DECODE_NEUTRAL_PCT),
            ("Prefill", b.median_prefill, p.median_prefill, PREFILL_NEUTRAL_PCT),
        ];
        for (name, bv, pv, band) in rows {
            let _ = writeln!(out, "  {name:<14} {bv:>10.1}  {pv:>10.1}  {:>18}", fmt_change(bv, pv, band));
        }
        let f = &v.fidelity;
        let verdict = if f.verdict.is_empty() { "?" } else { &f.verdict };
        let frac = format!("{}/{}", f.matched, f.total);
        let _ = writeln!(out, "  {:<14} {:>12} {frac:>12}  {verdict:>18}", "Fidelity", "");
        if let Some(i) = f.first_divergence {
            let _ = writeln!(out, "  {:<14} {:>12} {:>12}  {:>18}", "", "", "", format!("first diff @ {i}"));
        }
        if b.peak_mem_gb > 0.0 || p.peak_mem_gb > 0.0 {
            let delta = format!("{:+.2} GB", p.peak_mem_gb - b.peak_mem_gb);
            let _ = writeln!(
                out,
                "  {:<14} {:>7.2} GB  {:>7.2} GB  {delta:>18}",
                "Peak memory", b.peak_mem_gb, p.peak_mem_gb
            );
        }
        if !v.notes.is_empty() {
            let _ = writeln!(out, "  Notes: {}", v.notes);
        }
    }
    if let Some(n) = &m.note {
        let _ = writeln!(out, "\n  Note: {n}");
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// benchmarks/repro_capsules/glm47_flash_control_m4max_20260205.json of the original.
    const GLM_CAPSULE: &str = r#"{
  "meta": {
    "date": "2026-02-04",
    "device": "Apple M4 Max",
    "memory_gb": 36,
    "macos": "26.1",
    "mlx_version": "0.30.4.dev20260204+2f324cc",
    "zmlx_version": "0.8.0",
    "git_commit": "c6df299",
    "python": "3.14",
    "has_gather_qmm_swiglu": true,
    "command_control_swiglu_moe": "python -m zmlx.validate mlx-community/GLM-4.7-Flash-4bit --patterns swiglu_mlp moe_mlp --runs 3 --max-tokens 200"
  },
  "control_swiglu_moe": {
    "model": "mlx-community/GLM-4.7-Flash-4bit",
    "variant": "control_swiglu_moe",
    "max_tokens": 200,
    "gen_tokens": 200,
    "runs": 3,
    "fidelity": {"matched": 200, "total": 200, "verdict": "PASS"},
    "baseline": {
      "prefill_tok_s": [300.2, 273.3, 275.5],
      "decode_tok_s": [86.4, 86.6, 86.8],
      "median_prefill": 275.5,
      "median_decode": 86.6,
      "peak_mem_gb": 16.91
    },
    "patched": {
      "patterns": ["moe_mlp", "swiglu_mlp"],
      "modules_patched": 47,
      "prefill_tok_s": [308.3, 279.4, 278.0],
      "decode_tok_s": [92.5, 92.4, 92.0],
      "median_prefill": 279.4,
      "median_decode": 92.4,
      "peak_mem_gb": 16.91
    },
    "summary": {"decode_speedup": 1.067, "prefill_change": 0.0142},
    "notes": "Control: current best patch set (no RoPE fusion)."
  }
}"#;

    #[test]
    fn reads_original_capsule_and_renders_report() {
        let c: Capsule = serde_json::from_str(GLM_CAPSULE).unwrap();
        assert_eq!(c.meta.memory_gb, 36.0);
        assert_eq!(c.variants.len(), 1);
        let (key, v) = &c.variants[0];
        assert_eq!(key, "control_swiglu_moe");
        assert_eq!(v.patched.modules_patched, 47);
        assert_eq!(v.patched.stats.decode_tok_s, [92.5, 92.4, 92.0]);
        assert_eq!(v.summary.decode_speedup, 1.067);
        assert!(v.patched.stats.extra.is_empty() && v.extra.is_empty());
        let r = render_report(&c);
        // Table rows checked against the original report.py's output for this file.
        let expected = "\
==============================================================
  ZMLX Benchmark Report
==============================================================
  Date:    2026-02-04
  Device:  Apple M4 Max (36 GB)
  macOS:   26.1
  MLX:     0.30.4.dev20260204+2f324cc
  ZMLX:    0.8.0
  Python:  3.14
  Commit:  c6df299

  Commands:
    $ python -m zmlx.validate mlx-community/GLM-4.7-Flash-4bit --patterns swiglu_mlp moe_mlp --runs 3 --max-tokens 200

  mlx-community/GLM-4.7-Flash-4bit
  Metric             Baseline      Patched             Change
  ----------------------------------------------------------
  Decode               86.6        92.4           **+6.7%**
  Prefill             275.5       279.4     +1.4% (neutral)
  Fidelity                         200/200                PASS
  Peak memory      16.91 GB    16.91 GB            +0.00 GB
  Notes: Control: current best patch set (no RoPE fusion).

";
        assert_eq!(r, expected, "\n{r}");
    }

    #[test]
    fn prefill_band_is_wider_than_decode_band() {
        assert_eq!(fmt_change(100.0, 102.5, DECODE_NEUTRAL_PCT), "**+2.5%**");
        assert_eq!(fmt_change(100.0, 102.5, PREFILL_NEUTRAL_PCT), "+2.5% (neutral)");
        assert_eq!(fmt_change(100.0, 96.0, PREFILL_NEUTRAL_PCT), "**-4.0%**");
        assert_eq!(fmt_change(0.0, 96.0, PREFILL_NEUTRAL_PCT), "\u{2014}");
    }

    #[test]
    fn other_layouts_are_refused_with_the_file_name() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("suite_summary.json");
        std::fs::write(&p, r#"{"suite":"x","results":[],"env_overrides":{}}"#).unwrap();
        let err = format!("{:#}", read_capsule(&p).unwrap_err());
        assert!(err.contains("suite_summary.json") && err.contains("layout A"), "{err}");
        let missing = format!("{:#}", read_capsule(&dir.path().join("nope.json")).unwrap_err());
        assert!(missing.contains("nope.json"), "{missing}");
        std::fs::write(&p, r#"{"meta":{},"v":{"runs":"three"}}"#).unwrap();
        let err = format!("{:#}", read_capsule(&p).unwrap_err());
        assert!(err.contains("suite_summary.json") && err.contains("section \"v\""), "{err}");
    }

    #[test]
    fn write_then_read_round_trips_with_our_extras() {
        let mut c: Capsule = serde_json::from_str(GLM_CAPSULE).unwrap();
        c.meta.backend = Some("cpu".into());
        c.meta.mlx_rs_version = Some("0.33.0".into());
        c.meta.libmlx_version = Some("0.32.2".into());
        c.meta.command_line = vec!["zmlx".into(), "validate".into(), "--notes".into(), "it's a test".into()];
        c.meta.env = BTreeMap::from([("ZMLX_MOE_STREAMS".to_string(), "2".to_string())]);
        c.variants[0].1.baseline.token_ids = Some(vec![vec![1, 2, 3], vec![1, 2, 3]]);
        c.variants[0].1.fidelity.first_divergence = Some(17);
        let dir = tempfile::tempdir().unwrap();
        let p1 = write_capsule(&dir.path().join("caps"), &c).unwrap();
        let p2 = write_capsule(&dir.path().join("caps"), &c).unwrap();
        let name = p1.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("glm-4-7-flash-4bit_control_swiglu_moe_2") && name.ends_with(".json"), "{name}");
        assert_ne!(p1, p2, "a second capsule in the same second must not overwrite the first");
        assert_eq!(read_capsule(&p1).unwrap(), c);
        let explicit = write_capsule(&dir.path().join("x/y.json"), &c).unwrap();
        assert_eq!(read_capsule(&explicit).unwrap(), c);
        // Key order of the file: meta first, then the variant; the original's keys first.
        let text = std::fs::read_to_string(&p1).unwrap();
        assert!(text.find("\"meta\"").unwrap() < text.find("\"control_swiglu_moe\": {").unwrap());
        let r = render_report(&c);
        assert!(r.contains("  Backend: cpu (mlx-rs 0.33.0, libmlx 0.32.2)\n"), "{r}");
        assert!(r.contains("    ZMLX_MOE_STREAMS=2\n"));
        assert!(r.contains("first diff @ 17"));
        c.meta.extra.clear();
        assert!(render_report(&c).contains("    $ zmlx validate --notes 'it'\\''s a test'\n"));
        assert!(write_capsule(dir.path(), &Capsule::default()).is_err());
    }

    #[test]
    fn helpers() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        let mut m = CapsuleMeta::default();
        m.set_command("v1", "zmlx validate x");
        assert_eq!(m.commands(), [("command_v1", "zmlx validate x")]);
        assert!(capture_env().keys().all(|k| k.starts_with("ZMLX_") || k == "LD_LIBRARY_PATH"));
    }
}
