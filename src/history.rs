//! Views of the ledger: history table, JSON, SVG plot, CSV export and ledger diff.
//!
//! Text layouts follow the original's `python -m zmlx.matrix history|csv|diff` byte for byte
//! where it had one; where we go further (pattern/since/fidelity filters, colour, a
//! fidelity column in `diff`) the additions are noted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone, Utc};

use crate::ledger::{latest, py_float_repr, sorted_patterns, EntryKey, MatrixEntry};

const GREEN: &str = "\x1b[32m";
const RED: &str = "\x1b[31m";
const RESET: &str = "\x1b[0m";

/// Which entries `filter` keeps. Every field that is set must match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistoryQuery {
    /// Case-insensitive substring of `model_id` or of the part after the last '/'.
    pub query: Option<String>,
    /// Exact hardware string, as in the original.
    pub hardware: Option<String>,
    /// The entry's patterns must include this one.
    pub pattern: Option<String>,
    /// Entries at or after this instant; entries without a readable timestamp are dropped.
    pub since: Option<DateTime<Utc>>,
    /// Case-insensitive fidelity verdict (PASS, FAIL, SKIP, EXCLUDED).
    pub fidelity: Option<String>,
}

/// Parse a ledger timestamp: RFC 3339 (what Python's `isoformat()` writes for aware
/// datetimes), a naive date-time taken as UTC, or a bare date (midnight UTC).
pub fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, fmt) {
            return Some(Utc.from_utc_datetime(&t));
        }
    }
    let d = NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?;
    Some(Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0)?))
}

/// `--since` argument: a date (`2026-02-05`) or a date-time (RFC 3339 or naive UTC).
pub fn parse_since(s: &str) -> Result<DateTime<Utc>> {
    parse_timestamp(s)
        .ok_or_else(|| anyhow!("cannot read {s:?} as a date (YYYY-MM-DD) or date-time (YYYY-MM-DDTHH:MM:SS[+00:00])"))
}

impl HistoryQuery {
    pub fn matches(&self, e: &MatrixEntry) -> bool {
        if let Some(q) = self.query.as_deref() {
            let q = q.trim().to_lowercase();
            let id = e.model_id.to_lowercase();
            let name = id.rsplit('/').next().unwrap_or("");
            if !id.contains(&q) && !name.contains(&q) {
                return false;
            }
        }
        if self.hardware.as_deref().is_some_and(|h| h != e.hardware) {
            return false;
        }
        if let Some(p) = self.pattern.as_deref() {
            if !e.patterns_applied.iter().any(|x| x == p) {
                return false;
            }
        }
        if let Some(since) = self.since {
            match parse_timestamp(&e.timestamp) {
                Some(t) if t >= since => {}
                _ => return false,
            }
        }
        if let Some(f) = self.fidelity.as_deref() {
            if !f.eq_ignore_ascii_case(&e.fidelity) {
                return false;
            }
        }
        true
    }
}

/// Matching entries, oldest first. Sorted by the parsed instant (the original compared the
/// strings, which misorders mixed UTC offsets), then by the raw string; stable, so equal
/// timestamps keep file order.
pub fn filter(entries: &[MatrixEntry], q: &HistoryQuery) -> Vec<MatrixEntry> {
    let mut out: Vec<MatrixEntry> = entries.iter().filter(|e| q.matches(e)).cloned().collect();
    out.sort_by_cached_key(|e| (parse_timestamp(&e.timestamp), e.timestamp.clone()));
    out
}

