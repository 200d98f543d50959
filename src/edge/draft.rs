//! The draft path: input hidden states queued for the adapter and the SLM's output submodel,
//! run as far as the middle outputs a conditioned adapter needs allow, and the SLM's logits at
//! the last drafted position; a round's drafts, and the next round's drafted ahead while the
//! cloud verifies.

use std::time::Instant;

use candle_core::Tensor;

use crate::adapter::DraftContext;
use crate::decode::timing::ms;
use crate::decode::Sampler;
use crate::edge::drafter::DraftLength;
use crate::edge::state::Edge;
use crate::error::{Error, Result};
use crate::net::MiddleLink;

/// One round's drafts, ready to verify.
pub(super) struct Drafted {
    /// Input-submodel hidden states of the round's positions, `(1, 1, hidden)` each: the
    /// committed token, then each draft.
    pub verify: Vec<Tensor>,
    pub drafts: Vec<u32>,
    /// Sampling: the distribution each draft was drawn from, over the whole vocabulary (empty
    /// when greedy).
    pub draft_probs: Vec<Vec<f32>>,
    /// The chain's cumulative draft probability.
    pub p_chain: f32,
    /// Drafting stopped because the cloud's reply came in, not by a limit: it may go on.
    pub open: bool,
}

impl Drafted {
    fn new(first: Tensor, p_chain: f32, gamma: usize) -> Self {
        Self { verify: vec![first], drafts: Vec::with_capacity(gamma), draft_probs: Vec::with_capacity(gamma), p_chain, open: false }
    }
}

/// The next round, drafted while the cloud verifies this one, on the guess that it accepts every
/// draft and its bonus token is `bonus`.
pub(super) struct Ahead {
    pub bonus: u32,
    pub round: Drafted,
}

/// How a round's drafting stops.
pub(super) struct Limits<'a> {
    /// Most drafts.
    pub gamma: usize,
    /// Stop when the chain's cumulative draft probability falls below this.
    pub threshold: f32,
    pub eos: &'a [u32],
    /// Drafting ahead: also stop as soon as the cloud's reply is in (greedy only: with sampling
    /// the draws must not depend on timing).
    pub until_reply: bool,
}

