//! Pattern composition: patterns on one slot wrap the active implementation (both take effect,
//! the slot and the report list both), slot metadata matches what each pattern swaps, and
//! declared requirements/conflicts are refused at selection.
mod common;

use common::*;
use zmlx::config::Family;
use zmlx::generate::greedy_ids;
use zmlx::model::DtypeChoice;
use zmlx::patterns::{self, check_composition, registry, PatternInfo, SafetyClass, Selection, SlotKind};

fn sel(names: &[&str]) -> Selection {
    Selection { names: names.iter().map(|s| s.to_string()).collect(), source: "test".into() }
}

/// Every patched slot's patterns declare that slot kind in their metadata.
fn metadata_matches(model: &mut zmlx::model::Model) {
    let reg = registry();
    for (path, slot) in model.slots_mut() {
        for name in slot.patterns() {
            let info = reg.iter().map(|p| p.info()).find(|i| i.name == *name).unwrap();
            assert!(
                info.slots.contains(&slot.kind()),
                "{name} swapped {path} ({:?}) but lists {:?}",
                slot.kind(),
                info.slots
            );
        }
    }
}

#[test]
fn debug_drop_expert_wraps_moe_mlps_router() {
    let _g = mlx_lock();
    let dir = tempfile::tempdir().unwrap();
    synth_into(dir.path(), &synth_opts(Family::Qwen3Moe, Some(4), 4));
    let (mut m, _) = load(dir.path(), DtypeChoice::F32);
    let ids = [7u32, 100, 200, 300, 42];
    let base = greedy_ids(&m, &ids, 24, true).unwrap();
    patterns::patch(&mut m, &sel(&["debug_drop_expert"])).unwrap();
    let dropped = greedy_ids(&m, &ids, 24, true).unwrap();
    assert_ne!(dropped, base);
    let r = patterns::patch(&mut m, &sel(&["moe_mlp", "debug_drop_expert"])).unwrap();
    // Both took effect on the router: the fused router is bit-exact, so the tokens are those of
    // the drop alone (before, the drop replaced the fused router, silently).
    assert_eq!(greedy_ids(&m, &ids, 24, true).unwrap(), dropped);
    for (_, b) in m.moe_blocks_mut() {
        assert_eq!(b.router.patterns(), ["moe_mlp", "debug_drop_expert"]);
        assert_eq!(b.router.patched_by(), Some("debug_drop_expert"));
        assert_eq!(b.combine.patterns(), ["moe_mlp"]);
    }
    assert_eq!(r.slots["model.layers.0.mlp.gate"], ["moe_mlp", "debug_drop_expert"]);
    assert!(r.summary().contains("composed model.layers.0.mlp.gate: moe_mlp + debug_drop_expert"), "{}", r.summary());
    metadata_matches(&mut m);
    patterns::unpatch(&mut m);
    assert!(m.slots_mut().iter().all(|(_, s)| s.patterns().is_empty()));
    assert_eq!(greedy_ids(&m, &ids, 24, true).unwrap(), base);
}

#[test]
fn stacked_patterns_keep_every_name_per_slot() {
    let _g = mlx_lock();
    let dir = tempfile::tempdir().unwrap();
    synth_into(dir.path(), &synth_opts(Family::Glm4MoeLite, Some(4), 6));
    let (mut m, _) = load(dir.path(), DtypeChoice::F32);
    let safe: Vec<&str> = registry()
        .iter()
        .map(|p| p.info())
        .filter(|i| i.class == SafetyClass::Safe && i.families.contains(&Family::Glm4MoeLite))
        .map(|i| i.name)
        .collect();
    let r = patterns::patch(&mut m, &sel(&safe)).unwrap();
    // glm47_rope's wrapper, rebuilt by qmv_linear without knowing its type.
    assert_eq!(m.layers[0].attention.patterns(), ["glm47_rope", "qmv_linear"]);
    let a = m.layers[0].attention.get().as_any();
    let fused = a.downcast_ref::<zmlx::patterns::glm47_rope::FusedRopeMla>().expect("glm47_rope's attention");
    assert!(fused.inner.o_proj.implementation().as_any().is::<zmlx::patterns::qmv_linear::QmvProjection>());
    let (_, b) = m.moe_blocks_mut().next().unwrap();
    assert_eq!(b.experts.patterns(), ["swiglu_mlp", "downproj_combine"]);
    assert_eq!(b.router.patterns(), ["deepseek_router"]);
    assert_eq!(b.combine.patterns(), ["moe_mlp"]);
    assert!(r.slots.values().any(|c| c.len() > 1));
    metadata_matches(&mut m);
}

