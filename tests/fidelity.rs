//! Every `safe` pattern, on every family it claims: patched greedy tokens == unpatched, for 64
//! tokens and two prompts, on float (bf16 stored, f32 compute), 4-bit, and 4-bit with bf16
//! compute. The long prompt runs prefill through SwitchGLU's sorted path (tokens × k ≥ 64).
mod common;

use common::*;
use zmlx::config::Family;
use zmlx::generate::greedy_ids;
use zmlx::model::DtypeChoice;
use zmlx::patterns::{self, registry, SafetyClass, Selection};

const TOKENS: usize = 64;
const LONG: &str = "In a distributed system, a client sends requests over the network to many servers; \
each server keeps a log of operations, and the cluster elects a leader that orders every write.";

/// One synthesized checkpoint, loaded once, with its unpatched greedy tokens: every pattern set
/// checked on it is compared with the same baseline (unpatch restores the model between sets).
struct Fixture {
    _dir: tempfile::TempDir,
    family: Family,
    quantize: Option<i32>,
    dtype: DtypeChoice,
    model: zmlx::model::Model,
    prompts: Vec<Vec<u32>>,
    base: Vec<Vec<u32>>,
}

impl Fixture {
    fn new(family: Family, quantize: Option<i32>, dtype: DtypeChoice) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        synth_into(dir.path(), &synth_opts(family, quantize, 21));
        let (model, tok) = load(dir.path(), dtype);
        let prompts: Vec<Vec<u32>> = [PROMPTS[0], LONG].iter().map(|p| tok.encode(p).unwrap()).collect();
        let base = prompts.iter().map(|p| greedy_ids(&model, p, TOKENS, true).unwrap()).collect();
        Fixture { _dir: dir, family, quantize, dtype, model, prompts, base }
    }

    /// Patches `names`, checks the tokens against the baseline and that the kernels ran, unpatches
    /// and checks that unpatching restores the baseline.
    fn check(&mut self, names: &[&str]) {
        let (family, quantize, dtype) = (self.family, self.quantize, self.dtype);
        let sel = Selection { names: names.iter().map(|s| s.to_string()).collect(), source: "test".into() };
        let report = patterns::patch(&mut self.model, &sel).unwrap();
        if report.modules_patched() == 0 {
            // Only acceptable for a quantized-kernel pattern on a float checkpoint or a compute dtype
            // its kernel is not exact for (decided at patch time), said so (a sigmoid router, which
            // has no Linear gate, says that).
            let reasons: Vec<&String> =
                report.patterns.values().flat_map(|o| o.skipped.iter().map(|(_, r)| r)).collect();
            let float_ckpt = |r: &str| {
                r.contains("float experts") || r.contains("float weights") || r.contains("no Linear projection")
            };
            let half_compute = |r: &str| r.contains("activations (the CPU kernel is bit-exact for float32 only)");
            assert!(
                !reasons.is_empty()
                    && reasons.iter().all(|r| {
                        (quantize.is_none() && float_ckpt(r))
                            || (dtype != DtypeChoice::F32 && (half_compute(r) || float_ckpt(r)))
                    }),
                "{family}: {names:?} patched nothing:\n{}",
                report.summary()
            );
            patterns::unpatch(&mut self.model);
            return;
        }
        zmlx::fallbacks::reset();
        for (p, want) in self.prompts.iter().zip(&self.base) {
            let got = greedy_ids(&self.model, p, TOKENS, true).unwrap();
            assert_eq!(
                &got,
                want,
                "{family} q={quantize:?} {dtype:?} {names:?}: first divergence at {:?}",
                first_divergence(&got, want)
            );
        }
        // The decode-only kernels really ran (not only their stock fallback).
        let calls = zmlx::fallbacks::snapshot();
        let kernels =
            ["downproj_combine", "glm47_rope", "qmv_linear", "gqa_attention", "rms_norm", "quantized_embedding"];
        for n in names.iter().filter(|n| kernels.contains(n)) {
            let f32_only = ["gqa_attention", "rms_norm"].contains(n) && dtype == DtypeChoice::F32;
            if quantize.is_some() && dtype == DtypeChoice::F32 || *n == "glm47_rope" || f32_only {
                assert!(calls.get(*n).is_some_and(|c| c.fused > 0), "{family} {n}: kernel never ran: {calls:?}");
            }
        }
        patterns::unpatch(&mut self.model);
        assert_eq!(
            greedy_ids(&self.model, &self.prompts[0], TOKENS, true).unwrap(),
            self.base[0],
            "{family} {names:?}: unpatch restores"
        );
    }
}

