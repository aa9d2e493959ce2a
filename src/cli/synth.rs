//! `zmlx synth`: a deterministic random-weight checkpoint mlx-lm loads unchanged.
use std::path::PathBuf;

use anyhow::Result;

use super::args::{parse_bits, parse_family, parse_group_size};
use crate::config::Family;
use crate::mlx_env;
use crate::synth::{synthesize, Layout, Preset, StoreDtype, SynthOptions};

#[derive(clap::Args)]
pub struct SynthArgs {
    /// Model family (config.json model_type).
    #[arg(long, value_parser = parse_family)]
    pub family: Family,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "tiny")]
    pub preset: Preset,
    /// Stored float dtype.
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: StoreDtype,
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
}

pub fn run(a: &SynthArgs) -> Result<i32> {
    mlx_env::init()?;
    let o = SynthOptions {
        family: a.family,
        preset: a.preset,
        dtype: a.dtype,
        quantize: a.quantize,
        group_size: a.group_size,
        seed: a.seed,
        layout: a.layout,
        max_shard_bytes: a.max_shard_mb << 20,
    };
    let files = synthesize(&o, &a.out)?;
    eprintln!("[zmlx] wrote {} ({} safetensors file(s))", a.out.display(), files.len());
    Ok(0)
}
