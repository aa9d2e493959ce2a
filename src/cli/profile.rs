//! `zmlx profile`: MLX operations per decode step and ms per slot, stock vs patched; with
//! `--prefill N`, the same for one prefill of the prompt (N timed runs).
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use anyhow::Result;

use super::args::{at_least_one, PatternArgs};
use crate::model::{DtypeChoice, Model};
use crate::tokenizer::TextTokenizer;
use crate::{mlx_env, patterns};

#[derive(clap::Args)]
pub struct ProfileArgs {
    /// Checkpoint directory.
    pub model: PathBuf,
    /// The patched side's patterns (default: ZMLX_PATTERNS, else the family preset).
    #[command(flatten)]
    pub patterns: PatternArgs,
    /// Decode steps to time.
    #[arg(long, default_value_t = 16, value_parser = at_least_one)]
    pub tokens: usize,
    #[arg(long, default_value = super::DEFAULT_GENERATE_PROMPT)]
    pub prompt: String,
    #[arg(long, value_enum, default_value = "auto")]
    pub dtype: DtypeChoice,
    /// Also profile the prefill of the prompt: N timed runs (barriered and not), ops by primitive.
    #[arg(long, value_parser = parse_prefill_runs)]
    pub prefill: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

fn parse_prefill_runs(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=100).contains(&n) => Ok(n),
        _ => Err(format!("`{s}`: expected a number of runs from 1 to 100")),
    }
}

pub fn run(a: &ProfileArgs) -> Result<i32> {
    let backend = mlx_env::init()?;
    let (mut model, _) = Model::load(&a.model, a.dtype, backend)?;
    let tok = TextTokenizer::load(&a.model, &model.config)?;
    let prompt = tok.encode(&a.prompt)?;
    let selection = a.patterns.select(model.family())?;
    let prefill = |m: &Model| a.prefill.map(|runs| crate::profile::prefill_profile(m, &prompt, runs)).transpose();
    // Prefill first: its `ms_first` is then the process's first prefill (what a first prompt pays).
    let stock_prefill = prefill(&model)?;
    let stock = crate::profile::decode_profile(&model, &prompt, a.tokens)?;
    patterns::patch(&mut model, &selection)?;
    let patched = crate::profile::decode_profile(&model, &prompt, a.tokens)?;
    let patched_prefill = prefill(&model)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"model": a.model, "patterns": selection.names, "stock": stock, "patched": patched,
                               "stock_prefill": stock_prefill, "patched_prefill": patched_prefill})
        );
        return Ok(0);
    }
    println!(
        "decode-step profile of {} ({} layers), patched = {}",
        a.model.display(),
        model.layers.len(),
        selection.names.join(", ")
    );
    println!(
        "MLX operations per step: stock {} ({:.1}/layer), patched {} ({:.1}/layer)",
        stock.ops_total, stock.ops_per_layer, patched.ops_total, patched.ops_per_layer
    );
    print_slots("slot (ms/token)", (&stock.ms_by_slot, stock.ms_total), (&patched.ms_by_slot, patched.ms_total));
    let mut ops: Vec<(&String, &usize)> = stock.ops_by_primitive.iter().collect();
    ops.sort_by(|x, y| y.1.cmp(x.1));
    let top: Vec<String> = ops.iter().take(8).map(|(k, v)| format!("{k} {v}")).collect();
    println!("most frequent stock ops: {}", top.join(", "));
    if let (Some(sp), Some(pp)) = (&stock_prefill, &patched_prefill) {
        println!(
            "prefill of {} tokens: MLX operations stock {}, patched {}; unbarriered ms (median of {}): stock {:.2} ({:.1} tok/s), patched {:.2} ({:.1} tok/s)",
            sp.prompt_tokens, sp.ops_total, pp.ops_total, sp.runs, sp.ms_unbarriered, sp.tokens_per_second,
            pp.ms_unbarriered, pp.tokens_per_second
        );
        print_slots("slot (ms/prefill)", (&sp.ms_by_slot, sp.ms_total), (&pp.ms_by_slot, pp.ms_total));
    }
    Ok(0)
}

/// The stock vs patched table of milliseconds per slot, and the totals.
fn print_slots(title: &str, stock: (&BTreeMap<String, f64>, f64), patched: (&BTreeMap<String, f64>, f64)) {
    println!("{:<18} {:>10} {:>10}", title, "stock", "patched");
    let keys: BTreeSet<&String> = stock.0.keys().chain(patched.0.keys()).collect();
    for k in keys {
        let f = |m: &BTreeMap<String, f64>| m.get(k).map_or("-".into(), |v| format!("{v:.2}"));
        println!("{:<18} {:>10} {:>10}", k, f(stock.0), f(patched.0));
    }
    println!("{:<18} {:>10.2} {:>10.2}", "total", stock.1, patched.1);
}
