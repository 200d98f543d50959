//! The teacher: the model itself, run as the split runs it. One pass over a sequence gives the
//! student's input (the input submodel's states), the middle layers' output and the model's
//! next-token distribution (its top-k); self-distillation generates the model's own replies
//! and records the same on the way.


use candle_core::{Device, IndexOp, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::io::dataset::Conversation;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::split::pipeline::{PipelineStates, SplitPipeline};
use crate::split::{CloudBundle, DeviceBundle};
use crate::io::tokenizer::Message;

use crate::train::config::TrainConfig;

/// One tokenised training sequence with the teacher's view of it.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The sequence's token ids (`len`).
    pub ids: Vec<u32>,
    /// Input submodel hidden states `(len, hidden)`.
    pub input_hidden: Tensor,
    /// Middle layers' output `(len, hidden)` (conditioned adapters and the feature loss).
    pub middle_hidden: Option<Tensor>,
    /// Teacher top-k ids `(len, k)` u32 and probabilities `(len, k)` f32 (renormalised over the
    /// top-k, sorted by decreasing probability): the model's next-token distribution at each
    /// position.
    pub top_ids: Tensor,
    pub top_probs: Tensor,
    /// The output submodel's keys and values over `middle_hidden`, `(1, kv_heads, len, head_dim)`
    /// per layer: computed once per run for adapters that draft behind verified positions.
    pub output_kv: Option<Vec<(Tensor, Tensor)>>,
}

/// Everything training needs that does not change during a run.
pub struct Trainer<'a> {
    pub model: &'a Model,
    pub device: &'a DeviceBundle,
    pub cloud: &'a CloudBundle,
    pub config: TrainConfig,
}

/// Renders a conversation's first exchange with the chat template and tokenises it.
pub(crate) fn sequence_ids(device: &DeviceBundle, c: &Conversation, seq_len: usize) -> Result<Option<Vec<u32>>> {
    let Some(prompt) = c.first_prompt() else { return Ok(None) };
    let tok = &device.tokenizer;
    let mut messages = vec![Message::user(prompt)];
    let reply = c.turns.iter().skip_while(|t| t.role != "user").find(|t| t.role == "assistant");
    let text = match (&tok.chat_template, reply) {
        (Some(t), Some(r)) => {
            messages.push(Message { role: "assistant".into(), content: r.text.clone() });
            t.render(&messages, false)?
        }
        (Some(t), None) => t.render(&messages, true)?,
        (None, Some(r)) => format!("{prompt}\n{}", r.text),
        (None, None) => prompt.to_string(),
    };
    let mut ids = tok.encode(&text)?;
    ids.truncate(seq_len);
    Ok((ids.len() >= 8).then_some(ids))
}

/// Seeded split of conversations (with a prompt) into (train, held-out).
pub fn split_conversations(mut conversations: Vec<Conversation>, held_out: usize, max_train: usize, seed: u64) -> (Vec<Conversation>, Vec<Conversation>) {
    conversations.retain(|c| c.first_prompt().is_some_and(|p| !p.trim().is_empty()));
    conversations.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed));
    let held = conversations.split_off(conversations.len().saturating_sub(held_out));
    conversations.truncate(max_train);
    (conversations, held)
}

/// A run's (train, held-out) conversations: [`split_conversations`] with the run's seed and
/// held-out count, then its training conversations after the first `skip_conversations`, at most
/// `max_conversations` of them. The held-out ones do not depend on the skip.
pub fn run_conversations(conversations: Vec<Conversation>, cfg: &crate::train::TrainConfig) -> (Vec<Conversation>, Vec<Conversation>) {
    let (mut train, held) = split_conversations(conversations, cfg.held_out, cfg.skip_conversations.saturating_add(cfg.max_conversations), cfg.seed);
    train.drain(..cfg.skip_conversations.min(train.len()));
    (train, held)
}

