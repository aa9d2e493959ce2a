//! The pattern registry: each pattern swaps slot implementations on a loaded model.
//! One static, explicit list (no lazy registration); selection precedence, highest first:
//! `--patterns` (or `none`) > `ZMLX_PATTERNS` > the family preset; then `--exclude`, then
//! per-pattern `ZMLX_<NAME>=0|1`.
//!
//! Composition is explicit: patterns apply in registry order, and each one wraps or copies the
//! implementation *active* in a slot (never the stock one behind another pattern's back), so
//! two patterns on one slot both take effect; a pair that cannot compose is declared in
//! `conflicts` (and a dependency in `requires`), which `resolve` refuses with a clear error.
//! Each slot records the full list of patterns that shaped it (`Slot::patterns`), and the
//! report lists it per slot. [`Swaps`] does the walk / downcast / swap / record for every
//! pattern, so a pattern file holds only what is particular to it.
//!
//! Adding a pattern `bar`: `patterns/bar.rs` with a `static INFO: PatternInfo` (its `slots` must
//! list exactly the slot kinds it has rules for; `requires`/`conflicts` if it cannot compose),
//! the wrapper type(s) implementing the slot trait(s) over the *active* implementation, and
//! `apply` = `Swaps::new(&INFO).<kind>(|active| …).apply(model)`; then a `mod` line and a
//! registry entry here (the entry's position is its application order).
mod debug_drop_expert;
pub mod deepseek_router;
pub mod downproj_combine;
pub mod fast;
pub mod glm47_rope;
pub mod gqa_attention;
pub mod moe_mlp;
pub mod qmv_linear;
pub mod quantized_embedding;
pub mod rms_norm;
pub mod swiglu_mlp;

use std::collections::BTreeMap;
use std::rc::Rc;

use anyhow::{bail, Result};
use serde::Serialize;

use crate::config::Family;
use crate::model::Model;
pub use crate::slots::SlotKind;
use crate::slots::{
    AttentionSlot, CombineSlot, EmbeddingSlot, ExpertsSlot, HeadSlot, MlpSlot, NormSlot, RouterSlot, SlotMut,
};

/// How far a pattern's fidelity is proven.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SafetyClass {
    /// Token-identical to the stock slot on every family it claims, proven by tests.
    Safe,
    /// Not bit-identical (reassociated float sums), but token-identical to the unpatched model
    /// on every family's bench and full-size checkpoints over the validation suite, with the
    /// logit max-abs / KL differences recorded (`zmlx validate --logits`). Used by `fast` presets.
    Validated,
    /// Runs, not (yet) proven token-identical.
    Experimental,
    /// Known to change tokens or otherwise risky; refused without `--allow-unsafe`.
    Unsafe,
}

#[derive(Debug, Clone, Serialize)]
pub struct PatternInfo {
    pub name: &'static str,
    /// The part of the model it is about (what `zmlx patterns` shows).
    pub slot: SlotKind,
    /// Every kind of slot it swaps (checked when it applies: swapping another kind is an error).
    pub slots: &'static [SlotKind],
    /// Patterns it needs in the same selection.
    pub requires: &'static [&'static str],
    /// Patterns it cannot be combined with (refused by `resolve`).
    pub conflicts: &'static [&'static str],
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
    fn info(&self) -> &'static PatternInfo;
    /// Swaps the slots of `model` it applies to (normally one [`Swaps`] walk).
    fn apply(&self, model: &mut Model) -> Result<PatternOutcome>;
}

/// What a pattern does with one slot, given the implementation active there.
pub enum Swap<T: ?Sized> {
    /// Make this (built from the active one: a wrapper or a modified copy) the active one.
    With(Rc<T>),
    /// Leave the slot as it is and report why.
    Skip(String),
    /// Leave the slot as it is, silently (the pattern has nothing to do with it).
    Leave,
}

impl<T: ?Sized> Swap<T> {
    pub fn skip(why: impl Into<String>) -> Self {
        Swap::Skip(why.into())
    }
}

type Rule<'r, T> = Box<dyn FnMut(&Rc<T>) -> Swap<T> + 'r>;

/// The walk / downcast / swap / record skeleton shared by every pattern: one rule per slot kind
/// the pattern touches, each given the slot's *active* implementation; `apply` visits the
/// model's slots in model order (`Model::slots_mut`), swaps, records the pattern on the slot and
/// the module path in the outcome.
pub struct Swaps<'r> {
    info: &'static PatternInfo,
    attention: Option<Rule<'r, dyn AttentionSlot>>,
    router: Option<Rule<'r, dyn RouterSlot>>,
    experts: Option<Rule<'r, dyn ExpertsSlot>>,
    combine: Option<Rule<'r, dyn CombineSlot>>,
    shared_expert: Option<Rule<'r, dyn MlpSlot>>,
    dense_mlp: Option<Rule<'r, dyn MlpSlot>>,
    head: Option<Rule<'r, dyn HeadSlot>>,
    embedding: Option<Rule<'r, dyn EmbeddingSlot>>,
    norm: Option<Rule<'r, dyn NormSlot>>,
    /// Appended to a slot's path in the outcome (e.g. `.down_proj` for the part it replaces).
    suffix: Vec<(SlotKind, &'static str)>,
}

