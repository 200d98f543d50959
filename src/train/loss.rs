//! The student's loss on a batch: soft cross-entropy against the teacher's top-k (optionally a
//! sampled softmax with shared negatives) plus the per-position-normalised feature regression,
//! with optional noise on the conditioning features.


use candle_core::{Device, Tensor, D};
use rand::SeedableRng;

use crate::adapter::Adapter;
use crate::error::{Error, Result};
use crate::model::Ops;

use crate::train::teacher::{Sample, Trainer};

impl<'a> Trainer<'a> {
    /// The student's loss on a batch, and the number of positions it covers. `negatives`: token
    /// ids shared by the batch for the sampled softmax (unused when `config.negatives` is 0).
    pub(crate) fn batch_loss(&self, adapter: &Adapter, batch: &[&Sample], negatives: &[u32], noise_seed: u64) -> Result<(Tensor, usize)> {
        let len = batch.iter().map(|s| s.input_hidden.dim(0)).collect::<candle_core::Result<Vec<_>>>()?;
        let max = len.iter().copied().max().unwrap_or(0);
        let dev = &Device::Cpu;
        // Right padding: causal attention never lets real positions see the pads; a mask drops
        // the pads from the loss.
        let pad = |t: &Tensor, n: usize| pad_axis(t, 0, n);
        let x = Tensor::stack(&batch.iter().map(|s| pad(&s.input_hidden, max)).collect::<Result<Vec<_>>>()?, 0)?;
        let middle = || -> Result<Tensor> {
            let m = batch.iter().map(|s| s.middle().and_then(|t| pad(t, max))).collect::<Result<Vec<_>>>()?;
            Ok(Tensor::stack(&m, 0)?)
        };
        let ids = Tensor::stack(&batch.iter().map(|s| pad(&s.top_ids, max)).collect::<Result<Vec<_>>>()?, 0)?;
        let probs = Tensor::stack(&batch.iter().map(|s| pad(&s.top_probs, max)).collect::<Result<Vec<_>>>()?, 0)?;
        let mask: Vec<f32> = len.iter().flat_map(|&l| (0..max).map(move |i| if i < l { 1.0 } else { 0.0 })).collect();
        let mask = Tensor::from_vec(mask, (batch.len(), max), dev)?;
        let positions: usize = len.iter().sum();

        let output = self.device.output.clone().with_ops(Ops::Differentiable);
        let head = self.device.head.clone().with_ops(Ops::Differentiable);
        let target = if self.config.keeps_middle() { Some(middle()?) } else { None };
        // The output submodel's keys and values over the true middle outputs, padded like the
        // states (the causal masks never let real positions see the pads).
        let output_kv = match batch.iter().map(|s| s.output_kv.as_ref()).collect::<Option<Vec<_>>>() {
            Some(kv) if !kv.is_empty() => {
                let layer = |i: usize, which: fn(&(Tensor, Tensor)) -> &Tensor| -> Result<Tensor> {
                    Ok(Tensor::cat(&kv.iter().map(|s| pad_axis(which(&s[i]), 2, max)).collect::<Result<Vec<_>>>()?, 0)?)
                };
                Some((0..kv[0].len()).map(|i| Ok((layer(i, |p| &p.0)?, layer(i, |p| &p.1)?))).collect::<Result<Vec<_>>>()?)
            }
            _ => None,
        };
        // Soft cross-entropy of the drafts made from output-submodel states `h` against the
        // teacher, averaged over the real positions.
        let neg_mask = if self.config.negatives == 0 { None } else { Some(negative_mask(&ids, negatives)?) };
        let token_loss = |h: &Tensor| -> Result<Tensor> {
            let logp = if self.config.negatives == 0 {
                // Exact: log-softmax over the whole vocabulary.
                let logp = candle_nn::ops::log_softmax(&head.forward(h)?, D::Minus1)?; // (b, max, vocab)
                logp.gather(&ids, D::Minus1)? // (b, max, k)
            } else {
                // Sampled softmax: the teacher's top-k candidates of each position plus negatives
                // shared by the batch; no (positions × vocab) tensor is ever built.
                let (b, s, k) = ids.dims3()?;
                let hn = head.norm(h)?.reshape((b * s, 1, ()))?; // (bs, 1, hidden)
                let w = head.weight();
                let cand = w.index_select(&ids.flatten_all()?, 0)?.reshape((b * s, k, ()))?; // (bs, k, hidden)
                // The head is frozen: no gradient for its rows.
                let frozen = crate::model::kernels::frozen_matmul;
                let pos_logits = frozen(&hn, &cand.transpose(1, 2)?)?.squeeze(1)?; // (bs, k)
                let neg_ids = Tensor::new(negatives, dev)?;
                let neg_logits = frozen(&hn.squeeze(1)?, &w.index_select(&neg_ids, 0)?.t()?)?; // (bs, n)
                let neg_logits = neg_logits.broadcast_add(neg_mask.as_ref().ok_or_else(|| Error::invalid("internal: no negatives"))?)?;
                let all = Tensor::cat(&[&pos_logits, &neg_logits], 1)?;
                let logp = candle_nn::ops::log_softmax(&all, D::Minus1)?.narrow(1, 0, k)?;
                logp.reshape((b, s, k))?
            };
            let ce = (&logp * &probs)?.sum(D::Minus1)?.neg()?; // (b, max)
            Ok(((ce * &mask)?.sum_all()? / positions as f64)?)
        };
        // What a conditioned adapter reads: the true middle outputs, perturbed with
        // `--feature-noise` (the output submodel's context then comes from `output_kv`, exact).
        let conditioning = match (&target, &output_kv) {
            (Some(m), Some(_)) if self.config.feature_noise > 0.0 && self.config.conditioned => Some(perturb(m, self.config.feature_noise, noise_seed)?),
            _ => target.clone(),
        };
        let (h, y) = adapter.draft_hidden_with(&output, &x, conditioning.as_ref(), output_kv.as_deref())?;
        let mut loss = token_loss(&h)?;
        // Later drafts of a round read the adapter's own predictions (training-time test).
        let mut drafted = y.clone();
        for _ in 1..self.config.draft_steps {
            let truth = conditioning.as_ref().ok_or_else(|| Error::invalid("internal: later drafts need the true middle outputs"))?;
            let (h, next) = adapter.next_draft_hidden(&output, &x, truth, &drafted, output_kv.as_deref())?;
            loss = (loss + token_loss(&h)?)?;
            drafted = next;
        }
        let mut loss = (loss / self.config.draft_steps as f64)?;
        if let (true, Some(target)) = (self.config.feature_weight > 0.0, &target) {
            // Per-position normalised squared error: |y - t|² / |t|².
            let err = (&y - target)?.sqr()?.sum(D::Minus1)?;
            let norm = (target.sqr()?.sum(D::Minus1)? + 1e-6)?;
            let feat = ((err / norm)? * &mask)?.sum_all()? / positions as f64;
            loss = (loss + (feat? * self.config.feature_weight)?)?;
        }
        Ok((loss, positions))
    }
}

