//! Autoregressive generation: sampling settings, the decoding loop and its timing report.
//!
//! The loop is generic over [`Decoder`] so the unsplit model ([`ModelDecoder`]) and the split
//! pipeline run in one process ([`LocalSplitDecoder`]) produce tokens the same way.

use std::time::Instant;

use candle_core::Tensor;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::{Model, StackCache};
use crate::split::{CloudBundle, DeviceBundle};

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

/// Device input → cloud middle → device output, in one process (no network): the reference for
/// what a split must compute.
#[derive(Debug)]
pub struct LocalSplitDecoder<'a> {
    device: &'a DeviceBundle,
    cloud: &'a CloudBundle,
    caches: [StackCache; 3],
}

impl<'a> LocalSplitDecoder<'a> {
    pub fn new(device: &'a DeviceBundle, cloud: &'a CloudBundle) -> Result<Self> {
        if device.manifest.split_id != cloud.manifest.split_id {
            return Err(Error::invalid(format!(
                "device bundle (split {}) and cloud bundle (split {}) come from different splits",
                device.manifest.split_id, cloud.manifest.split_id
            )));
        }
        let caches = [device.input.new_cache(), cloud.middle.new_cache(), device.output.new_cache()];
        Ok(Self { device, cloud, caches })
    }

    /// Logits at every fed position, `(seq, vocab)`.
    pub fn feed_all(&mut self, ids: &[u32]) -> Result<Tensor> {
        let pos = self.position();
        let [ci, cm, co] = &mut self.caches;
        let x = self.device.embedder.embed_ids(ids)?;
        let x = self.device.input.forward(&x, pos, ci)?;
        let x = self.cloud.middle.forward(&x, pos, cm)?;
        let x = self.device.output.forward(&x, pos, co)?;
        Ok(self.device.head.forward(&x)?.squeeze(0)?)
    }
}

impl Decoder for LocalSplitDecoder<'_> {
    fn feed(&mut self, ids: &[u32]) -> Result<Tensor> {
        let logits = self.feed_all(ids)?;
        Ok(logits.get(logits.dim(0)? - 1)?)
    }
    fn position(&self) -> usize {
        self.caches[0].len()
    }
    fn max_positions(&self) -> usize {
        self.device.input.max_positions()
    }
    fn reset(&mut self) {
        self.caches.iter_mut().for_each(StackCache::clear);
    }
}

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
    if prompt.is_empty() {
        return Err(Error::invalid("the prompt is empty (no tokens to start from)"));
    }
    let limit = decoder.max_positions();
    if decoder.position() + prompt.len() >= limit {
        return Err(Error::ContextTooLong { needed: decoder.position() + prompt.len() + 1, limit });
    }
    let mut sampler = crate::sampling::Sampler::new(*sampling)?;
    let mut tokens = Vec::with_capacity(max_tokens);
    let start = Instant::now();
    let mut first_at = None;
    let mut last_at = start;
    let mut stop_reason = StopReason::MaxTokens;
    let mut logits = if max_tokens > 0 { Some(decoder.feed(prompt)?) } else { None };
    while let Some(l) = logits.take() {
        let next = sampler.select(&l)?;
        last_at = Instant::now();
        first_at.get_or_insert(last_at);
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
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    let first_at = first_at.unwrap_or(start);
    let ttft_ms = ms(first_at - start);
    let tbt_ms = if tokens.len() > 1 { ms(last_at - first_at) / (tokens.len() - 1) as f64 } else { 0.0 };
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
