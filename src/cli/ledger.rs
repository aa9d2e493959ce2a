//! `zmlx history`, `report`, `diff`, `csv`: views of the ledger and of capsules.
use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::history;
use crate::ledger::{Ledger, MatrixEntry};

#[derive(clap::Args)]
pub struct HistoryArgs {
    /// Substring of the model id.
    pub query: Option<String>,
    #[arg(long)]
    pub hardware: Option<String>,
    #[arg(long)]
    pub pattern: Option<String>,
    /// Only entries at or after this date (YYYY-MM-DD or an RFC 3339 time).
    #[arg(long)]
    pub since: Option<String>,
    #[arg(long, value_parser = ["PASS", "FAIL", "SKIP", "EXCLUDED"])]
    pub fidelity: Option<String>,
    #[arg(long)]
    pub ledger: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    /// Draw decode tok/s over time per pattern set (.svg).
    #[arg(long)]
    pub plot: Option<PathBuf>,
}

impl HistoryArgs {
    /// Every entry of `ledger` (the demo).
    pub fn all(ledger: PathBuf) -> HistoryArgs {
        HistoryArgs {
            query: None,
            hardware: None,
            pattern: None,
            since: None,
            fidelity: None,
            ledger: Some(ledger),
            json: false,
            plot: None,
        }
    }
}

/// An explicit path, else `$ZMLX_LEDGER`, else benchmarks/matrix.jsonl.
pub fn ledger_path(explicit: Option<&Path>) -> PathBuf {
    crate::ledger::resolve_ledger_path(explicit, Path::new("."))
}

/// The entries of an existing ledger; unreadable lines are reported on stderr and skipped.
fn read_ledger(path: &Path) -> Result<Vec<MatrixEntry>> {
    let read = Ledger::new(path).read()?;
    for (line, why) in &read.bad_lines {
        eprintln!("[matrix] warning: {}:{line}: skipped unreadable line ({why})", path.display());
    }
    Ok(read.into_entries())
}

pub fn history(a: &HistoryArgs) -> Result<i32> {
    use std::io::IsTerminal;
    let entries = read_ledger(&ledger_path(a.ledger.as_deref()))?;
    let q = history::HistoryQuery {
        query: a.query.clone(),
        hardware: a.hardware.clone(),
        pattern: a.pattern.clone(),
        since: a.since.as_deref().map(history::parse_since).transpose()?,
        fidelity: a.fidelity.clone(),
    };
    let rows = history::filter(&entries, &q);
    if let Some(p) = &a.plot {
        history::plot(&rows, p)?;
        eprintln!("[matrix] plot written to {}", p.display());
    }
    if a.json {
        println!("{}", history::render_json(&rows));
    } else {
        print!("{}", history::render_table(&rows, &q, std::io::stdout().is_terminal()));
    }
    Ok(0)
}

pub fn report(capsule: &Path) -> Result<i32> {
    let c = crate::capsule::read_capsule(capsule)?;
    print!("{}", crate::capsule::render_report(&c));
    Ok(0)
}

pub fn diff(a: &Path, b: &Path) -> Result<i32> {
    print!("{}", history::diff(&read_ledger(a)?, &read_ledger(b)?));
    Ok(0)
}

pub fn csv(ledger: Option<&Path>) -> Result<i32> {
    print!("{}", history::csv(&read_ledger(&ledger_path(ledger))?));
    Ok(0)
}
