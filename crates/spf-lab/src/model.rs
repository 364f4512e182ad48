//! A small decoder-only transformer from burn-nn parts: token and position embeddings, pre-norm
//! blocks of causal multi-head attention and a ReLU MLP, a final norm and a linear head.
//!
//! For tokens `t₁ … t_T`: `h⁰ = E[t] + P[1..T]`, then per block
//! `h ← h + Attn(LN(h))` (each position attends to itself and earlier ones only) and
//! `h ← h + W₂ ReLU(W₁ LN(h))`, and the logits are `LN(h) W_out`.

use burn::config::Config;
use burn::module::Module;
use burn::nn::attention::{
    MhaInput, MultiHeadAttention, MultiHeadAttentionConfig, generate_autoregressive_mask,
};
use burn::nn::{
    Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig, Relu,
};
use burn::tensor::Device;
use burn::tensor::{Bool, Int, Tensor};

/// The transformer's sizes.
#[derive(Config, Debug, PartialEq)]
pub struct TransformerConfig {
    /// Width of the residual stream.
    #[config(default = 64)]
    pub d_model: usize,
    /// Blocks.
    #[config(default = 2)]
    pub layers: usize,
    /// Attention heads per block.
    #[config(default = 4)]
    pub heads: usize,
    /// Hidden width of the MLP.
    #[config(default = 128)]
    pub d_ff: usize,
}

impl TransformerConfig {
    /// A freshly initialised model over `vocab_size` token ids and sequences of up to `max_len`
    /// positions, on `device` (burn's default initialisers, seeded by `B::seed`).
    pub fn init(&self, vocab_size: usize, max_len: usize, device: &Device) -> Transformer {
        let norm = || LayerNormConfig::new(self.d_model).init(device);
        let blocks = (0..self.layers)
            .map(|_| Block {
                attn_norm: norm(),
                attn: MultiHeadAttentionConfig::new(self.d_model, self.heads)
                    .with_dropout(0.0)
                    .init(device),
                mlp_norm: norm(),
                mlp: Mlp {
                    up: LinearConfig::new(self.d_model, self.d_ff).init(device),
                    down: LinearConfig::new(self.d_ff, self.d_model).init(device),
                    act: Relu::new(),
                },
            })
            .collect();
        Transformer {
            token: EmbeddingConfig::new(vocab_size, self.d_model).init(device),
            position: EmbeddingConfig::new(max_len, self.d_model).init(device),
            blocks,
            norm: norm(),
            head: LinearConfig::new(self.d_model, vocab_size).init(device),
        }
    }
}

/// The decoder-only transformer.
#[derive(Module, Debug)]
pub struct Transformer {
    token: Embedding,
    position: Embedding,
    blocks: Vec<Block>,
    norm: LayerNorm,
    head: Linear,
}

/// One pre-norm block.
#[derive(Module, Debug)]
pub struct Block {
    attn_norm: LayerNorm,
    attn: MultiHeadAttention,
    mlp_norm: LayerNorm,
    mlp: Mlp,
}

/// The block's MLP.
#[derive(Module, Debug)]
pub struct Mlp {
    up: Linear,
    down: Linear,
    act: Relu,
}

impl Transformer {
    /// Logits `[batch, T, vocab]` for tokens `[batch, T]`; position `t`'s logits depend on
    /// tokens `1..=t` only.
    ///
    /// # Panics
    ///
    /// If `T` exceeds the `max_len` the model was built with.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        let [batch, len] = tokens.dims();
        let device = tokens.device();
        let positions = Tensor::<1, Int>::arange(0..len as i64, &device)
            .reshape([1, len])
            .expand([batch, len]);
        let mut h = self.token.forward(tokens) + self.position.forward(positions);
        let future = generate_autoregressive_mask(batch, len, &device);
        for block in &self.blocks {
            h = block.forward(h, future.clone());
        }
        self.head.forward(self.norm.forward(h))
    }
}

impl Block {
    fn forward(&self, h: Tensor<3>, future: Tensor<3, Bool>) -> Tensor<3> {
        let input = MhaInput::self_attn(self.attn_norm.forward(h.clone())).mask_attn(future);
        let h = h + self.attn.forward(input).context;
        let mlp = &self.mlp;
        let hidden = mlp
            .act
            .forward(mlp.up.forward(self.mlp_norm.forward(h.clone())));
        h + mlp.down.forward(hidden)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

    #[test]
    fn forward_has_the_right_shape_and_is_causal() {
        let device = burn::tensor::Device::default().autodiff();
        let model = TransformerConfig::new().init(20, 12, &device);
        let tokens = Tensor::<2, Int>::random([3, 9], Distribution::Uniform(0.0, 20.0), &device);
        let logits = model.forward(tokens.clone());
        assert_eq!(logits.dims(), [3, 9, 20]);

        // Change the last token: every earlier position's logits stay exactly the same.
        let mut data = tokens
            .to_data()
            .convert::<i64>()
            .try_to_vec::<i64>()
            .unwrap();
        for row in 0..3 {
            data[row * 9 + 8] = (data[row * 9 + 8] + 1) % 20;
        }
        let changed = Tensor::<2, Int>::from_data(TensorData::new(data, [3, 9]), &device);
        let after = model.forward(changed);
        let prefix = |l: Tensor<3>| {
            l.slice([0..3, 0..8])
                .into_data()
                .try_to_vec::<f32>()
                .unwrap()
        };
        assert_eq!(prefix(logits.clone()), prefix(after.clone()));
        let last = |l: Tensor<3>| {
            l.slice([0..3, 8..9])
                .into_data()
                .try_to_vec::<f32>()
                .unwrap()
        };
        assert_ne!(
            last(logits),
            last(after),
            "the changed position does see it"
        );
    }
}
