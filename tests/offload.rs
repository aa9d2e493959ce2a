//! Expert offloading (src/offload.rs): with the routed experts left in the checkpoint files and
//! only a few per layer in memory, greedy tokens equal the fully resident model's — on every
//! family, mlx-community (stacked, 4-bit) and Hugging Face (per-expert, float) layouts, unpatched
//! and with the presets, with LRU and LFU, with and without prefetch, with as few slots as a
//! token selects (misses on nearly every step; prefill in token chunks), in single and batched
//! decode. Also: what stays in memory is the pool, not the experts; counters add up; bad sizes
//! are refused.
mod common;

use common::*;
use zmlx::batch::{generate_batch, BatchOptions, SequenceRequest};
use zmlx::config::Family;
use zmlx::generate::{greedy_ids, GenerateOptions};
use zmlx::mlx_env;
use zmlx::model::{DtypeChoice, Model};
use zmlx::offload::{CacheSize, OffloadConfig, Policy};
use zmlx::synth::Layout;
use zmlx::tokenizer::TextTokenizer;

const TOKENS: usize = 12;

fn prompts(tok: &TextTokenizer) -> Vec<Vec<u32>> {
    [
        "Hi",
        "In a distributed system, a client sends requests over the network to many servers; each server keeps a \
         log of operations, and the cluster elects a leader that orders every write.",
    ]
    .iter()
    .map(|t| tok.encode(t).unwrap())
    .collect()
}

fn load(dir: &std::path::Path, offload: Option<OffloadConfig>) -> Model {
    let (m, _) = Model::load_with(dir, DtypeChoice::F32, mlx_env::Backend::detect(), offload).unwrap();
    m
}

fn greedy(model: &Model, prompts: &[Vec<u32>]) -> Vec<Vec<u32>> {
    prompts.iter().map(|p| greedy_ids(model, p, TOKENS, true).unwrap()).collect()
}

/// Every (preset, cache) combination of `dir` against the resident model.
fn check(dir: &std::path::Path, label: &str, presets: &[&str]) {
    let mut resident = load(dir, None);
    let tok = TextTokenizer::load(dir, &resident.config).unwrap();
    let prompts = prompts(&tok);
    let k = resident.config.num_experts_per_tok as usize;
    let e = resident.config.num_experts as usize;
    let caches = [
        OffloadConfig { size: CacheSize::Experts(k), policy: Policy::Lru, prefetch: true, pin: 0 },
        OffloadConfig { size: CacheSize::Experts(k), policy: Policy::Lfu, prefetch: false, pin: 0 },
        OffloadConfig { size: CacheSize::Experts((k + 1).min(e)), policy: Policy::Lru, prefetch: false, pin: 0 },
    ];
    for preset in presets {
        patch_preset(&mut resident, preset);
        let want = greedy(&resident, &prompts);
        for cfg in caches {
            let mut m = load(dir, Some(cfg));
            patch_preset(&mut m, preset);
            let got = greedy(&m, &prompts);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g,
                    w,
                    "{label} {preset} {cfg:?}: prompt {i} differs from the resident model at {:?}",
                    first_divergence(g, w)
                );
            }
            let s = m.offload.as_ref().expect("an expert cache").stats();
            assert_eq!(
                s.slots_per_layer,
                match cfg.size {
                    CacheSize::Experts(n) => n,
                    _ => unreachable!(),
                }
            );
            assert!(s.misses > 0 && s.hits + s.misses > 0, "{label} {preset} {cfg:?}: no expert lookups: {s:?}");
            assert!(s.bytes_read > 0 && s.expert_bytes > s.pool_bytes, "{label}: {s:?}");
            if cfg.prefetch && s.moe_layers > 1 {
                assert!(s.prefetch_loads > 0, "{label} {preset}: prefetch never loaded an expert: {s:?}");
            } else {
                assert_eq!(s.prefetch_loads, 0);
            }
        }
    }
}

fn family(family: Family) {
    let _g = mlx_lock();
    let dir = tempfile::tempdir().unwrap();
    synth_into(dir.path(), &synth_opts(family, Some(4), 11));
    check(dir.path(), &format!("{family} mlx 4-bit"), &["none", "safe", "fast"]);
    let hf = tempfile::tempdir().unwrap();
    let mut o = synth_opts(family, None, 11);
    o.layout = Layout::Hf;
    synth_into(hf.path(), &o);
    check(hf.path(), &format!("{family} hf float"), &["none"]);
}

#[test]
fn mixtral_offloaded_equals_resident() {
    family(Family::Mixtral);
}

#[test]
fn qwen2_moe_offloaded_equals_resident() {
    family(Family::Qwen2Moe);
}

