//! `zmlx synth`: deterministic bytes, sharding with an index that loads like one file, and the
//! quantized layout MLX expects.
mod common;

use common::*;
use mlx_rs::ops::indexing::IndexOp;
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

fn tensors(dir: &std::path::Path) -> std::collections::HashMap<String, mlx_rs::Array> {
    let mut all = std::collections::HashMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_name().to_string_lossy().ends_with(".safetensors") {
            all.extend(mlx_rs::Array::load_safetensors(e.path()).unwrap());
        }
    }
    all
}

/// Bit-for-bit equality: same dtype and shape, equal values (MLX's array_equal; the values are
/// random normals or packed words, so no NaN and no signed zero hides a difference).
fn same_bits(a: &mlx_rs::Array, b: &mlx_rs::Array) -> bool {
    a.shape() == b.shape() && a.dtype() == b.dtype() && mlx_rs::ops::array_eq(a, b, false).unwrap().item_exact::<bool>()
}

fn quiet(mut o: zmlx::synth::SynthOptions) -> zmlx::synth::SynthOptions {
    o.margins = zmlx::synth::MarginMode::Off;
    o
}

/// Same seed → the same experts in both layouts: the HF per-expert tensors stacked equal the
/// mlx layout's switch_mlp tensor bit for bit (float, and 4-bit with per-expert scales), and
/// MLA's kv_b_proj split as mlx-lm's sanitize splits it equals embed_q / unembed_out.
#[test]
fn hf_and_mlx_layouts_hold_the_same_weights() {
    use zmlx::synth::{Layout, StoreDtype};
    let _g = mlx_lock();
    for (family, quantize) in [(Family::Qwen3Moe, None), (Family::Mixtral, Some(4)), (Family::DeepseekV3, None)] {
        let (m, h) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut o = quiet(synth_opts(family, quantize, 5));
        o.dtype = StoreDtype::F32;
        synth_into(m.path(), &o);
        o.layout = Layout::Hf;
        synth_into(h.path(), &o);
        let (mw, hw) = (tensors(m.path()), tensors(h.path()));
        let c = zmlx::config::ModelConfig::load(m.path()).unwrap();
        let x = zmlx::models::family(family).hf_experts();
        let l = (0..c.num_hidden_layers).find(|&l| c.is_moe_layer(l)).unwrap();
        let parts: &[&str] = if quantize.is_some() { &["weight", "scales", "biases"] } else { &["weight"] };
        for (hf, ours) in x.names {
            for part in parts {
                let p = format!("model.layers.{l}.{}", x.block);
                let per: Vec<_> =
                    (0..c.num_experts).map(|e| hw[&format!("{p}.experts.{e}.{hf}.{part}")].clone()).collect();
                let stacked = mlx_rs::ops::stack(&per, 0).unwrap();
                let name = format!("{p}.switch_mlp.{ours}.{part}");
                assert!(same_bits(&stacked, &mw[&name]), "{family}: stacked HF experts differ from {name}");
            }
        }
        if let Some(mla) = &c.mla {
            let a = format!("model.layers.{l}.self_attn");
            let (h, nope, r) = (c.num_attention_heads, mla.qk_nope_head_dim, mla.kv_lora_rank);
            let kvb = hw[&format!("{a}.kv_b_proj.weight")].reshape(&[h, nope + mla.v_head_dim, r]).unwrap();
            let k = kvb.index((.., ..nope, ..)).swap_axes(-1, -2).unwrap();
            let v = kvb.index((.., nope.., ..));
            assert!(
                same_bits(&k, &mw[&format!("{a}.embed_q.weight")]),
                "{family}: embed_q is not kv_b_proj's key part"
            );
            assert!(
                same_bits(&v, &mw[&format!("{a}.unembed_out.weight")]),
                "{family}: unembed_out is not kv_b_proj's value part"
            );
        }
        // Everything outside the experts and the MLA split has the same name and bits.
        for (name, t) in &mw {
            if let Some(o) = hw.get(name) {
                assert!(same_bits(t, o), "{family}: {name} differs between layouts");
            }
        }
    }
}