/// Python's `repr(str)`, which the original used to quote the query in the header.
fn py_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::from(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c == '\x7f' => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// The original's history table, as the exact text it printed (leading and trailing blank
/// lines included). `entries` should come from `filter`. Colour (fidelity PASS green,
/// FAIL red) only when `color`; pass `std::io::stdout().is_terminal()`.
pub fn render_table(entries: &[MatrixEntry], q: &HistoryQuery, color: bool) -> String {
    if entries.is_empty() {
        return "\n[matrix] No matching entries.\n".into();
    }
    let what = match q.query.as_deref() {
        Some(s) => py_repr(s),
        None => "all models".into(),
    };
    let mut out = format!("\n[matrix] History for {what} ({} entries)\n", entries.len());
    // Hardware line as in the original; the other lines are our filters.
    let filters = [
        ("Hardware", q.hardware.clone()),
        ("Pattern", q.pattern.clone()),
        ("Since", q.since.map(|t| t.to_rfc3339())),
        ("Fidelity", q.fidelity.clone()),
    ];
    for (name, value) in filters {
        if let Some(v) = value {
            let _ = writeln!(out, "[matrix] {name}: {v}");
        }
    }
    let header = format!(
        "{:<20} {:>8} {:>8} {:>8} {:>6} {:<28} Notes",
        "Timestamp", "Decode", "Base", "Patched", "Fid", "Patterns"
    );
    let _ = write!(out, "\n{header}\n{}\n", "-".repeat(header.chars().count()));
    for e in entries {
        let ts: String = e.timestamp.chars().take(19).collect();
        let patterns = if e.patterns_applied.is_empty() { "(none)".to_string() } else { e.patterns_applied.join(",") };
        let notes = e.notes.replace('\n', " ");
        // Pad before colouring so escape codes do not count toward the width.
        let fid = format!("{:>6}", e.fidelity);
        let fid = match (color, e.fidelity.as_str()) {
            (true, "PASS") => format!("{GREEN}{fid}{RESET}"),
            (true, "FAIL") => format!("{RED}{fid}{RESET}"),
            _ => fid,
        };
        let _ = writeln!(
            out,
            "{ts:<20} {:>8.3} {:>8.1} {:>8.1} {fid} {patterns:<28} {}",
            e.decode_speedup,
            e.decode_tps_baseline,
            e.decode_tps_patched,
            notes.trim()
        );
    }
    out.push('\n');
    out
}

/// The entries as a pretty-printed JSON array (ledger field names and order).
pub fn render_json(entries: &[MatrixEntry]) -> String {
    serde_json::to_string_pretty(entries).expect("MatrixEntry always serializes")
}

/// Plot patched decode tok/s over time, one line per pattern set (per model and pattern
/// set when several models are present), with axis labels and a legend.
///
/// SVG only: plotters draws text into bitmaps through a font rasteriser (font-kit or
/// ab_glyph plus a font file), which this dependency-light build leaves out, so `.png`
/// gets an error saying so. Entries without a readable timestamp or with
/// `decode_tps_patched <= 0` (skipped runs) are left out.
pub fn plot(entries: &[MatrixEntry], path: &Path) -> Result<()> {
    use plotters::prelude::*;

    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("svg") => {}
        Some("png") => bail!(
            "cannot write {}: PNG plots are not supported by this build (plotters needs a font \
             rasteriser to draw text into bitmaps); use a .svg path",
            path.display()
        ),
        Some(other) => bail!("cannot write {}: unsupported plot extension '.{other}'; use .svg", path.display()),
        None => bail!("cannot write {}: no file extension; use .svg", path.display()),
    }

    let models: HashSet<&str> = entries.iter().map(|e| e.model_id.as_str()).collect();
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for e in entries {
        let Some(t) = parse_timestamp(&e.timestamp) else {
            continue;
        };
        // Also drops NaN (a non-finite value read back from `null`).
        if e.decode_tps_patched.is_nan() || e.decode_tps_patched <= 0.0 {
            continue;
        }
        let p = sorted_patterns(&e.patterns_applied);
        let mut label = if p.is_empty() { "(none)".to_string() } else { p.join("+") };
        if models.len() > 1 {
            label = format!("{}: {label}", short_model(&e.model_id));
        }
        // Days since the epoch: an f64 axis with our own date labels needs no plotters
        // datetime feature.
        let x = t.timestamp_millis() as f64 / 86_400_000.0;
        series.entry(label).or_default().push((x, e.decode_tps_patched));
    }
    if series.is_empty() {
        bail!("nothing to plot: no entry has a timestamp and decode_tps_patched > 0");
    }
    for pts in series.values_mut() {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let all = series.values().flatten();
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    // Pad so single points and flat lines still get a non-empty range.
    let xpad = ((x1 - x0) * 0.05).max(0.5);
    let ypad = ((y1 - y0) * 0.1).max(1.0);
    let (x0, x1, y0, y1) = (x0 - xpad, x1 + xpad, (y0 - ypad).max(0.0), y1 + ypad);
    let span_days = x1 - x0;

    let draw_err = |e: &dyn std::fmt::Display| anyhow!("drawing plot {}: {e}", path.display());
    let root = SVGBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw_err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Decode tok/s (patched) over time", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(|e| draw_err(&e))?;
    let fmt_x = move |x: &f64| {
        let t = DateTime::<Utc>::from_timestamp_millis((x * 86_400_000.0) as i64);
        let fmt = if span_days > 3.0 { "%Y-%m-%d" } else { "%m-%d %H:%M" };
        t.map(|t| t.format(fmt).to_string()).unwrap_or_default()
    };
    chart
        .configure_mesh()
        .x_desc("Run time (UTC)")
        .y_desc("Decode tok/s (patched)")
        .x_labels(6)
        .x_label_formatter(&fmt_x)
        .draw()
        .map_err(|e| draw_err(&e))?;
    for (i, (label, pts)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
            .map_err(|e| draw_err(&e))?
            .label(label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| draw_err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| draw_err(&e))?;
    root.present().map_err(|e| draw_err(&e))?;
    Ok(())
}

/// Columns of the original's CSV export: the schema minus notes, macos_version,
/// python_version, zmlx_commit and the per-run lists.
pub const CSV_COLUMNS: [&str; 23] = [
    "model_id",
    "model_family",
    "architecture",
    "patterns_applied",
    "hardware",
    "fidelity",
    "fidelity_detail",
    "modules_patched",
    "decode_tps_baseline",
    "decode_tps_patched",
    "decode_speedup",
    "prefill_tps_baseline",
    "prefill_tps_patched",
    "prefill_change",
    "peak_mem_baseline_gb",
    "peak_mem_patched_gb",
    "max_tokens",
    "gen_tokens",
    "runs",
    "mlx_version",
    "zmlx_version",
    "custom_mlx",
    "timestamp",
];

/// CSV of the latest entry per (model, hardware, pattern set), sorted by (family, model),
/// formatted as Python's `csv.DictWriter` wrote it: CRLF line ends, minimal quoting,
/// `repr` floats, `True`/`False`, patterns joined with ';'. Applies `latest` itself, so
/// passing all entries or already-latest ones gives the same result. An empty ledger gives
/// the header only (the original fell back to its model catalog, which we do not have).
pub fn csv(entries: &[MatrixEntry]) -> String {
    let mut rows = latest(entries);
    rows.sort_by(|a, b| (&a.model_family, &a.model_id).cmp(&(&b.model_family, &b.model_id)));
    let mut out = String::new();
    push_csv_row(&mut out, CSV_COLUMNS.iter().map(|s| s.to_string()));
    for e in &rows {
        let f = |x: f64| py_float_repr(x);
        let cells = [
            e.model_id.clone(),
            e.model_family.clone(),
            e.architecture.clone(),
            e.patterns_applied.join(";"),
            e.hardware.clone(),
            e.fidelity.clone(),
            e.fidelity_detail.clone(),
            e.modules_patched.to_string(),
            f(e.decode_tps_baseline),
            f(e.decode_tps_patched),
            f(e.decode_speedup),
            f(e.prefill_tps_baseline),
            f(e.prefill_tps_patched),
            f(e.prefill_change),
            f(e.peak_mem_baseline_gb),
            f(e.peak_mem_patched_gb),
            e.max_tokens.to_string(),
            e.gen_tokens.to_string(),
            e.runs.to_string(),
            e.mlx_version.clone(),
            e.zmlx_version.clone(),
            if e.custom_mlx { "True" } else { "False" }.to_string(),
            e.timestamp.clone(),
        ];
        push_csv_row(&mut out, cells.into_iter());
    }
    out
}

fn push_csv_row(out: &mut String, cells: impl Iterator<Item = String>) {
    for (i, cell) in cells.enumerate() {
        if i > 0 {
            out.push(',');
        }
        // QUOTE_MINIMAL: quote only cells holding the delimiter, a quote or a line break.
        if cell.contains([',', '"', '\n', '\r']) {
            let _ = write!(out, "\"{}\"", cell.replace('"', "\"\""));
        } else {
            out.push_str(&cell);
        }
    }
    out.push_str("\r\n");
}

fn short_model(model_id: &str) -> &str {
    model_id.rsplit('/').next().unwrap_or(model_id)
}

/// Compare the latest results of two ledgers: patched decode tok/s old → new with the
/// change in percent, like the original's `diff`, keyed by (model, hardware, pattern set)
/// instead of (model, hardware). Additions: a Patterns column, a Hardware column when the
/// ledgers span several machines, and the fidelity verdict old→new (the original ignored
/// fidelity, so a speedup that broke token identity looked like a win).
pub fn diff(a_entries: &[MatrixEntry], b_entries: &[MatrixEntry]) -> String {
    let index =
        |v: Vec<MatrixEntry>| -> HashMap<EntryKey, MatrixEntry> { v.into_iter().map(|e| (e.key(), e)).collect() };
    let (old, new) = (index(latest(a_entries)), index(latest(b_entries)));
    let mut keys: Vec<&EntryKey> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    if keys.is_empty() {
        return "No entries to compare.\n".into();
    }
    let multi_hw = keys.iter().map(|k| &k.1).collect::<HashSet<_>>().len() > 1;
    let pattern_cell = |p: &[String]| {
        if p.is_empty() {
            "(none)".to_string()
        } else {
            p.join(",")
        }
    };
    // Our own column, so it may widen to keep rows aligned (at least the original's 28).
    let pw = keys.iter().map(|k| pattern_cell(&k.2).len()).max().unwrap_or(0).max(28);

    let hw_col = |h: &str| {
        if multi_hw {
            format!(" {h:<20}")
        } else {
            String::new()
        }
    };
    let header = format!(
        "{:<40} {:<pw$}{} {:>10} {:>10} {:>10}  Fidelity",
        "Model",
        "Patterns",
        hw_col("Hardware"),
        "Old",
        "New",
        "Change"
    );
    let mut out = format!("\n{header}\n{}\n", "-".repeat(header.chars().count()));
    for key in keys {
        let (o, n) = (old.get(key), new.get(key));
        let tps = |e: Option<&MatrixEntry>| e.map_or("--".into(), |e| format!("{:.1}", e.decode_tps_patched));
        let change = match (o, n) {
            (Some(o), Some(n)) if o.decode_tps_patched > 0.0 => {
                format!("{:+.1}%", (n.decode_tps_patched / o.decode_tps_patched - 1.0) * 100.0)
            }
            _ => "--".into(),
        };
        let fid = |e: Option<&MatrixEntry>| e.map_or_else(|| "--".to_string(), |e| e.fidelity.clone());
        let patterns = pattern_cell(&key.2);
        let _ = writeln!(
            out,
            "{:<40} {patterns:<pw$}{} {:>10} {:>10} {change:>10}  {}\u{2192}{}",
            short_model(&key.0),
            hw_col(&key.1),
            tps(o),
            tps(n),
            fid(o),
            fid(n)
        );
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::MatrixEntry;

    fn e(model: &str, patterns: &[&str], ts: &str, base: f64, tps: f64, fid: &str) -> MatrixEntry {
        MatrixEntry {
            model_id: model.into(),
            model_family: model.split('/').nth(1).unwrap_or("x")[..3].to_lowercase(),
            architecture: "moe".into(),
            patterns_applied: patterns.iter().map(|s| s.to_string()).collect(),
            hardware: "Apple M4 Max 36GB".into(),
            timestamp: ts.into(),
            fidelity: fid.into(),
            decode_tps_baseline: base,
            decode_tps_patched: tps,
            decode_speedup: (tps / base * 10_000.0).round() / 10_000.0,
            ..MatrixEntry::default()
        }
    }

    fn sample() -> Vec<MatrixEntry> {
        let mut a =
            e("mlx-community/Qwen3-30B-A3B-4bit", &["moe_mlp"], "2026-02-05T15:16:38.1+00:00", 106.6, 115.0, "PASS");
        a.notes = "first\nrun".into();
        vec![
            e(
                "mlx-community/GLM-4.7-Flash-4bit",
                &["moe_mlp", "swiglu_mlp"],
                "2026-02-06T01:00:00+00:00",
                86.6,
                92.4,
                "PASS",
            ),
            a,
            e(
                "mlx-community/GLM-4.7-Flash-4bit",
                &["moe_mlp", "residual_norm", "swiglu_mlp"],
                "2026-02-05T05:58:35+00:00",
                80.7,
                87.3,
                "FAIL",
            ),
            e("mlx-community/Qwen3-30B-A3B-4bit", &[], "2026-02-07T00:00:00+00:00", 100.0, 0.0, "SKIP"),
        ]
    }

    #[test]
    fn filter_by_query_pattern_since_fidelity() {
        let all = sample();
        let q = |f: fn(&mut HistoryQuery)| {
            let mut q = HistoryQuery::default();
            f(&mut q);
            filter(&all, &q).iter().map(|e| e.timestamp[..10].to_string()).collect::<Vec<_>>()
        };
        // Sorted by time; "qwen3" matches the id, "mlx-community/glm" the full id.
        assert_eq!(q(|q| q.query = Some("QWEN3".into())), ["2026-02-05", "2026-02-07"]);
        assert_eq!(q(|q| q.query = Some("mlx-community/glm".into())), ["2026-02-05", "2026-02-06"]);
        assert_eq!(q(|q| q.pattern = Some("swiglu_mlp".into())), ["2026-02-05", "2026-02-06"]);
        assert_eq!(q(|q| q.since = Some(parse_since("2026-02-06").unwrap())), ["2026-02-06", "2026-02-07"]);
        assert_eq!(q(|q| q.fidelity = Some("fail".into())), ["2026-02-05"]);
        assert_eq!(q(|q| q.hardware = Some("Apple M1 Pro 16GB".into())), Vec::<String>::new());
        assert!(parse_since("yesterday").is_err());
        assert_eq!(parse_timestamp("2026-02-05T01:01:40.104915+00:00").unwrap().timestamp(), 1_770_253_300);
    }

    #[test]
    fn table_matches_original_layout() {
        let q = HistoryQuery { query: Some("qwen3".into()), ..Default::default() };
        let rows = filter(&sample(), &q);
        let t = render_table(&rows, &q, false);
        let expected = "\n[matrix] History for 'qwen3' (2 entries)\n\n\
Timestamp              Decode     Base  Patched    Fid Patterns                     Notes\n\
-----------------------------------------------------------------------------------------\n\
2026-02-05T15:16:38     1.079    106.6    115.0   PASS moe_mlp                      first run\n\
2026-02-07T00:00:00     0.000    100.0      0.0   SKIP (none)                       \n\n";
        assert_eq!(t, expected);
        assert!(!t.contains('\x1b'));
        let c = render_table(&rows, &q, true);
        assert!(c.contains("\x1b[32m  PASS\x1b[0m moe_mlp"));
        assert_eq!(render_table(&[], &q, true), "\n[matrix] No matching entries.\n");
        let q2 = HistoryQuery { query: Some("it's".into()), hardware: Some("hw".into()), ..Default::default() };
        assert!(render_table(&rows, &q2, false)
            .starts_with("\n[matrix] History for \"it's\" (2 entries)\n[matrix] Hardware: hw\n\n"));
    }

    #[test]
    fn json_is_an_array_of_ledger_objects() {
        let v: serde_json::Value = serde_json::from_str(&render_json(&sample())).unwrap();
        assert_eq!(v.as_array().unwrap().len(), 4);
        assert_eq!(v[0]["decode_tps_patched"], 92.4);
    }

    #[test]
    fn csv_matches_python_dictwriter() {
        let mut rows = sample();
        rows[0].fidelity_detail = "200/200 tokens, \"identical\"".into();
        rows[0].custom_mlx = true;
        rows.push(e(
            "mlx-community/GLM-4.7-Flash-4bit",
            &["swiglu_mlp", "moe_mlp"],
            "2026-02-08T00:00:00+00:00",
            86.0,
            93.0,
            "PASS",
        ));
        let c = csv(&rows);
        let lines: Vec<&str> = c.split("\r\n").collect();
        assert_eq!(lines.len(), 6, "header + 4 latest rows + empty tail: {c}");
        assert_eq!(lines[0], CSV_COLUMNS.join(","));
        // glm sorts first; the later GLM moe+swiglu line replaced the earlier one.
        assert_eq!(
            lines[1],
            "mlx-community/GLM-4.7-Flash-4bit,glm,moe,swiglu_mlp;moe_mlp,Apple M4 Max 36GB,PASS,,0,86.0,93.0,1.0814,0.0,0.0,0.0,0.0,0.0,0,0,0,,,False,2026-02-08T00:00:00+00:00"
        );
        assert!(lines[2].contains("residual_norm"));
        assert!(lines[3].starts_with("mlx-community/Qwen3-30B-A3B-4bit,qwe,"));
        assert_eq!(csv(&[]), CSV_COLUMNS.join(",") + "\r\n");
        assert!(csv(&rows[..1]).contains(",\"200/200 tokens, \"\"identical\"\"\","));
    }

    #[test]
    fn diff_shows_change_and_fidelity() {
        let old = sample();
        let mut new = sample();
        new[0].decode_tps_patched = 101.64; // +10.0 %
        new[2].fidelity = "PASS".into();
        new.pop();
        new.push(e(
            "org/New-Model",
            &["moe_mlp", "a_very_long_pattern_name"],
            "2026-02-09T00:00:00+00:00",
            50.0,
            55.0,
            "PASS",
        ));
        let d = diff(&old, &new);
        let lines: Vec<&str> = d.lines().collect();
        assert_eq!(lines[0], "");
        assert!(lines[1].starts_with("Model ") && lines[1].ends_with("Change  Fidelity"));
        assert!(!lines[1].contains("Hardware"));
        let row = |m: &str, p: &str| {
            lines
                .iter()
                .find(|l| l.starts_with(m) && l[41..].starts_with(p))
                .copied()
                .unwrap_or_else(|| panic!("{m} {p}\n{d}"))
        };
        assert!(row("GLM-4.7-Flash-4bit ", "moe_mlp,swiglu_mlp ").ends_with("92.4      101.6     +10.0%  PASS→PASS"));
        assert!(row("GLM-4.7-Flash-4bit ", "moe_mlp,residual_norm").ends_with("87.3       87.3      +0.0%  FAIL→PASS"));
        assert!(row("Qwen3-30B-A3B-4bit ", "(none)").ends_with("0.0         --         --  SKIP→--"));
        assert!(row("New-Model ", "a_very_long_pattern_name,moe_mlp").ends_with("--       55.0         --  --→PASS"));
        // A pattern set longer than 28 chars widens the column instead of shifting its row.
        let widths: HashSet<usize> = lines[1..]
            .iter()
            .filter(|l| !l.is_empty() && !l.starts_with('-'))
            .map(|l| l.rfind("  ").unwrap())
            .collect();
        assert_eq!(widths.len(), 1, "{d}");
        assert_eq!(diff(&[], &[]), "No entries to compare.\n");
        new[0].hardware = "Apple M1 Pro 16GB".into();
        assert!(diff(&old, &new).contains(" Hardware "));
    }

    #[test]
    fn plot_writes_svg_and_refuses_other_extensions() {
        let dir = tempfile::tempdir().unwrap();
        let svg = dir.path().join("h.svg");
        plot(&sample(), &svg).unwrap();
        let text = std::fs::read_to_string(&svg).unwrap();
        assert!(text.starts_with("<svg"));
        for needle in
            ["Decode tok/s (patched)", "Run time (UTC)", "GLM-4.7-Flash-4bit: moe_mlp+swiglu_mlp", "<polyline"]
        {
            assert!(text.contains(needle), "missing {needle}");
        }
        let png = plot(&sample(), &dir.path().join("h.png")).unwrap_err().to_string();
        assert!(png.contains("PNG") && png.contains(".svg"), "{png}");
        let gif = plot(&sample(), &dir.path().join("h.gif")).unwrap_err().to_string();
        assert!(gif.contains("'.gif'"), "{gif}");
        assert!(plot(&sample()[3..], &svg).is_err(), "a SKIP row alone has nothing to plot");
    }
}
