//! Learned inverters: a cloud **without** the device's weights, which learns to read tokens from
//! the states it sees out of (state, token) pairs of its own (it is a user of the service too, or
//! holds a device: it sends its own text and records what goes up). Of rising strength:
//! - `nearest-embedding`: no training; the token whose public embedding row is closest (cosine)
//!   to the state (a shallow split's states stay near their token's embedding);
//! - `linear-probe`: ridge regression from the state to one-hot tokens;
//! - `mlp-window`: a one-hidden-layer network over the states of a window of three positions
//!   (the position and its neighbours), trained with cross-entropy on the most frequent tokens of
//!   the attacker's text.
//!
//! Every state is scaled to unit RMS first (position 0's is ~40× the others: an attention sink).
//! The learned ones are trained on growing shares of the attacker's pairs (its training budget)
//! and evaluated on the audited conversations, which they never saw.

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};

/// Rows of the hidden layer of `mlp-window`.
const MLP_HIDDEN: usize = 512;
/// Most output classes of `mlp-window` (the attacker's most frequent tokens; the others it
/// cannot name).
const MLP_CLASSES: usize = 8192;
/// Pairs per training step, and passes over the pairs (at most `MLP_MAX_STEPS` steps).
const MLP_BATCH: usize = 256;
const MLP_EPOCHS: usize = 3;
const MLP_MAX_STEPS: usize = 1500;

/// States of one text, `(n, hidden)`, scaled to unit RMS per position, with their tokens.
pub struct Text {
    pub states: Tensor,
    pub tokens: Vec<u32>,
}

impl Text {
    /// `states` `(n, hidden)` as the wire delivered them.
    pub fn new(states: &Tensor, tokens: Vec<u32>) -> Result<Self> {
        let rms = states.sqr()?.mean_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
        Ok(Self { states: states.broadcast_div(&rms)?, tokens })
    }

    /// Each position's window: its state and its neighbours' (zeros past the ends), `(n, 3 ·
    /// hidden)`.
    fn windows(&self) -> Result<Tensor> {
        let (n, h) = self.states.dims2()?;
        let zero = Tensor::zeros((1, h), DType::F32, self.states.device())?;
        if n < 2 {
            return Ok(Tensor::cat(&[&zero, &self.states, &zero], 1)?);
        }
        let before = Tensor::cat(&[&zero, &self.states.narrow(0, 0, n - 1)?], 0)?;
        let after = Tensor::cat(&[&self.states.narrow(0, 1, n - 1)?, &zero], 0)?;
        Ok(Tensor::cat(&[&before, &self.states, &after], 1)?)
    }
}

/// Scores over the vocabulary for every position of a text, `(n, vocab)` (or over a subset of it,
/// with the token of each column).
pub trait Inverter {
    fn name(&self) -> &'static str;
    fn scores(&self, text: &Text) -> Result<(Tensor, Option<&[u32]>)>;
}

/// An inverter that scores every token linearly, `state · weights`: the nearest public
/// embedding row (cosine; [`Linear::nearest_embedding`]) or a ridge probe
/// ([`Linear::probe`]).
pub struct Linear {
    name: &'static str,
    /// `(hidden, vocab)`.
    weights: Tensor,
}

impl Linear {
    /// The token whose public embedding row is closest (cosine) to the state.
    pub fn nearest_embedding(embedding: &Tensor) -> Result<Self> {
        let norm = embedding.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?;
        Ok(Self { name: "nearest-embedding", weights: embedding.broadcast_div(&norm)?.t()?.contiguous()? })
    }

    /// Ridge regression from states `(N, hidden)` to their one-hot `tokens` over a vocabulary of
    /// `vocab`.
    pub fn probe(states: &Tensor, tokens: &[u32], vocab: usize) -> Result<Self> {
        Ok(Self { name: "linear-probe", weights: ridge_probe(states, tokens, vocab)? })
    }
}

impl Inverter for Linear {
    fn name(&self) -> &'static str {
        self.name
    }

    fn scores(&self, text: &Text) -> Result<(Tensor, Option<&[u32]>)> {
        Ok((text.states.matmul(&self.weights)?, None))
    }
}

/// The ridge-regression weights `(hidden, vocab)` from states `(N, hidden)` to their one-hot
/// `tokens`: `(HᵀH + λI)⁻¹ Hᵀ Y`, λ a thousandth of the mean diagonal of `HᵀH`.
pub(super) fn ridge_probe(states: &Tensor, tokens: &[u32], vocab: usize) -> Result<Tensor> {
    let hidden = states.dim(1)?;
    if tokens.is_empty() {
        return Err(Error::invalid("no (state, token) pairs to fit the attacker's probe on"));
    }
    let h = states.to_dtype(DType::F64)?;
    let y = Tensor::new(tokens, h.device())?;
    // Sᵀ = Σ over rows of the state into its token's row: (vocab, hidden).
    let s_t = Tensor::zeros((vocab, hidden), DType::F64, h.device())?.index_add(&y, &h, 0)?;
    let gram: Vec<Vec<f64>> = h.t()?.matmul(&h)?.to_vec2()?;
    let ridge = 1e-3 * (0..hidden).map(|i| gram[i][i]).sum::<f64>() / hidden as f64;
    let inverse = Tensor::new(crate::util::linalg::invert_spd(gram, ridge)?, h.device())?.reshape((hidden, hidden))?;
    Ok(inverse.matmul(&s_t.t()?)?.to_dtype(DType::F32)?)
}

