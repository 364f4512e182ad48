//! The tokenizer of a GGUF model, built from its metadata with the `tokenizers` crate, and the
//! ChatML chat format.
//!
//! SmolLM2's tokenizer is byte-level BPE (`tokenizer.ggml.model = "gpt2"`): the vocabulary
//! (`tokenizer.ggml.tokens`) and merges (`tokenizer.ggml.merges`, `"left right"` strings), a
//! pre-tokenizer that splits digits one by one and then applies GPT-2's byte-level split (no
//! prefix space), and a byte-level decoder. Tokens of type 3 (control) or 4 (user-defined) in
//! `tokenizer.ggml.token_type` are special: matched whole in the input, never merged.
//!
//! ChatML wraps each turn as `<|im_start|>{role}\n{content}<|im_end|>\n`; a prompt for the
//! assistant ends with `<|im_start|>assistant\n`, and the assistant's turn ends at `<|im_end|>`.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use crate::gguf::{Gguf, GgufError};

/// Why a tokenizer could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The GGUF metadata lacks a key or holds the wrong type.
    #[error("tokenizer metadata: {0}")]
    Metadata(#[from] GgufError),
    /// The metadata describes a tokenizer this module does not build.
    #[error("tokenizer: {0}")]
    Unsupported(String),
    /// The `tokenizers` crate refused the vocabulary or an input.
    #[error("tokenizers: {0}")]
    Tokenizers(String),
}

/// A model's tokenizer plus its chat format.
#[derive(Clone)]
pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    /// The id of `<|im_start|>`.
    pub bos: u32,
    /// The id of `<|im_end|>`, which ends an assistant turn.
    pub eos: u32,
}

impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("vocab", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl ChatTokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self, ChatError> {
        let model = gguf.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(ChatError::Unsupported(format!(
                "tokenizer.ggml.model is {model:?}; only byte-level BPE (\"gpt2\") is built"
            )));
        }
        let tokens = gguf.get_strings("tokenizer.ggml.tokens")?;
        let types = gguf.get_ints("tokenizer.ggml.token_type")?;
        if types.len() != tokens.len() {
            return Err(ChatError::Unsupported(format!(
                "{} token types for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let merges = gguf
            .get_strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| ChatError::Unsupported(format!("merge {m:?} has no space")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| ChatError::Tokenizers(e.to_string()))?;
        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ])));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        // 3 = control, 4 = user-defined: matched whole, never split by the pre-tokenizer.
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|&(_, &t)| t == 3 || t == 4)
            .map(|(&t, _)| AddedToken::from(t.to_string(), true))
            .collect();
        tokenizer.add_special_tokens(&special);

        let id = |key: &str| -> Result<u32, ChatError> {
            let id = gguf.get_usize(key)?;
            if id >= tokens.len() {
                return Err(ChatError::Unsupported(format!(
                    "{key} = {id} is not a token"
                )));
            }
            Ok(id as u32)
        };
        Ok(Self {
            tokenizer,
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
        })
    }

    /// The number of tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The ids of `text`; special tokens written in it (`<|im_start|>`) become their ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, ChatError> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| ChatError::Tokenizers(e.to_string()))
    }

    /// The text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String, ChatError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| ChatError::Tokenizers(e.to_string()))
    }

    /// The ids of a one-turn ChatML prompt asking the assistant to answer `user`.
    pub fn prompt(&self, user: &str) -> Result<Vec<u32>, ChatError> {
        self.encode(&chatml_prompt(user))
    }
}

/// `user` as a one-turn ChatML prompt that ends where the assistant's answer begins.
pub fn chatml_prompt(user: &str) -> String {
    format!("<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
}