impl<'r> Swaps<'r> {
    pub fn new(info: &'static PatternInfo) -> Self {
        Swaps {
            info,
            attention: None,
            router: None,
            experts: None,
            combine: None,
            shared_expert: None,
            dense_mlp: None,
            head: None,
            embedding: None,
            norm: None,
            suffix: vec![],
        }
    }

    pub fn attention(mut self, f: impl FnMut(&Rc<dyn AttentionSlot>) -> Swap<dyn AttentionSlot> + 'r) -> Self {
        self.attention = Some(Box::new(f));
        self
    }

    pub fn router(mut self, f: impl FnMut(&Rc<dyn RouterSlot>) -> Swap<dyn RouterSlot> + 'r) -> Self {
        self.router = Some(Box::new(f));
        self
    }

    pub fn experts(mut self, f: impl FnMut(&Rc<dyn ExpertsSlot>) -> Swap<dyn ExpertsSlot> + 'r) -> Self {
        self.experts = Some(Box::new(f));
        self
    }

    pub fn combine(mut self, f: impl FnMut(&Rc<dyn CombineSlot>) -> Swap<dyn CombineSlot> + 'r) -> Self {
        self.combine = Some(Box::new(f));
        self
    }

    pub fn shared_expert(mut self, f: impl FnMut(&Rc<dyn MlpSlot>) -> Swap<dyn MlpSlot> + 'r) -> Self {
        self.shared_expert = Some(Box::new(f));
        self
    }

    pub fn dense_mlp(mut self, f: impl FnMut(&Rc<dyn MlpSlot>) -> Swap<dyn MlpSlot> + 'r) -> Self {
        self.dense_mlp = Some(Box::new(f));
        self
    }

    pub fn head(mut self, f: impl FnMut(&Rc<dyn HeadSlot>) -> Swap<dyn HeadSlot> + 'r) -> Self {
        self.head = Some(Box::new(f));
        self
    }

    pub fn embedding(mut self, f: impl FnMut(&Rc<dyn EmbeddingSlot>) -> Swap<dyn EmbeddingSlot> + 'r) -> Self {
        self.embedding = Some(Box::new(f));
        self
    }

    pub fn norm(mut self, f: impl FnMut(&Rc<dyn NormSlot>) -> Swap<dyn NormSlot> + 'r) -> Self {
        self.norm = Some(Box::new(f));
        self
    }

    /// Reports slots of `kind` as `<slot path><suffix>`.
    pub fn report_suffix(mut self, kind: SlotKind, suffix: &'static str) -> Self {
        self.suffix.push((kind, suffix));
        self
    }

    fn declared(&self) -> Result<()> {
        let ruled = [
            (SlotKind::Attention, self.attention.is_some()),
            (SlotKind::Router, self.router.is_some()),
            (SlotKind::Experts, self.experts.is_some()),
            (SlotKind::Combine, self.combine.is_some()),
            (SlotKind::SharedExpert, self.shared_expert.is_some()),
            (SlotKind::DenseMlp, self.dense_mlp.is_some()),
            (SlotKind::Head, self.head.is_some()),
            (SlotKind::Embedding, self.embedding.is_some()),
            (SlotKind::Norm, self.norm.is_some()),
        ];
        for (kind, has) in ruled {
            if has != self.info.slots.contains(&kind) {
                bail!(
                    "pattern `{}`: its metadata lists slots {:?}, but it has {} rule for {kind:?} slots",
                    self.info.name,
                    self.info.slots,
                    if has { "a" } else { "no" }
                );
            }
        }
        Ok(())
    }

    pub fn apply(mut self, model: &mut Model) -> Result<PatternOutcome> {
        self.declared()?;
        let name = self.info.name;
        let mut out = PatternOutcome::default();
        for (path, slot) in model.slots_mut() {
            let kind = slot.kind();
            let path = match self.suffix.iter().find(|(k, _)| *k == kind) {
                Some((_, sfx)) => format!("{path}{sfx}"),
                None => path,
            };
            macro_rules! rule {
                ($rule:expr, $slot:expr) => {
                    match $rule.as_mut().map(|f| f($slot.get_rc())) {
                        Some(Swap::With(imp)) => {
                            $slot.swap(imp, name);
                            out.patched.push(path);
                        }
                        Some(Swap::Skip(why)) => out.skipped.push((path, why)),
                        Some(Swap::Leave) | None => {}
                    }
                };
            }
            match slot {
                SlotMut::Attention(s) => rule!(self.attention, s),
                SlotMut::Router(s) => rule!(self.router, s),
                SlotMut::Experts(s) => rule!(self.experts, s),
                SlotMut::Combine(s) => rule!(self.combine, s),
                SlotMut::SharedExpert(s) => rule!(self.shared_expert, s),
                SlotMut::DenseMlp(s) => rule!(self.dense_mlp, s),
                SlotMut::Head(s) => rule!(self.head, s),
                SlotMut::Embedding(s) => rule!(self.embedding, s),
                SlotMut::Norm(s) => rule!(self.norm, s),
            }
        }
        Ok(out)
    }
}