/// `t` with zeros appended along `axis` up to length `n`.
pub(crate) fn pad_axis(t: &Tensor, axis: usize, n: usize) -> Result<Tensor> {
    let mut shape = t.dims().to_vec();
    let l = shape[axis];
    if l >= n {
        return Ok(t.clone());
    }
    shape[axis] = n - l;
    Ok(Tensor::cat(&[t, &Tensor::zeros(shape, t.dtype(), t.device())?], axis)?)
}

/// `m + σ · rms(m) · ε` for states `m` `(batch, len, hidden)`: `ε` standard normal (seeded
/// Box–Muller), `rms` each position's root mean square.
pub(crate) fn perturb(m: &Tensor, sigma: f64, seed: u64) -> Result<Tensor> {
    use rand::Rng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = m.elem_count();
    let mut eps = Vec::with_capacity(n + 1);
    while eps.len() < n {
        let (u, v): (f64, f64) = (rng.random::<f64>().max(f64::MIN_POSITIVE), rng.random());
        let r = (-2.0 * u.ln()).sqrt();
        let a = 2.0 * std::f64::consts::PI * v;
        eps.push((r * a.cos()) as f32);
        eps.push((r * a.sin()) as f32);
    }
    eps.truncate(n);
    let eps = Tensor::from_vec(eps, m.shape(), m.device())?;
    let rms = m.sqr()?.mean_keepdim(D::Minus1)?.sqrt()?;
    Ok((m + eps.broadcast_mul(&(rms * sigma)?)?)?)
}

impl Sample {
    pub(crate) fn middle(&self) -> Result<&Tensor> {
        self.middle_hidden.as_ref().ok_or_else(|| Error::invalid("internal: the teacher kept no middle states"))
    }
}

/// `(positions, n)`: -inf where a negative is one of the position's own candidates.
pub(crate) fn negative_mask(ids: &Tensor, negatives: &[u32]) -> Result<Tensor> {
    let rows: Vec<Vec<u32>> = ids.flatten_to(1)?.to_vec2()?;
    let mut mask = Vec::with_capacity(rows.len() * negatives.len());
    for row in &rows {
        mask.extend(negatives.iter().map(|n| if row.contains(n) { f32::NEG_INFINITY } else { 0.0 }));
    }
    Ok(Tensor::from_vec(mask, (rows.len(), negatives.len()), &Device::Cpu)?)
}

