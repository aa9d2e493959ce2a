//! Shared argument pieces: value parsers that reject nonsense at parse time, and the one
//! pattern-selection path every model command uses.
use anyhow::Result;

use crate::config::Family;
use crate::patterns::{self, Selection, SelectionRequest};

/// `--patterns / --exclude / --allow-unsafe`, resolved the same way by every command.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct PatternArgs {
    /// Patterns to apply (`none` for none; `safe` / `fast` = the family's safe / fast preset);
    /// default: ZMLX_PATTERNS, else the safe family preset.
    #[arg(long, num_args = 1..)]
    pub patterns: Option<Vec<String>>,
    /// Patterns to leave out of the selection.
    #[arg(long, num_args = 1..)]
    pub exclude: Vec<String>,
    /// Allow patterns of class `unsafe`.
    #[arg(long)]
    pub allow_unsafe: bool,
}

impl PatternArgs {
    /// The selection for `family`: flags > `ZMLX_PATTERNS` > the family preset, then
    /// `--exclude`, then `ZMLX_<PATTERN>` switches.
    pub fn select(&self, family: Family) -> Result<Selection> {
        let env = patterns::relevant_env()?;
        patterns::resolve(&SelectionRequest {
            patterns: self.patterns.as_deref(),
            exclude: &self.exclude,
            family,
            allow_unsafe: self.allow_unsafe,
            env: &env,
        })
    }
}

/// `--expert-cache GB | --expert-cache-experts N [--expert-cache-policy lru|lfu]
/// [--expert-prefetch]`: expert offloading (`crate::offload`); no size = every expert loaded.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct OffloadArgs {
    /// Leave routed experts in the checkpoint files and keep at most this many GB of them in
    /// memory (all MoE layers together; at least top-k experts per layer). CPU backend.
    #[arg(long, value_name = "GB", value_parser = parse_cache_gb, conflicts_with = "expert_cache_experts")]
    pub expert_cache: Option<f64>,
    /// As --expert-cache, sized in experts per MoE layer (at least the model's top-k).
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub expert_cache_experts: Option<usize>,
    /// Which cached expert a miss replaces: lru (default) or lfu (least often selected so far).
    #[arg(long, value_enum)]
    pub expert_cache_policy: Option<crate::offload::Policy>,
    /// After the warm-up (--warmup, at least 1), keep the N experts each layer selected most
    /// often in memory for good (pinned; the rest of the cache is LRU/LFU).
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    pub expert_cache_pin: Option<usize>,
    /// Also load the experts the next layer's router picks on the current hidden state, on a
    /// background thread (off by default: on the CPU with the checkpoint in the page cache it read
    /// more and gained nothing, HANDOFF.md).
    #[arg(long)]
    pub expert_prefetch: bool,
}

impl OffloadArgs {
    /// The offload configuration, None when no cache size is given; policy/prefetch flags
    /// without a size are an error (they would do nothing).
    pub fn config(&self) -> Result<Option<crate::offload::OffloadConfig>> {
        use crate::offload::{CacheSize, OffloadConfig, Policy};
        let size = match (self.expert_cache, self.expert_cache_experts) {
            (Some(gb), _) => CacheSize::Bytes((gb * 1e9) as u64),
            (None, Some(n)) => CacheSize::Experts(n),
            (None, None) => {
                if self.expert_cache_policy.is_some() || self.expert_prefetch || self.expert_cache_pin.is_some() {
                    anyhow::bail!(
                        "--expert-cache-policy / --expert-prefetch / --expert-cache-pin need a cache size: add \
                         --expert-cache GB or --expert-cache-experts N"
                    );
                }
                return Ok(None);
            }
        };
        Ok(Some(OffloadConfig {
            size,
            policy: self.expert_cache_policy.unwrap_or(Policy::Lru),
            prefetch: self.expert_prefetch,
            pin: self.expert_cache_pin.unwrap_or(0),
        }))
    }
}