/// The registry, in application order.
pub fn registry() -> Vec<Box<dyn Pattern>> {
    vec![
        Box::new(swiglu_mlp::SwigluMlp),
        Box::new(fast::SwigluMlpFast),
        Box::new(moe_mlp::MoeMlp),
        Box::new(deepseek_router::DeepseekRouter),
        Box::new(downproj_combine::DownprojCombine),
        Box::new(fast::DownprojCombineFast),
        Box::new(glm47_rope::Glm47Rope),
        Box::new(gqa_attention::GqaAttentionPattern),
        Box::new(fast::GqaAttentionFast),
        Box::new(qmv_linear::QmvLinear),
        Box::new(fast::QmvLinearFast),
        Box::new(rms_norm::RmsNormPattern),
        Box::new(quantized_embedding::QuantizedEmbeddingPattern),
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

/// The family's `fast` preset: its (safe) preset with each exact quantized-kernel pattern
/// replaced by its `validated` fast twin (`patterns::fast::TWINS`). Empty on GPU backends.
pub fn family_fast_preset(family: Family) -> Vec<&'static str> {
    family_preset(family)
        .into_iter()
        .map(|n| fast::TWINS.iter().find(|(exact, _)| *exact == n).map_or(n, |(_, f)| *f))
        .collect()
}

/// `safe` / `fast` in a pattern list stand for the family's presets.
fn expand_presets(list: Vec<String>, family: Family) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for n in list {
        let names: Vec<String> = match n.as_str() {
            "safe" => family_preset(family).into_iter().map(str::to_owned).collect(),
            "fast" => family_fast_preset(family).into_iter().map(str::to_owned).collect(),
            _ => vec![n],
        };
        for n in names {
            if !out.contains(&n) {
                out.push(n);
            }
        }
    }
    out
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
    anyhow::anyhow!(
        "unknown pattern `{name}`; valid patterns: {} (or `none`; `safe` / `fast` = the family's presets)",
        pattern_names().join(", ")
    )
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
    let (names, source): (Vec<String>, &str) = if let Some(p) = req.patterns {
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
    let mut names = expand_presets(names, req.family);
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
    let infos: Vec<&PatternInfo> =
        ordered.iter().map(|n| reg.iter().find(|p| p.info().name == n).unwrap().info()).collect();
    for info in &infos {
        if info.class == SafetyClass::Unsafe && !req.allow_unsafe {
            bail!("pattern `{}` is unsafe ({}); pass --allow-unsafe to run it anyway", info.name, info.description);
        }
    }
    check_composition(&infos)?;
    Ok(Selection { names: ordered, source: source.to_owned() })
}

/// Refuses a selection where a pattern's `requires` is missing or two patterns conflict
/// (declared on either side).
pub fn check_composition(selected: &[&PatternInfo]) -> Result<()> {
    let has = |n: &str| selected.iter().any(|i| i.name == n);
    for i in selected {
        if let Some(missing) = i.requires.iter().find(|r| !has(r)) {
            bail!("pattern `{}` requires `{missing}`; add it to the selection", i.name);
        }
        if let Some(other) = i.conflicts.iter().find(|c| has(c)) {
            bail!("patterns `{}` and `{other}` cannot be combined (declared conflict); pick one", i.name);
        }
    }
    Ok(())
}

/// Per pattern: what was patched and skipped; per patched slot: every pattern that shaped it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PatchReport {
    pub patterns: BTreeMap<String, PatternOutcome>,
    /// Slot path → the patterns applied to it, first applied first (only patched slots).
    pub slots: BTreeMap<String, Vec<String>>,
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
        for (path, chain) in self.slots.iter().filter(|(_, c)| c.len() > 1) {
            s.push_str(&format!("\n  composed {path}: {}", chain.join(" + ")));
        }
        s
    }
}

/// Applies the selected patterns to `model` in registry order, each on top of what the earlier
/// ones left active (stock slots first: patching is not cumulative across calls).
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
    for (path, slot) in model.slots_mut() {
        if !slot.patterns().is_empty() {
            report.slots.insert(path, slot.patterns().iter().map(|p| p.to_string()).collect());
        }
    }
    Ok(report)
}

/// Restores every slot's stock implementation.
pub fn unpatch(model: &mut Model) {
    model.restore_all_slots();
}
