//! The self-distillation samples of a run, and their cache file (safetensors, keyed by what
//! they were made from).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::io::dataset::Conversation;
use crate::error::{Error, Result};

use crate::train::teacher::{Sample, Trainer};

/// Prompts below this many tokens are not cut to a shorter length bucket.
pub(crate) const PROMPT_BUCKET: usize = 16;

/// The self-distillation samples of a run: the first prompts of `train`, fitted into
/// `seq_len - self_distill_tokens + 1` tokens and cut down to a multiple of [`PROMPT_BUCKET`] (by
/// dropping the end of the prompt's text, never the chat template) so that prompts batch
/// together. Loaded from `cache` when it holds this exact data, else generated and saved there.
pub(crate) fn distilled_samples(t: &Trainer, train: &[Conversation], cache: Option<&Path>, pb: &indicatif::ProgressBar) -> Result<Vec<Sample>> {
    let cfg = &t.config;
    let tok = &t.device.tokenizer;
    let cap = (cfg.seq_len + 1).saturating_sub(cfg.self_distill_tokens);
    let mut prompts = Vec::new();
    for p in train.iter().filter_map(|c| c.first_prompt()) {
        let n = tok.encode_prompt(p, true)?.len().min(cap);
        let bucket = n / PROMPT_BUCKET * PROMPT_BUCKET;
        let ids = match tok.encode_prompt_within(p, true, bucket) {
            Ok(ids) => ids,
            Err(_) => tok.encode_prompt_within(p, true, n)?,
        };
        if ids.len() >= 8 {
            prompts.push(ids);
        }
    }
    if prompts.is_empty() {
        return Err(Error::invalid(format!(
            "no training prompt fits in --seq-len {} with {} self-distilled tokens",
            cfg.seq_len, cfg.self_distill_tokens
        )));
    }
    let mut digest = format!("{}|{}|{}|{}|{}", t.device.manifest.split_id, cfg.self_distill_tokens, t.top_k(), cfg.keeps_middle(), cfg.self_distill_batch);
    for p in &prompts {
        digest.push_str(&format!("|{p:?}"));
    }
    let key = crate::util::digest::sha256(digest.as_bytes());
    if let Some(path) = cache {
        if let Some(samples) = load_samples(path, &key)? {
            crate::util::progress::say(pb, format!("self-distill: {} sequences loaded from {}", samples.len(), path.display()));
            return Ok(samples);
        }
    }
    let samples = t.self_distill(&prompts, cfg.self_distill_tokens, cfg.self_distill_batch, pb)?;
    if let Some(path) = cache {
        save_samples(path, &key, &samples)?;
    }
    Ok(samples)
}

/// Writes samples as one safetensors file: each field concatenated over all sequences, their
/// `lengths`, and `key` (what they were made from).
pub(crate) fn save_samples(path: &Path, key: &str, samples: &[Sample]) -> Result<()> {
    let dev = &Device::Cpu;
    let cat = |f: &dyn Fn(&Sample) -> Tensor| -> Result<Tensor> { Ok(Tensor::cat(&samples.iter().map(f).collect::<Vec<_>>(), 0)?) };
    let mut t = HashMap::new();
    t.insert("key".to_string(), Tensor::new(key.as_bytes(), dev)?);
    t.insert("lengths".to_string(), Tensor::new(samples.iter().map(|s| s.ids.len() as u32).collect::<Vec<_>>(), dev)?);
    t.insert("ids".to_string(), Tensor::new(samples.iter().flat_map(|s| s.ids.iter().copied()).collect::<Vec<_>>(), dev)?);
    t.insert("input_hidden".to_string(), cat(&|s| s.input_hidden.clone())?);
    t.insert("top_ids".to_string(), cat(&|s| s.top_ids.clone())?);
    t.insert("top_probs".to_string(), cat(&|s| s.top_probs.clone())?);
    let middle: Option<Vec<Tensor>> = samples.iter().map(|s| s.middle_hidden.clone()).collect();
    if let Some(m) = middle {
        t.insert("middle_hidden".to_string(), Tensor::cat(&m, 0)?);
    }
    let tmp = path.with_extension("partial");
    candle_core::safetensors::save(&t, &tmp)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Reads [`save_samples`]'s file; `None` when it is missing or holds other data than `key`.
pub(crate) fn load_samples(path: &Path, key: &str) -> Result<Option<Vec<Sample>>> {
    if !path.exists() {
        return Ok(None);
    }
    let t = candle_core::safetensors::load(path, &Device::Cpu)?;
    let bad = |what: &str| Error::bad_file(path, format!("self-distillation cache: {what}"));
    let get = |name: &str| t.get(name).ok_or_else(|| bad(&format!("no {name}")));
    if get("key")?.to_vec1::<u8>()? != key.as_bytes() {
        return Ok(None);
    }
    let lengths: Vec<u32> = get("lengths")?.to_vec1()?;
    let ids: Vec<u32> = get("ids")?.to_vec1()?;
    let (input, top_ids, top_probs) = (get("input_hidden")?, get("top_ids")?, get("top_probs")?);
    let middle = t.get("middle_hidden");
    let total: usize = lengths.iter().map(|&l| l as usize).sum();
    if ids.len() != total || input.dim(0)? != total || top_ids.dim(0)? != total || top_probs.dim(0)? != total || middle.is_some_and(|m| m.dims()[0] != total) {
        return Err(bad("lengths do not add up"));
    }
    let mut start = 0;
    let mut samples = Vec::with_capacity(lengths.len());
    for &l in &lengths {
        let l = l as usize;
        samples.push(Sample {
            ids: ids[start..start + l].to_vec(),
            input_hidden: input.narrow(0, start, l)?,
            middle_hidden: middle.map(|m| m.narrow(0, start, l)).transpose()?,
            top_ids: top_ids.narrow(0, start, l)?,
            top_probs: top_probs.narrow(0, start, l)?,
            output_kv: None,
        });
        start += l;
    }
    Ok(Some(samples))
}

