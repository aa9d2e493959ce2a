//! Deterministic synthesis of a small, real GPT-2-style byte-level BPE tokenizer.
//!
//! [`write_tokenizer`] trains a BPE model with the HF `tokenizers` crate on an
//! embedded English corpus and writes `tokenizer.json` plus a minimal
//! `tokenizer_config.json` that Python transformers' `AutoTokenizer` (and thus
//! mlx-lm) loads as a `PreTrainedTokenizerFast`.
//!
//! Layout of the vocabulary (ids):
//! * `0..3`   special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`
//! * `3..259` the 256 byte-level alphabet characters, sorted by code point
//! * `259..`  learned merges, then (only if the corpus runs out of merges
//!   before `vocab_size`) `<|reserved_N|>` special tokens, so that the
//!   vocabulary is always exactly `vocab_size` entries.
//!
//! Determinism: the BPE trainer breaks count ties by pair id and sorts the
//! alphabet, and `tokenizer.json` is serialized with vocab/added tokens ordered
//! by id, so the output bytes do not depend on hash-map order or on the number
//! of rayon threads (checked by writing the file repeatedly in separate
//! processes, with `RAYON_NUM_THREADS=1` and with several threads).

use std::collections::HashSet;
use std::path::Path;

use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

/// End of text; also used as the padding token (GPT-2 convention).
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// ChatML turn delimiters used by the chat template.
pub const IM_START_TOKEN: &str = "<|im_start|>";
pub const IM_END_TOKEN: &str = "<|im_end|>";

/// Special tokens first, so their ids are 0, 1, 2 whatever the vocab size.
const SPECIAL_TOKENS: [&str; 3] = [EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN];
/// Specials + the full byte-level alphabet: the smallest possible vocab.
pub const MIN_VOCAB_SIZE: usize = SPECIAL_TOKENS.len() + 256;

/// A ChatML template in the style of Qwen2.5's (system / user / assistant turns between
/// `<|im_start|>` and `<|im_end|>`, `add_generation_prompt` opens the assistant turn), with
/// transformers' `raise_exception` for roles it does not know and a misplaced system message.
pub const CHAT_TEMPLATE: &str = r#"{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role "' + message['role'] + '": this template accepts system, user and assistant') }}
    {%- endif %}
    {%- if message['role'] == 'system' and not loop.first %}
        {{- raise_exception('The system message must be the first message') }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

/// What was written; ids refer to the written `tokenizer.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizerInfo {
    /// Total number of ids (model vocab + added tokens); equals the request.
    pub vocab_size: usize,
    /// Number of ids that are learned merges (the rest is specials, bytes, padding).
    pub num_merges: usize,
    pub eos_token_id: u32,
    pub pad_token_id: u32,
    pub im_start_token_id: u32,
    pub im_end_token_id: u32,
}

/// Train the tokenizer and write `tokenizer.json` and `tokenizer_config.json`
/// (with [`CHAT_TEMPLATE`] as its `chat_template` if `chat_template`) into `dir`
/// (created if missing). `vocab_size` must be at least [`MIN_VOCAB_SIZE`] (259).
pub fn write_tokenizer(dir: &Path, vocab_size: usize, chat_template: bool) -> Result<TokenizerInfo, String> {
    if vocab_size < MIN_VOCAB_SIZE {
        return Err(format!("vocab_size {vocab_size} is below the minimum {MIN_VOCAB_SIZE} (3 specials + 256 bytes)"));
    }
    let mut tok = train(vocab_size)?;

    // A small corpus has a finite number of merges; pad with reserved special
    // tokens so the id space matches the requested (embedding) size exactly.
    let trained = tok.get_vocab_size(true);
    let num_merges = trained - MIN_VOCAB_SIZE;
    let reserved: Vec<AddedToken> =
        (0..vocab_size - trained).map(|i| AddedToken::from(format!("<|reserved_{i}|>"), true)).collect();
    tok.add_special_tokens(reserved).map_err(|e| format!("adding reserved tokens failed: {e}"))?;

    let id = |t: &str| tok.token_to_id(t).ok_or_else(|| format!("missing special token {t}"));
    let info = TokenizerInfo {
        vocab_size: tok.get_vocab_size(true),
        num_merges,
        eos_token_id: id(EOS_TOKEN)?,
        pad_token_id: id(EOS_TOKEN)?,
        im_start_token_id: id(IM_START_TOKEN)?,
        im_end_token_id: id(IM_END_TOKEN)?,
    };
    if info.vocab_size != vocab_size {
        return Err(format!("built {} tokens, wanted {vocab_size}", info.vocab_size));
    }

    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    tok.save(dir.join("tokenizer.json"), true).map_err(|e| format!("write tokenizer.json: {e}"))?;
    let mut config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": null,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": null,
        "add_bos_token": false,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 32768,
    });
    if chat_template {
        config["chat_template"] = CHAT_TEMPLATE.into();
    }
    let text = serde_json::to_string_pretty(&config).map_err(|e| e.to_string())? + "\n";
    std::fs::write(dir.join("tokenizer_config.json"), text).map_err(|e| format!("write tokenizer_config.json: {e}"))?;
    Ok(info)
}

