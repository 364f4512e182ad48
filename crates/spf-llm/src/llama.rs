//! A Llama-architecture decoder in burn, loaded from a GGUF file: SmolLM2's architecture.
//!
//! For tokens `t₁ … t_T`: `h⁰ = E[t]`, then per block
//!
//! ```text
//! h ← h + W_o · Attn(RoPE(W_q x), RoPE(W_k x), W_v x),   x = RMSNorm(h)
//! h ← h + W_down (SiLU(W_gate x) ⊙ W_up x),               x = RMSNorm(h)
//! ```
//!
//! and the logits are `RMSNorm(h) Eᵀ`: the head is tied to the embedding `E`.
//! `RMSNorm(x) = γ ⊙ x / √(mean(x²) + ε)`. Attention is causal and grouped-query: `heads` query
//! heads share `kv_heads` key/value heads, query head `h` reading key/value head
//! `h / (heads / kv_heads)`. RoPE rotates **interleaved pairs** `(x₂ᵢ, x₂ᵢ₊₁)` of each head by
//! the angle `p · base^(−2i/head_dim)` at position `p` (llama.cpp's layout, in which the GGUF
//! stores W_q and W_k).
//!
//! [`Llama::forward`] runs whole sequences (training, scoring); a [`KvCache`] keeps each
//! block's keys and values so that [`Llama::generate`] feeds one new token per step. Batches of
//! prompts of different lengths are left-padded, and a key mask keeps the pads out of
//! attention: RoPE makes scores depend on relative positions only, so a shift changes nothing.

use std::ops::Range;

use burn::module::{Module, Param};
use burn::nn::{Linear, RmsNorm, RmsNormConfig};
use burn::tensor::Device;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Int, Tensor, TensorData};
use spf_core::screen::LinearTap;

use crate::gguf::{Gguf, GgufError};

/// The architecture's sizes, read from the GGUF metadata (`llama.*`).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Blocks.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (`heads` is a multiple of it).
    pub kv_heads: usize,
    /// Hidden width of the MLP.
    pub d_ff: usize,
    /// RoPE base.
    pub rope_base: f64,
    /// RMSNorm's ε.
    pub norm_eps: f64,
}

impl LlamaConfig {
    /// The sizes of the Llama model in `gguf`.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self, GgufError> {
        let arch = gguf.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(GgufError::Corrupt(format!(
                "general.architecture is {arch:?}, not \"llama\""
            )));
        }
        let key = |k: &str| format!("llama.{k}");
        let config = Self {
            vocab: gguf.info("token_embd.weight")?.shape()[0],
            d_model: gguf.get_usize(&key("embedding_length"))?,
            layers: gguf.get_usize(&key("block_count"))?,
            heads: gguf.get_usize(&key("attention.head_count"))?,
            kv_heads: gguf.get_usize(&key("attention.head_count_kv"))?,
            d_ff: gguf.get_usize(&key("feed_forward_length"))?,
            rope_base: gguf.get_f64(&key("rope.freq_base"))?,
            norm_eps: gguf.get_f64(&key("attention.layer_norm_rms_epsilon"))?,
        };
        let ok = config.d_model > 0
            && config.d_ff > 0
            && config.heads > 0
            && config.kv_heads > 0
            && config.heads.is_multiple_of(config.kv_heads)
            && config.d_model.is_multiple_of(config.heads)
            && (config.d_model / config.heads).is_multiple_of(2)
            && config.rope_base > 0.0
            && config.norm_eps > 0.0;
        if !ok {
            return Err(GgufError::Corrupt(format!(
                "inconsistent Llama sizes {config:?}"
            )));
        }
        Ok(config)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.heads
    }
}

/// One pre-norm block: grouped-query attention, then a SwiGLU MLP.
#[derive(Module, Debug)]
pub struct Block {
    /// Norm before attention.
    pub attn_norm: RmsNorm,
    /// Query projection, `[d_model, heads · head_dim]`.
    pub wq: Linear,
    /// Key projection, `[d_model, kv_heads · head_dim]`.
    pub wk: Linear,
    /// Value projection, `[d_model, kv_heads · head_dim]`.
    pub wv: Linear,
    /// Output projection, `[heads · head_dim, d_model]`.
    pub wo: Linear,
    /// Norm before the MLP.
    pub ffn_norm: RmsNorm,
    /// Gate projection, `[d_model, d_ff]`.
    pub gate: Linear,
    /// Up projection, `[d_model, d_ff]`.
    pub up: Linear,
    /// Down projection, `[d_ff, d_model]`.
    pub down: Linear,
}

