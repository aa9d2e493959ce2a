//! `zmlx synth`: deterministic random-weight checkpoints that mlx-lm loads unchanged, from a
//! preset (tiny, bench, or `full` = a real model's published config) or any config.json.
//!
//! Weights are generated in Rust (`gen.rs`: a Xoshiro256++ stream per seed, logical tensor name
//! and expert/head index, so a tensor does not depend on which others are written and both
//! layouts hold the same experts) and streamed to disk tensor by tensor (`writer.rs`), so a
//! 17 GB checkpoint is written with bounded memory. Quantized tensors are written directly in
//! MLX's affine layout (random packed words, scales and biases chosen for the float init's std),
//! never through a float intermediate. The output head is scaled for clear greedy margins
//! (`margins.rs`), which are measured after writing and stored in config.json.
mod calibrate;
mod gen;
pub mod margins;
pub mod routing;
pub mod skew;
pub mod tokenizer;
mod writer;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};

use crate::config::{Family, ModelConfig};
use crate::model::{DtypeChoice, Model};
use gen::{FloatKind, Stream};
pub use skew::RouteSkew;
use writer::Planned;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// A few layers of small width: for tests (seconds).
    Tiny,
    /// Per-layer shape of a real small MoE (hidden 2048, many experts), few layers: for benchmarks.
    Bench,
    /// The family's real published model, every dimension and layer (see `zmlx synth --help`).
    Full,
}

/// Tensor naming of the written checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// mlx-community conversion: stacked `switch_mlp` expert tensors.
    Mlx,
    /// Hugging Face original: one tensor per expert (`experts.{e}.…`), stacked at load time.
    Hf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreDtype {
    Bf16,
    F16,
    F32,
}

impl StoreDtype {
    fn kind(self) -> FloatKind {
        match self {
            StoreDtype::Bf16 => FloatKind::Bf16,
            StoreDtype::F16 => FloatKind::F16,
            StoreDtype::F32 => FloatKind::F32,
        }
    }

    pub fn torch_name(self) -> &'static str {
        match self {
            StoreDtype::Bf16 => "bfloat16",
            StoreDtype::F16 => "float16",
            StoreDtype::F32 => "float32",
        }
    }

    /// The dtype a config.json's `torch_dtype` (or transformers 5's `dtype`) names, if a float one.
    pub fn from_config(v: &Value) -> Option<StoreDtype> {
        let name = v.get("torch_dtype").or_else(|| v.get("dtype")).and_then(Value::as_str)?;
        match name {
            "bfloat16" => Some(StoreDtype::Bf16),
            "float16" => Some(StoreDtype::F16),
            "float32" => Some(StoreDtype::F32),
            _ => None,
        }
    }
}

/// Whether to measure the logit margins after writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MarginMode {
    /// Measure when the weights total at most 4 GiB (loading a full-size model costs its size in
    /// memory and a forward pass).
    Auto,
    On,
    Off,
}

/// Checkpoints at most this large get measured under `MarginMode::Auto`.
pub const AUTO_MEASURE_BYTES: u64 = 4 << 30;

#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub family: Family,
    pub preset: Preset,
    /// A config.json to synthesize for instead of the preset (its model_type must be `family`).
    pub config: Option<PathBuf>,
    /// Keep only the first N decoder layers.
    pub layers: Option<i32>,
    pub dtype: StoreDtype,
    /// Affine quantization bits (None = float checkpoint, or the `--config`'s own MLX block).
    pub quantize: Option<i32>,
    pub group_size: i32,
    pub seed: u64,
    pub layout: Layout,
    /// Shard the weights above this many bytes per file.
    pub max_shard_bytes: u64,
    pub margins: MarginMode,
    /// Write a ChatML chat template into tokenizer_config.json (`synth::tokenizer::CHAT_TEMPLATE`).
    pub chat_template: bool,
    /// Expert preference of the routers (`skew.rs`).
    pub route_skew: RouteSkew,
    /// Whether to measure (and, with a skew, calibrate) the routing after writing.
    pub measure_routing: MarginMode,
    /// `MarginMode::Auto` measures checkpoints of at most this many bytes of weights.
    pub auto_measure_bytes: u64,
}

impl SynthOptions {
    pub fn new(family: Family) -> Self {
        SynthOptions {
            family,
            preset: Preset::Tiny,
            config: None,
            layers: None,
            dtype: StoreDtype::Bf16,
            quantize: None,
            group_size: 64,
            seed: 0,
            layout: Layout::Mlx,
            max_shard_bytes: 2 << 30,
            margins: MarginMode::Auto,
            chat_template: true,
            route_skew: RouteSkew::None,
            measure_routing: MarginMode::Auto,
            auto_measure_bytes: AUTO_MEASURE_BYTES,
        }
    }
}

/// What `synthesize` wrote.
#[derive(Debug)]
pub struct SynthReport {
    pub files: Vec<PathBuf>,
    pub bytes: u64,
    pub seconds: f64,
    pub margins: Option<margins::Margins>,
    pub routing: Option<routing::RoutingSummary>,
}