impl<'a> Trainer<'a> {
    /// The teacher's pass over one sequence.
    pub fn teach(&self, ids: &[u32]) -> Result<Sample> {
        let x = self.model.embedder.embed_ids(ids)?;
        let PipelineStates { input: h_in, middle: h_mid, output: out } = self.pipeline()?.forward(&x)?;
        let k = self.top_k();
        let (top_ids, top_probs) = top_k_softmax(&self.device.head.forward(&out)?.squeeze(0)?, k)?;
        let n = ids.len();
        Ok(Sample {
            ids: ids.to_vec(),
            input_hidden: h_in.squeeze(0)?,
            middle_hidden: self.config.keeps_middle().then(|| h_mid.squeeze(0)).transpose()?,
            top_ids: Tensor::from_vec(top_ids, (n, k), &Device::Cpu)?,
            top_probs: Tensor::from_vec(top_probs, (n, k), &Device::Cpu)?,
            output_kv: None,
        })
    }

    /// The teacher's pipeline: the model's layers as the split runs them (input submodel,
    /// middle layers, output submodel), over fresh caches.
    pub(crate) fn pipeline(&self) -> Result<SplitPipeline<'a>> {
        SplitPipeline::new(self.device, self.cloud)
    }

    /// Teacher tokens kept per position: `--teacher-top-k`, at most the vocabulary.
    pub(crate) fn top_k(&self) -> usize {
        self.config.teacher_top_k.min(self.device.manifest.config.vocab_size)
    }

    /// Self-distillation data: the model's own greedy replies to `prompts`, up to `tokens` tokens
    /// each (cut after an end-of-sequence token), with the teacher's view of every position of
    /// prompt + reply. Prompts of equal length run together, `batch` at a time, and the teacher's
    /// outputs are recorded while the reply is generated, so no second pass is needed. Greedy
    /// ties aside, each reply is what `hat generate` says. Returns one sample per prompt, in
    /// order; the last reply token is a target only (it is never fed back).
    pub fn self_distill(&self, prompts: &[Vec<u32>], tokens: usize, batch: usize, progress: &indicatif::ProgressBar) -> Result<Vec<Sample>> {
        let mut by_len: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
        for (i, p) in prompts.iter().enumerate() {
            if p.is_empty() {
                return Err(Error::invalid("self-distillation: empty prompt"));
            }
            by_len.entry(p.len()).or_default().push(i);
        }
        progress.set_length((prompts.len() * tokens) as u64);
        progress.set_position(0);
        progress.set_message("self-distill");
        let mut out: Vec<Option<Sample>> = vec![None; prompts.len()];
        for group in by_len.values() {
            for chunk in group.chunks(batch.max(1)) {
                let rows: Vec<&[u32]> = chunk.iter().map(|&i| prompts[i].as_slice()).collect();
                for (&i, s) in chunk.iter().zip(self.reply_batch(&rows, tokens, progress)?) {
                    out[i] = Some(s);
                }
            }
        }
        out.into_iter().map(|s| s.ok_or_else(|| Error::invalid("internal: a prompt was not distilled"))).collect()
    }

    /// [`Self::self_distill`] for prompts of one length.
    pub(crate) fn reply_batch(&self, prompts: &[&[u32]], tokens: usize, progress: &indicatif::ProgressBar) -> Result<Vec<Sample>> {
        let (b, len) = (prompts.len(), prompts[0].len());
        let k = self.top_k();
        let eos = &self.device.tokenizer.eos_token_ids;
        let head = &self.device.head;
        let mut pipeline = self.pipeline()?;
        // Per row: ids fed, and per block of fed positions (h_in, middle, top ids, top probs).
        let mut ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
        let mut parts: Vec<Vec<(Tensor, Option<Tensor>, Vec<u32>, Vec<f32>)>> = vec![vec![]; b];
        let mut done = vec![false; b];
        let mut x = self.model.embedder.forward(&Tensor::new(prompts.iter().flat_map(|p| p.iter().copied()).collect::<Vec<u32>>(), &Device::Cpu)?.reshape((b, len))?)?;
        for step in 0..tokens {
            let seq = x.dim(1)?;
            let PipelineStates { input: h_in, middle: h_mid, output: h_out } = pipeline.forward(&x)?;
            let mut next = vec![0u32; b];
            // Decode steps: the head on all rows at once, (b, vocab); the prompt block: one row at
            // a time, (seq, vocab) each.
            let decoded = if seq == 1 { Some(top_k_softmax(&head.forward(&h_out)?.squeeze(1)?, k)?) } else { None };
            for r in 0..b {
                if done[r] {
                    next[r] = eos.first().copied().unwrap_or(0);
                    continue;
                }
                let (top_ids, top_probs) = match &decoded {
                    Some((ids, probs)) => (ids[r * k..(r + 1) * k].to_vec(), probs[r * k..(r + 1) * k].to_vec()),
                    None => top_k_softmax(&head.forward(&h_out.i(r)?.unsqueeze(0)?)?.squeeze(0)?, k)?,
                };
                next[r] = top_ids[(seq - 1) * k];
                let middle_rows = self.config.keeps_middle().then(|| h_mid.i(r)).transpose()?;
                parts[r].push((h_in.i(r)?, middle_rows, top_ids, top_probs));
                if eos.contains(&next[r]) || step + 1 == tokens {
                    done[r] = true;
                } else {
                    ids[r].push(next[r]);
                }
            }
            progress.inc(b as u64);
            if done.iter().all(|&d| d) {
                break;
            }
            x = self.model.embedder.forward(&Tensor::new(next, &Device::Cpu)?.reshape((b, 1))?)?;
        }
        let dev = &Device::Cpu;
        ids.into_iter()
            .zip(parts)
            .map(|(ids, parts)| {
                let n = ids.len();
                let cat = |v: Vec<Tensor>| -> Result<Tensor> { Ok(Tensor::cat(&v, 0)?) };
                let middle = if self.config.keeps_middle() { Some(cat(parts.iter().filter_map(|p| p.1.clone()).collect())?) } else { None };
                let top: Vec<u32> = parts.iter().flat_map(|p| p.2.iter().copied()).collect();
                let probs: Vec<f32> = parts.iter().flat_map(|p| p.3.iter().copied()).collect();
                Ok(Sample {
                    input_hidden: cat(parts.iter().map(|p| p.0.clone()).collect())?,
                    middle_hidden: middle,
                    top_ids: Tensor::from_vec(top, (n, k), dev)?,
                    top_probs: Tensor::from_vec(probs, (n, k), dev)?,
                    output_kv: None,
                    ids,
                })
            })
            .collect()
    }

}

/// The top `k` entries of each row of `logits`, `(rows, vocab)`, with their softmax renormalised
/// over those `k`, sorted by decreasing probability: flat `(rows * k)` ids and probabilities.
pub(crate) fn top_k_softmax(logits: &Tensor, k: usize) -> Result<(Vec<u32>, Vec<f32>)> {
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    let (mut ids, mut probs) = (Vec::with_capacity(rows.len() * k), Vec::with_capacity(rows.len() * k));
    for row in &rows {
        if row.len() < k || k == 0 {
            return Err(Error::invalid(format!("internal: top-{k} of a row of {} logits", row.len())));
        }
        let mut order: Vec<u32> = (0..row.len() as u32).collect();
        order.select_nth_unstable_by(k - 1, |&a, &b| row[b as usize].total_cmp(&row[a as usize]));
        order.truncate(k);
        order.sort_unstable_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        let max = row[order[0] as usize];
        let e: Vec<f32> = order.iter().map(|&i| (row[i as usize] - max).exp()).collect();
        let z: f32 = e.iter().sum();
        ids.extend(&order);
        probs.extend(e.iter().map(|x| x / z));
    }
    Ok((ids, probs))
}