fn safe_patterns_for(family: Family) -> Vec<&'static str> {
    registry()
        .iter()
        .map(|p| p.info())
        .filter(|i| i.class == SafetyClass::Safe && i.families.contains(&family))
        .map(|i| i.name)
        .collect()
}

fn all_configs(family: Family) {
    let _g = mlx_lock();
    let safe = safe_patterns_for(family);
    assert!(!safe.is_empty());
    for (q, dt) in [(None, DtypeChoice::F32), (Some(4), DtypeChoice::F32), (Some(4), DtypeChoice::Bf16)] {
        let mut fixture = Fixture::new(family, q, dt);
        for name in &safe {
            fixture.check(&[name]);
        }
        if (q, dt) == (Some(4), DtypeChoice::F32) {
            // Together, as a preset would apply them.
            fixture.check(&safe);
        }
    }
    Fixture::new(family, Some(8), DtypeChoice::F32).check(&safe);
}

#[test]
fn mixtral_safe_patterns_are_token_identical() {
    all_configs(Family::Mixtral);
}

#[test]
fn qwen3_moe_safe_patterns_are_token_identical() {
    all_configs(Family::Qwen3Moe);
}

#[test]
fn patch_report_names_swapped_modules() {
    let _g = mlx_lock();
    let dir = tempfile::tempdir().unwrap();
    synth_into(dir.path(), &synth_opts(Family::Qwen3Moe, None, 1));
    let (mut model, _) = load(dir.path(), DtypeChoice::F32);
    let sel = Selection { names: vec!["swiglu_mlp".into(), "moe_mlp".into()], source: "test".into() };
    let r = patterns::patch(&mut model, &sel).unwrap();
    // Tiny qwen3: layers 0 and 2 are MoE, layer 1 dense (mlp_only_layers = [1]).
    assert_eq!(
        r.patterns["swiglu_mlp"].patched,
        ["model.layers.0.mlp.switch_mlp", "model.layers.1.mlp", "model.layers.2.mlp.switch_mlp"]
    );
    assert_eq!(
        r.patterns["moe_mlp"].patched,
        [
            "model.layers.0.mlp.gate",
            "model.layers.0.mlp.combine",
            "model.layers.2.mlp.gate",
            "model.layers.2.mlp.combine"
        ]
    );
    assert_eq!(model.layers[0].attention.patched_by(), None);
    patterns::unpatch(&mut model);
    for l in &model.layers {
        if let zmlx::model::LayerMlp::Moe(b) = &l.mlp {
            assert!(
                b.router.patched_by().is_none() && b.experts.patched_by().is_none() && b.combine.patched_by().is_none()
            );
        }
    }
}

#[test]
fn qwen2_moe_safe_patterns_are_token_identical() {
    all_configs(Family::Qwen2Moe);
}

#[test]
fn glm4_moe_safe_patterns_are_token_identical() {
    all_configs(Family::Glm4Moe);
}

#[test]
fn glm4_moe_lite_safe_patterns_are_token_identical() {
    all_configs(Family::Glm4MoeLite);
}

#[test]
fn deepseek_v3_safe_patterns_are_token_identical() {
    all_configs(Family::DeepseekV3);
}