/// Every tiny checkpoint has clear greedy margins (stored in config.json by synth).
#[test]
fn margins_are_measured_and_clear_on_tiny() {
    let _g = mlx_lock();
    for family in Family::ALL {
        for quantize in [None, Some(4)] {
            let d = tempfile::tempdir().unwrap();
            synth_into(d.path(), &synth_opts(family, quantize, 0));
            let c: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(d.path().join("config.json")).unwrap()).unwrap();
            let m = &c["zmlx_synth"]["margins"];
            let (median, p10) = (m["median"].as_f64().unwrap(), m["p10"].as_f64().unwrap());
            assert_eq!(m["positions"], 64);
            assert!(median >= 2.0, "{family} q={quantize:?}: median top-1/top-2 gap {median} < 2 nats ({m})");
            assert!(p10 > 0.0 && m["p90"].as_f64().unwrap() >= median, "{family} q={quantize:?}: {m}");
        }
    }
}

fn config_of(dir: &std::path::Path) -> serde_json::Map<String, serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    v.as_object().unwrap().clone()
}

/// The written config equals `want` except the keys synth owns or trims.
fn same_config_except(
    got: &serde_json::Map<String, serde_json::Value>,
    want: &serde_json::Map<String, serde_json::Value>,
    except: &[&str],
) {
    let skip = ["zmlx_synth", "quantization", "quantization_config", "torch_dtype", "dtype"];
    for (k, v) in want {
        if !skip.contains(&k.as_str()) && !except.contains(&k.as_str()) {
            assert_eq!(got.get(k), Some(v), "config key `{k}` changed");
        }
    }
    for k in got.keys() {
        assert!(want.contains_key(k) || skip.contains(&k.as_str()), "config key `{k}` appeared");
    }
}

/// `--config` + `--layers`: the source config back except the trimmed keys, its MLX quantization
/// block followed (the 8-bit router override kept for the remaining layers), only the kept
/// layers' tensors written; loads and generates in zmlx.
#[test]
fn config_and_layers_round_trip() {
    let _g = mlx_lock();
    let (src, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // qwen3_moe tiny: 3 layers, mlp_only_layers [1], 4-bit with 8-bit routers on layers 0 and 2.
    synth_into(src.path(), &quiet(synth_opts(Family::Qwen3Moe, Some(4), 3)));
    let cfg = src.path().join("config.json");
    let run = |layers: &str| {
        zmlx_cmd()
            .args(["synth", "--config", cfg.to_str().unwrap(), "--layers", layers, "--margins", "off", "--out"])
            .arg(out.path())
            .output()
            .unwrap()
    };
    let r = run("1");
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let (got, want) = (config_of(out.path()), config_of(src.path()));
    same_config_except(&got, &want, &["num_hidden_layers", "mlp_only_layers"]);
    assert_eq!(got["num_hidden_layers"], 1);
    assert_eq!(got["mlp_only_layers"], serde_json::json!([]));
    let q = got["quantization"].as_object().unwrap();
    assert_eq!(q["bits"], 4);
    assert_eq!(q["model.layers.0.mlp.gate"]["bits"], 8);
    assert!(!q.contains_key("model.layers.2.mlp.gate"), "override of a trimmed layer kept: {q:?}");
    let w = tensors(out.path());
    assert!(w.keys().all(|k| !k.starts_with("model.layers.1.") && !k.starts_with("model.layers.2.")));
    assert_eq!(w["model.layers.0.mlp.gate.weight"].shape(), &[16, 128 * 8 / 32]);
    let (m, tok) = load(out.path(), DtypeChoice::F32);
    let ids = tok.encode(PROMPTS[0]).unwrap();
    assert_eq!(greedy_ids(&m, &ids, 4, true).unwrap().len(), 4);
    // Trimming to more layers than exist is refused with the file named.
    let r = run("4");
    assert_eq!(r.status.code(), Some(2));
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("--layers 4") && err.contains("num_hidden_layers") && err.contains("config.json"), "{err}");
}

