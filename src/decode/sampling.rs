//! Token selection shared by `hat generate` and the edge's speculative decoding.
//!
//! Greedy selection is candle-transformers' `LogitsProcessor` argmax. Sampling draws from the
//! *processed* distribution — softmax(logits / temperature), then top-k, then top-p,
//! renormalised — made explicit here because speculative rejection sampling needs the draft's
//! and the target's probabilities, not only a sample.

use candle_core::Tensor;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::error::{Error, Result};

/// How to pick the next token.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SamplingParams {
    /// 0 = greedy (argmax).
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, top_p: None, top_k: None, seed: 0 }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0) || !self.temperature.is_finite() {
            return Err(Error::invalid(format!("--temperature {} must be a finite number >= 0", self.temperature)));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(Error::invalid(format!("--top-p {p} must be in (0, 1]")));
            }
        }
        if self.top_k == Some(0) {
            return Err(Error::invalid("--top-k must be at least 1"));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// A seeded token selector.
pub struct Sampler {
    params: SamplingParams,
    argmax: LogitsProcessor,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            params,
            argmax: LogitsProcessor::from_sampling(params.seed, Sampling::ArgMax),
            rng: rand::rngs::StdRng::seed_from_u64(params.seed),
        })
    }

    pub fn is_greedy(&self) -> bool {
        self.params.is_greedy()
    }

    pub fn params(&self) -> SamplingParams {
        self.params
    }

    /// The processed distribution over the vocabulary for `logits` `(vocab,)`.
    pub fn probs(&self, logits: &Tensor) -> Result<Vec<f32>> {
        probs(logits, &self.params)
    }

    /// Picks the next token: argmax when greedy, else a draw from [`Self::probs`].
    pub fn select(&mut self, logits: &Tensor) -> Result<u32> {
        if self.is_greedy() {
            return Ok(self.argmax.sample(logits)?);
        }
        let p = self.probs(logits)?;
        Ok(self.draw(&p))
    }

    /// A draw from a distribution (weights need not sum to one).
    pub fn draw(&mut self, weights: &[f32]) -> u32 {
        let total: f64 = weights.iter().map(|&w| w as f64).sum();
        let mut u = self.rng.random::<f64>() * total;
        let mut last = 0;
        for (i, &w) in weights.iter().enumerate() {
            if w > 0.0 {
                last = i;
                u -= w as f64;
                if u < 0.0 {
                    return i as u32;
                }
            }
        }
        last as u32
    }

    /// A uniform number in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }
}

/// [`processed_probs`] of a logits tensor `(vocab,)`.
pub fn probs(logits: &Tensor, params: &SamplingParams) -> Result<Vec<f32>> {
    let logits: Vec<f32> = logits.to_dtype(candle_core::DType::F32)?.to_vec1()?;
    Ok(processed_probs(&logits, params))
}

/// softmax(logits / T), then top-k, then top-p, renormalised.
pub fn processed_probs(logits: &[f32], params: &SamplingParams) -> Vec<f32> {
    let t = params.temperature.max(1e-6) as f32;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<f32> = logits.iter().map(|&l| ((l - max) / t).exp()).collect();
    if params.top_k.is_some() || params.top_p.is_some() {
        let mut order: Vec<usize> = (0..p.len()).collect();
        order.sort_unstable_by(|&a, &b| p[b].total_cmp(&p[a]));
        let total: f32 = p.iter().sum();
        let mut keep = params.top_k.unwrap_or(p.len()).min(p.len());
        if let Some(top_p) = params.top_p {
            let mut cum = 0.0;
            for (n, &i) in order.iter().take(keep).enumerate() {
                cum += p[i] / total;
                if cum as f64 >= top_p {
                    keep = n + 1;
                    break;
                }
            }
        }
        for &i in &order[keep..] {
            p[i] = 0.0;
        }
    }
    let total: f32 = p.iter().sum();
    p.iter_mut().for_each(|x| *x /= total);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_and_top_p_truncate() {
        let params = |k, p| SamplingParams { temperature: 1.0, top_k: k, top_p: p, seed: 0 };
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let full = processed_probs(&logits, &params(None, None));
        assert!((full.iter().sum::<f32>() - 1.0).abs() < 1e-6 && full.iter().all(|&x| x > 0.0));
        let k2 = processed_probs(&logits, &params(Some(2), None));
        assert_eq!(k2.iter().filter(|&&x| x > 0.0).count(), 2);
        let p = processed_probs(&logits, &params(None, Some(0.5)));
        assert_eq!(p.iter().filter(|&&x| x > 0.0).count(), 1, "{p:?}"); // the top token alone has 0.64
        let mut s = Sampler::new(params(None, None)).unwrap();
        let counts = (0..4000).fold([0usize; 4], |mut c, _| {
            c[s.draw(&full) as usize] += 1;
            c
        });
        assert!(counts[0] > counts[1] && counts[1] > counts[2] && counts[2] > counts[3], "{counts:?}");
    }
}
