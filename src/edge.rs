//! The device's side of HAT inference: chunked prefill, speculative drafting with the on-device
//! SLM (input submodel → adapter → output submodel → head), verification of the drafts by the
//! cloud's middle layers in one round trip, and rollback of every cache to the accepted length.
//! `Mode::UShape` is the baseline: the same split without drafting, one round trip per token.
//!
//! Caches on the device, all indexed by position:
//! - input submodel (shared by the SLM and the LLM paths: same layers, same hidden states);
//! - adapter and SLM output submodel (the draft path);
//! - LLM output submodel (runs on the cloud's replies). With an adapter whose draft context is
//!   [`DraftContext::Verified`] the SLM drafts behind these exact states instead of keeping an
//!   output cache of its own: each draft appends one position, and the next verification
//!   truncates the cache back to the round's start.
//!
//! The cloud's middle cache is truncated by the start position of the next block it receives.
//!
//! A feature-conditioned adapter (see [`crate::adapter`]) reads the middle output of the previous
//! position: the cloud's, for verified positions, or its own prediction, for drafts. After each
//! verification its cache is rolled back to the round's first position and the accepted drafts
//! are run again with the cloud's middle outputs (the next round does that in one block).

use std::time::{Duration, Instant};

use candle_core::Tensor;
use serde::Serialize;

use crate::adapter::{Adapter, DraftContext};
use crate::error::{Error, Result};
use crate::generate::{SamplingParams, StopReason};
use crate::link::{MiddleLink, MiddleReply};
use crate::model::StackCache;
use crate::sampling::Sampler;
use crate::split::DeviceBundle;

/// How the edge generates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Speculative decoding with the on-device SLM, verified by the cloud.
    Hat,
    /// U-shaped split inference without drafting: one round trip per generated token.
    UShape,
}

/// Settings of one generation.
#[derive(Debug, Clone, Copy)]
pub struct EdgeOptions {
    pub mode: Mode,
    /// γ: most tokens drafted per round.
    pub draft_len: usize,
    /// Prompt positions per prefill chunk; 0 = the whole prompt at once.
    pub chunk_size: usize,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// The cloud's context limit (positions), from the handshake.
    pub max_context: usize,
}

/// What a generation did, how fast, and what it cost on the link.
#[derive(Debug, Clone, Serialize)]
pub struct EdgeReport {
    pub token_ids: Vec<u32>,
    pub mode: Mode,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub ttft_ms: f64,
    pub tbt_ms: f64,
    /// Cloud round trips after prefill.
    pub rounds: usize,
    /// Generated tokens per round (accepted drafts + the corrected or bonus token).
    pub mean_accepted: f64,
    /// Accepted drafts / drafts sent.
    pub acceptance_rate: f64,
    pub drafts_sent: usize,
    pub drafts_accepted: usize,
    /// Per draft position of a round (0 = the first draft): how often it was checked (every
    /// draft before it accepted) and how often accepted. Their ratio is the acceptance rate of
    /// position i given the ones before it.
    pub draft_checks: Vec<usize>,
    pub draft_hits: Vec<usize>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub device_compute_ms: f64,
    pub cloud_compute_ms: f64,
    /// Time the device waited for replies (network and cloud queueing included).
    pub network_wait_ms: f64,
    pub stop_reason: StopReason,
}