/// A one-hidden-layer network over windows of three states.
pub struct MlpWindow {
    hidden: candle_nn::Linear,
    out: candle_nn::Linear,
    /// The token of each output class.
    classes: Vec<u32>,
}

impl MlpWindow {
    /// Trains on the attacker's texts (its most frequent tokens as classes), seeded.
    pub fn train(texts: &[Text], seed: u64) -> Result<Self> {
        let mut counts = std::collections::HashMap::<u32, usize>::new();
        for t in texts {
            for &tok in &t.tokens {
                *counts.entry(tok).or_default() += 1;
            }
        }
        let mut by_count: Vec<(u32, usize)> = counts.into_iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let classes: Vec<u32> = by_count.iter().take(MLP_CLASSES).map(|c| c.0).collect();
        let class_of: std::collections::HashMap<u32, u32> = classes.iter().enumerate().map(|(i, &t)| (t, i as u32)).collect();
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for t in texts.iter().filter(|t| t.tokens.len() > 1) {
            let w = t.windows()?;
            let keep: Vec<u32> = (0..t.tokens.len() as u32).filter(|&i| class_of.contains_key(&t.tokens[i as usize])).collect();
            if keep.is_empty() {
                continue;
            }
            xs.push(w.index_select(&Tensor::new(keep.as_slice(), w.device())?, 0)?);
            ys.extend(keep.iter().map(|&i| class_of[&t.tokens[i as usize]]));
        }
        if ys.is_empty() {
            return Err(Error::invalid("no (state, token) pairs to train the attacker's network on"));
        }
        let dev = Device::Cpu;
        let x = Tensor::cat(&xs, 0)?;
        let y = Tensor::new(ys.as_slice(), &dev)?;
        let n = ys.len();
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let hidden = candle_nn::linear(x.dim(1)?, MLP_HIDDEN, vb.pp("hidden"))?;
        let out = candle_nn::linear(MLP_HIDDEN, classes.len(), vb.pp("out"))?;
        let mut opt = candle_nn::AdamW::new(varmap.all_vars(), candle_nn::ParamsAdamW { lr: 1e-3, weight_decay: 1e-4, ..Default::default() })?;
        let steps = (MLP_EPOCHS * n).div_ceil(MLP_BATCH).clamp(1, MLP_MAX_STEPS);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for _ in 0..steps {
            let idx: Vec<u32> = (0..MLP_BATCH.min(n)).map(|_| rng.random_range(0..n as u32)).collect();
            let idx = Tensor::new(idx.as_slice(), &dev)?;
            let logits = out.forward(&hidden.forward(&x.index_select(&idx, 0)?)?.relu()?)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y.index_select(&idx, 0)?)?;
            opt.backward_step(&loss)?;
        }
        Ok(Self { hidden, out, classes })
    }
}

impl Inverter for MlpWindow {
    fn name(&self) -> &'static str {
        "mlp-window"
    }

    fn scores(&self, text: &Text) -> Result<(Tensor, Option<&[u32]>)> {
        let logits = self.out.forward(&self.hidden.forward(&text.windows()?)?.relu()?)?;
        Ok((logits, Some(&self.classes)))
    }
}

/// `(top-1, top-10, counted)` of an inverter over the content positions of `texts`
/// (`content[i][t]`).
pub fn recovery(inverter: &dyn Inverter, texts: &[Text], content: &[Vec<bool>]) -> Result<(usize, usize, usize)> {
    let (mut top1, mut top10, mut counted) = (0, 0, 0);
    for (text, content) in texts.iter().zip(content) {
        let (scores, columns) = inverter.scores(text)?;
        let k = 10.min(scores.dim(1)?);
        let ranked = scores.arg_sort_last_dim(false)?.narrow(1, 0, k)?;
        for (t, &truth) in text.tokens.iter().enumerate() {
            if !content.get(t).copied().unwrap_or(false) {
                continue;
            }
            let best: Vec<u32> = ranked.i(t)?.to_vec1()?;
            let token = |c: u32| columns.map_or(c, |cols| cols[c as usize]);
            counted += 1;
            top1 += usize::from(token(best[0]) == truth);
            top10 += usize::from(best.iter().any(|&c| token(c) == truth));
        }
    }
    Ok((top1, top10, counted))
}

/// The first `share` of the attacker's texts (its training budget), at least one.
pub fn budget(texts: &[Text], share: f64) -> &[Text] {
    let n = ((texts.len() as f64 * share).round() as usize).clamp(1, texts.len().max(1));
    &texts[..n.min(texts.len())]
}

/// The pairs of texts as one `(N, hidden)` block and their tokens.
pub fn pairs(texts: &[Text]) -> Result<(Tensor, Vec<u32>)> {
    let states: Vec<&Tensor> = texts.iter().map(|t| &t.states).collect();
    Ok((Tensor::cat(&states, 0)?, texts.iter().flat_map(|t| t.tokens.iter().copied()).collect()))
}