/// No cost when nothing is fused: a kernel that could never run for this backend and compute
/// dtype is not installed (the slot keeps the stock implementation or only what does apply, and
/// the report says why), so no call falls back. Here: a 4-bit model in bf16 on the CPU, where the
/// quantized kernels are exact for float32 activations only.
#[test]
fn kernels_that_cannot_apply_are_not_installed() {
    let _g = mlx_lock();
    let dir = tempfile::tempdir().unwrap();
    synth_into(dir.path(), &synth_opts(Family::Qwen3Moe, Some(4), 8));
    let (mut m, tok) = load(dir.path(), DtypeChoice::Bf16);
    let r = patterns::patch(&mut m, &sel(&["swiglu_mlp", "moe_mlp", "downproj_combine", "qmv_linear"])).unwrap();
    let why = |p: &str| -> Vec<String> { r.patterns[p].skipped.iter().map(|(_, w)| w.clone()).collect() };
    for p in ["downproj_combine", "qmv_linear"] {
        assert!(r.patterns[p].patched.is_empty(), "{p} patched {:?}", r.patterns[p].patched);
        let w = why(p);
        assert!(
            !w.is_empty() && w.iter().all(|w| w.contains("activations (the CPU kernel is bit-exact for float32 only)")),
            "{p}: {w:?}"
        );
    }
    // swiglu_mlp keeps only the activation kernel (the gate/up kernel never applies in bf16).
    let (_, b) = m.moe_blocks_mut().next().unwrap();
    assert_eq!(b.experts.patterns(), ["swiglu_mlp"]);
    assert!(
        b.experts.get().as_any().is::<zmlx::moe::SwitchGlu>(),
        "experts should be a plain SwitchGlu with the fused activation"
    );
    assert_eq!(b.combine.patterns(), ["moe_mlp"]);
    zmlx::fallbacks::reset();
    let ids = tok.encode("The quick brown fox").unwrap();
    greedy_ids(&m, &ids, 6, true).unwrap();
    let calls = zmlx::fallbacks::snapshot();
    for (name, c) in &calls {
        assert!(c.fallback.is_empty(), "{name} fell back at run time: {:?}", c.fallback);
    }
    // In float32 the same selection installs every kernel and they run.
    let (mut m, _) = load(dir.path(), DtypeChoice::F32);
    let r = patterns::patch(&mut m, &sel(&["swiglu_mlp", "moe_mlp", "downproj_combine", "qmv_linear"])).unwrap();
    for p in ["swiglu_mlp", "downproj_combine", "qmv_linear"] {
        assert!(!r.patterns[p].patched.is_empty(), "{p} in float32: {:?}", r.patterns[p].skipped);
    }
    zmlx::fallbacks::reset();
    greedy_ids(&m, &ids, 6, true).unwrap();
    let calls = zmlx::fallbacks::snapshot();
    // downproj_combine composes with moe_mlp's combine (the plain weighted sum, done inside its
    // kernel), so moe_mlp's combine kernel is not called.
    for n in ["downproj_combine", "qmv_linear", "swiglu_mlp.experts"] {
        assert!(calls.get(n).is_some_and(|c| c.fused > 0 && c.fallback.is_empty()), "{n}: {calls:?}");
    }
}

static A: PatternInfo = PatternInfo {
    name: "a",
    slot: SlotKind::Router,
    slots: &[SlotKind::Router],
    requires: &[],
    conflicts: &["b"],
    families: &Family::ALL,
    class: SafetyClass::Safe,
    decode_only: false,
    env: &[],
    description: "",
};
static B: PatternInfo = PatternInfo { name: "b", conflicts: &[], ..A };
static C: PatternInfo = PatternInfo { name: "c", conflicts: &[], requires: &["b"], ..A };

#[test]
fn declared_conflicts_and_requirements_are_refused() {
    let e = check_composition(&[&A, &B]).unwrap_err().to_string();
    assert!(e.contains("`a` and `b` cannot be combined"), "{e}");
    let e = check_composition(&[&C]).unwrap_err().to_string();
    assert!(e.contains("`c` requires `b`"), "{e}");
    check_composition(&[&B, &C]).unwrap();
    // The registry's own declarations are consistent: every named pattern exists.
    let names = patterns::pattern_names();
    for p in registry() {
        for n in p.info().requires.iter().chain(p.info().conflicts) {
            assert!(names.contains(n), "{}: unknown pattern {n}", p.info().name);
        }
    }
}
