//! The checkpoint's tokenizer.json (HF `tokenizers`) and its EOS ids, as mlx-lm resolves them:
//! config.json's `eos_token_id` (int or list) plus tokenizer_config.json's `eos_token`.
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};

use crate::config::ModelConfig;

pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    pub eos_token_ids: Vec<u32>,
}

impl TextTokenizer {
    /// Loads `<dir>/tokenizer.json` for a model whose embedding has `config.vocab_size` rows:
    /// a tokenizer with ids past those rows is refused (such an id would index past the table).
    pub fn load(dir: &Path, config: &ModelConfig) -> Result<TextTokenizer> {
        let path = dir.join("tokenizer.json");
        let inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|e| anyhow!("cannot load {}: {e}", path.display()))?;
        if let Some((token, &id)) = inner.get_vocab(true).iter().max_by_key(|(_, &id)| id) {
            if id >= config.vocab_size as u32 {
                bail!(
                    "{}: token {token:?} has id {id}, but config.json vocab_size is {} (embedding rows); \
                     the tokenizer does not belong to this checkpoint or vocab_size is wrong",
                    path.display(),
                    config.vocab_size
                );
            }
        }
        let mut eos_token_ids = config.eos_token_ids.clone();
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

    /// Encodes text rendered by a chat template the way transformers'
    /// `apply_chat_template(..., tokenize=True)` does (`add_special_tokens=False`): special tokens
    /// written in the text (`<|im_start|>`, `<s>`, `[INST]`, ...) become their ids, and no BOS/EOS
    /// or other post-processor tokens are added (the template writes those it wants).
    pub fn encode_chat(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow!("tokenizing the chat prompt: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| anyhow!("decoding tokens: {e}"))
    }

    /// Incremental detokenization for streaming: each `step` returns the text that one more token
    /// completes (multi-byte characters wait for their last token), in O(1) per token instead of
    /// re-decoding the whole sequence (the `tokenizers` crate's own `DecodeStream`).
    pub fn stream(&self) -> TextStream<'_> {
        self.stream_with(true)
    }

    /// `stream`, choosing whether special tokens (`<|im_end|>`, reserved ids, ...) are skipped
    /// (the default, as `decode`) or written as their text (as mlx-lm's detokenizers do).
    pub fn stream_with(&self, skip_special_tokens: bool) -> TextStream<'_> {
        TextStream {
            inner: Box::new(self.inner.decode_stream(skip_special_tokens)),
            tokenizer: &self.inner,
            skip_special_tokens,
            ids: Vec::new(),
            emitted: 0,
        }
    }
}

/// See `TextTokenizer::stream`.
pub struct TextStream<'a> {
    inner: Box<dyn StreamStep + 'a>,
    tokenizer: &'a tokenizers::Tokenizer,
    skip_special_tokens: bool,
    /// Every token stepped, and the bytes of text returned for them so far (for `finish`).
    ids: Vec<u32>,
    emitted: usize,
}

impl TextStream<'_> {
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let piece = self.inner.step(id)?;
        self.emitted += piece.as_ref().map_or(0, String::len);
        Ok(piece)
    }

    /// The text still held back when the sequence ends: the tail of an incomplete multi-byte
    /// character, decoded as the whole sequence decodes (U+FFFD for the missing bytes, as
    /// `decode` and mlx-lm's detokenizers finalize). Empty when nothing is pending.
    pub fn finish(&mut self) -> Result<String> {
        let full =
            self.tokenizer.decode(&self.ids, self.skip_special_tokens).map_err(|e| anyhow!("decoding tokens: {e}"))?;
        // The pieces are a prefix of the whole decode; if a decoder ever broke that, the whole
        // decode's tail past the emitted length is still the best answer (never panics: checked).
        let tail = full.get(self.emitted..).unwrap_or_default().to_owned();
        self.emitted = full.len().max(self.emitted);
        Ok(tail)
    }
}

// Hides DecodeStream's five type parameters behind one method.
trait StreamStep {
    fn step(&mut self, id: u32) -> Result<Option<String>>;
}

impl<M, N, PT, PP, D> StreamStep for tokenizers::DecodeStream<'_, M, N, PT, PP, D>
where
    M: tokenizers::Model,
    N: tokenizers::Normalizer,
    PT: tokenizers::PreTokenizer,
    PP: tokenizers::PostProcessor,
    D: tokenizers::Decoder,
{
    fn step(&mut self, id: u32) -> Result<Option<String>> {
        tokenizers::DecodeStream::step(self, id).map_err(|e| anyhow!("decoding token {id}: {e}"))
    }
}
