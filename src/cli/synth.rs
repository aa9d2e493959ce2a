//! `zmlx synth`: a deterministic random-weight checkpoint mlx-lm loads unchanged.
use std::path::PathBuf;

use anyhow::{bail, Result};

use super::args::{parse_bits, parse_family, parse_group_size};
use crate::config::Family;
use crate::mlx_env;
use crate::synth::{read_config, synthesize, Layout, MarginMode, Preset, RouteSkew, StoreDtype, SynthOptions};

#[derive(clap::Args)]
pub struct SynthArgs {
    /// Model family (config.json model_type); optional with --config (which names it).
    #[arg(long, value_parser = parse_family)]
    pub family: Option<Family>,
    #[arg(long)]
    pub out: PathBuf,
    /// tiny (tests), bench (real per-layer shapes, 2 layers) or full (the real model: mixtral =
    /// Mixtral-8x7B-v0.1, qwen2_moe = Qwen1.5-MoE-A2.7B, qwen3_moe = Qwen3-30B-A3B, glm4_moe =
    /// GLM-4.5-Air, glm4_moe_lite = GLM-4.7-Flash, deepseek_v3 = Moonlight-16B-A3B).
    #[arg(long, value_enum, default_value = "tiny")]
    pub preset: Preset,
    /// Synthesize for this config.json (any supported model_type) instead of a preset; an MLX
    /// `quantization` block in it is followed unless --quantize is given.
    #[arg(long, conflicts_with = "preset")]
    pub config: Option<PathBuf>,
    /// Keep only the first N decoder layers (1 to the config's num_hidden_layers).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub layers: Option<i32>,
    /// Stored float dtype (default: the --config's torch_dtype, else bf16).
    #[arg(long, value_enum)]
    pub dtype: Option<StoreDtype>,
    /// MLX affine quantization bits: 2, 3, 4, 5, 6 or 8 (omit for a float checkpoint).
    #[arg(long, value_parser = parse_bits)]
    pub quantize: Option<i32>,
    /// Quantization group size: 32, 64 or 128.
    #[arg(long, default_value_t = 64, value_parser = parse_group_size)]
    pub group_size: i32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tensor naming: mlx-community (stacked experts) or Hugging Face (per-expert tensors).
    #[arg(long, value_enum, default_value = "mlx")]
    pub layout: Layout,
    /// Shard weights into files of at most this many MiB (1 to 1048576).
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u64).range(1..=1 << 20))]
    pub max_shard_mb: u64,
    /// Measure the top-1/top-2 logit margins after writing (a load + one forward pass of 64
    /// positions; stored in config.json under zmlx_synth.margins). auto: when the weights total
    /// at most 4 GiB.
    #[arg(long, value_enum, default_value = "auto")]
    pub margins: MarginMode,
    /// Leave the chat template out of tokenizer_config.json (a checkpoint without one).
    #[arg(long)]
    pub no_chat_template: bool,
    /// Router preference for some experts, as trained routers have: `zipf:S` (S in (0, 10], e.g.
    /// 1.0) selects the expert of rank r (per-layer random ranking) with a share ∝ 1/r^S;
    /// `none`: random routers' near-uniform choice.
    #[arg(long, default_value = "none", value_parser = RouteSkew::parse)]
    pub route_skew: RouteSkew,
    /// Measure the routing after writing (one forward pass of 1024 tokens: each MoE layer's share
    /// of the top 10 %/25 % experts and entropy, stored under zmlx_synth.routing); with
    /// --route-skew, calibrate the skew on that pass first. auto: with --route-skew, when the
    /// weights total at most 4 GiB.
    #[arg(long, value_enum, default_value = "auto")]
    pub measure_routing: MarginMode,
}

pub fn run(a: &SynthArgs) -> Result<i32> {
    mlx_env::init()?;
    let (family, dtype) = match (&a.config, a.family) {
        (Some(path), given) => {
            let (v, family) = read_config(path)?;
            if let Some(f) = given.filter(|&f| f != family) {
                bail!(
                    "--family {f} disagrees with {}: its model_type `{}` is family {family}",
                    path.display(),
                    v["model_type"].as_str().unwrap_or("")
                );
            }
            (family, a.dtype.or(StoreDtype::from_config(&v)).unwrap_or(StoreDtype::Bf16))
        }
        (None, Some(f)) => (f, a.dtype.unwrap_or(StoreDtype::Bf16)),
        (None, None) => bail!("--family is required (or --config with a model_type)"),
    };
    let o = SynthOptions {
        family,
        preset: a.preset,
        config: a.config.clone(),
        layers: a.layers,
        dtype,
        quantize: a.quantize,
        group_size: a.group_size,
        seed: a.seed,
        layout: a.layout,
        max_shard_bytes: a.max_shard_mb << 20,
        margins: a.margins,
        chat_template: !a.no_chat_template,
        route_skew: a.route_skew,
        measure_routing: a.measure_routing,
        auto_measure_bytes: crate::synth::AUTO_MEASURE_BYTES,
    };
    let r = synthesize(&o, &a.out)?;
    eprintln!(
        "[zmlx] wrote {} ({} safetensors file(s), {:.2} GB of weights) in {:.1} s",
        a.out.display(),
        r.files.len(),
        r.bytes as f64 / 1e9,
        r.seconds
    );
    match &r.margins {
        Some(m) => eprintln!(
            "[zmlx] logit margin top-1 - top-2 over {} positions: median {:.2}, p10 {:.2}, p90 {:.2}, min {:.2} nats",
            m.positions, m.median, m.p10, m.p90, m.min
        ),
        None => eprintln!("[zmlx] logit margins not measured (--margins on to measure: loads the whole model)"),
    }
    if let Some(routing) = &r.routing {
        eprintln!("[zmlx] routing: {}", routing.line());
        for l in &routing.layers {
            eprintln!(
                "[zmlx]   layer {:>3}: top 10 % {:5.1} %, top 25 % {:5.1} %, entropy {:.3}, busiest expert {:4.1} %",
                l.layer,
                100.0 * l.top10,
                100.0 * l.top25,
                l.entropy,
                100.0 * l.max
            );
        }
    } else if o.route_skew != RouteSkew::None {
        eprintln!("[zmlx] routing not measured (--measure-routing on to measure: loads the whole model)");
    }
    Ok(0)
}