#[test]
fn qwen3_moe_offloaded_equals_resident() {
    family(Family::Qwen3Moe);
}

#[test]
fn glm4_moe_offloaded_equals_resident() {
    family(Family::Glm4Moe);
}

#[test]
fn glm4_moe_lite_offloaded_equals_resident() {
    family(Family::Glm4MoeLite);
}

#[test]
fn deepseek_v3_offloaded_equals_resident() {
    family(Family::DeepseekV3);
}

/// Batched decode (the server's engine) on the pool: sequences joining and leaving, prefill
/// chunks interleaved with decode steps — the pool's fence keeps a step from overwriting slots a
/// queued step still reads.
#[test]
fn batched_decode_on_the_pool_equals_resident() {
    let _g = mlx_lock();
    let dir = tempfile::tempdir().unwrap();
    synth_into(dir.path(), &synth_opts(Family::Qwen3Moe, Some(4), 5));
    let resident = load(dir.path(), None);
    let tok = TextTokenizer::load(dir.path(), &resident.config).unwrap();
    let texts = ["Hi", "The capital of France is", "1 2 3 4 5 6 7", "def fib(n):", "Why is the sky blue?"];
    let reqs: Vec<SequenceRequest> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut o = GenerateOptions::greedy(6 + 3 * i, vec![]);
            o.ignore_eos = true;
            SequenceRequest::from_options(tok.encode(t).unwrap(), &o)
        })
        .collect();
    let (want, _) = generate_batch(&resident, &reqs, BatchOptions::new(3), |_, _| Ok(())).unwrap();
    let k = resident.config.num_experts_per_tok as usize;
    let m = load(
        dir.path(),
        Some(OffloadConfig { size: CacheSize::Experts(k), policy: Policy::Lru, prefetch: true, pin: 0 }),
    );
    let (got, _) = generate_batch(&m, &reqs, BatchOptions::new(3), |_, _| Ok(())).unwrap();
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g.token_ids,
            w.token_ids,
            "sequence {i} differs at {:?}",
            first_divergence(&g.token_ids, &w.token_ids)
        );
    }
}

/// Experts never become resident: after loading with a budget a third of the experts' bytes,
/// MLX holds the pools (within the budget) and at most the non-expert weights besides — not the
/// experts — and generating reads into the pools without growing them.
#[test]
fn memory_holds_the_pool_not_the_experts() {
    let _g = mlx_lock();
    let dir = tempfile::tempdir().unwrap();
    let mut o = synth_opts(Family::Qwen3Moe, Some(4), 3);
    o.preset = zmlx::synth::Preset::Bench;
    o.layers = Some(2);
    synth_into(dir.path(), &o);
    let file_bytes: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    let budget: u64 = 60_000_000;
    let before = mlx_rs::memory::active_memory().unwrap() as u64;
    let m = load(
        dir.path(),
        Some(OffloadConfig { size: CacheSize::Bytes(budget), policy: Policy::Lru, prefetch: true, pin: 0 }),
    );
    let held = mlx_rs::memory::active_memory().unwrap() as u64 - before;
    let s = m.offload.as_ref().unwrap().stats();
    assert!(s.pool_bytes <= budget, "pools {} over the budget {budget}", s.pool_bytes);
    assert!(s.expert_bytes >= 3 * budget, "the checkpoint's experts ({}) should be >= 3x the budget", s.expert_bytes);
    let others = file_bytes - s.expert_bytes;
    assert!(
        held <= s.pool_bytes + others + 1_000_000,
        "MLX holds {held} B after load: more than the pools ({}) + every non-expert weight ({others})",
        s.pool_bytes
    );
    // Generating (prefill in chunks, then decode with misses) keeps MLX's peak within the pools,
    // the other weights and the activations: expert bytes are read into the pools, never into
    // arrays of their own.
    let tok = TextTokenizer::load(dir.path(), &m.config).unwrap();
    mlx_rs::memory::reset_peak_memory().unwrap();
    greedy_ids(&m, &tok.encode(&"The capital of France is Paris. ".repeat(8)).unwrap(), 8, true).unwrap();
    let peak = mlx_rs::memory::peak_memory().unwrap() as u64 - before;
    let s2 = m.offload.as_ref().unwrap().stats();
    assert!(s2.bytes_read > 0 && s2.misses > 0);
    assert_eq!(s2.pool_bytes, s.pool_bytes);
    let activations: u64 = 32_000_000;
    assert!(
        peak <= s.pool_bytes + others + activations,
        "MLX peak {peak} B while generating: over the pools ({}) + non-expert weights ({others}) + {activations} B \
         of activations",
        s.pool_bytes
    );
}

