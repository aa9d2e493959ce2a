//! The pattern registry: each pattern swaps one slot implementation on a loaded model.
//! One static, explicit list (no lazy registration); selection precedence, highest first:
//! `--patterns` (or `none`) > `ZMLX_PATTERNS` > the family preset; then `--exclude`, then
//! per-pattern `ZMLX_<NAME>=0|1`.
mod debug_drop_expert;
pub mod deepseek_router;
pub mod downproj_combine;
pub mod glm47_rope;
pub mod moe_mlp;
pub mod qmv_linear;
pub mod swiglu_mlp;

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::config::Family;
use crate::model::Model;

/// How far a pattern's fidelity is proven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SafetyClass {
    /// Token-identical to the stock slot on every family it claims, proven by tests.
    Safe,
    /// Runs, not (yet) proven token-identical.
    Experimental,
    /// Known to change tokens or otherwise risky; refused without `--allow-unsafe`.
    Unsafe,
}

/// Which slot a pattern replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotKind {
    Attention,
    Router,
    Experts,
    Activation,
    Combine,
    SharedExpert,
    /// Dense projections inside the attention, MLP and head slots.
    Linear,
}

#[derive(Debug, Clone, Serialize)]
pub struct PatternInfo {
    pub name: &'static str,
    pub slot: SlotKind,
    pub families: &'static [Family],
    pub class: SafetyClass,
    /// Applies only to single-token decode steps; prefill falls back to the stock slot.
    pub decode_only: bool,
    /// Environment variables this pattern reads (besides `ZMLX_<NAME>`).
    pub env: &'static [&'static str],
    pub description: &'static str,
}

impl PatternInfo {
    /// `ZMLX_<NAME>`: per-pattern on/off switch.
    pub fn switch_var(&self) -> String {
        format!("ZMLX_{}", self.name.to_uppercase())
    }
}

/// What applying a pattern did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PatternOutcome {
    /// Module paths whose slot now runs this pattern.
    pub patched: Vec<String>,
    /// Module paths left stock, with the reason.
    pub skipped: Vec<(String, String)>,
}

pub trait Pattern {
    fn info(&self) -> &PatternInfo;
    /// Swaps the slot on every module of `model` it applies to.
    fn apply(&self, model: &mut Model) -> Result<PatternOutcome>;
}

/// The registry, in application order.
pub fn registry() -> Vec<Box<dyn Pattern>> {
    vec![
        Box::new(swiglu_mlp::SwigluMlp),
        Box::new(moe_mlp::MoeMlp),
        Box::new(deepseek_router::DeepseekRouter),
        Box::new(downproj_combine::DownprojCombine),
        Box::new(glm47_rope::Glm47Rope),
        Box::new(qmv_linear::QmvLinear),
        Box::new(debug_drop_expert::DebugDropExpert),
    ]
}

pub fn pattern_names() -> Vec<&'static str> {
    registry().iter().map(|p| p.info().name).collect()
}

/// The default pattern set per family: only `safe` patterns, chosen from the CPU bench ledger
/// (benchmarks/matrix-cpu.jsonl; HANDOFF.md has the numbers): on 4-bit checkpoints the fused
/// expert kernels (`swiglu_mlp` + `downproj_combine`) carry the decode speedup; the routers and
/// the combine are bit-exact and never slower. GPU backends get no preset: there the router and
/// combine kernels are not bit-identical to MLX's CUDA ops (HANDOFF.md, GPU section).
pub fn family_preset(family: Family) -> Vec<&'static str> {
    if crate::kernels::backend() != crate::mlx_env::Backend::Cpu {
        return vec![];
    }
    // Each family module lists its preset (src/models/<family>.rs, `preset_patterns`).
    family.module().preset_patterns()
}

/// A resolved selection: pattern names in registry order.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Selection {
    pub names: Vec<String>,
    /// Where the list came from: "--patterns", "ZMLX_PATTERNS" or "preset".
    pub source: String,
}

/// Inputs to selection, separated from the process environment so it can be tested.
pub struct SelectionRequest<'a> {
    pub patterns: Option<&'a [String]>,
    pub exclude: &'a [String],
    pub family: Family,
    pub allow_unsafe: bool,
    pub env: &'a BTreeMap<String, String>,
}

