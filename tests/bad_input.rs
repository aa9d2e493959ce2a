//! Bad checkpoints and arguments give a clear error (naming the file / tensor / key and what was
//! expected), a non-zero exit code, and never a panic.
mod common;

use std::collections::HashMap;
use std::path::Path;

use common::*;
use mlx_rs::{Array, Dtype};
use zmlx::config::Family;

/// Runs `zmlx generate` on `dir` and returns stderr, asserting failure without a panic.
fn generate_fails(dir: &Path) -> String {
    let out = zmlx_cmd().args(["generate", "--max-tokens", "2", "--model"]).arg(dir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "expected failure, got success; stderr: {err}");
    assert_eq!(out.status.code(), Some(2), "errors exit with 2; stderr: {err}");
    assert!(!err.contains("panicked"), "must not panic: {err}");
    err
}

fn fresh(family: Family, quantize: Option<i32>) -> tempfile::TempDir {
    let _g = mlx_lock();
    let dir = tempfile::tempdir().unwrap();
    synth_into(dir.path(), &synth_opts(family, quantize, 0));
    dir
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(p, v.to_string()).unwrap();
}

fn edit_weights(dir: &Path, f: impl FnOnce(&mut HashMap<String, Array>)) {
    let _g = mlx_lock();
    let p = dir.join("model.safetensors");
    let mut w = Array::load_safetensors(&p).unwrap();
    for a in w.values() {
        a.eval().unwrap();
    }
    f(&mut w);
    let meta: HashMap<String, String> = [("format".to_string(), "mlx".to_string())].into();
    Array::save_safetensors(w.iter().map(|(k, v)| (k.as_str(), v)), &meta, &p).unwrap();
}

#[test]
fn unknown_model_type() {
    let d = fresh(Family::Mixtral, None);
    edit_config(d.path(), |c| c["model_type"] = "llama4_moe".into());
    let err = generate_fails(d.path());
    assert!(err.contains("config.json") && err.contains("unsupported model_type `llama4_moe`"), "{err}");
    assert!(
        err.contains("mixtral, qwen2_moe, qwen3_moe, glm4_moe, glm4_moe_lite, deepseek_v3"),
        "lists the supported families: {err}"
    );
}

#[test]
fn missing_required_config_key() {
    let d = fresh(Family::Qwen3Moe, None);
    edit_config(d.path(), |c| {
        c.as_object_mut().unwrap().remove("moe_intermediate_size");
    });
    let err = generate_fails(d.path());
    assert!(err.contains("config.json") && err.contains("`moe_intermediate_size`") && err.contains("missing"), "{err}");
}

#[test]
fn not_a_directory_and_no_weights() {
    let err = generate_fails(Path::new("/nonexistent/zmlx-model"));
    assert!(err.contains("/nonexistent/zmlx-model is not a directory"), "{err}");
    let d = fresh(Family::Mixtral, None);
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    let err = generate_fails(d.path());
    assert!(err.contains("no model*.safetensors files"), "{err}");
}

#[test]
fn truncated_safetensors() {
    let d = fresh(Family::Mixtral, None);
    let p = d.path().join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len / 2).unwrap();
    let err = generate_fails(d.path());
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");
}