/// `--expert-cache`: a finite number of GB > 0.
fn parse_cache_gb(s: &str) -> Result<f64, String> {
    let x = finite(s)?;
    if x <= 0.0 {
        return Err(format!("{x} GB is not a cache size: give a number of GB > 0 (e.g. 4 or 0.5)"));
    }
    Ok(x)
}

/// A count that must be at least 1 (tokens, runs, steps).
pub fn at_least_one(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("must be at least 1".into()),
        Err(_) => Err(format!("`{s}` is not a whole number >= 1")),
    }
}

fn finite(s: &str) -> Result<f64, String> {
    let x: f64 = s.trim().parse().map_err(|_| format!("`{s}` is not a number"))?;
    if !x.is_finite() {
        return Err(format!("`{s}` is not a finite number"));
    }
    Ok(x)
}

/// `--batch-size`: 1..=1024 sequences decoding at once.
pub fn parse_batch_size(s: &str) -> Result<usize, String> {
    let n: usize = s.parse().map_err(|_| format!("'{s}' is not a whole number"))?;
    if !(1..=crate::batch::MAX_BATCH).contains(&n) {
        return Err(format!("{n} is not allowed: use 1..={}", crate::batch::MAX_BATCH));
    }
    Ok(n)
}

pub fn parse_temp(s: &str) -> Result<f32, String> {
    let t = finite(s)?;
    if t < 0.0 {
        return Err("must be >= 0 (0 = greedy)".into());
    }
    Ok(t as f32)
}

pub fn parse_top_p(s: &str) -> Result<f32, String> {
    let p = finite(s)?;
    if !(p > 0.0 && p <= 1.0) {
        return Err("must be in (0, 1]; 1 turns nucleus sampling off".into());
    }
    Ok(p as f32)
}

pub fn parse_cooldown(s: &str) -> Result<f64, String> {
    let c = finite(s)?;
    if !(0.0..=crate::validate::MAX_COOLDOWN_S).contains(&c) {
        return Err(format!("must be between 0 and {} seconds", crate::validate::MAX_COOLDOWN_S));
    }
    Ok(c)
}

pub fn parse_warmup(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n <= 100 => Ok(n),
        _ => Err(format!("`{s}`: use 0 to 100 warm-up generations")),
    }
}

pub fn parse_bits(s: &str) -> Result<i32, String> {
    match s.trim().parse::<i32>() {
        Ok(b) if [2, 3, 4, 5, 6, 8].contains(&b) => Ok(b),
        _ => Err(format!("`{s}`: MLX affine quantization supports 2, 3, 4, 5, 6 or 8 bits")),
    }
}

pub fn parse_group_size(s: &str) -> Result<i32, String> {
    match s.trim().parse::<i32>() {
        Ok(g) if [32, 64, 128].contains(&g) => Ok(g),
        _ => Err(format!("`{s}`: the group size must be 32, 64 or 128")),
    }
}

pub fn parse_family(s: &str) -> Result<Family, String> {
    Family::from_model_type(s).ok_or_else(|| {
        let all: Vec<_> = Family::ALL.iter().map(|f| f.model_type()).collect();
        format!("unknown family `{s}`; expected one of: {}", all.join(", "))
    })
}

/// `zmlx patterns`: the registry as a table or JSON.
pub fn list_patterns(json: bool) -> Result<i32> {
    let infos: Vec<_> = patterns::registry().iter().map(|p| p.info().clone()).collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&infos)?);
        return Ok(0);
    }
    println!("{:<20} {:<13} {:<12} {:<7} {:<34} families", "pattern", "slot", "class", "decode", "env");
    for i in &infos {
        let mut env = vec![i.switch_var()];
        env.extend(i.env.iter().map(|s| s.to_string()));
        let fams: Vec<_> = i.families.iter().map(|f| f.model_type()).collect();
        println!(
            "{:<20} {:<13} {:<12} {:<7} {:<34} {}",
            i.name,
            format!("{:?}", i.slot).to_lowercase(),
            format!("{:?}", i.class).to_lowercase(),
            if i.decode_only { "only" } else { "all" },
            env.join(" "),
            fams.join(", ")
        );
        println!("    {}", i.description);
    }
    Ok(0)
}