/// The device's caches and timers for one generation.
struct Edge<'a, L: MiddleLink> {
    dev: &'a DeviceBundle,
    adapter: &'a Adapter,
    link: &'a mut L,
    input: StackCache,
    adapter_cache: StackCache,
    slm_output: StackCache,
    llm_output: StackCache,
    /// Input-submodel hidden states of positions `[adapter_cache.len(), input.len())`, not yet
    /// run through the draft path.
    tail: Option<Tensor>,
    /// Conditioned adapters: middle outputs (the cloud's, or drafted) of positions
    /// `[adapter_cache.len() - 1, …)` (position -1 is a zero row), `(1, n, hidden)`.
    features: Option<Tensor>,
    device_time: Duration,
    wait_time: Duration,
    cloud_time: Duration,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl<'a, L: MiddleLink> Edge<'a, L> {
    fn new(dev: &'a DeviceBundle, adapter: &'a Adapter, link: &'a mut L) -> Self {
        Self {
            input: dev.input.new_cache(),
            adapter_cache: adapter.layers.new_cache(),
            slm_output: dev.output.new_cache(),
            llm_output: dev.output.new_cache(),
            dev,
            adapter,
            link,
            tail: None,
            features: None,
            device_time: Duration::ZERO,
            wait_time: Duration::ZERO,
            cloud_time: Duration::ZERO,
        }
    }

    /// Embeds `ids` and runs the input submodel at the next positions: `(1, n, hidden)`.
    fn input_hidden(&mut self, ids: &[u32]) -> Result<Tensor> {
        let t = Instant::now();
        let x = self.dev.embedder.embed_ids(ids)?;
        let h = self.dev.input.forward(&x, self.input.len(), &mut self.input)?;
        self.device_time += t.elapsed();
        Ok(h)
    }

    /// Queues input hidden states for the draft path.
    fn push_tail(&mut self, h: &Tensor) -> Result<()> {
        append(&mut self.tail, h)
    }

    /// Queues middle outputs for a conditioned adapter (no-op for the others).
    fn push_features(&mut self, m: &Tensor) -> Result<()> {
        if self.adapter.is_conditioned() {
            append(&mut self.features, m)?;
        }
        Ok(())
    }

    /// Runs the queued positions that can run (for a conditioned adapter, those whose previous
    /// middle output is known) through adapter and SLM output submodel. With `logits`, every
    /// queued position must run; returns the SLM's logits at the last one `(vocab,)`, and the
    /// adapter's prediction of its middle output `(1, 1, hidden)`.
    fn run_draft_path(&mut self, logits: bool) -> Result<Option<(Tensor, Tensor)>> {
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

    fn receive(&mut self) -> Result<MiddleReply> {
        let t = Instant::now();
        let r = self.link.receive()?;
        self.wait_time += t.elapsed();
        self.cloud_time += r.cloud_compute;
        Ok(r)
    }

    /// Runs the LLM output submodel on a reply; returns logits `(count, vocab)` for every
    /// position, or only the last `(1, vocab)` when `all` is false.
    fn llm_logits(&mut self, r: &MiddleReply, all: bool) -> Result<Tensor> {
        let t = Instant::now();
        self.llm_output.truncate(r.start);
        let y = self.dev.output.forward(&r.hidden, r.start, &mut self.llm_output)?;
        let logits = if all { self.dev.head.forward(&y)?.squeeze(0)? } else { self.dev.head.forward_last(&y)? };
        self.device_time += t.elapsed();
        Ok(logits)
    }

    /// Chunked prefill: each chunk goes up as soon as its input hidden states exist; replies
    /// are run through the output submodel as they arrive. Returns the last position's logits.
    fn prefill(&mut self, prompt: &[u32], chunk: usize, drafting: bool) -> Result<Tensor> {
        let chunk = if chunk == 0 { prompt.len() } else { chunk };
        let mut pending = 0usize;
        let mut last = None;
        if drafting && self.adapter.is_conditioned() {
            self.features = Some(Tensor::zeros((1, 1, self.dev.manifest.hidden_size), candle_core::DType::F32, &candle_core::Device::Cpu)?);
        }
        let mut handle = |edge: &mut Self, r: MiddleReply| -> Result<()> {
            let is_last = r.start + r.hidden.dim(1)? == prompt.len();
            if drafting {
                edge.push_features(&r.hidden)?;
            }
            let logits = edge.llm_logits(&r, false)?;
            if is_last {
                last = Some(logits.squeeze(0)?);
            }
            Ok(())
        };
        for ids in prompt.chunks(chunk) {
            let pos = self.input.len();
            let h = self.input_hidden(ids)?;
            self.link.submit(pos, &h)?;
            pending += 1;
            if drafting {
                self.push_tail(&h)?;
            }
            while let Some(r) = self.link.try_receive()? {
                self.cloud_time += r.cloud_compute;
                pending -= 1;
                handle(self, r)?;
            }
        }
        // The draft path's prefill overlaps with the cloud's work on the last chunks (for a
        // conditioned adapter, chunk by chunk as the middle outputs it needs arrive).
        if drafting {
            self.run_draft_path(false)?;
        }
        for _ in 0..pending {
            let r = self.receive()?;
            handle(self, r)?;
            if drafting {
                self.run_draft_path(false)?;
            }
        }
        last.ok_or_else(|| Error::invalid("the cloud never answered the last prompt chunk"))
    }

    /// Runs the draft path up to the last queued position and returns the SLM's logits there;
    /// a conditioned adapter's prediction of that position's middle output is queued for the
    /// next draft.
    fn draft_logits(&mut self) -> Result<Tensor> {
        let (logits, predicted) = self.run_draft_path(true)?.ok_or_else(|| Error::invalid("internal: the draft path had no input"))?;
        self.push_features(&predicted)?;
        Ok(logits)
    }

    fn rollback(&mut self, valid: usize) {
        self.input.truncate(valid);
        self.adapter_cache.truncate(valid);
        self.slm_output.truncate(valid);
        self.llm_output.truncate(valid);
    }
}

/// Generates after `prompt`, calling `on_token` with each committed token.
pub fn generate<L: MiddleLink>(
    dev: &DeviceBundle,
    adapter: &Adapter,
    link: &mut L,
    prompt: &[u32],
    opts: &EdgeOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<EdgeReport> {
    if prompt.is_empty() {
        return Err(Error::invalid("the prompt is empty (no tokens to start from)"));
    }
    let limit = opts.max_context.min(dev.input.max_positions());
    if prompt.len() >= limit {
        return Err(Error::ContextTooLong { needed: prompt.len() + 1, limit });
    }
    let eos = &dev.tokenizer.eos_token_ids;
    let drafting = opts.mode == Mode::Hat && opts.draft_len > 0;
    let mut sampler = Sampler::new(opts.sampling)?;
    let mut edge = Edge::new(dev, adapter, link);
    let start = Instant::now();

    let logits = edge.prefill(prompt, opts.chunk_size, drafting)?;
    let mut next = sampler.select(&logits)?;
    let first_at = Instant::now();
    let mut last_at = first_at;
    let mut tokens = vec![next];
    on_token(next)?;
    let (mut rounds, mut sent, mut accepted) = (0usize, 0usize, 0usize);
    let (mut draft_checks, mut draft_hits) = (vec![0usize; opts.draft_len], vec![0usize; opts.draft_len]);
    let mut stop = StopReason::MaxTokens;

    let done = |tokens: &[u32], stop: &mut StopReason| {
        if tokens.last().is_some_and(|t| eos.contains(t)) {
            *stop = StopReason::Eos;
            true
        } else {
            tokens.len() >= opts.max_tokens
        }
    };
    while !done(&tokens, &mut stop) {
        let base = edge.input.len(); // position of `next`
        if base + 1 > limit {
            stop = StopReason::ContextFull;
            break;
        }
        // Draft: γ tokens, fewer near the token and context limits.
        let budget = opts.max_tokens - tokens.len();
        let gamma = if drafting { opts.draft_len.min(budget.saturating_sub(1)).min(limit - base - 1) } else { 0 };
        let h = edge.input_hidden(&[next])?;
        let mut verify = vec![h.clone()];
        let mut drafts = Vec::with_capacity(gamma);
        let mut draft_probs = Vec::with_capacity(gamma);
        if drafting {
            edge.push_tail(&h)?;
        }
        if gamma > 0 {
            let mut logits = edge.draft_logits()?;
            for i in 1..=gamma {
                let d = if sampler.is_greedy() {
                    sampler.select(&logits)?
                } else {
                    let q = sampler.probs(&logits)?;
                    let d = sampler.draw(&q);
                    draft_probs.push(q);
                    d
                };
                drafts.push(d);
                let hd = edge.input_hidden(&[d])?;
                verify.push(hd.clone());
                edge.push_tail(&hd)?;
                if i == gamma || eos.contains(&d) {
                    break;
                }
                logits = edge.draft_logits()?;
            }
        }

        // Verify: the cloud runs positions base..=base+k in one round trip.
        let x = if verify.len() == 1 { verify[0].clone() } else { Tensor::cat(&verify, 1)? };
        edge.link.submit(base, &x)?;
        let reply = edge.receive()?;
        let logits = edge.llm_logits(&reply, true)?; // (k + 1, vocab)
        rounds += 1;
        sent += drafts.len();

        let mut a = 0;
        let mut correction = None;
        for (i, &d) in drafts.iter().enumerate() {
            let l = logits.get(i)?;
            if sampler.is_greedy() {
                let want = sampler.select(&l)?;
                if want != d {
                    correction = Some(want);
                    break;
                }
            } else {
                let p = sampler.probs(&l)?;
                let q = &draft_probs[i];
                if sampler.uniform() * (q[d as usize] as f64) < p[d as usize] as f64 {
                    // accepted with probability min(1, p/q)
                } else {
                    let residual: Vec<f32> = p.iter().zip(q).map(|(p, q)| (p - q).max(0.0)).collect();
                    let fix = if residual.iter().any(|&r| r > 0.0) { sampler.draw(&residual) } else { sampler.draw(&p) };
                    correction = Some(fix);
                    break;
                }
            }
            a += 1;
        }
        let new_token = match correction {
            Some(t) => t,
            None => sampler.select(&logits.get(a)?)?,
        };
        accepted += a;
        for i in 0..drafts.len().min(a + 1) {
            draft_checks[i] += 1;
            draft_hits[i] += usize::from(i < a);
        }
        // Roll every device cache back to the accepted prefix; the cloud follows from the
        // start position of the next block.
        edge.rollback(base + a + 1);
        if edge.adapter.is_conditioned() {
            // Drafts after the first were conditioned on predictions: run the accepted ones again
            // on the cloud's middle outputs.
            if edge.adapter_cache.len() > base {
                edge.adapter_cache.truncate(base + 1);
                edge.slm_output.truncate(base + 1);
                edge.tail = if a > 0 { Some(Tensor::cat(&verify[1..=a], 1)?) } else { None };
                edge.features = None;
            }
            if drafting {
                edge.push_features(&reply.hidden.narrow(1, 0, a + 1)?)?;
            }
        } else if a < drafts.len() {
            edge.tail = None;
        }
        for &t in drafts[..a].iter().chain(std::iter::once(&new_token)) {
            tokens.push(t);
            last_at = Instant::now();
            on_token(t)?;
            if done(&tokens, &mut stop) {
                break;
            }
        }
        next = new_token;
    }
    let n = tokens.len();
    let stats = edge.link.stats();
    Ok(EdgeReport {
        mode: opts.mode,
        prompt_tokens: prompt.len(),
        generated_tokens: n,
        ttft_ms: ms(first_at - start),
        tbt_ms: if n > 1 { ms(last_at - first_at) / (n - 1) as f64 } else { 0.0 },
        rounds,
        mean_accepted: if rounds > 0 { (n - 1) as f64 / rounds as f64 } else { 0.0 },
        acceptance_rate: if sent > 0 { accepted as f64 / sent as f64 } else { 0.0 },
        drafts_sent: sent,
        drafts_accepted: accepted,
        draft_checks,
        draft_hits,
        bytes_up: stats.bytes_up,
        bytes_down: stats.bytes_down,
        device_compute_ms: ms(edge.device_time),
        cloud_compute_ms: ms(edge.cloud_time),
        network_wait_ms: ms(edge.wait_time),
        stop_reason: stop,
        token_ids: tokens,
    })
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
