//! The two ends of the model: the token embedding and the head (final norm + LM head).

use std::sync::Arc;

use candle_core::{IndexOp, Module, Tensor};
use candle_nn::{Embedding, Linear, RmsNorm, VarBuilder};

use crate::model::ops::Proj;

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::model::ops::{load_rms_norm, project, rms_norm, Ops};
use crate::model::screen::ScreenedHead;

/// Token embedding: ids `(batch, seq)` u32 → `(batch, seq, hidden)`.
#[derive(Debug, Clone)]
pub struct Embedder {
    embed: Embedding,
}

impl Embedder {
    pub fn load(vb: &VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let w = vb.pp("model.embed_tokens").get((cfg.vocab_size, cfg.hidden_size), "weight")?;
        Ok(Self { embed: Embedding::new(w, cfg.hidden_size) })
    }

    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.embed.forward(ids)?)
    }

    /// Embeds one sequence of token ids, `(1, ids.len(), hidden)`.
    pub fn embed_ids(&self, ids: &[u32]) -> Result<Tensor> {
        let vocab = self.embed.embeddings().dim(0)?;
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::invalid(format!("token id {bad} is outside the vocabulary of {vocab}")));
        }
        let ids = Tensor::new(ids, self.embed.embeddings().device())?.unsqueeze(0)?;
        self.forward(&ids)
    }

    pub fn weight(&self) -> &Tensor {
        self.embed.embeddings()
    }
}

/// Final norm + LM head: `(batch, seq, hidden)` → logits `(batch, seq, vocab)`.
#[derive(Debug, Clone)]
pub struct Head {
    norm: RmsNorm,
    lm_head: Proj,
    eps: f64,
    ops: Ops,
    /// The 8-bit screening copy for greedy decoding ([`Head::forward_greedy`]), when prepared.
    screen: Option<Arc<ScreenedHead>>,
}

impl Head {
    /// Loads `model.norm` and `lm_head` (or, with tied embeddings, `model.embed_tokens`).
    pub fn load(vb: &VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let norm = load_rms_norm(vb.pp("model.norm"), cfg)?;
        let shape = (cfg.vocab_size, cfg.hidden_size);
        let w = if cfg.tie_word_embeddings {
            vb.pp("model.embed_tokens").get(shape, "weight")?
        } else {
            vb.pp("lm_head").get(shape, "weight")?
        };
        Ok(Self { norm, lm_head: Linear::new(w, None).into(), eps: cfg.rms_norm_eps, ops: Ops::Fused, screen: None })
    }

    pub fn with_ops(mut self, ops: Ops) -> Self {
        self.ops = ops;
        self
    }

    /// Prepares (`true`) or drops the 8-bit screening copy that [`Head::forward_greedy`] uses
    /// (a quarter of the head's f32 bytes).
    pub fn set_screen(&mut self, on: bool) -> Result<()> {
        self.screen = match (on, self.screen.take()) {
            (false, _) => None,
            (true, Some(s)) => Some(s),
            (true, None) => Some(Arc::new(ScreenedHead::new(self.lm_head.weight())?)),
        };
        Ok(())
    }

    /// Whether greedy decoding screens the head ([`Head::set_screen`]).
    pub fn screened(&self) -> bool {
        self.screen.is_some()
    }

    /// The final norm alone: `(batch, seq, hidden)` → same shape.
    pub fn norm(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(&self.norm, x, self.eps, self.ops)
    }

    /// The LM head's weight, `(vocab, hidden)`.
    pub fn weight(&self) -> &Tensor {
        self.lm_head.weight()
    }

    /// Logits at every position: `(batch, seq, hidden)` → `(batch, seq, vocab)`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = rms_norm(&self.norm, x, self.eps, self.ops)?;
        project(&self.lm_head, &x, self.ops, false)
    }

    /// [`Head::forward`] with every row computed exactly as it would be alone (the rows of a
    /// draft tree, up to [`crate::model::kernels::EXACT_ROWS`]).
    pub fn forward_exact(&self, x: &Tensor) -> Result<Tensor> {
        let x = rms_norm(&self.norm, x, self.eps, self.ops)?;
        project(&self.lm_head, &x, self.ops, true)
    }

    /// Logits for greedy decoding: their argmax (ties included) is [`Head::forward_exact`]'s,
    /// and so are the values of every row that could be the largest; the others are `-inf`
    /// ([`crate::model::screen`]). Without a screen, or beyond [`crate::model::kernels::EXACT_ROWS`]
    /// rows, [`Head::forward_exact`]. Never for sampling: the distribution is not the model's.
    pub fn forward_greedy(&self, x: &Tensor) -> Result<Tensor> {
        let xn = rms_norm(&self.norm, x, self.eps, self.ops)?;
        match &self.screen {
            Some(s) if self.ops == Ops::Fused && ScreenedHead::serves(&xn, self.lm_head.weight()) => s.logits(&xn, self.lm_head.weight()),
            _ => project(&self.lm_head, &xn, self.ops, true),
        }
    }

    /// Logits of the last position only: `(batch, seq, hidden)` → `(batch, vocab)`.
    pub fn forward_last(&self, x: &Tensor) -> Result<Tensor> {
        let seq = x.dim(1)?;
        let last = x.i((.., seq - 1..seq, ..))?;
        Ok(self.forward(&last)?.squeeze(1)?)
    }
}
