//! The `fast` preset (validated patterns: reassociated quantized kernels and attention core) on every family's
//! small 4-bit and 8-bit checkpoints: greedy tokens identical to the unpatched model for 64
//! tokens on two prompts (the long one runs prefill through the grouped expert path), the fast
//! kernels really ran, and the teacher-forced logits stay within float-rounding distance.
//! The heavier validation suite (≥ 4 prompts × 256 tokens on the bench and full-size
//! checkpoints, ledger lines with logit max-abs/KL) is scripts/validate_fast.sh.
mod common;

use common::*;
use zmlx::config::Family;
use zmlx::generate::greedy_ids;
use zmlx::model::DtypeChoice;
use zmlx::patterns::{self, family_fast_preset, registry, SafetyClass, Selection};

const TOKENS: usize = 64;
const LONG: &str = "In a distributed system, a client sends requests over the network to many servers; \
each server keeps a log of operations, and the cluster elects a leader that orders every write.";

fn check(family: Family, bits: i32) {
    let _g = mlx_lock();
    let names = family_fast_preset(family);
    assert!(names.iter().any(|n| n.ends_with("_fast")), "{family}: the fast preset has no fast pattern: {names:?}");
    for n in &names {
        let class = registry().iter().find(|p| p.info().name == *n).unwrap().info().class;
        assert!(matches!(class, SafetyClass::Safe | SafetyClass::Validated), "{family}: {n} is {class:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    synth_into(dir.path(), &synth_opts(family, Some(bits), 31));
    let (mut model, tok) = load(dir.path(), DtypeChoice::F32);
    let prompts: Vec<Vec<u32>> = [PROMPTS[0], LONG].iter().map(|p| tok.encode(p).unwrap()).collect();
    let base: Vec<Vec<u32>> = prompts.iter().map(|p| greedy_ids(&model, p, TOKENS, true).unwrap()).collect();
    let mut seq = prompts[1].clone();
    seq.extend_from_slice(&base[1]);
    let lb = zmlx::validate::teacher_forced_logits(&model, &seq).unwrap();
    let sel = Selection { names: names.iter().map(|s| s.to_string()).collect(), source: "test".into() };
    patterns::patch(&mut model, &sel).unwrap();
    zmlx::fallbacks::reset();
    for (p, want) in prompts.iter().zip(&base) {
        let got = greedy_ids(&model, p, TOKENS, true).unwrap();
        assert_eq!(
            &got,
            want,
            "{family} {bits}-bit fast preset: first divergence at {:?}",
            first_divergence(&got, want)
        );
    }
    let calls = zmlx::fallbacks::snapshot();
    for n in ["downproj_combine_fast", "qmv_linear_fast", "swiglu_mlp_fast.experts"] {
        assert!(calls.get(n).is_some_and(|c| c.fused > 0), "{family}: {n} never ran: {calls:?}");
    }
    if names.contains(&"gqa_attention_fast") {
        let c = calls.get("gqa_attention_fast");
        assert!(c.is_some_and(|c| c.fused > 0 && c.fallback.is_empty()), "{family}: gqa_attention_fast: {calls:?}");
    }
    let lp = zmlx::validate::teacher_forced_logits(&model, &seq).unwrap();
    let diff = mlx_rs::ops::abs(lb.subtract(&lp).unwrap()).unwrap().max(None).unwrap().item_cast::<f32>();
    assert!(diff > 0.0 || bits == 8, "{family}: fast logits identical to stock — did the fast kernels run?");
    assert!(diff < 1e-2, "{family} {bits}-bit: teacher-forced logits differ by {diff}");
}

#[test]
fn mixtral_fast_preset_token_identical() {
    check(Family::Mixtral, 4);
}

#[test]
fn qwen2_moe_fast_preset_token_identical() {
    check(Family::Qwen2Moe, 4);
}

#[test]
fn qwen3_moe_fast_preset_token_identical() {
    check(Family::Qwen3Moe, 4);
    check(Family::Qwen3Moe, 8);
}

#[test]
fn glm4_moe_fast_preset_token_identical() {
    check(Family::Glm4Moe, 4);
}

#[test]
fn glm4_moe_lite_fast_preset_token_identical() {
    check(Family::Glm4MoeLite, 4);
}

#[test]
fn deepseek_v3_fast_preset_token_identical() {
    check(Family::DeepseekV3, 4);
}
