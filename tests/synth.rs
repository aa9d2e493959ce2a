//! `zmlx synth`: deterministic bytes, sharding with an index that loads like one file, and the
//! quantized layout MLX expects.
mod common;

use common::*;
use zmlx::config::Family;
use zmlx::generate::greedy_ids;
use zmlx::model::DtypeChoice;

fn sha(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let _g = mlx_lock();
    let (a, b, c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    synth_into(a.path(), &synth_opts(Family::Qwen3Moe, Some(4), 11));
    synth_into(b.path(), &synth_opts(Family::Qwen3Moe, Some(4), 11));
    synth_into(c.path(), &synth_opts(Family::Qwen3Moe, Some(4), 12));
    for f in ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(sha(&a.path().join(f)), sha(&b.path().join(f)), "{f} must be deterministic");
    }
    assert_ne!(sha(&a.path().join("model.safetensors")), sha(&c.path().join("model.safetensors")));
}

#[test]
fn sharded_checkpoint_loads_like_a_single_file() {
    let _g = mlx_lock();
    let (one, many) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let o = synth_opts(Family::Mixtral, None, 3);
    synth_into(one.path(), &o);
    let mut sharded = o.clone();
    sharded.max_shard_bytes = 256 << 10;
    synth_into(many.path(), &sharded);
    let shards: Vec<_> = std::fs::read_dir(many.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .collect();
    assert!(shards.len() > 2, "expected several shards, got {}", shards.len());
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(many.path().join("model.safetensors.index.json")).unwrap())
            .unwrap();
    assert!(index["weight_map"]["lm_head.weight"].as_str().unwrap().starts_with("model-0000"));
    let prompt = [5u32, 17, 300, 42];
    let (m1, _) = load(one.path(), DtypeChoice::F32);
    let (m2, _) = load(many.path(), DtypeChoice::F32);
    assert_eq!(greedy_ids(&m1, &prompt, 16, true).unwrap(), greedy_ids(&m2, &prompt, 16, true).unwrap());
}

#[test]
fn quantized_layout_is_mlx_affine() {
    let _g = mlx_lock();
    let d = tempfile::tempdir().unwrap();
    synth_into(d.path(), &synth_opts(Family::Qwen3Moe, Some(4), 0));
    let w = mlx_rs::Array::load_safetensors(d.path().join("model.safetensors")).unwrap();
    let q = &w["model.layers.0.mlp.switch_mlp.up_proj.weight"];
    assert_eq!(q.dtype(), mlx_rs::Dtype::Uint32);
    assert_eq!(q.shape(), &[16, 64, 128 * 4 / 32]);
    assert_eq!(w["model.layers.0.mlp.switch_mlp.up_proj.scales"].shape(), &[16, 64, 2]);
    assert_eq!(w["model.layers.0.mlp.switch_mlp.up_proj.biases"].dtype(), mlx_rs::Dtype::Bfloat16);
    // The router is 8-bit, as mlx-lm's qwen3_moe quant_predicate makes it.
    assert_eq!(w["model.layers.0.mlp.gate.weight"].shape(), &[16, 128 * 8 / 32]);
    assert!(!w.contains_key("model.layers.0.input_layernorm.scales"), "norms stay float");
}
