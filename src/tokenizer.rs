//! The checkpoint's tokenizer.json (HF `tokenizers`) and its EOS ids, as mlx-lm resolves them:
//! config.json's `eos_token_id` (int or list) plus tokenizer_config.json's `eos_token`.
use std::path::Path;

use anyhow::{anyhow, Context, Result};

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub eos_token_ids: Vec<u32>,
}

impl TextTokenizer {
    pub fn load(dir: &Path, config_eos: &[u32]) -> Result<TextTokenizer> {
        let path = dir.join("tokenizer.json");
        let inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| anyhow!("cannot load {}: {e}", path.display()))?;
        let mut eos_token_ids = config_eos.to_vec();
        let cfg_path = dir.join("tokenizer_config.json");
        if let Ok(text) = std::fs::read_to_string(&cfg_path) {
            let cfg: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", cfg_path.display()))?;
            let eos = match cfg.get("eos_token") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(str::to_owned),
                _ => None,
            };
            if let Some(id) = eos.and_then(|t| inner.token_to_id(&t)) {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        Ok(TextTokenizer { inner, eos_token_ids })
    }

    /// Encodes a raw prompt (no chat template, no special tokens added: our tokenizers have no BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| anyhow!("tokenizing the prompt: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| anyhow!("decoding tokens: {e}"))
    }
}