fn train(vocab_size: usize) -> Result<Tokenizer, String> {
    // GPT-2 setup: no prefix space, GPT-2 split regex; the same component
    // serves as pre-tokenizer, post-processor (offsets only) and decoder.
    let byte_level = ByteLevel::default().add_prefix_space(false).use_regex(true);
    // Seeding all 256 byte chars makes every UTF-8 input encodable (no unk).
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let specials = SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)).collect();
    let mut trainer: TrainerWrapper = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(0)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(alphabet)
        .build()
        .into();

    let mut tok = Tokenizer::new(BPE::default());
    tok.with_pre_tokenizer(Some(byte_level)).with_post_processor(Some(byte_level)).with_decoder(Some(byte_level));
    tok.train(&mut trainer, CORPUS.split_inclusive('\n')).map_err(|e| format!("BPE training failed: {e}"))?;
    Ok(tok)
}

/// Training text: varied plain English prose (networking, computing, cooking,
/// ...) with digits and punctuation, so merges look like a real tokenizer's.
const CORPUS: &str = "\
The Internet is a network of networks. Every packet carries a source address and a \
destination address, and routers forward it hop by hop toward its goal. When a router \
receives a packet, it looks up the longest matching prefix in its routing table and sends \
the packet out of the corresponding interface. If no route matches, the packet is dropped.
TCP provides a reliable, ordered stream of bytes on top of IP. It uses sequence numbers, \
acknowledgements and retransmission timers to recover from loss. Congestion control \
algorithms such as Reno, CUBIC and BBR decide how fast a sender may transmit. A three-way \
handshake (SYN, SYN-ACK, ACK) opens a connection; a FIN from each side closes it.
UDP is simpler: it sends independent datagrams with no ordering and no retransmission. \
That makes it a good fit for DNS queries, voice calls and video streams, where a late \
packet is as useless as a lost one. QUIC builds a secure, multiplexed transport over UDP.
A computer executes instructions stored in memory. The processor fetches an instruction, \
decodes it, executes it and writes back the result. Modern CPUs run many instructions at \
once through pipelining, out-of-order execution and speculative branch prediction. Caches \
keep recently used data close to the core, because reading main memory can take more than \
100 cycles while a hit in the L1 cache takes about 4.
An operating system manages processes, threads, files and devices. The kernel schedules \
threads on the available cores, maps virtual addresses to physical pages and handles \
interrupts from hardware. A system call such as read() or write() switches from user mode \
into kernel mode and back again.
Programs are written in languages like C, Rust, Python and Go. A compiler translates source \
code into machine code, while an interpreter runs the program directly. Good programmers \
write tests, measure performance before optimizing, and keep functions small and clear. \
Version control lets a team review every change and return to any earlier state.
A neural network is a stack of layers. Each layer multiplies its input by a weight matrix, \
adds a bias and applies a nonlinear function. Training adjusts the weights with gradient \
descent so that the loss on the training data goes down. A mixture of experts routes each \
token to a few expert networks chosen by a small gating network, which keeps the cost per \
token low while the total number of parameters grows.
To bake a simple loaf of bread, mix 500 grams of flour, 350 grams of warm water, 10 grams \
of salt and 7 grams of dry yeast. Knead the dough for ten minutes until it is smooth and \
elastic, then cover the bowl and let it rise for an hour. Shape the loaf, let it rise \
again, and bake it at 220 degrees for about 35 minutes until the crust is golden brown.
For a quick tomato sauce, warm olive oil in a pan, add chopped garlic and cook it gently \
for one minute. Add a can of crushed tomatoes, a pinch of salt and a few leaves of fresh \
basil. Simmer the sauce for twenty minutes, stirring now and then, and serve it with pasta.
Rice should be rinsed until the water runs clear. Use one cup of rice to one and a half \
cups of water, bring it to a boil, then lower the heat, cover the pot and cook for fifteen \
minutes. Let the rice rest for five more minutes before you open the lid.
The weather today is cold and windy, with light rain in the morning and clear skies in \
the evening. Tomorrow will be warmer, reaching 18 degrees in the afternoon.
She opened the old book and read the first line aloud: \"It was a bright morning, and the \
town was already awake.\" Children ran along the river, a dog barked at the gate, and the \
baker was selling fresh bread to the people who waited outside his shop.
Good writing is clear, short and honest. Say what you mean, use simple words, and cut \
every sentence that does not help the reader. Read your draft aloud; if you stumble over \
a phrase, your reader will too.
Questions? Send an email to the support team, or call us between 9:00 and 17:00, Monday \
to Friday. We usually answer within 24 hours.
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_exact_size() {
        let base = std::env::temp_dir().join(format!("tokenizer_synth_{}", std::process::id()));
        let read = |d: &Path| std::fs::read(d.join("tokenizer.json")).unwrap();
        let (a, b) = (base.join("a"), base.join("b"));
        let info = write_tokenizer(&a, 512, true).unwrap();
        assert_eq!(write_tokenizer(&b, 512, true).unwrap(), info);
        assert_eq!(read(&a), read(&b));
        assert_eq!((info.vocab_size, info.eos_token_id, info.im_end_token_id), (512, 0, 2));
        // Beyond the corpus' merges the vocab is padded with reserved tokens.
        assert_eq!(write_tokenizer(&a, 3000, false).unwrap().vocab_size, 3000);
        assert!(write_tokenizer(&a, MIN_VOCAB_SIZE - 1, true).is_err());
        std::fs::remove_dir_all(base).unwrap();
    }
}