/// `--preset full` writes each family's real published config (trimmed to 1–2 layers here, so
/// one MoE layer exists) with directly quantized 4-bit weights that mlx-lm's strict loader
/// accepts (lazy load_model: every tensor name and shape checked, nothing computed); the
/// qwen3_moe one is also loaded and run by zmlx (its margins measured).
#[test]
fn full_presets_load_in_mlx_lm() {
    let root = tempfile::tempdir().unwrap();
    let mut dirs = vec![];
    for family in Family::ALL {
        let full = zmlx::models::family(family).full_config();
        let first_dense = full.get("first_k_dense_replace").and_then(|v| v.as_i64()).unwrap_or(0);
        let layers = (first_dense + 1).to_string();
        let d = root.path().join(family.model_type());
        let margins = if family == Family::Qwen3Moe { "on" } else { "off" };
        let r = zmlx_cmd()
            .args(["synth", "--preset", "full", "--family", family.model_type(), "--quantize", "4"])
            .args(["--layers", &layers, "--margins", margins, "--out"])
            .arg(&d)
            .output()
            .unwrap();
        assert!(r.status.success(), "{family}: {}", String::from_utf8_lossy(&r.stderr));
        let got = config_of(&d);
        same_config_except(&got, full.as_object().unwrap(), &["num_hidden_layers", "eos_token_id", "bos_token_id"]);
        assert_eq!(got["zmlx_synth"]["model"], zmlx::models::family(family).full_model());
        if family == Family::Qwen3Moe {
            let median = got["zmlx_synth"]["margins"]["median"].as_f64().unwrap();
            assert!(median >= 2.0, "full qwen3_moe: median margin {median}");
        }
        dirs.push(d);
    }
    let script = "import sys\nfrom pathlib import Path\nfrom mlx_lm.utils import load_model\n\
                  for d in sys.argv[1:]:\n    load_model(Path(d), lazy=True)\n    print('loaded', d)\n";
    let out = std::process::Command::new(oracle_python()).arg("-c").arg(script).args(&dirs).output().unwrap();
    assert!(out.status.success(), "mlx-lm refused a full preset:\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), dirs.len());
}

fn routing_of(dir: &std::path::Path) -> serde_json::Value {
    config_of(dir)["zmlx_synth"]["routing"].clone()
}

fn share(routing: &serde_json::Value, key: &str) -> f64 {
    routing[key].as_f64().unwrap_or_else(|| panic!("no {key} in {routing}"))
}

/// `--route-skew zipf:1.2` concentrates the routing of a softmax-router family (qwen3_moe, float
/// and 4-bit) and a sigmoid-router family (glm4_moe_lite): the top 25 % experts' share, measured
/// on tokens the calibration did not see, rises well above the unskewed checkpoint's and lands
/// near Zipf's; config.json records the skew; the skewed checkpoint still has clear margins.
#[test]
fn route_skew_concentrates_routing() {
    use zmlx::synth::{MarginMode, RouteSkew};
    let _g = mlx_lock();
    for (family, quantize) in [(Family::Qwen3Moe, None), (Family::Qwen3Moe, Some(4)), (Family::Glm4MoeLite, None)] {
        let (plain, skewed) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut o = synth_opts(family, quantize, 7);
        o.measure_routing = MarginMode::On;
        synth_into(plain.path(), &o);
        o.route_skew = RouteSkew::Zipf(1.2);
        synth_into(skewed.path(), &o);
        let (base, got) = (routing_of(plain.path()), routing_of(skewed.path()));
        let what = format!("{family} q={quantize:?}");
        assert!(base.get("target").is_none(), "{what}: {base}");
        assert!(share(&got, "top25") > share(&base, "top25") + 0.15, "{what}: skewed {got}\nplain {base}");
        assert!(share(&got, "entropy") < share(&base, "entropy") - 0.05, "{what}: skewed {got}\nplain {base}");
        let target = &got["target"];
        assert!((share(&got, "top25") - share(target, "top25")).abs() < 0.12, "{what}: {got}");
        let meta = &config_of(skewed.path())["zmlx_synth"];
        assert_eq!(meta["route_skew"], "zipf:1.2", "{what}: {meta}");
        assert_eq!(meta["route_skew_calibration"], "a forward pass of the checkpoint", "{what}: {meta}");
        assert!(meta["margins"]["median"].as_f64().unwrap() >= 2.0, "{what}: {meta}");
        // zmlx's own measurement of the written checkpoint, on other tokens, agrees.
        let again = zmlx::synth::routing::measure(skewed.path(), 99).unwrap();
        assert!(again.top25 > share(&base, "top25") + 0.15, "{what}: {again:?}");
    }
}

/// A softmax-router checkpoint too large to run (here: any size) is calibrated on its first
/// three MoE layers, the rest extrapolated; the extrapolated layers are skewed as much.
#[test]
fn route_skew_extrapolates_past_the_calibrated_layers() {
    use zmlx::synth::{MarginMode, RouteSkew};
    let _g = mlx_lock();
    let (src, out) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut c = serde_json::Value::Object(config_of({
        synth_into(src.path(), &quiet(synth_opts(Family::Qwen3Moe, None, 2)));
        src.path()
    }));
    c["num_hidden_layers"] = 8.into();
    c["mlp_only_layers"] = serde_json::json!([]);
    let cfg = src.path().join("deep.json");
    std::fs::write(&cfg, c.to_string()).unwrap();
    let mut o = quiet(synth_opts(Family::Qwen3Moe, None, 2));
    o.config = Some(cfg);
    o.route_skew = RouteSkew::Zipf(1.2);
    o.auto_measure_bytes = 0;
    synth_into(out.path(), &o);
    let meta = &config_of(out.path())["zmlx_synth"];
    assert_eq!(meta["route_skew_calibration"], "a forward pass of the first 3 layers, the rest extrapolated");
    assert!(!out.path().join(".zmlx-route-skew-prefix").exists(), "the prefix checkpoint is removed");
    let r = zmlx::synth::routing::measure(out.path(), 5).unwrap();
    let late: Vec<_> = r.layers.iter().filter(|l| l.layer >= 3).collect();
    assert_eq!(late.len(), 5);
    for l in late {
        assert!(l.top25 > 0.45, "extrapolated layer {} not skewed: {l:?}", l.layer);
    }
    o.route_skew = RouteSkew::None;
    o.measure_routing = MarginMode::Off;
    synth_into(out.path(), &o);
    let plain = zmlx::synth::routing::measure(out.path(), 5).unwrap();
    assert!(r.top25 > plain.top25 + 0.15, "skewed {r:?}\nplain {plain:?}");
}

/// The skew is the same in both layouts: calibrated on the same model, the HF checkpoint's
/// tensors equal the mlx one's (its per-expert tensors stacked), so the edits that keep the
/// shared direction private reach the per-expert tensors too.
#[test]
fn route_skew_is_the_same_in_both_layouts() {
    use zmlx::synth::{Layout, MarginMode, RouteSkew, StoreDtype};
    let _g = mlx_lock();
    let (m, h) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut o = quiet(synth_opts(Family::Mixtral, None, 4));
    o.dtype = StoreDtype::F32;
    o.route_skew = RouteSkew::Zipf(0.8);
    o.measure_routing = MarginMode::On;
    synth_into(m.path(), &o);
    o.layout = Layout::Hf;
    synth_into(h.path(), &o);
    let (mw, hw) = (tensors(m.path()), tensors(h.path()));
    let x = zmlx::models::family(Family::Mixtral).hf_experts();
    for (name, t) in &mw {
        match hw.get(name) {
            Some(o) => assert!(same_bits(t, o), "{name} differs between layouts"),
            None => {
                let (p, ours) = name.rsplit_once(".switch_mlp.").unwrap();
                let hf = x.names.iter().find(|(_, o)| *o == ours.trim_end_matches(".weight")).unwrap().0;
                let per: Vec<_> = (0..8).map(|e| hw[&format!("{p}.experts.{e}.{hf}.weight")].clone()).collect();
                assert!(same_bits(&mlx_rs::ops::stack(&per, 0).unwrap(), t), "{name}: stacked HF experts differ");
            }
        }
    }
    assert_eq!(routing_of(m.path()), routing_of(h.path()));
}