#[test]
fn index_lists_a_missing_shard() {
    let d = fresh(Family::Mixtral, None);
    std::fs::write(
        d.path().join("model.safetensors.index.json"),
        r#"{"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let err = generate_fails(d.path());
    assert!(err.contains("model-00002-of-00002.safetensors") && err.contains("missing"), "{err}");
}

#[test]
fn missing_tensor() {
    let d = fresh(Family::Qwen3Moe, None);
    edit_weights(d.path(), |w| {
        w.remove("model.layers.2.self_attn.k_norm.weight");
    });
    let err = generate_fails(d.path());
    assert!(err.contains("tensor `model.layers.2.self_attn.k_norm.weight` is missing"), "{err}");
}

#[test]
fn missing_hf_expert_tensor() {
    let _g = mlx_lock();
    let d = tempfile::tempdir().unwrap();
    let mut o = synth_opts(Family::Mixtral, None, 0);
    o.layout = zmlx::synth::Layout::Hf;
    synth_into(d.path(), &o);
    drop(_g);
    edit_weights(d.path(), |w| {
        w.remove("model.layers.1.block_sparse_moe.experts.5.w3.weight");
    });
    let err = generate_fails(d.path());
    assert!(
        err.contains("`model.layers.1.block_sparse_moe.experts.5.w3.weight` is missing") && err.contains("expert 0"),
        "{err}"
    );
}

#[test]
fn shape_mismatch() {
    let d = fresh(Family::Mixtral, None);
    edit_config(d.path(), |c| c["intermediate_size"] = 96.into());
    let err = generate_fails(d.path());
    assert!(
        err.contains("model.safetensors") && err.contains("has shape") && err.contains("expected [8, 96, 128]"),
        "{err}"
    );
}

#[test]
fn dtype_mismatch() {
    let d = fresh(Family::Mixtral, None);
    edit_weights(d.path(), |w| {
        w.insert("model.norm.weight".into(), Array::from_slice(&[1i32; 128], &[128]));
    });
    let err = generate_fails(d.path());
    assert!(err.contains("`model.norm.weight` has dtype Int32, expected a float"), "{err}");

    let d = fresh(Family::Mixtral, Some(4));
    edit_weights(d.path(), |w| {
        let f = w["lm_head.weight"].as_dtype(Dtype::Float32).unwrap();
        w.insert("lm_head.weight".into(), f);
    });
    let err = generate_fails(d.path());
    assert!(err.contains("`lm_head.weight` has dtype Float32, expected uint32"), "{err}");
}

#[test]
fn bad_quantization_entry() {
    let d = fresh(Family::Qwen3Moe, Some(4));
    edit_config(d.path(), |c| c["quantization"]["bits"] = 7.into());
    let err = generate_fails(d.path());
    assert!(err.contains("config.json") && err.contains("quantization.bits is 7"), "{err}");

    let d = fresh(Family::Qwen3Moe, Some(4));
    edit_config(d.path(), |c| {
        c["quantization"]["model.layers.0.mlp.gate"] = serde_json::json!({"group_size": 64, "bits": 4})
    });
    let err = generate_fails(d.path());
    assert!(
        err.contains("quantization.model.layers.0.mlp.gate says bits 4") && err.contains("tensors have bits 8"),
        "{err}"
    );

    let d = fresh(Family::Qwen3Moe, Some(4));
    edit_config(d.path(), |c| c["quantization"]["mode"] = "mxfp4".into());
    let err = generate_fails(d.path());
    assert!(err.contains("mode is `mxfp4`") && err.contains("affine"), "{err}");
}

#[test]
fn unexpected_tensor() {
    let d = fresh(Family::Mixtral, None);
    edit_weights(d.path(), |w| {
        w.insert("model.layers.0.self_attn.rotary_emb.inv_freq".into(), Array::from_slice(&[1f32; 4], &[4]));
    });
    let err = generate_fails(d.path());
    assert!(err.contains("unexpected tensor") && err.contains("rotary_emb.inv_freq"), "{err}");
}

#[test]
fn bad_cli_arguments() {
    let out = zmlx_cmd().args(["synth", "--family", "gpt2", "--out", "/tmp/zmlx-never"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("unknown family `gpt2`") && err.contains("deepseek_v3"), "{err}");
}

#[test]
fn bad_deepseek_style_configs() {
    let d = fresh(Family::DeepseekV3, None);
    edit_config(d.path(), |c| c["n_group"] = 3.into());
    let err = generate_fails(d.path());
    assert!(err.contains("n_group (3) must divide n_routed_experts (16)"), "{err}");

    let d = fresh(Family::DeepseekV3, None);
    edit_config(d.path(), |c| c["topk_group"] = 5.into());
    let err = generate_fails(d.path());
    assert!(err.contains("topk_group (5) must be at most n_group (4)"), "{err}");

    let d = fresh(Family::Glm4MoeLite, None);
    edit_config(d.path(), |c| {
        c.as_object_mut().unwrap().remove("kv_lora_rank");
    });
    let err = generate_fails(d.path());
    assert!(err.contains("`kv_lora_rank`") && err.contains("missing"), "{err}");

    let d = fresh(Family::Glm4Moe, None);
    edit_config(d.path(), |c| c["scoring_func"] = "softmax".into());
    let err = generate_fails(d.path());
    assert!(err.contains("`scoring_func` must be \"sigmoid\""), "{err}");

    let d = fresh(Family::DeepseekV3, None);
    edit_config(d.path(), |c| c["rope_scaling"] = serde_json::json!({"type": "longrope", "factor": 2.0}));
    let err = generate_fails(d.path());
    assert!(err.contains("rope_scaling type `longrope` is not supported"), "{err}");
}

#[test]
fn mtp_layers_are_dropped_as_mlx_lm_does() {
    // GLM-4.7-Flash: layers >= num_hidden_layers are the MTP head, dropped at load.
    let d = fresh(Family::Glm4MoeLite, None);
    edit_weights(d.path(), |w| {
        w.insert("model.layers.3.eh_proj.weight".into(), Array::from_slice(&[0.5f32; 4], &[2, 2]));
        w.insert("model.layers.3.mlp.experts.0.up_proj.weight".into(), Array::from_slice(&[0.5f32; 4], &[2, 2]));
    });
    let out = zmlx_cmd().args(["generate", "--max-tokens", "2", "--model"]).arg(d.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // DeepSeek-V3 drops only its hard-coded layer 61, so another stray layer is an error.
    let d = fresh(Family::DeepseekV3, None);
    edit_weights(d.path(), |w| {
        w.insert("model.layers.61.eh_proj.weight".into(), Array::from_slice(&[0.5f32; 4], &[2, 2]));
    });
    let out = zmlx_cmd().args(["generate", "--max-tokens", "2", "--model"]).arg(d.path()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    edit_weights(d.path(), |w| {
        w.insert("model.layers.3.eh_proj.weight".into(), Array::from_slice(&[0.5f32; 4], &[2, 2]));
    });
    let err = generate_fails(d.path());
    assert!(err.contains("unexpected tensor") && err.contains("model.layers.3.eh_proj.weight"), "{err}");
}