/// Reads a user's config.json: the JSON object and the family its model_type names. Errors name
/// the file and the key.
pub fn read_config(path: &Path) -> Result<(Value, Family)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("--config: cannot read {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("--config: {} is not valid JSON", path.display()))?;
    let map = v.as_object().ok_or_else(|| anyhow!("{}: expected a JSON object at the top level", path.display()))?;
    let t = map.get("model_type").and_then(Value::as_str).ok_or_else(|| {
        anyhow!(
            "{}: key `model_type` must be a string naming the model family (found {})",
            path.display(),
            map.get("model_type").map(|v| v.to_string()).unwrap_or_else(|| "missing".into())
        )
    })?;
    let family = Family::from_model_type(t).ok_or_else(|| {
        let known: Vec<_> = Family::ALL.iter().map(|f| f.model_type()).collect();
        anyhow!("{}: unsupported model_type `{t}`; zmlx supports: {}", path.display(), known.join(", "))
    })?;
    Ok((v, family))
}

/// config.json of a tiny/bench preset: the family module's keys (small (tiny) or real-per-layer
/// (bench) dimensions, chosen to exercise its special features) plus the keys every synthesized
/// checkpoint shares.
fn preset_config(o: &SynthOptions) -> Value {
    let fam = o.family.module();
    if o.preset == Preset::Full {
        let mut c = fam.full_config();
        let obj = c.as_object_mut().unwrap();
        // The synthesized tokenizer is ours: its end-of-text id is 0 and it has no BOS.
        obj.insert("eos_token_id".into(), json!(0));
        if obj.contains_key("bos_token_id") {
            obj.insert("bos_token_id".into(), Value::Null);
        }
        return c;
    }
    let tiny = o.preset == Preset::Tiny;
    // Bench vocab 8192: the output head dominated per-token bytes at 32768 and is not part of
    // the per-layer shape the benchmark is about.
    let (v, d) = if tiny { (512, 128) } else { (8192, 2048) };
    let mut c = fam.synth_config(tiny);
    let obj = c.as_object_mut().unwrap();
    obj.insert("vocab_size".into(), json!(v));
    obj.insert("hidden_size".into(), json!(d));
    obj.insert("eos_token_id".into(), json!(0));
    obj.insert("bos_token_id".into(), Value::Null);
    c
}