fn unknown(name: &str) -> anyhow::Error {
    anyhow::anyhow!("unknown pattern `{name}`; valid patterns: {} (or `none`)", pattern_names().join(", "))
}

fn parse_switch(var: &str, v: &str) -> Result<bool> {
    crate::settings::parse_switch(v)
        .ok_or_else(|| anyhow::anyhow!("{var}={v}: expected 0 or 1 (also true/false, on/off, yes/no)"))
}

/// Every `ZMLX_*` variable (they affect patching), for selection, reports and capsules. A value
/// that is not UTF-8 is an error; other variables are never read.
pub fn relevant_env() -> Result<BTreeMap<String, String>> {
    crate::settings::zmlx_vars()
}

pub fn resolve(req: &SelectionRequest) -> Result<Selection> {
    let reg = registry();
    let (mut names, source): (Vec<String>, &str) = if let Some(p) = req.patterns {
        let list: Vec<String> =
            p.iter().flat_map(|s| s.split(',')).map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
        if list.iter().any(|n| n == "none") {
            if list.len() > 1 {
                bail!("--patterns none cannot be combined with other pattern names");
            }
            (vec![], "--patterns")
        } else {
            (list, "--patterns")
        }
    } else if let Some(v) = req.env.get("ZMLX_PATTERNS").filter(|v| !v.trim().is_empty()) {
        let list: Vec<String> = v.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect();
        if list == ["none"] {
            (vec![], "ZMLX_PATTERNS")
        } else {
            (list, "ZMLX_PATTERNS")
        }
    } else {
        (family_preset(req.family).into_iter().map(str::to_owned).collect(), "preset")
    };
    for n in names.iter().chain(req.exclude.iter()) {
        if !reg.iter().any(|p| p.info().name == n) {
            return Err(unknown(n));
        }
    }
    names.retain(|n| !req.exclude.contains(n));
    for p in &reg {
        let info = p.info();
        let var = info.switch_var();
        if let Some(v) = req.env.get(&var) {
            let on = parse_switch(&var, v)?;
            let present = names.iter().any(|n| n == info.name);
            if on && !present {
                names.push(info.name.to_owned());
            } else if !on {
                names.retain(|n| n != info.name);
            }
        }
    }
    // Registry order, deduplicated.
    let ordered: Vec<String> =
        reg.iter().map(|p| p.info().name).filter(|n| names.iter().any(|m| m == n)).map(str::to_owned).collect();
    for n in &ordered {
        let info = reg.iter().find(|p| p.info().name == n).unwrap().info();
        if info.class == SafetyClass::Unsafe && !req.allow_unsafe {
            bail!("pattern `{n}` is unsafe ({}); pass --allow-unsafe to run it anyway", info.description);
        }
    }
    Ok(Selection { names: ordered, source: source.to_owned() })
}

/// Per pattern: what was patched and skipped.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PatchReport {
    pub patterns: BTreeMap<String, PatternOutcome>,
}

impl PatchReport {
    pub fn modules_patched(&self) -> usize {
        self.patterns.values().map(|o| o.patched.len()).sum()
    }

    pub fn summary(&self) -> String {
        let mut s = format!("Patched {} modules:", self.modules_patched());
        for (name, o) in &self.patterns {
            s.push_str(&format!("\n  {name}: {}", o.patched.len()));
            for path in &o.patched {
                s.push_str(&format!("\n    {path}"));
            }
            for (path, why) in &o.skipped {
                s.push_str(&format!("\n    skipped {path}: {why}"));
            }
        }
        s
    }
}

/// Applies the selected patterns to `model` (stock slots first: patching is not cumulative).
pub fn patch(model: &mut Model, selection: &Selection) -> Result<PatchReport> {
    unpatch(model);
    let mut report = PatchReport::default();
    for p in registry() {
        let info = p.info();
        if !selection.names.iter().any(|n| n == info.name) {
            continue;
        }
        let outcome = if info.families.contains(&model.family()) {
            p.apply(model)?
        } else {
            PatternOutcome {
                patched: vec![],
                skipped: vec![("*".into(), format!("{} does not apply to the {} family", info.name, model.family()))],
            }
        };
        report.patterns.insert(info.name.to_owned(), outcome);
    }
    Ok(report)
}

/// Restores every slot's stock implementation.
pub fn unpatch(model: &mut Model) {
    model.restore_all_slots();
}
