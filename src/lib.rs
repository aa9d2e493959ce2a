//! zmlx: run, patch, validate and benchmark Mixture-of-Experts LLMs on MLX.
pub mod attention;
pub mod cache;
pub mod config;
pub mod generate;
pub mod kernels;
pub mod mlx_env;
pub mod model;
pub mod models;
pub mod moe;
pub mod nn;
#[path = "../patterns/mod.rs"]
pub mod patterns;
pub mod slots;
pub mod synth;
pub mod tokenizer;
pub mod validate;
pub mod weights;
