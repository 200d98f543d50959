//! Autoregressive generation: the decoding loop and its report.
//!
//! The loop is generic over [`Decoder`] so the unsplit model ([`ModelDecoder`]) and the split
//! pipeline run in one process (`split::LocalSplitDecoder`) produce tokens the same way.

use candle_core::Tensor;
use serde::Serialize;

use crate::decode::sampling::{Sampler, SamplingParams};
use crate::decode::timing::{check_prompt, TokenClock};
use crate::error::Result;
use crate::model::{Model, StackCache};

/// Something that turns token ids into next-token logits, keeping its own context.
pub trait Decoder {
    /// Feeds `ids` at the next positions; returns the logits after the last one, `(vocab,)`.
    fn feed(&mut self, ids: &[u32]) -> Result<Tensor>;
    /// Positions in the context so far.
    fn position(&self) -> usize;
    /// Largest context the decoder supports.
    fn max_positions(&self) -> usize;
    /// Forgets the context.
    fn reset(&mut self);
}

/// The unsplit model with its cache.
#[derive(Debug)]
pub struct ModelDecoder<'a> {
    model: &'a Model,
    cache: StackCache,
}

impl<'a> ModelDecoder<'a> {
    pub fn new(model: &'a Model) -> Self {
        Self { model, cache: model.new_cache() }
    }
}

impl Decoder for ModelDecoder<'_> {
    fn feed(&mut self, ids: &[u32]) -> Result<Tensor> {
        self.model.forward_last(ids, &mut self.cache)
    }
    fn position(&self) -> usize {
        self.cache.len()
    }
    fn max_positions(&self) -> usize {
        self.model.layers.max_positions()
    }
    fn reset(&mut self) {
        self.cache.clear();
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// An end-of-sequence token was generated.
    Eos,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The context is full.
    ContextFull,
    /// The caller stopped it (its token callback returned [`Flow::Stop`]: a stop sequence, or
    /// the client went away).
    Stopped,
}

/// What a token callback wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on generating.
    Continue,
    /// End the generation after this token ([`StopReason::Stopped`]).
    Stop,
}

/// What one generation did and how long it took.
#[derive(Debug, Clone, Serialize)]
pub struct GenerationReport {
    /// Generated ids (the EOS token, if any, included).
    pub token_ids: Vec<u32>,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Prompt submitted → first generated token known.
    pub ttft_ms: f64,
    /// Mean time between consecutive generated tokens.
    pub tbt_ms: f64,
    /// Decode throughput: generated tokens after the first per second (1000 / tbt_ms).
    pub tokens_per_s: f64,
    /// Prompt tokens per second of prefill (prompt_tokens / ttft).
    pub prefill_tokens_per_s: f64,
    pub stop_reason: StopReason,
}

/// Generates up to `max_tokens` after `prompt`, calling `on_token` with each id as it comes.
pub fn generate<D: Decoder>(
    decoder: &mut D,
    prompt: &[u32],
    max_tokens: usize,
    sampling: &SamplingParams,
    eos_token_ids: &[u32],
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<GenerationReport> {
    sampling.validate()?;
    let limit = decoder.max_positions();
    check_prompt(prompt, decoder.position(), limit)?;
    let mut sampler = Sampler::new(*sampling)?;
    let mut tokens = Vec::with_capacity(max_tokens);
    let mut clock = TokenClock::start();
    let mut stop_reason = StopReason::MaxTokens;
    let mut logits = if max_tokens > 0 { Some(decoder.feed(prompt)?) } else { None };
    while let Some(l) = logits.take() {
        let next = sampler.select(&l)?;
        clock.token();
        tokens.push(next);
        on_token(next)?;
        if eos_token_ids.contains(&next) {
            stop_reason = StopReason::Eos;
        } else if tokens.len() >= max_tokens {
            stop_reason = StopReason::MaxTokens;
        } else if decoder.position() + 1 >= limit {
            stop_reason = StopReason::ContextFull;
        } else {
            logits = Some(decoder.feed(&[next])?);
        }
    }
    let (ttft_ms, tbt_ms) = (clock.ttft_ms(), clock.tbt_ms());
    Ok(GenerationReport {
        prompt_tokens: prompt.len(),
        generated_tokens: tokens.len(),
        token_ids: tokens,
        ttft_ms,
        tbt_ms,
        tokens_per_s: if tbt_ms > 0.0 { 1e3 / tbt_ms } else { 0.0 },
        prefill_tokens_per_s: if ttft_ms > 0.0 { prompt.len() as f64 * 1e3 / ttft_ms } else { 0.0 },
        stop_reason,
    })
}