/// Sizes that cannot work are refused with the numbers needed.
#[test]
fn too_small_caches_are_refused() {
    let _g = mlx_lock();
    let dir = tempfile::tempdir().unwrap();
    synth_into(dir.path(), &synth_opts(Family::Mixtral, Some(4), 1));
    let k = 2; // mixtral tiny: top-2
    let cfg = OffloadConfig { size: CacheSize::Experts(k - 1), policy: Policy::Lru, prefetch: true, pin: 0 };
    let err = Model::load_with(dir.path(), DtypeChoice::F32, mlx_env::Backend::detect(), Some(cfg))
        .err()
        .expect("a cache below top-k is refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("--expert-cache") && msg.contains(&format!("{k} experts")), "{msg}");
    let cfg = OffloadConfig { size: CacheSize::Bytes(1000), policy: Policy::Lru, prefetch: true, pin: 0 };
    let msg = format!(
        "{:#}",
        Model::load_with(dir.path(), DtypeChoice::F32, mlx_env::Backend::detect(), Some(cfg)).err().unwrap()
    );
    assert!(msg.contains("GB"), "{msg}");
}

/// `zmlx generate`'s cache flags: nonsense is refused (exit 2, the flag named), never run.
#[test]
fn bad_cache_flags_exit_2() {
    let _g = mlx_lock();
    let dir = tempfile::tempdir().unwrap();
    synth_into(dir.path(), &synth_opts(Family::Mixtral, Some(4), 1));
    let model = dir.path().to_str().unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (&["--expert-cache", "0"], &["--expert-cache", "> 0"]),
        (&["--expert-cache=-2"], &["--expert-cache"]),
        (&["--expert-cache", "nan"], &["--expert-cache", "finite"]),
        (&["--expert-cache", "lots"], &["--expert-cache", "not a number"]),
        (&["--expert-cache-experts", "0"], &["--expert-cache-experts", "at least 1"]),
        (&["--expert-cache", "1", "--expert-cache-experts", "4"], &["--expert-cache", "cannot be used with"]),
        (&["--expert-cache-policy", "mru", "--expert-cache-experts", "4"], &["--expert-cache-policy", "mru"]),
        (&["--expert-cache-policy", "lfu"], &["need a cache size"]),
        (&["--expert-prefetch"], &["need a cache size"]),
        (&["--expert-cache-experts", "1"], &["fewer than the 2 experts"]),
        (&["--expert-cache-pin", "1"], &["need a cache size"]),
        (&["--expert-cache-experts", "4", "--expert-cache-pin", "1"], &["--expert-cache-pin", "--warmup"]),
        (
            &["--expert-cache-experts", "4", "--expert-cache-pin", "3", "--warmup", "1"],
            &["--expert-cache-pin 3", "pin at most 2"],
        ),
        (&["--expert-cache-experts", "4", "--expert-cache-pin", "0"], &["--expert-cache-pin", "at least 1"]),
    ];
    for (flags, needles) in cases {
        let out = zmlx_cmd()
            .args(["generate", "--model", model, "--max-tokens", "2"])
            .args(*flags)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{flags:?} panicked:\n{err}");
        assert_eq!(out.status.code(), Some(2), "{flags:?}: exit 2 expected; stderr:\n{err}");
        for n in *needles {
            assert!(err.contains(n), "{flags:?}: stderr should mention {n:?}:\n{err}");
        }
    }
}

/// `--expert-cache-pin`: the warm-up's most selected experts stay in their slots (reported per
/// layer); tokens still equal the resident run's (CLI, with the preset).
#[test]
fn pinned_experts_keep_the_resident_tokens() {
    let _g = mlx_lock();
    let dir = tempfile::tempdir().unwrap();
    synth_into(dir.path(), &synth_opts(Family::Qwen3Moe, Some(4), 9));
    let run = |extra: &[&str]| -> serde_json::Value {
        let out = zmlx_cmd()
            .args(["generate", "--model", dir.path().to_str().unwrap(), "--max-tokens", "16", "--ignore-eos"])
            .args(["--json", "--warmup", "1"])
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let resident = run(&[]);
    let pinned = run(&["--expert-cache-experts", "6", "--expert-cache-pin", "2"]);
    assert_eq!(pinned["token_ids"], resident["token_ids"]);
    let c = &pinned["expert_cache"];
    assert_eq!(c["slots_per_layer"], 6);
    assert_eq!(c["pinned_per_layer"], 2);
    assert!(c["hits"].as_u64().unwrap() > 0, "{c}");
}
