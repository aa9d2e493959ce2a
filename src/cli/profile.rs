//! `zmlx profile`: MLX operations per decode step and ms per slot, stock vs patched.
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
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &ProfileArgs) -> Result<i32> {
    let backend = mlx_env::init()?;
    let (mut model, _) = Model::load(&a.model, a.dtype, backend)?;
    let tok = TextTokenizer::load(&a.model, &model.config)?;
    let prompt = tok.encode(&a.prompt)?;
    let selection = a.patterns.select(model.family())?;
    let stock = crate::profile::decode_profile(&model, &prompt, a.tokens)?;
    patterns::patch(&mut model, &selection)?;
    let patched = crate::profile::decode_profile(&model, &prompt, a.tokens)?;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"model": a.model, "patterns": selection.names, "stock": stock, "patched": patched})
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
    println!("{:<18} {:>10} {:>10}", "slot (ms/token)", "stock", "patched");
    let keys: BTreeSet<&String> = stock.ms_by_slot.keys().chain(patched.ms_by_slot.keys()).collect();
    for k in keys {
        let f = |m: &BTreeMap<String, f64>| m.get(k).map_or("-".into(), |v| format!("{v:.2}"));
        println!("{:<18} {:>10} {:>10}", k, f(&stock.ms_by_slot), f(&patched.ms_by_slot));
    }
    println!("{:<18} {:>10.2} {:>10.2}", "total", stock.ms_total, patched.ms_total);
    let mut ops: Vec<(&String, &usize)> = stock.ops_by_primitive.iter().collect();
    ops.sort_by(|x, y| y.1.cmp(x.1));
    let top: Vec<String> = ops.iter().take(8).map(|(k, v)| format!("{k} {v}")).collect();
    println!("most frequent stock ops: {}", top.join(", "));
    Ok(0)
}
