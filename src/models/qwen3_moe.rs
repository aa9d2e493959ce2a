//! Qwen3-MoE (`qwen3_moe`): GQA attention with per-head q/k RMSNorm, MoE layers by
//! decoder_sparse_step / mlp_only_layers (else a dense SwiGLU MLP), router = softmax over all
//! experts then top-k with optional renormalisation, combine cast back to the activation dtype.
use std::rc::Rc;

use anyhow::Result;
use serde_json::{json, Value};

use super::{HfExperts, ModelFamily, BENCH_LAYERS};
use crate::config::{Keys, ModelConfig};
use crate::model::{slot, DecoderLayer, LayerMlp};
use crate::moe::DenseMlp;
use crate::moe::RouterKind;
use crate::nn::LoadCtx;
use crate::weights::WeightStore;

pub struct Qwen3Moe;

/// HF checkpoints hold `mlp.experts.{e}.{up,down,gate}_proj.weight`; mlx-lm stacks only `.weight`.
const EXPERTS: HfExperts = HfExperts { parts: &["weight"], ..HfExperts::STANDARD };

impl ModelFamily for Qwen3Moe {
    fn model_type(&self) -> &'static str {
        "qwen3_moe"
    }

    /// Qwen3-MoE's ModelArgs has no defaults: every key is required.
    fn parse_config(&self, k: &Keys, c: &mut ModelConfig) -> Result<()> {
        c.vocab_size = k.positive("vocab_size", None)?;
        c.num_hidden_layers = k.positive("num_hidden_layers", None)?;
        c.num_key_value_heads = k.positive("num_key_value_heads", None)?;
        c.head_dim = k.positive("head_dim", None)?;
        c.intermediate_size = k.positive("intermediate_size", None)?;
        c.moe_intermediate_size = k.positive("moe_intermediate_size", None)?;
        c.num_experts = k.non_negative("num_experts", None)?;
        c.num_experts_per_tok = k.positive("num_experts_per_tok", None)?;
        c.norm_topk_prob = k.boolean("norm_topk_prob", None)?;
        c.decoder_sparse_step = k.positive("decoder_sparse_step", None)?;
        c.mlp_only_layers = k.int_list("mlp_only_layers", None)?;
        c.rms_norm_eps = k.positive_float("rms_norm_eps", None)?;
        c.rope_theta = k.positive_float("rope_theta", None)?;
        c.tie_word_embeddings = k.boolean("tie_word_embeddings", None)?;
        c.max_position_embeddings = Some(k.positive("max_position_embeddings", None)? as i64);
        c.use_qk_norm = true;
        Ok(())
    }

    fn is_moe_layer(&self, c: &ModelConfig, i: i32) -> bool {
        !c.mlp_only_layers.contains(&i) && c.num_experts > 0 && (i + 1) % c.decoder_sparse_step == 0
    }

    fn hf_experts(&self) -> &'static HfExperts {
        &EXPERTS
    }

    fn sanitize(&self, c: &ModelConfig, store: &mut WeightStore) -> Result<()> {
        super::stack_all_experts(c, store, &EXPERTS)
    }

    fn load_layer(&self, ctx: &mut LoadCtx, i: i32) -> Result<DecoderLayer> {
        let attention = super::gqa_attention(ctx, i)?;
        let c = ctx.config.clone();
        let path = format!("model.layers.{i}.mlp");
        let mlp = if c.is_moe_layer(i) {
            let kind = RouterKind::SoftmaxThenTopK { norm: c.norm_topk_prob };
            LayerMlp::Moe(super::softmax_moe(ctx, path, kind, c.moe_intermediate_size, true)?)
        } else {
            LayerMlp::Dense(slot(Rc::new(DenseMlp::load(ctx, &path, c.hidden_size, c.intermediate_size)?)))
        };
        super::decoder_layer(ctx, i, attention, mlp)
    }

    fn full_model(&self) -> &'static str {
        "Qwen/Qwen3-30B-A3B"
    }

    fn full_config(&self) -> Value {
        serde_json::from_str(
            r#"{
              "architectures": [
                "Qwen3MoeForCausalLM"
              ],
              "attention_bias": false,
              "attention_dropout": 0.0,
              "bos_token_id": 151643,
              "decoder_sparse_step": 1,
              "eos_token_id": 151645,
              "head_dim": 128,
              "hidden_act": "silu",
              "hidden_size": 2048,
              "initializer_range": 0.02,
              "intermediate_size": 6144,
              "max_position_embeddings": 40960,
              "max_window_layers": 48,
              "mlp_only_layers": [],
              "model_type": "qwen3_moe",
              "moe_intermediate_size": 768,
              "norm_topk_prob": true,
              "num_attention_heads": 32,
              "num_experts": 128,
              "num_experts_per_tok": 8,
              "num_hidden_layers": 48,
              "num_key_value_heads": 4,
              "output_router_logits": false,
              "rms_norm_eps": 1e-06,
              "rope_scaling": null,
              "rope_theta": 1000000.0,
              "router_aux_loss_coef": 0.001,
              "sliding_window": null,
              "tie_word_embeddings": false,
              "torch_dtype": "bfloat16",
              "use_cache": true,
              "use_sliding_window": false,
              "vocab_size": 151936
            }"#,
        )
        .expect("the published config is valid JSON")
    }

    fn synth_config(&self, tiny: bool) -> Value {
        json!({
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "num_hidden_layers": if tiny { 3 } else { BENCH_LAYERS },
            "num_attention_heads": if tiny { 4 } else { 32 }, "num_key_value_heads": if tiny { 2 } else { 4 },
            "head_dim": if tiny { 32 } else { 128 },
            "intermediate_size": if tiny { 256 } else { 6144 },
            "moe_intermediate_size": if tiny { 64 } else { 768 },
            "num_experts": if tiny { 16 } else { 64 }, "num_experts_per_tok": if tiny { 4 } else { 8 },
            "decoder_sparse_step": 1, "mlp_only_layers": if tiny { vec![1] } else { vec![] },
            "norm_topk_prob": true, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "max_position_embeddings": 32768, "tie_word_embeddings": false,
        })
    }

    /// mlx-lm's qwen3_moe quant_predicate keeps the router at 8 bits.
    fn synth_router_bits(&self) -> Option<i32> {
        Some(8)
    }

    fn preset_patterns(&self) -> Vec<&'static str> {
        vec![
            "swiglu_mlp",
            "moe_mlp",
            "downproj_combine",
            "gqa_attention",
            "qmv_linear",
            "rms_norm",
            "quantized_embedding",
        ]
    }
}
