//! `zmlx validate`: exit 0 on PASS, 1 on FAIL (with the first divergent index), 2 on error, 3 on
//! SKIP (nothing patched, so nothing compared).
mod common;

use common::*;
use zmlx::config::Family;
use zmlx::generate::greedy_ids;
use zmlx::model::DtypeChoice;
use zmlx::patterns::{self, Selection};

fn zmlx(args: &[&str]) -> (i32, String, String) {
    let out = zmlx_cmd().args(args).output().unwrap();
    let (o, e) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
    assert!(!e.contains("panicked"), "{e}");
    (out.status.code().unwrap_or(-1), o, e)
}

#[test]
fn pass_fail_and_error_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    {
        let _g = mlx_lock();
        synth_into(dir.path(), &synth_opts(Family::Mixtral, Some(4), 9));
    }
    let model = dir.path().to_str().unwrap();
    let prompt = "The kernel schedules threads across cores.";

    // The expected first divergence, computed through the library with the pattern applied.
    let expected = {
        let _g = mlx_lock();
        let (mut m, tok) = load(dir.path(), DtypeChoice::F32);
        let ids = tok.encode(prompt).unwrap();
        let base = greedy_ids(&m, &ids, 24, false).unwrap();
        let sel = Selection { names: vec!["debug_drop_expert".into()], source: "test".into() };
        patterns::patch(&mut m, &sel).unwrap();
        let patched = greedy_ids(&m, &ids, 24, false).unwrap();
        first_divergence(&base, &patched).expect("the wrong pattern must change the tokens")
    };

    let common = ["validate", model, "--max-tokens", "24", "--runs", "2", "--prompt", prompt];
    let (code, out, _) = zmlx(&[&common[..], &["--patterns", "moe_mlp"]].concat());
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("FIDELITY: 48/48 tokens identical over 2 run pairs  [PASS]"), "{out}");

    // Nothing patched: not a PASS with a speed ratio, but a SKIP that says why (exit 3).
    for (patterns, why) in
        [("none", "no patterns selected"), ("deepseek_router", "does not apply to the mixtral family")]
    {
        let (code, out, _) = zmlx(&[&common[..], &["--patterns", patterns]].concat());
        assert_eq!(code, 3, "{out}");
        assert!(out.contains("[SKIP]") && out.contains(why) && out.contains("0 tokens compared"), "{out}");
        assert!(out.contains("PERFORMANCE: not measured") && !out.contains("Speedup"), "{out}");
    }

    let (code, out, _) =
        zmlx(&[&common[..], &["--patterns", "debug_drop_expert", "--allow-unsafe", "--json"]].concat());
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["fidelity"]["verdict"], "FAIL");
    assert_eq!(v["fidelity"]["first_divergence"]["index"], expected as u64, "{out}");
    assert_eq!(v["fidelity"]["first_divergence"]["run"], 0);
    assert_eq!(v["patch_report"]["patterns"]["debug_drop_expert"]["patched"].as_array().unwrap().len(), 2);

    let (code, _, err) = zmlx(&[&common[..], &["--patterns", "debug_drop_expert"]].concat());
    assert_eq!(code, 2);
    assert!(err.contains("unsafe") && err.contains("--allow-unsafe"), "{err}");

    let (code, _, err) = zmlx(&[&common[..], &["--patterns", "no_such_pattern"]].concat());
    assert_eq!(code, 2);
    assert!(err.contains("unknown pattern `no_such_pattern`") && err.contains("debug_drop_expert"), "{err}");
}