impl Block {
    /// The block's seven matrices, attention's then the MLP's: `wq`, `wk`, `wv`, `wo`, `gate`,
    /// `up`, `down` (what fine-tuning protects and adapts).
    pub fn matrices(&self) -> [&Linear; 7] {
        [
            &self.wq, &self.wk, &self.wv, &self.wo, &self.gate, &self.up, &self.down,
        ]
    }
}

/// The model: embedding (also the head), blocks, final norm.
#[derive(Module, Debug)]
pub struct Llama {
    /// Token embedding `[vocab, d_model]`, tied to the LM head.
    pub embed: Param<Tensor<2>>,
    /// The blocks.
    pub blocks: Vec<Block>,
    /// Final norm.
    pub norm: RmsNorm,
    heads: usize,
    kv_heads: usize,
    rope_base: f64,
}

/// Each block's keys and values for the positions seen so far.
#[derive(Debug, Clone)]
pub struct KvCache {
    entries: Vec<Option<(Tensor<4>, Tensor<4>)>>,
}

impl KvCache {
    /// An empty cache for a model of `layers` blocks.
    pub fn new(layers: usize) -> Self {
        Self {
            entries: vec![None; layers],
        }
    }

    /// The positions cached (the same for every block that has run).
    pub fn len(&self) -> usize {
        self.entries
            .iter()
            .flatten()
            .next()
            .map_or(0, |(k, _)| k.dims()[2])
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Llama {
    /// Loads the model in `gguf` onto `device`, dequantizing every tensor to f32.
    ///
    /// Names: `token_embd`, `output_norm`, and per block `blk.{i}.` + `attn_norm`, `attn_q`,
    /// `attn_k`, `attn_v`, `attn_output`, `ffn_norm`, `ffn_gate`, `ffn_up`, `ffn_down` (each
    /// `.weight`). ggml matrices are `[out, in]`; burn's `Linear` holds `[in, out]`.
    pub fn from_gguf(gguf: &Gguf, device: &Device) -> Result<Self, GgufError> {
        let config = LlamaConfig::from_gguf(gguf)?;
        let (hd, kv) = (config.head_dim(), config.kv_heads * config.head_dim());
        let tensor = |name: &str, expect: &[usize]| -> Result<Vec<f32>, GgufError> {
            let (shape, values) = gguf.tensor_f32(name)?;
            if shape != expect {
                return Err(GgufError::Corrupt(format!(
                    "tensor {name} has shape {shape:?}, expected {expect:?}"
                )));
            }
            Ok(values)
        };
        let norm = |name: &str| -> Result<RmsNorm, GgufError> {
            let gamma = tensor(name, &[config.d_model])?;
            let mut norm = RmsNormConfig::new(config.d_model)
                .with_epsilon(config.norm_eps)
                .init(device);
            norm.gamma = Param::from_tensor(Tensor::from_data(
                TensorData::new(gamma, [config.d_model]),
                device,
            ));
            Ok(norm)
        };
        let linear = |name: &str, d_in: usize, d_out: usize| -> Result<Linear, GgufError> {
            let w = tensor(name, &[d_out, d_in])?;
            let mut t = vec![0.0f32; w.len()];
            for (o, row) in w.chunks_exact(d_in).enumerate() {
                for (i, &v) in row.iter().enumerate() {
                    t[i * d_out + o] = v;
                }
            }
            Ok(Linear {
                weight: Param::from_tensor(Tensor::from_data(
                    TensorData::new(t, [d_in, d_out]),
                    device,
                )),
                bias: None,
            })
        };
        let (d, ff) = (config.d_model, config.d_ff);
        let blocks = (0..config.layers)
            .map(|i| {
                let n = |part: &str| format!("blk.{i}.{part}.weight");
                Ok(Block {
                    attn_norm: norm(&n("attn_norm"))?,
                    wq: linear(&n("attn_q"), d, config.heads * hd)?,
                    wk: linear(&n("attn_k"), d, kv)?,
                    wv: linear(&n("attn_v"), d, kv)?,
                    wo: linear(&n("attn_output"), config.heads * hd, d)?,
                    ffn_norm: norm(&n("ffn_norm"))?,
                    gate: linear(&n("ffn_gate"), d, ff)?,
                    up: linear(&n("ffn_up"), d, ff)?,
                    down: linear(&n("ffn_down"), ff, d)?,
                })
            })
            .collect::<Result<Vec<_>, GgufError>>()?;
        let embed = tensor("token_embd.weight", &[config.vocab, d])?;
        Ok(Self {
            embed: Param::from_tensor(Tensor::from_data(
                TensorData::new(embed, [config.vocab, d]),
                device,
            )),
            blocks,
            norm: norm("output_norm.weight")?,
            heads: config.heads,
            kv_heads: config.kv_heads,
            rope_base: config.rope_base,
        })
    }

    /// The embeddings of `tokens` `[batch, T]`: `[batch, T, d_model]`.
    pub fn embed(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        burn::tensor::module::embedding(self.embed.val(), tokens)
    }

    /// Runs blocks `layers` on hidden states `h` `[batch, T, d_model]` at positions
    /// `start .. start + T`. `key_valid[b][j]` says whether key position `j` of sequence `b` is
    /// a real token (`None`: all are); a `cache` supplies the keys and values of positions
    /// `0 .. start` and takes the new ones.
    pub fn forward_layers(
        &self,
        h: Tensor<3>,
        layers: Range<usize>,
        start: usize,
        key_valid: Option<&[Vec<bool>]>,
        cache: Option<&mut KvCache>,
    ) -> Tensor<3> {
        self.run_layers(h, layers, start, key_valid, cache, None)
    }

    /// [`Self::forward_layers`] on a training batch (positions from 0, every key real, no cache)
    /// with every matrix of the blocks tapped, for the traced sample screen
    /// ([`spf_core::screen::traced_scores`]): one [`LinearTap`] per matrix use, in `taps`.
    pub fn forward_layers_tapped(
        &self,
        h: Tensor<3>,
        layers: Range<usize>,
        taps: &mut Vec<LinearTap>,
    ) -> Tensor<3> {
        self.run_layers(h, layers, 0, None, None, Some(taps))
    }

    fn run_layers(
        &self,
        mut h: Tensor<3>,
        layers: Range<usize>,
        start: usize,
        key_valid: Option<&[Vec<bool>]>,
        mut cache: Option<&mut KvCache>,
        mut taps: Option<&mut Vec<LinearTap>>,
    ) -> Tensor<3> {
        let [batch, t, _] = h.dims();
        let device = h.device();
        let head_dim = self.embed.dims()[1] / self.heads;
        let mask = attention_mask(batch, t, start, key_valid, &device);
        let (cos, sin) = rope_tables(start, t, head_dim, self.rope_base, &device);
        for i in layers {
            let block = &self.blocks[i];
            let x = block.attn_norm.forward(h.clone());
            let mut heads = |lin: &Linear, n: usize| {
                tapped(lin, x.clone(), taps.as_deref_mut())
                    .reshape([batch, t, n, head_dim])
                    .swap_dims(1, 2)
            };
            let q = rope(heads(&block.wq, self.heads), &cos, &sin);
            let mut k = rope(heads(&block.wk, self.kv_heads), &cos, &sin);
            let mut v = heads(&block.wv, self.kv_heads);
            if let Some(cache) = cache.as_deref_mut() {
                if let Some((ck, cv)) = cache.entries[i].take() {
                    k = Tensor::cat(vec![ck, k], 2);
                    v = Tensor::cat(vec![cv, v], 2);
                }
                cache.entries[i] = Some((k.clone(), v.clone()));
            }
            let group = self.heads / self.kv_heads;
            let repeat = |x: Tensor<4>| {
                let [b, n, tk, hd] = x.dims();
                x.unsqueeze_dim::<5>(2)
                    .repeat_dim(2, group)
                    .reshape([b, n * group, tk, hd])
            };
            let scores = q.matmul(repeat(k).swap_dims(2, 3)) / (head_dim as f64).sqrt();
            let att = softmax(scores + mask.clone(), 3).matmul(repeat(v));
            let att = att
                .swap_dims(1, 2)
                .reshape([batch, t, self.heads * head_dim]);
            h = h + tapped(&block.wo, att, taps.as_deref_mut());
            let x = block.ffn_norm.forward(h.clone());
            let gate = tapped(&block.gate, x.clone(), taps.as_deref_mut());
            let mlp = silu(gate) * tapped(&block.up, x, taps.as_deref_mut());
            h = h + tapped(&block.down, mlp, taps.as_deref_mut());
        }
        h
    }

    /// The logits `[.., vocab]` of final hidden states: `RMSNorm(h) Eᵀ`.
    pub fn logits<const D: usize>(&self, h: Tensor<D>) -> Tensor<D> {
        let x = self.norm.forward(h);
        let e = self.embed.val().transpose();
        let dims = x.dims();
        let rows = dims[..D - 1].iter().product();
        let mut out = dims;
        out[D - 1] = e.dims()[1];
        x.reshape([rows, dims[D - 1]]).matmul(e).reshape(out)
    }

    /// Logits `[batch, T, vocab]` of whole, right-padded sequences `tokens` `[batch, T]`.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let h = self.embed(tokens);
        self.logits(self.forward_layers(h, 0..self.blocks.len(), 0, None, None))
    }

    /// Greedy continuations of `prompts`, `max_new` tokens at most each, each ending at (and
    /// including) its first `eos`. The prompts run as one batch, left-padded with `eos`.
    pub fn generate(
        &self,
        prompts: &[Vec<u32>],
        max_new: usize,
        eos: u32,
        device: &Device,
    ) -> Vec<Vec<u32>> {
        let Some(mut batch) = PromptBatch::new(prompts, eos, self.blocks.len(), device) else {
            return vec![Vec::new(); prompts.len()];
        };
        let h = self.embed(batch.tokens.clone());
        let h = self.forward_layers(
            h,
            0..self.blocks.len(),
            0,
            Some(&batch.valid),
            Some(&mut batch.cache),
        );
        self.continue_greedy(h, batch, max_new, eos)
    }

    /// Greedy decoding after a prefill: `h` holds the prompts' final hidden states (all blocks
    /// run) and `batch.cache` their keys and values.
    pub fn continue_greedy(
        &self,
        mut h: Tensor<3>,
        mut batch: PromptBatch,
        max_new: usize,
        eos: u32,
    ) -> Vec<Vec<u32>> {
        let device = h.device();
        let n = batch.valid.len();
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut done = vec![false; n];
        for step in 0..max_new {
            let [b, t, d] = h.dims();
            let last = self.logits(h.slice([0..b, t - 1..t]).reshape([b, d]));
            let next: Vec<i64> = last.argmax(1).into_data().iter::<i64>().collect();
            for (i, &id) in next.iter().enumerate() {
                if !done[i] {
                    out[i].push(id as u32);
                    done[i] = id as u32 == eos;
                }
                batch.valid[i].push(true);
            }
            if step + 1 == max_new || done.iter().all(|&d| d) {
                break;
            }
            let tokens = Tensor::from_data(TensorData::new(next, [b, 1]), &device);
            let start = batch.cache.len();
            h = self.forward_layers(
                self.embed(tokens),
                0..self.blocks.len(),
                start,
                Some(&batch.valid),
                Some(&mut batch.cache),
            );
        }
        out
    }

    /// This model's first `n` blocks and the rest, each as a model with the same embedding and
    /// final norm.
    pub fn split(mut self, n: usize) -> (Self, Self) {
        let top = self.blocks.split_off(n.min(self.blocks.len()));
        let rest = Self {
            embed: self.embed.clone(),
            blocks: top,
            norm: self.norm.clone(),
            heads: self.heads,
            kv_heads: self.kv_heads,
            rope_base: self.rope_base,
        };
        (self, rest)
    }

    /// The model whose blocks are this one's followed by `top`'s (embedding and norm from `top`).
    pub fn join(self, top: Self) -> Self {
        let mut blocks = self.blocks;
        blocks.extend(top.blocks);
        Self { blocks, ..top }
    }
}

/// Prompts of different lengths as one left-padded batch, with the key mask and a cache.
#[derive(Debug, Clone)]
pub struct PromptBatch {
    /// The padded ids `[batch, longest]`.
    pub tokens: Tensor<2, Int>,
    /// `valid[b][j]`: whether position `j` of sequence `b` is a real token.
    pub valid: Vec<Vec<bool>>,
    /// The keys and values computed so far.
    pub cache: KvCache,
}

impl PromptBatch {
    /// `prompts` left-padded with `pad`, and an empty cache for `layers` blocks; `None` when
    /// there is no prompt or every prompt is empty.
    pub fn new(prompts: &[Vec<u32>], pad: u32, layers: usize, device: &Device) -> Option<Self> {
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        if longest == 0 {
            return None;
        }
        let valid = prompts
            .iter()
            .map(|p| {
                let mut v = vec![false; longest - p.len()];
                v.resize(longest, true);
                v
            })
            .collect();
        let padded: Vec<i64> = prompts
            .iter()
            .flat_map(|p| {
                std::iter::repeat_n(pad, longest - p.len())
                    .chain(p.iter().copied())
                    .map(i64::from)
            })
            .collect();
        Some(Self {
            tokens: Tensor::from_data(TensorData::new(padded, [prompts.len(), longest]), device),
            valid,
            cache: KvCache::new(layers),
        })
    }
}

/// `lin` on `x` `[batch, T, d_in]` as one `[batch·T, d_in]` matrix product. burn's
/// `Linear::forward` on a 3-d input broadcasts the weight over the batch, and burn-ndarray then
/// runs one product (re-packing the whole weight) per sequence: with one new token per
/// sequence while generating, that made decoding several times slower.
fn linear(lin: &Linear, x: Tensor<3>) -> Tensor<3> {
    let [b, t, d] = x.dims();
    let y = lin.forward(x.reshape([b * t, d]));
    let out = y.dims()[1];
    y.reshape([b, t, out])
}

/// [`linear`], tapped into `taps` when there are taps.
fn tapped(lin: &Linear, x: Tensor<3>, taps: Option<&mut Vec<LinearTap>>) -> Tensor<3> {
    let Some(taps) = taps else {
        return linear(lin, x);
    };
    let y = linear(lin, x.clone());
    let (y, tap) = LinearTap::new(&lin.weight, &x, y);
    taps.push(tap);
    y
}

/// The additive mask `[batch, 1, T, start + T]`: 0 where query `start + i` may read key `j`
/// (`j ≤ start + i` and key `j` real), −10⁹ elsewhere (finite, so a pad query that sees no real
/// key gets a uniform row instead of NaN).
fn attention_mask(
    batch: usize,
    t: usize,
    start: usize,
    key_valid: Option<&[Vec<bool>]>,
    device: &Device,
) -> Tensor<4> {
    let tk = start + t;
    let mut m = vec![0.0f32; batch * t * tk];
    for b in 0..batch {
        for i in 0..t {
            for j in 0..tk {
                let real = key_valid.is_none_or(|v| {
                    v.get(b)
                        .and_then(|row| row.get(j))
                        .copied()
                        .unwrap_or(false)
                });
                if j > start + i || !real {
                    m[(b * t + i) * tk + j] = -1e9;
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(m, [batch, 1, t, tk]), device)
}

/// `cos` and `sin` `[T, head_dim]` of positions `start .. start + T`, each angle written twice
/// (once per element of its pair).
fn rope_tables(
    start: usize,
    t: usize,
    head_dim: usize,
    base: f64,
    device: &Device,
) -> (Tensor<2>, Tensor<2>) {
    let (mut cos, mut sin) = (
        Vec::with_capacity(t * head_dim),
        Vec::with_capacity(t * head_dim),
    );
    for p in start..start + t {
        for i in 0..head_dim {
            let freq = base.powf(-((i / 2 * 2) as f64) / head_dim as f64);
            let angle = p as f64 * freq;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    let table = |v| Tensor::from_data(TensorData::new(v, [t, head_dim]), device);
    (table(cos), table(sin))
}

/// RoPE on `x` `[batch, heads, T, head_dim]`: each pair `(a, b)` becomes
/// `(a·cos − b·sin, b·cos + a·sin)`.
fn rope(x: Tensor<4>, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<4> {
    let [b, h, t, d] = x.dims();
    let pairs = x.clone().reshape([b, h, t, d / 2, 2]);
    let (even, odd) = (
        pairs.clone().slice([0..b, 0..h, 0..t, 0..d / 2, 0..1]),
        pairs.slice([0..b, 0..h, 0..t, 0..d / 2, 1..2]),
    );
    let rotated = Tensor::cat(vec![odd.neg(), even], 4).reshape([b, h, t, d]);
    x * cos.clone().unsqueeze::<4>() + rotated * sin.clone().unsqueeze::<4>()
}

impl LlamaConfig {
    /// The sizes of the tiny Llama the tests build with [`tiny_gguf`]: the byte-level
    /// tokenizer's 261 symbols, width 32, `layers` blocks of 4 heads (2 key-value heads) and a
    /// 48-wide MLP. Only with the `testing` feature.
    #[cfg(any(test, feature = "testing"))]
    pub fn tiny(layers: usize) -> Self {
        Self {
            vocab: 261,
            d_model: 32,
            layers,
            heads: 4,
            kv_heads: 2,
            d_ff: 48,
            rope_base: 10000.0,
            norm_eps: 1.0 / 65536.0,
        }
    }
}

/// A small random Llama with a byte-level tokenizer, as GGUF bytes: what tests (the loader's
/// fuzzing among them) use when the real model is not fetched. Vocabulary: `<|endoftext|>`,
/// `<|im_start|>`, `<|im_end|>`, GPT-2's 256 byte symbols, and the merges `Ġ t` and `h e`.
/// Weights are F32, uniform in ±0.1, from `seed`. Only with the `testing` feature.
#[cfg(any(test, feature = "testing"))]
pub fn tiny_gguf(config: &LlamaConfig, seed: u64) -> Vec<u8> {
    use crate::gguf::{Value, ggml_type, write};
    use rand::{Rng, SeedableRng};

    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    // GPT-2's byte → symbol table: printable bytes stand for themselves, the rest are
    // shifted to 256 and up.
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut shifted = 0;
    for b in 0..256u32 {
        let c = if printable(b) {
            b
        } else {
            shifted += 1;
            255 + shifted
        };
        tokens.push(char::from_u32(c).expect("a valid char").to_string());
    }
    tokens.extend(["Ġt", "he"].map(String::from));
    let mut types = vec![3i32; 3];
    types.resize(tokens.len(), 1);
    let vocab = tokens.len().max(config.vocab);
    while tokens.len() < vocab {
        tokens.push(format!("<unused{}>", tokens.len()));
        types.push(3);
    }

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut add = |name: String, dims: Vec<usize>, ones: bool| {
        let n: usize = dims.iter().product();
        let bytes = (0..n)
            .flat_map(|_| {
                let v: f32 = if ones {
                    1.0
                } else {
                    rng.random_range(-0.1..0.1)
                };
                v.to_le_bytes()
            })
            .collect();
        tensors.push((name, dims, bytes));
    };
    let (d, hd) = (config.d_model, config.head_dim());
    add("token_embd.weight".into(), vec![d, vocab], false);
    for i in 0..config.layers {
        let n = |p: &str| format!("blk.{i}.{p}.weight");
        add(n("attn_norm"), vec![d], true);
        add(n("attn_q"), vec![d, config.heads * hd], false);
        add(n("attn_k"), vec![d, config.kv_heads * hd], false);
        add(n("attn_v"), vec![d, config.kv_heads * hd], false);
        add(n("attn_output"), vec![config.heads * hd, d], false);
        add(n("ffn_norm"), vec![d], true);
        add(n("ffn_gate"), vec![d, config.d_ff], false);
        add(n("ffn_up"), vec![d, config.d_ff], false);
        add(n("ffn_down"), vec![config.d_ff, d], false);
    }
    add("output_norm.weight".into(), vec![d], true);

    let u = |v: usize| Value::U32(v as u32);
    let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
    let metadata = [
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", u(d)),
        ("llama.block_count", u(config.layers)),
        ("llama.attention.head_count", u(config.heads)),
        ("llama.attention.head_count_kv", u(config.kv_heads)),
        ("llama.feed_forward_length", u(config.d_ff)),
        ("llama.rope.freq_base", Value::F32(config.rope_base as f32)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(config.norm_eps as f32),
        ),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        (
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges",
            strings(&["Ġ t".into(), "h e".into()]),
        ),
        ("tokenizer.ggml.bos_token_id", u(1)),
        ("tokenizer.ggml.eos_token_id", u(2)),
    ];
    let tensors: Vec<(&str, &[usize], u32, &[u8])> = tensors
        .iter()
        .map(|(n, dims, b)| (n.as_str(), dims.as_slice(), ggml_type::F32, b.as_slice()))
        .collect();
    write::encode(&metadata, &tensors)
}

#[cfg(test)]
mod tests;