impl<L: MiddleLink> Edge<'_, L> {
    /// Runs the committed token `next` through the input submodel and drafts after it (up to
    /// `limits`); `drafting` queues the positions for the draft path even when `gamma` is 0 near
    /// the limits.
    pub(super) fn draft(&mut self, next: u32, limits: &Limits, drafting: bool, sampler: &mut Sampler, steps: &mut DraftLength) -> Result<Drafted> {
        let h = self.input_hidden(&[next])?;
        let mut round = Drafted::new(h.clone(), 1.0, limits.gamma);
        if drafting {
            self.push_tail(&h)?;
        }
        self.extend_draft(&mut round, limits, sampler, steps)?;
        Ok(round)
    }

    /// Drafts the next round while the cloud verifies this one: guesses that every draft is
    /// accepted and that the bonus token is the draft's most likely one, then drafts after it.
    /// `None` when the guess is too unlikely (below the threshold) or ends the sequence.
    pub(super) fn draft_ahead(&mut self, limits: &Limits, sampler: &mut Sampler, steps: &mut DraftLength) -> Result<Option<Ahead>> {
        if limits.until_reply && self.reply_arrived()? {
            return Ok(None);
        }
        let logits = self.draft_logits()?.to_vec1::<f32>()?;
        let (row, p) = argmax_prob(&logits);
        let bonus = self.head.token(row);
        if p < limits.threshold || limits.eos.contains(&bonus) {
            return Ok(None);
        }
        let h = self.input_hidden(&[bonus])?;
        self.push_tail(&h)?;
        let mut round = Drafted::new(h, p, limits.gamma);
        self.extend_draft(&mut round, limits, sampler, steps)?;
        Ok(Some(Ahead { bonus, round }))
    }

    /// Drafts after the round's last position while the chain's cumulative probability stays at
    /// or above the threshold, up to `gamma` drafts or an end-of-sequence one (or the reply).
    pub(super) fn extend_draft(&mut self, round: &mut Drafted, limits: &Limits, sampler: &mut Sampler, steps: &mut DraftLength) -> Result<()> {
        round.open = false;
        if round.drafts.last().is_some_and(|d| limits.eos.contains(d)) {
            return Ok(());
        }
        while round.drafts.len() < limits.gamma {
            if limits.until_reply && self.reply_arrived()? {
                round.open = true;
                break;
            }
            let t = Instant::now();
            let logits = self.draft_logits()?;
            // Whether to draft on is decided before drawing (from the chain so far and the most
            // likely next draft): deciding on the drawn token would skew the drafts away from
            // the distribution verification assumes.
            let (q, (top, p_top)) = if sampler.is_greedy() {
                (None, argmax_prob(&logits.to_vec1::<f32>()?))
            } else {
                let q = sampler.probs(&logits)?;
                let top = argmax(&q);
                (Some(q), top)
            };
            if round.p_chain * p_top < limits.threshold {
                self.last_logits = Some(logits);
                steps.record_step(ms(t.elapsed()));
                break;
            }
            let (d, p) = match q {
                None => (self.head.token(top), p_top),
                Some(q) => {
                    let row = sampler.draw(&q);
                    let p = q.get(row as usize).copied().unwrap_or(0.0);
                    round.draft_probs.push(self.head.to_vocab(q));
                    (self.head.token(row), p)
                }
            };
            round.p_chain *= p;
            round.drafts.push(d);
            let hd = self.input_hidden(&[d])?;
            round.verify.push(hd.clone());
            self.push_tail(&hd)?;
            steps.record_step(ms(t.elapsed()));
            if limits.eos.contains(&d) {
                break;
            }
        }
        Ok(())
    }

    /// Queues input hidden states for the draft path.
    pub(super) fn push_tail(&mut self, h: &Tensor) -> Result<()> {
        self.last_logits = None;
        append(&mut self.tail, h)
    }

    /// Positions queued for the draft path that a fresh round would run before drafting.
    pub(super) fn draft_path_backlog(&self) -> Result<usize> {
        Ok(match &self.tail {
            Some(t) => t.dim(1)?,
            None => 0,
        })
    }

    /// Queues middle outputs for a conditioned adapter (no-op for the others).
    pub(super) fn push_features(&mut self, m: &Tensor) -> Result<()> {
        if self.adapter.is_conditioned() {
            append(&mut self.features, m)?;
        }
        Ok(())
    }

    /// Runs the queued positions that can run (for a conditioned adapter, those whose previous
    /// middle output is known) through adapter and SLM output submodel. With `logits`, every
    /// queued position must run; returns the SLM's draft logits at the last one (one per row of
    /// the draft head), and the adapter's prediction of its middle output `(1, 1, hidden)`.
    pub(super) fn run_draft_path(&mut self, logits: bool) -> Result<Option<(Tensor, Tensor)>> {
        self.run_draft_path_upto(logits, usize::MAX)
    }

    /// [`Edge::run_draft_path`] without logits over at most `most` of the positions that can
    /// run (the prompt's, while the cloud works on its later chunks); returns whether any ran.
    pub(super) fn catch_up_draft_path(&mut self, most: usize) -> Result<bool> {
        let before = self.adapter_cache.len();
        self.run_draft_path_upto(false, most)?;
        Ok(self.adapter_cache.len() > before)
    }

    fn run_draft_path_upto(&mut self, logits: bool, most: usize) -> Result<Option<(Tensor, Tensor)>> {
        let Some(tail) = self.tail.take() else { return Ok(None) };
        let queued = tail.dim(1)?;
        let n = match &self.features {
            _ if !self.adapter.is_conditioned() => queued,
            Some(f) => queued.min(f.dim(1)?),
            None => 0,
        }
        .min(most);
        if logits && n < queued {
            return Err(Error::invalid("internal: the draft path lacks the middle output of a drafted position"));
        }
        let (x, rest) = split_front(&tail, n)?;
        self.tail = rest;
        let Some(x) = x else { return Ok(None) };
        let t = Instant::now();
        let prev = match self.features.take() {
            Some(f) => {
                let (prev, rest) = split_front(&f, n)?;
                self.features = rest;
                prev
            }
            None => None,
        };
        let pos = self.adapter_cache.len();
        let m = self.adapter.forward(&x, prev.as_ref(), pos, &mut self.adapter_cache)?;
        let out = match self.adapter.draft_context {
            DraftContext::Drafted => {
                let y = self.draft_output.forward(&m, pos, &mut self.slm_output)?;
                logits.then(|| Ok::<_, Error>((self.head.logits(&self.dev.head, &y)?, m.narrow(1, n - 1, 1)?))).transpose()?
            }
            // The LLM's output cache holds every verified position (and this round's drafts):
            // only the drafted position runs, behind them; verification truncates it back.
            DraftContext::Verified if logits => {
                let last = pos + n - 1;
                if self.llm_output.len() != last {
                    return Err(Error::invalid(format!(
                        "internal: drafting at position {last} behind {} verified positions",
                        self.llm_output.len()
                    )));
                }
                let m = m.narrow(1, n - 1, 1)?;
                let y = self.draft_output.forward(&m, last, &mut self.llm_output)?;
                Some((self.head.logits(&self.dev.head, &y)?, m))
            }
            DraftContext::Verified => None,
        };
        self.device_time += t.elapsed();
        Ok(out)
    }

    /// Runs the draft path up to the last queued position and returns the SLM's logits there;
    /// a conditioned adapter's prediction of that position's middle output is queued for the
    /// next draft.
    pub(super) fn draft_logits(&mut self) -> Result<Tensor> {
        if self.tail.is_none() {
            if let Some(logits) = self.last_logits.take() {
                return Ok(logits);
            }
        }
        let (logits, predicted) = self.run_draft_path(true)?.ok_or_else(|| Error::invalid("internal: the draft path had no input"))?;
        self.push_features(&predicted)?;
        Ok(logits)
    }

}

/// The largest logit's index and its softmax probability.
fn argmax_prob(logits: &[f32]) -> (u32, f32) {
    let (best, max) = argmax(logits);
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    (best, if sum > 0.0 { 1.0 / sum } else { 0.0 })
}

/// The index of the largest value (the first of equals) and the value.
fn argmax(v: &[f32]) -> (u32, f32) {
    v.iter().enumerate().fold((0u32, f32::NEG_INFINITY), |best, (i, &x)| if x > best.1 { (i as u32, x) } else { best })
}

/// Appends `x` to an optional `(1, n, hidden)` queue along the positions.
fn append(queue: &mut Option<Tensor>, x: &Tensor) -> Result<()> {
    *queue = Some(match queue.take() {
        Some(q) => Tensor::cat(&[&q, x], 1)?,
        None => x.clone(),
    });
    Ok(())
}

/// Splits a `(1, n, hidden)` queue after its first `k` positions (`None` for an empty part).
fn split_front(q: &Tensor, k: usize) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let n = q.dim(1)?;
    let part = |start: usize, len: usize| -> Result<Option<Tensor>> { Ok((len > 0).then(|| q.narrow(1, start, len)).transpose()?) };
    Ok((part(0, k.min(n))?, part(k.min(n), n - k.min(n))?))
}