#[test]
fn selection_precedence_and_env_switches() {
    use std::collections::BTreeMap;
    use zmlx::patterns::{resolve, SelectionRequest};
    let env = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    let req = |patterns: Option<&[String]>, env: &BTreeMap<String, String>, allow: bool| {
        resolve(&SelectionRequest { patterns, exclude: &[], family: Family::Qwen3Moe, allow_unsafe: allow, env })
    };
    let none = vec!["none".to_string()];
    let e = env(&[("ZMLX_PATTERNS", "debug_drop_expert")]);
    assert!(req(Some(&none), &e, true).unwrap().names.is_empty(), "--patterns beats ZMLX_PATTERNS");
    assert_eq!(req(None, &e, true).unwrap().names, ["debug_drop_expert"]);
    let preset = req(None, &env(&[]), false).unwrap();
    assert_eq!(preset.source, "preset");
    assert_eq!(preset.names, zmlx::patterns::family_preset(Family::Qwen3Moe), "no selection = the family preset");
    assert!(!preset.names.is_empty() && !preset.names.iter().any(|n| n == "debug_drop_expert"), "{:?}", preset.names);
    let ex = vec!["moe_mlp".to_string()];
    let r = resolve(&SelectionRequest {
        patterns: None,
        exclude: &ex,
        family: Family::Qwen3Moe,
        allow_unsafe: false,
        env: &env(&[]),
    });
    assert!(!r.unwrap().names.contains(&"moe_mlp".to_string()), "--exclude removes a preset pattern");
    let e = env(&[("ZMLX_PATTERNS", "debug_drop_expert"), ("ZMLX_DEBUG_DROP_EXPERT", "0")]);
    assert!(req(None, &e, true).unwrap().names.is_empty(), "ZMLX_<NAME>=0 switches a pattern off");
    let e = env(&[("ZMLX_DEBUG_DROP_EXPERT", "maybe")]);
    let err = req(None, &e, true).unwrap_err().to_string();
    assert!(err.contains("ZMLX_DEBUG_DROP_EXPERT=maybe") && err.contains("expected 0 or 1"), "{err}");
    let e = env(&[("ZMLX_PATTERNS", "bogus")]);
    assert!(req(None, &e, true).unwrap_err().to_string().contains("unknown pattern `bogus`"));
}

#[test]
fn unpatch_restores_a_fresh_models_tokens() {
    let _g = mlx_lock();
    let dir = tempfile::tempdir().unwrap();
    synth_into(dir.path(), &synth_opts(Family::Qwen3Moe, Some(4), 4));
    let (mut m, _) = load(dir.path(), DtypeChoice::F32);
    let (fresh, _) = load(dir.path(), DtypeChoice::F32);
    let ids = [7u32, 100, 200, 300, 42];
    let want = greedy_ids(&fresh, &ids, 32, true).unwrap();
    let sel = Selection { names: vec!["debug_drop_expert".into()], source: "test".into() };
    let report = patterns::patch(&mut m, &sel).unwrap();
    assert_eq!(report.modules_patched(), 2, "{}", report.summary());
    assert_ne!(greedy_ids(&m, &ids, 32, true).unwrap(), want);
    patterns::unpatch(&mut m);
    assert_eq!(greedy_ids(&m, &ids, 32, true).unwrap(), want);
}

#[test]
fn decode_profile_counts_ops_and_times_slots() {
    let _g = mlx_lock();
    let dir = tempfile::tempdir().unwrap();
    synth_into(dir.path(), &synth_opts(Family::Qwen3Moe, Some(4), 5));
    let (model, _) = load(dir.path(), DtypeChoice::F32);
    let p = zmlx::profile::decode_profile(&model, &[7, 100, 200, 300], 3).unwrap();
    assert_eq!(p.ops_total, p.ops_by_primitive.values().sum::<usize>());
    assert!(p.ops_by_primitive.contains_key("GatherQMM"), "{:?}", p.ops_by_primitive);
    for slot in ["attention", "router", "experts+combine", "head", "dense_mlp"] {
        assert!(p.ms_by_slot.get(slot).is_some_and(|v| *v > 0.0), "{slot} missing: {:?}", p.ms_by_slot);
    }
    // Profiling must not change what the model computes.
    let (fresh, _) = load(dir.path(), DtypeChoice::F32);
    let want = greedy_ids(&fresh, &[7, 100, 200, 300], 8, true).unwrap();
    assert_eq!(greedy_ids(&model, &[7, 100, 200, 300], 8, true).unwrap(), want);
}