/// The layer index of a module path `model.layers.{i}.…`.
fn layer_of(path: &str) -> Option<i64> {
    path.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

/// Keeps the first `n` decoder layers: num_hidden_layers, the layer-indexed keys (mlp_only_layers
/// loses indices ≥ n; per-layer lists are cut) and the quantization block's per-layer entries.
fn trim_layers(c: &mut Map<String, Value>, n: i32, source: &str) -> Result<()> {
    let l = c.get("num_hidden_layers").and_then(Value::as_i64).unwrap_or(0);
    if n < 1 || i64::from(n) > l {
        bail!("--layers {n}: must be between 1 and {l} (num_hidden_layers of {source})");
    }
    c.insert("num_hidden_layers".into(), json!(n));
    if let Some(Value::Array(a)) = c.get_mut("mlp_only_layers") {
        a.retain(|v| v.as_i64().is_some_and(|i| i < i64::from(n)));
    }
    for key in ["layer_types", "mlp_layer_types"] {
        if let Some(Value::Array(a)) = c.get_mut(key) {
            if a.len() as i64 == l {
                a.truncate(n as usize);
            }
        }
    }
    for key in ["quantization", "quantization_config"] {
        if let Some(Value::Object(q)) = c.get_mut(key) {
            q.retain(|k, _| layer_of(k).is_none_or(|i| i < i64::from(n)));
        }
    }
    Ok(())
}

/// Removes the quantization keys; returns the MLX affine block if the config had one (an HF
/// `quantization_config` of another method, e.g. fp8, describes weights we do not write).
fn take_quantization(c: &mut Map<String, Value>) -> Option<Value> {
    let mlx = c.remove("quantization");
    let hf = c.remove("quantization_config");
    mlx.or(hf.filter(|q| q.get("bits").is_some() && q.get("quant_method").is_none_or(|m| m == "affine")))
}

/// The config.json a synth writes, parsed, with the tensors it describes (before any skew).
struct Prepared {
    config: Value,
    parsed: ModelConfig,
}

/// Validates the options and builds the config.json to write.
fn prepare(o: &SynthOptions, out: &Path) -> Result<Prepared> {
    if let Some(bits) = o.quantize {
        if ![2, 3, 4, 5, 6, 8].contains(&bits) {
            bail!("--quantize {bits}: MLX affine quantization supports 2, 3, 4, 5, 6 or 8 bits");
        }
        if ![32, 64, 128].contains(&o.group_size) {
            bail!("--group-size {}: expected 32, 64 or 128", o.group_size);
        }
    }
    let cfg_file = out.join("config.json");
    let (mut config, src) = match &o.config {
        Some(path) => {
            let (v, family) = read_config(path)?;
            if family != o.family {
                bail!(
                    "{}: model_type `{}` is family {family}, but --family {} was given",
                    path.display(),
                    v["model_type"],
                    o.family
                );
            }
            (v, path.clone())
        }
        None => (preset_config(o), cfg_file.clone()),
    };
    let obj = config.as_object_mut().unwrap();
    obj.remove("zmlx_synth");
    let source_quant = take_quantization(obj);
    // The source must make sense as it is (errors name its file and key) before it is trimmed.
    ModelConfig::from_value(&config, &src)?;
    let obj = config.as_object_mut().unwrap();
    let mut source_quant = source_quant.filter(|_| o.quantize.is_none());
    if let Some(n) = o.layers {
        let source = match &o.config {
            Some(p) => p.display().to_string(),
            None => format!("the {} {:?} preset", o.family, o.preset).to_lowercase(),
        };
        trim_layers(obj, n, &source)?;
        if let Some(Value::Object(q)) = &mut source_quant {
            q.retain(|k, _| layer_of(k).is_none_or(|i| i < i64::from(n)));
        }
    }
    if obj.contains_key("dtype") && !obj.contains_key("torch_dtype") {
        obj.insert("dtype".into(), json!(o.dtype.torch_name()));
    } else {
        obj.insert("torch_dtype".into(), json!(o.dtype.torch_name()));
    }
    let mut meta = json!({"seed": o.seed});
    match &o.config {
        Some(p) => meta["config"] = json!(p.display().to_string()),
        None => meta["preset"] = json!(format!("{:?}", o.preset).to_lowercase()),
    }
    if o.preset == Preset::Full && o.config.is_none() {
        meta["model"] = json!(o.family.module().full_model());
    }
    if let Some(n) = o.layers {
        meta["layers"] = json!(n);
    }
    if o.route_skew != RouteSkew::None {
        meta["route_skew"] = json!(o.route_skew.to_string());
    }
    obj.insert("zmlx_synth".into(), meta);

    let parsed = ModelConfig::from_value(&config, &src)?;
    let specs = specs(&parsed, o.layout, o.seed, None);
    let block = match (o.quantize, source_quant) {
        (Some(bits), _) => {
            let mut q = Map::new();
            q.insert("group_size".into(), json!(o.group_size));
            q.insert("bits".into(), json!(bits));
            q.insert("mode".into(), json!("affine"));
            for s in &specs {
                if let Some(b) = s.bits_override {
                    if s.quantizable && s.shape.last().unwrap() % o.group_size == 0 {
                        q.insert(s.module().into(), json!({"group_size": o.group_size, "bits": b}));
                    }
                }
            }
            Some(Value::Object(q))
        }
        (None, q) => q,
    };
    if let Some(q) = block {
        let obj = config.as_object_mut().unwrap();
        obj.insert("quantization".into(), q.clone());
        obj.insert("quantization_config".into(), q);
    }
    let parsed = ModelConfig::from_value(&config, &src)?;
    let quantized = parsed.quantization.global.is_some();
    if o.layout == Layout::Hf && quantized && !o.family.module().hf_experts().parts.contains(&"scales") {
        bail!(
            "--layout hf with quantized weights does not exist for {} (mlx-lm's sanitize stacks float expert weights only)",
            o.family
        );
    }
    Ok(Prepared { config, parsed })
}

/// Writes the checkpoint into `out`.
pub fn synthesize(o: &SynthOptions, out: &Path) -> Result<SynthReport> {
    let start = std::time::Instant::now();
    let Prepared { mut config, parsed } = prepare(o, out)?;
    let bytes = plan(&parsed, &specs(&parsed, o.layout, o.seed, None), o).iter().map(|t| t.bytes as u64).sum::<u64>();
    let auto = |mode: MarginMode, when: bool| match mode {
        MarginMode::On => true,
        MarginMode::Off => false,
        MarginMode::Auto => when && bytes <= o.auto_measure_bytes,
    };
    let measure_routing = auto(o.measure_routing, o.route_skew != RouteSkew::None);
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut skew = None;
    if let Some(s) = o.route_skew.exponent() {
        let (plan, how) = plan_skew(o, &parsed, s, measure_routing, out)?;
        config["zmlx_synth"]["route_skew_calibration"] = json!(how);
        skew = Some(plan);
    }
    let files = write(o, &config, &parsed, skew.as_ref(), out)?;
    if let Some(plan) = &mut skew {
        if measure_routing {
            calibrate_in_place(o, &parsed, plan, out)
                .with_context(|| format!("calibrating --route-skew on {}", out.display()))?;
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let measure_margins = auto(o.margins, true);
    let (mut m, mut r) = (None, None);
    if measure_margins || measure_routing {
        let (mut model, _) = Model::load(out, DtypeChoice::Auto, crate::mlx_env::backend())?;
        if measure_margins {
            let got = margins::measure(&model, o.seed, margins::POSITIONS)
                .with_context(|| format!("measuring the logit margins of {}", out.display()))?;
            config["zmlx_synth"]["margins"] = serde_json::to_value(&got)?;
            config["zmlx_synth"]["margins"]["target_median"] = json!(margins::TARGET_MEDIAN_GAP);
            m = Some(got);
        }
        if measure_routing {
            let mut got = routing::summarize(&mut model, o.seed)
                .with_context(|| format!("measuring the routing of {}", out.display()))?;
            if let Some(s) = o.route_skew.exponent() {
                got.set_target(&parsed, s);
            }
            config["zmlx_synth"]["routing"] = serde_json::to_value(&got)?;
            r = Some(got);
        }
        write_config(out, &config)?;
    }
    Ok(SynthReport { files, bytes, seconds, margins: m, routing: r })
}

fn write_config(out: &Path, c: &Value) -> Result<()> {
    let f = out.join("config.json");
    std::fs::write(&f, serde_json::to_string_pretty(c)? + "\n").with_context(|| format!("cannot write {}", f.display()))
}

/// Writes the weights, config.json and the tokenizer.
fn write(
    o: &SynthOptions,
    config: &Value,
    parsed: &ModelConfig,
    skew: Option<&calibrate::SkewPlan>,
    out: &Path,
) -> Result<Vec<PathBuf>> {
    let specs = specs(parsed, o.layout, o.seed, skew);
    let planned = plan(parsed, &specs, o);
    let files = writer::write_shards(out, &planned, o.max_shard_bytes)?;
    write_config(out, config)?;
    let tok = tokenizer::write_tokenizer(out, parsed.vocab_size as usize, o.chat_template)
        .map_err(|e| anyhow!("writing the tokenizer: {e}"))?;
    if tok.eos_token_id != 0 {
        bail!("internal: synthesized tokenizer has eos id {}, config says 0", tok.eos_token_id);
    }
    Ok(files)
}

/// The skew's offsets before writing, and how they are calibrated (for config.json): on the
/// checkpoint itself after writing (`measure`), on its first layers (a softmax-router
/// checkpoint too large to run under `--measure-routing auto`), or only on simulated scores.
fn plan_skew(
    o: &SynthOptions,
    parsed: &ModelConfig,
    s: f64,
    measure: bool,
    out: &Path,
) -> Result<(calibrate::SkewPlan, String)> {
    let cols = shared_cols(parsed);
    let sigmoid = o.family.module().sigmoid_router();
    if !sigmoid && 2 * cols > parsed.hidden_size as usize {
        bail!(
            "--route-skew {}: the routers' shared direction takes {cols} hidden coordinates (whole quantization \
             groups), more than half of hidden_size {}; use a smaller --group-size",
            o.route_skew,
            parsed.hidden_size
        );
    }
    let means = if sigmoid { BTreeMap::new() } else { gate_shared_means(parsed, o, cols)? };
    let mut plan = calibrate::SkewPlan::initial(parsed, o.seed, s, cols, embed_std(parsed, o.seed), &means);
    let how = if measure {
        "a forward pass of the checkpoint".to_string()
    } else if !sigmoid && o.measure_routing == MarginMode::Auto {
        match calibrate_on_prefix(o, parsed, &mut plan, &means, out)? {
            Some(n) => format!("a forward pass of the first {n} layers, the rest extrapolated"),
            None => "simulated router scores".to_string(),
        }
    } else {
        "simulated router scores".to_string()
    };
    Ok((plan, how))
}

/// Calibrates `plan` on the checkpoint in `dir` (written with it: one forward pass over
/// `routing::calibration_tokens`) and rewrites its router tensors. Returns what each MoE layer
/// showed.
fn calibrate_in_place(
    o: &SynthOptions,
    parsed: &ModelConfig,
    plan: &mut calibrate::SkewPlan,
    dir: &Path,
) -> Result<Vec<calibrate::LayerStats>> {
    let s = o.route_skew.exponent().unwrap_or(1.0);
    let (mut model, _) = Model::load(dir, DtypeChoice::Auto, crate::mlx_env::backend())?;
    let tokens = routing::calibration_tokens(o.seed, parsed.vocab_size);
    let stats = calibrate::calibrate(&mut model, plan, o.seed, s, &tokens)?;
    drop(model);
    let specs = specs(parsed, o.layout, o.seed, Some(plan));
    writer::rewrite(dir, &plan_routers(parsed, &specs, o))?;
    Ok(stats)
}

/// Per MoE layer of a softmax-router checkpoint, each gate row's mean over the first `cols`
/// columns as written without a skew. The shared direction reads those columns, so without a
/// correction each expert would get a random constant preference of its own on top of the
/// skew; the gate shift subtracts it.
fn gate_shared_means(parsed: &ModelConfig, o: &SynthOptions, cols: usize) -> Result<BTreeMap<i32, Vec<f32>>> {
    let specs = specs(parsed, o.layout, o.seed, None);
    let planned = plan(parsed, &specs, o);
    let (e, d) = (parsed.num_experts, parsed.hidden_size);
    let find = |name: &str| planned.iter().find(|t| t.name == name);
    let mut out = BTreeMap::new();
    for l in (0..parsed.num_hidden_layers).filter(|&l| parsed.is_moe_layer(l)) {
        let module = format!("model.layers.{l}.{}.gate", parsed.family.module().hf_experts().block);
        let w = find(&format!("{module}.weight")).ok_or_else(|| anyhow!("internal: no {module}.weight"))?;
        let dense = if w.dtype == safetensors::Dtype::U32 {
            let q = parsed.quant_for(&module, true).ok_or_else(|| anyhow!("internal: {module} packed unquantized"))?;
            let part = |suffix: &str| -> Result<mlx_rs::Array> {
                let t = find(&format!("{module}.{suffix}")).ok_or_else(|| anyhow!("internal: no {module}.{suffix}"))?;
                Ok(mlx_rs::Array::from_slice(&gen::to_f32((t.make)(), t.dtype), &[e, d / q.group_size]))
            };
            let bytes = (w.make)();
            let words: Vec<u32> = bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            let packed = mlx_rs::Array::from_slice(&words, &[e, words.len() as i32 / e]);
            let (scales, biases) = (part("scales")?, part("biases")?);
            routing::host::<f32>(&mlx_rs::ops::dequantize(&packed, &scales, &biases, q.group_size, q.bits)?)?
        } else {
            gen::to_f32((w.make)(), w.dtype)
        };
        let d = d as usize;
        let means = dense.chunks(d).map(|row| row[..cols].iter().sum::<f32>() / cols as f32).collect();
        out.insert(l, means);
    }
    Ok(out)
}

/// The written tensors `--route-skew` sets: gate weights (float) or their group biases
/// (quantized), and `e_score_correction_bias`.
fn plan_routers<'a>(parsed: &ModelConfig, specs: &'a [Spec], o: &SynthOptions) -> Vec<Planned<'a>> {
    plan(parsed, specs, o)
        .into_iter()
        .filter(|t| {
            [".gate.weight", ".gate.biases", ".gate.e_score_correction_bias"].iter().any(|x| t.name.ends_with(x))
        })
        .collect()
}

/// Calibrates a softmax router skew on a checkpoint of the first few layers (written into a
/// scratch folder of `out`, removed after; its tensors are the full checkpoint's), then
/// extrapolates the shared direction's signal to the remaining layers.
fn calibrate_on_prefix(
    o: &SynthOptions,
    parsed: &ModelConfig,
    plan: &mut calibrate::SkewPlan,
    means: &BTreeMap<i32, Vec<f32>>,
    out: &Path,
) -> Result<Option<i32>> {
    let moe: Vec<i32> = (0..parsed.num_hidden_layers).filter(|&l| parsed.is_moe_layer(l)).collect();
    let Some(&last) = moe.get(calibrate::PREFIX_MOE_LAYERS - 1) else { return Ok(None) };
    let n = last + 1;
    if n >= parsed.num_hidden_layers {
        return Ok(None);
    }
    let dir = out.join(".zmlx-route-skew-prefix");
    let prefix =
        SynthOptions { layers: Some(n), margins: MarginMode::Off, measure_routing: MarginMode::Off, ..o.clone() };
    let mut run = || -> Result<Vec<calibrate::LayerStats>> {
        let p = prepare(&prefix, &dir)?;
        std::fs::create_dir_all(&dir)?;
        let mut sub = plan.clone();
        sub.layers.retain(|&l, _| l < n);
        write(&prefix, &p.config, &p.parsed, Some(&sub), &dir)?;
        let stats = calibrate_in_place(&prefix, &p.parsed, &mut sub, &dir)?;
        plan.layers.extend(sub.layers);
        Ok(stats)
    };
    let stats = run();
    let _ = std::fs::remove_dir_all(&dir);
    let stats = stats.with_context(|| format!("calibrating --route-skew on the first {n} layers"))?;
    plan.extrapolate(parsed, o.seed, o.route_skew.exponent().unwrap_or(1.0), &stats, n, means);
    Ok(Some(n))
}

/// How a tensor's values are drawn.
#[derive(Debug, Clone)]
enum Gen {
    /// Keyed by the tensor's own name.
    Own,
    /// These values (the skewed `e_score_correction_bias`).
    Given(Vec<f32>),
    /// Experts `first..first+count` of the stacked logical tensor `key` (`…switch_mlp.*.weight`,
    /// `[E, out, in]`): expert e's matrix is keyed (key, e) in both layouts.
    Experts { key: String, first: i32, count: i32 },
    /// MLA's `kv_b_proj` (logical `[H, nope+v, r]`, head h keyed (key, h)): all of it (HF
    /// layout), the key rows transposed (`embed_q` `[H, r, nope]`) or the value rows
    /// (`unembed_out` `[H, v, r]`), as mlx-lm's sanitize splits it. Float only: a quantized
    /// embed_q/unembed_out is packed along other axes than kv_b_proj, so it is keyed by its name.
    KvB { key: String, part: KvPart, heads: i32, nope: i32, v: i32, r: i32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KvPart {
    All,
    Keys,
    Values,
}

/// One logical tensor to synthesize.
struct Spec {
    name: String,
    shape: Vec<i32>,
    /// Standard deviation of the init; `mean` is added (norm weights ≈ 1).
    std: f32,
    mean: f32,
    /// Weight of a module mlx-lm quantizes (Linear, Embedding, SwitchLinear, MultiLinear).
    quantizable: bool,
    /// Per-module quantization override (Qwen3's 8-bit router).
    bits_override: Option<i32>,
    /// Stored dtype other than the checkpoint's (e_score_correction_bias stays f32).
    dtype: Option<FloatKind>,
    gen: Gen,
    /// `--route-skew`'s change to the drawn values (softmax routers' shared direction).
    edit: Option<Edit>,
}

/// A change to a `[rows, in]` tensor (per expert for stacked experts; a norm weight is one row)
/// that keeps `--route-skew`'s shared direction, the first `cols` hidden coordinates, private to
/// the routers: only the embedding writes it, only the gates read it (the attention and MLP
/// inputs and the head ignore it, and no layer output writes to it). On a quantized tensor the
/// columns are whole groups (`cols` is a multiple of the group size): a shift moves the groups'
/// biases, a zeroed group or row has scale and bias 0.
#[derive(Debug, Clone)]
enum Edit {
    /// `add[row]` (`add[0]` for every row) added to the first `cols` inputs.
    AddCols { cols: usize, add: Vec<f32> },
    /// The first `cols` inputs of every row set to `value` (0 for weights, 1 for a norm's
    /// weights that the gates read through).
    SetCols { cols: usize, value: f32 },
    /// The first `rows` rows (outputs) are 0.
    ZeroRows { rows: usize },
}

impl Edit {
    fn value(&self, row: usize, col: usize, x: f32) -> f32 {
        match self {
            Edit::AddCols { cols, add } if col < *cols => x + add[if add.len() == 1 { 0 } else { row }],
            Edit::SetCols { cols, value } if col < *cols => *value,
            Edit::ZeroRows { rows } if row < *rows => 0.0,
            _ => x,
        }
    }

    /// (scale, bias) of group `g` of `row` (columns `g·gs..(g+1)·gs`).
    fn group(&self, row: usize, g: usize, gs: usize, scale: f32, bias: f32) -> (f32, f32) {
        let inside = |cols: usize| (g + 1) * gs <= cols;
        match self {
            Edit::AddCols { cols, add } if inside(*cols) => (scale, bias + add[if add.len() == 1 { 0 } else { row }]),
            Edit::SetCols { cols, value } if inside(*cols) => (0.0, *value),
            Edit::ZeroRows { rows } if row < *rows => (0.0, 0.0),
            _ => (scale, bias),
        }
    }
}

impl Spec {
    /// The module path (`….weight` → `…`).
    fn module(&self) -> &str {
        self.name.strip_suffix(".weight").unwrap_or(&self.name)
    }

    fn numel(&self) -> usize {
        self.shape.iter().map(|&x| x as usize).product()
    }

    /// The `[rows, in]` blocks of a quantized tensor with their stream keys.
    fn blocks(&self) -> Vec<(&str, u64, usize)> {
        let inp = *self.shape.last().unwrap() as usize;
        match &self.gen {
            Gen::Experts { key, first, count } => {
                let rows = self.numel() / inp / *count as usize;
                (*first..first + count).map(|e| (key.as_str(), e as u64, rows)).collect()
            }
            _ => vec![(self.name.as_str(), 0, self.numel() / inp)],
        }
    }

    /// The float values in `kind`, generated block by block.
    fn float_bytes(&self, seed: u64, kind: FloatKind) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.numel() * kind.size());
        match &self.gen {
            Gen::Own => {
                let mut r = gen::rng(seed, &self.name, 0, Stream::Float);
                match &self.edit {
                    None => gen::push_normals(&mut out, &mut r, self.numel(), self.mean, self.std, kind),
                    Some(edit) => self.push_edited(&mut out, &mut r, self.numel(), edit, kind),
                }
            }
            Gen::Given(v) => v.iter().for_each(|&x| kind.push(&mut out, x)),
            Gen::Experts { key, first, count } => {
                let per = self.numel() / *count as usize;
                for e in *first..first + count {
                    let mut r = gen::rng(seed, key, e as u64, Stream::Float);
                    match &self.edit {
                        None => gen::push_normals(&mut out, &mut r, per, self.mean, self.std, kind),
                        Some(edit) => self.push_edited(&mut out, &mut r, per, edit, kind),
                    }
                }
            }
            Gen::KvB { key, part, heads, nope, v, r } => {
                let (nope, v, r) = (*nope as usize, *v as usize, *r as usize);
                for h in 0..*heads {
                    let w =
                        gen::normals(&mut gen::rng(seed, key, h as u64, Stream::Float), (nope + v) * r, 0.0, self.std);
                    match part {
                        KvPart::All => w.iter().for_each(|&x| kind.push(&mut out, x)),
                        KvPart::Values => w[nope * r..].iter().for_each(|&x| kind.push(&mut out, x)),
                        KvPart::Keys => {
                            for i in 0..r {
                                for j in 0..nope {
                                    kind.push(&mut out, w[j * r + i]);
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// `n` values (one `[rows, in]` block) drawn as `push_normals` draws them, then edited.
    fn push_edited(
        &self,
        out: &mut Vec<u8>,
        r: &mut rand_xoshiro::Xoshiro256PlusPlus,
        n: usize,
        edit: &Edit,
        kind: FloatKind,
    ) {
        let inp = *self.shape.last().unwrap() as usize;
        for (i, x) in gen::normals(r, n, self.mean, self.std).into_iter().enumerate() {
            kind.push(out, edit.value(i / inp, i % inp, x));
        }
    }

    /// Packed words of the quantized tensor.
    fn packed_bytes(&self, seed: u64, bits: i32) -> Vec<u8> {
        let inp = *self.shape.last().unwrap() as usize;
        let mut out = Vec::with_capacity(self.numel() * bits as usize / 8);
        for (key, idx, rows) in self.blocks() {
            gen::push_packed(&mut out, &mut gen::rng(seed, key, idx, Stream::Packed), rows * inp * bits as usize / 8);
        }
        out
    }

    /// Scales (`biases == false`) or biases of the quantized tensor.
    fn group_bytes(&self, seed: u64, bits: i32, group_size: i32, kind: FloatKind, biases: bool) -> Vec<u8> {
        let inp = *self.shape.last().unwrap() as usize;
        let groups_per_row = inp / group_size as usize;
        let mut out = Vec::with_capacity(self.numel() / group_size as usize * kind.size());
        for (key, idx, rows) in self.blocks() {
            let mut r = gen::rng(seed, key, idx, Stream::Groups);
            for (i, (s, b)) in gen::group_params(&mut r, rows * groups_per_row, bits, self.mean, self.std).enumerate() {
                let (s, b) = match &self.edit {
                    Some(e) => e.group(i / groups_per_row, i % groups_per_row, group_size as usize, s, b),
                    None => (s, b),
                };
                kind.push(&mut out, if biases { b } else { s });
            }
        }
        out
    }
}

/// The tensors to write for `specs`: quantized where the config's quantization says so (and the
/// input dimension divides into groups), else float.
fn plan<'a>(c: &ModelConfig, specs: &'a [Spec], o: &SynthOptions) -> Vec<Planned<'a>> {
    let store = o.dtype.kind();
    let seed = o.seed;
    let mut v = Vec::new();
    for s in specs {
        let inp = *s.shape.last().unwrap();
        let q = c.quant_for(s.module(), true).filter(|q| s.quantizable && inp % q.group_size == 0);
        let shape: Vec<usize> = s.shape.iter().map(|&x| x as usize).collect();
        match q {
            Some(q) => {
                let (bits, gs) = (q.bits, q.group_size);
                let base = s.module().to_owned();
                let mut wshape = shape.clone();
                *wshape.last_mut().unwrap() = inp as usize * bits as usize / 32;
                v.push(Planned {
                    name: s.name.clone(),
                    dtype: safetensors::Dtype::U32,
                    bytes: s.numel() * bits as usize / 8,
                    shape: wshape,
                    make: Box::new(move || s.packed_bytes(seed, bits)),
                });
                let mut gshape = shape.clone();
                *gshape.last_mut().unwrap() = (inp / gs) as usize;
                for (suffix, biases) in [("scales", false), ("biases", true)] {
                    v.push(Planned {
                        name: format!("{base}.{suffix}"),
                        dtype: store.st(),
                        bytes: s.numel() / gs as usize * store.size(),
                        shape: gshape.clone(),
                        make: Box::new(move || s.group_bytes(seed, bits, gs, store, biases)),
                    });
                }
            }
            None => {
                let kind = s.dtype.unwrap_or(store);
                v.push(Planned {
                    name: s.name.clone(),
                    dtype: kind.st(),
                    bytes: s.numel() * kind.size(),
                    shape,
                    make: Box::new(move || s.float_bytes(seed, kind)),
                });
            }
        }
    }
    v
}

/// Width of `--route-skew`'s shared direction: 32 hidden coordinates, or the largest quantization
/// group if wider (a gate shift moves whole groups), at most the hidden size.
fn shared_cols(c: &ModelConfig) -> usize {
    let q = &c.quantization;
    let groups = q.global.iter().chain(q.overrides.values().flatten()).map(|p| p.group_size);
    groups.fold(32, i32::max).min(c.hidden_size) as usize
}

/// Standard deviation of the embedding: the head's when tied (see `specs`), else 0.3.
fn embed_std(c: &ModelConfig, seed: u64) -> f32 {
    if c.tie_word_embeddings {
        (margins::logit_sigma(seed, c.vocab_size) / (c.hidden_size as f64).sqrt()) as f32
    } else {
        0.3
    }
}

/// Every tensor the loader expects for `c`, in the chosen layout (with `--route-skew`'s changes).
fn specs(c: &ModelConfig, layout: Layout, seed: u64, skew: Option<&calibrate::SkewPlan>) -> Vec<Spec> {
    let mut v = Vec::new();
    let sp = |name: String, shape: Vec<i32>, std: f32, mean: f32, quantizable: bool| Spec {
        name,
        shape,
        std,
        mean,
        quantizable,
        bits_override: None,
        dtype: None,
        gen: Gen::Own,
        edit: None,
    };
    let lin = |v: &mut Vec<Spec>, name: &str, out: i32, inp: i32, std_scale: f32, bias: bool| {
        v.push(sp(format!("{name}.weight"), vec![out, inp], std_scale / (inp as f32).sqrt(), 0.0, true));
        if bias {
            v.push(sp(format!("{name}.bias"), vec![out], 0.05, 0.0, false));
        }
    };
    let norm = |v: &mut Vec<Spec>, name: String, n: i32| v.push(sp(format!("{name}.weight"), vec![n], 0.1, 1.0, false));
    let swiglu = |v: &mut Vec<Spec>, path: &str, d: i32, w: i32| {
        lin(v, &format!("{path}.gate_proj"), w, d, 1.0, false);
        lin(v, &format!("{path}.up_proj"), w, d, 1.0, false);
        lin(v, &format!("{path}.down_proj"), d, w, 1.0, false);
    };
    let (d, e) = (c.hidden_size, c.num_experts);
    // The head: logits of std margins::logit_sigma (median top-1/top-2 gap ~4 nats) given the
    // final-norm output (norm ≈ sqrt(D)); a tied head is the embedding, so it gets that scale.
    // Otherwise the embedding has std 0.3: the residual stream is then led by the layers'
    // outputs rather than the current token's embedding, and greedy text does not fall into
    // the short cycles a random token→token map has (with 1.0 some tiny seeds repeated one token).
    let head_std = (margins::logit_sigma(seed, c.vocab_size) / (d as f64).sqrt()) as f32;
    v.push(sp("model.embed_tokens.weight".into(), vec![c.vocab_size, d], embed_std(c, seed), 0.0, true));
    let skewed = |l: i32| skew.and_then(|p| p.layers.get(&l)).cloned();
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        norm(&mut v, format!("{p}.input_layernorm"), d);
        norm(&mut v, format!("{p}.post_attention_layernorm"), d);
        let a = format!("{p}.self_attn");
        match &c.mla {
            None => {
                let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
                lin(&mut v, &format!("{a}.q_proj"), q, d, 1.0, c.attention_bias);
                lin(&mut v, &format!("{a}.k_proj"), kv, d, 1.0, c.attention_bias);
                lin(&mut v, &format!("{a}.v_proj"), kv, d, 1.0, c.attention_bias);
                lin(&mut v, &format!("{a}.o_proj"), d, q, 1.0, false);
                if c.use_qk_norm {
                    norm(&mut v, format!("{a}.q_norm"), c.head_dim);
                    norm(&mut v, format!("{a}.k_norm"), c.head_dim);
                }
            }
            Some(m) => {
                let h = c.num_attention_heads;
                let qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
                match m.q_lora_rank {
                    Some(r) => {
                        lin(&mut v, &format!("{a}.q_a_proj"), r, d, 1.0, c.attention_bias);
                        norm(&mut v, format!("{a}.q_a_layernorm"), r);
                        lin(&mut v, &format!("{a}.q_b_proj"), h * qk, r, 1.0, false);
                    }
                    None => lin(&mut v, &format!("{a}.q_proj"), h * qk, d, 1.0, false),
                }
                lin(
                    &mut v,
                    &format!("{a}.kv_a_proj_with_mqa"),
                    m.kv_lora_rank + m.qk_rope_head_dim,
                    d,
                    1.0,
                    c.attention_bias,
                );
                norm(&mut v, format!("{a}.kv_a_layernorm"), m.kv_lora_rank);
                let (nope, vd, r) = (m.qk_nope_head_dim, m.v_head_dim, m.kv_lora_rank);
                let std = 1.0 / (r as f32).sqrt();
                let kvb = |part| Gen::KvB { key: format!("{a}.kv_b_proj.weight"), part, heads: h, nope, v: vd, r };
                match layout {
                    Layout::Mlx => {
                        v.push(Spec {
                            gen: kvb(KvPart::Keys),
                            ..sp(format!("{a}.embed_q.weight"), vec![h, r, nope], std, 0.0, true)
                        });
                        v.push(Spec {
                            gen: kvb(KvPart::Values),
                            ..sp(format!("{a}.unembed_out.weight"), vec![h, vd, r], std, 0.0, true)
                        });
                    }
                    Layout::Hf => v.push(Spec {
                        gen: kvb(KvPart::All),
                        ..sp(format!("{a}.kv_b_proj.weight"), vec![h * (nope + vd), r], std, 0.0, true)
                    }),
                }
                lin(&mut v, &format!("{a}.o_proj"), d, h * vd, 1.0, c.attention_bias);
            }
        }
        let family = c.family.module();
        let experts = family.hf_experts();
        let moe = format!("{p}.{}", experts.block);
        if !c.is_moe_layer(l) {
            swiglu(&mut v, &moe, d, c.intermediate_size);
            continue;
        }
        if family.sigmoid_router() {
            v.push(sp(format!("{moe}.gate.weight"), vec![e, d], 2.0 / (d as f32).sqrt(), 0.0, false));
            v.push(Spec {
                dtype: Some(FloatKind::F32),
                ..sp(format!("{moe}.gate.e_score_correction_bias"), vec![e], 0.1, 0.0, false)
            });
            if let Some(bias) = skewed(l) {
                v.last_mut().unwrap().gen = Gen::Given(bias);
            }
        } else {
            // A wide router init makes routing decisive (clear top-k margins).
            lin(&mut v, &format!("{moe}.gate"), e, d, 4.0, false);
            let gate = v.last_mut().unwrap();
            gate.bits_override = family.synth_router_bits();
            if let (Some(add), Some(sh)) = (skewed(l), skew.and_then(|p| p.shared)) {
                gate.edit = Some(Edit::AddCols { cols: sh.cols, add });
            }
        }
        let w = c.moe_intermediate_size;
        for (ours, out, inp) in [("gate_proj", w, d), ("down_proj", d, w), ("up_proj", w, d)] {
            let key = format!("{moe}.switch_mlp.{ours}.weight");
            let std = 1.0 / (inp as f32).sqrt();
            match layout {
                Layout::Mlx => v.push(Spec {
                    gen: Gen::Experts { key: key.clone(), first: 0, count: e },
                    ..sp(key, vec![e, out, inp], std, 0.0, true)
                }),
                Layout::Hf => {
                    let hf = experts.hf_name(ours);
                    for x in 0..e {
                        v.push(Spec {
                            gen: Gen::Experts { key: key.clone(), first: x, count: 1 },
                            ..sp(format!("{moe}.experts.{x}.{hf}.weight"), vec![out, inp], std, 0.0, true)
                        });
                    }
                }
            }
        }
        if let Some(width) = c.shared_expert_intermediate_size {
            swiglu(&mut v, &format!("{moe}.shared_expert"), d, width);
            lin(&mut v, &format!("{moe}.shared_expert_gate"), 1, d, 1.0, false);
        }
        if let Some(n) = c.n_shared_experts {
            swiglu(&mut v, &format!("{moe}.shared_experts"), d, c.moe_intermediate_size * n);
        }
    }
    norm(&mut v, "model.norm".into(), d);
    v.push(sp("lm_head.weight".into(), vec![c.vocab_size, d], head_std, 0.0, true));
    if let Some(sh) = skew.and_then(|p| p.shared) {
        for s in &mut v {
            s.edit = s.edit.take().or_else(|| private_direction(s, sh));
        }
    }
    v
}

/// What keeps the shared direction private to the routers (see [`Edit`]), by the logical tensor
/// name (a routed expert's is the stacked one in both layouts).
fn private_direction(s: &Spec, sh: calibrate::SharedDirection) -> Option<Edit> {
    let name = match &s.gen {
        Gen::Experts { key, .. } => key.as_str(),
        _ => s.name.as_str(),
    };
    let cols = sh.cols;
    let reads = ["gate_proj.weight", "up_proj.weight", "shared_expert_gate.weight"];
    if name == "model.embed_tokens.weight" {
        Some(Edit::AddCols { cols, add: vec![sh.value] })
    } else if name == "model.norm.weight" || name.ends_with(".input_layernorm.weight") {
        Some(Edit::SetCols { cols, value: 0.0 })
    } else if name.ends_with(".post_attention_layernorm.weight") {
        Some(Edit::SetCols { cols, value: 1.0 })
    } else if reads.iter().any(|r| name.ends_with(r)) {
        Some(Edit::SetCols { cols, value: 0.0 })
    } else if name.ends_with("down_proj.weight") || name.ends_with(".o_proj.weight") {
        Some(Edit::ZeroRows { rows: cols })
    } else {
        None
    }
}
