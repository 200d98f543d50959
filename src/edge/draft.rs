//! The draft path: input hidden states queued for the adapter and the SLM's output submodel,
//! run as far as the middle outputs a conditioned adapter needs allow, and the SLM's logits at
//! the last drafted position.

use std::time::Instant;

use candle_core::Tensor;

use crate::adapter::DraftContext;
use crate::decode::Sampler;
use crate::edge::state::Edge;
use crate::error::{Error, Result};
use crate::net::MiddleLink;

/// One round's drafts, ready to verify.
pub(super) struct Drafted {
    /// Input-submodel hidden states of the round's positions, `(1, 1, hidden)` each: the
    /// committed token, then each draft.
    pub verify: Vec<Tensor>,
    pub drafts: Vec<u32>,
    /// Sampling: the distribution each draft was drawn from (empty when greedy).
    pub draft_probs: Vec<Vec<f32>>,
}

impl<L: MiddleLink> Edge<'_, L> {
    /// Runs the committed token `next` through the input submodel and drafts up to `gamma`
    /// tokens after it (stopping at an end-of-sequence token); `drafting` queues the positions
    /// for the draft path even when `gamma` is 0 near the limits.
    pub(super) fn draft(&mut self, next: u32, gamma: usize, drafting: bool, sampler: &mut Sampler, eos: &[u32]) -> Result<Drafted> {
        let h = self.input_hidden(&[next])?;
        let mut round = Drafted { verify: vec![h.clone()], drafts: Vec::with_capacity(gamma), draft_probs: Vec::with_capacity(gamma) };
        if drafting {
            self.push_tail(&h)?;
        }
        if gamma == 0 {
            return Ok(round);
        }
        let mut logits = self.draft_logits()?;
        for i in 1..=gamma {
            let d = if sampler.is_greedy() {
                sampler.select(&logits)?
            } else {
                let q = sampler.probs(&logits)?;
                let d = sampler.draw(&q);
                round.draft_probs.push(q);
                d
            };
            round.drafts.push(d);
            let hd = self.input_hidden(&[d])?;
            round.verify.push(hd.clone());
            self.push_tail(&hd)?;
            if i == gamma || eos.contains(&d) {
                break;
            }
            logits = self.draft_logits()?;
        }
        Ok(round)
    }

    /// Queues input hidden states for the draft path.
    pub(super) fn push_tail(&mut self, h: &Tensor) -> Result<()> {
        append(&mut self.tail, h)
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
    /// queued position must run; returns the SLM's logits at the last one `(vocab,)`, and the
    /// adapter's prediction of its middle output `(1, 1, hidden)`.
    pub(super) fn run_draft_path(&mut self, logits: bool) -> Result<Option<(Tensor, Tensor)>> {
        let Some(tail) = self.tail.take() else { return Ok(None) };
        let queued = tail.dim(1)?;
        let n = match &self.features {
            _ if !self.adapter.is_conditioned() => queued,
            Some(f) => queued.min(f.dim(1)?),
            None => 0,
        };
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
                let y = self.dev.output.forward(&m, pos, &mut self.slm_output)?;
                logits.then(|| Ok::<_, Error>((self.dev.head.forward_last(&y)?.squeeze(0)?, m.narrow(1, n - 1, 1)?))).transpose()?
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
                let y = self.dev.output.forward(&m, last, &mut self.llm_output)?;
                Some((self.dev.head.forward_last(&y)?.squeeze(0)?, m))
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
        let (logits, predicted) = self.run_draft_path(true)?.ok_or_else(|| Error::invalid("internal: the draft path had no input"))?;
        self.push_features(&predicted)?;
        Ok(logits)
    }

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