#[test]
fn prefill_profile_counts_ops_and_times_slots() {
    let _g = mlx_lock();
    let dir = tempfile::tempdir().unwrap();
    synth_into(dir.path(), &synth_opts(Family::Qwen3Moe, Some(4), 5));
    let (model, _) = load(dir.path(), DtypeChoice::F32);
    let prompt: Vec<u32> = (0..40).map(|i| 7 + 11 * i).collect();
    let p = zmlx::profile::prefill_profile(&model, &prompt, 2).unwrap();
    let bad = zmlx::profile::prefill_profile(&model, &[1, 100_000], 1).unwrap_err().to_string();
    assert!(bad.contains("100000 is out of range"), "{bad}");
    assert_eq!(p.prompt_tokens, 39);
    assert_eq!(p.ops_total, p.ops_by_primitive.values().sum::<usize>());
    // 39 tokens x k slots: the experts run the sorted gathered matmul, as mlx-lm's prefill does.
    assert!(
        p.ops_by_primitive.contains_key("GatherQMM") && p.ops_by_primitive.contains_key("ArgSort"),
        "{:?}",
        p.ops_by_primitive
    );
    for slot in ["attention", "router", "experts+combine"] {
        assert!(p.ms_by_slot.get(slot).is_some_and(|v| *v > 0.0), "{slot} missing: {:?}", p.ms_by_slot);
    }
    assert!(p.ms_unbarriered > 0.0 && p.tokens_per_second > 0.0);
    // Profiling must not change what the model computes.
    let (fresh, _) = load(dir.path(), DtypeChoice::F32);
    assert_eq!(greedy_ids(&model, &prompt, 6, true).unwrap(), greedy_ids(&fresh, &prompt, 6, true).unwrap());
}

#[test]
fn benchmark_runs_generate_exactly_max_tokens_and_record_threads() {
    let dir = tempfile::tempdir().unwrap();
    {
        let _g = mlx_lock();
        synth_into(dir.path(), &synth_opts(Family::Qwen3Moe, Some(4), 6));
    }
    let ledger = dir.path().join("ledger.jsonl");
    let out = zmlx_cmd()
        .args(["run", dir.path().to_str().unwrap(), "--patterns", "moe_mlp", "--runs", "1", "--max-tokens", "9"])
        .args(["--ignore-eos", "--warmup", "0", "--json", "--ledger", ledger.to_str().unwrap()])
        .env("ZMLX_CPU_THREADS", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["ledger_line"]["gen_tokens"], 9, "--ignore-eos: exactly --max-tokens tokens");
    assert_eq!(v["ledger_line"]["threads"], 1, "the kernel thread count is recorded");
    assert_eq!((v["report"]["warmup"].as_u64(), v["report"]["ignore_eos"].as_bool()), (Some(0), Some(true)));
    for side in ["baseline", "patched"] {
        assert_eq!(v["report"][side]["runs"][0]["token_ids"].as_array().unwrap().len(), 9, "{side}");
    }
}

#[test]
fn generate_warmup_leaves_the_timed_generation_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    {
        let _g = mlx_lock();
        synth_into(dir.path(), &synth_opts(Family::Qwen3Moe, Some(4), 8));
    }
    let gen = |warmup: &str| -> serde_json::Value {
        let (code, out, err) = zmlx(&[
            "generate",
            "--model",
            dir.path().to_str().unwrap(),
            "--prompt",
            "The kernel schedules threads.",
            "--max-tokens",
            "6",
            "--ignore-eos",
            "--json",
            "--warmup",
            warmup,
        ]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let (cold, warm) = (gen("0"), gen("2"));
    assert_eq!(warm["token_ids"], cold["token_ids"], "warm-up generations must not change the timed one");
    assert_eq!(warm["token_ids"].as_array().unwrap().len(), 6);
    // Kernel call counts cover the timed generation only: the same with or without warm-up.
    assert_eq!(warm["pattern_calls"], cold["pattern_calls"]);
    assert!(warm["pattern_calls"].as_object().is_some_and(|m| !m.is_empty()), "{}", warm["pattern_calls"]);
}
