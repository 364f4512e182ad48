//! Text as the token ids the model trains and is scored on: prompts in ChatML, and prompt →
//! answer [`Pair`]s.

use crate::LlmError;
use crate::chat::ChatTokenizer;

/// A training pair: prompt ids (ChatML) and answer ids (ending with `<|im_end|>` unless cut).
#[derive(Debug, Clone)]
pub(super) struct Pair {
    pub(super) prompt: Vec<u32>,
    pub(super) answer: Vec<u32>,
}

/// Encodes prompts and pairs with the model's tokenizer.
#[derive(Clone, Copy)]
pub(super) struct Encoder<'a> {
    pub(super) tok: &'a ChatTokenizer,
}

impl Encoder<'_> {
    /// Each user prompt in ChatML, ready for the assistant's answer.
    pub(super) fn prompts(&self, prompts: &[String]) -> Result<Vec<Vec<u32>>, LlmError> {
        Ok(prompts
            .iter()
            .map(|p| self.tok.prompt(p))
            .collect::<Result<_, _>>()?)
    }

    /// The prompt `q` with the answer `a`, ending with `<|im_end|>`, cut to `cut` tokens.
    pub(super) fn pair(&self, q: &str, a: &str, cut: usize) -> Result<Pair, LlmError> {
        let mut answer = self.tok.encode(a)?;
        answer.push(self.tok.eos);
        answer.truncate(cut);
        Ok(Pair {
            prompt: self.tok.prompt(q)?,
            answer,
        })
    }

    /// The prompt `q` with the opening `a` of an answer, without `<|im_end|>`: the margin judge
    /// scores how an answer starts.
    pub(super) fn opening(&self, q: &str, a: &str) -> Result<Pair, LlmError> {
        Ok(Pair {
            prompt: self.tok.prompt(q)?,
            answer: self.tok.encode(a)?,
        })
    }
}
