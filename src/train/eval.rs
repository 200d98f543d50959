//! Held-out evaluation: top-1 agreement with the model (teacher-forced) and tokens per round
//! with the real decoding loop.


use candle_core::{IndexOp, D};

use crate::adapter::Adapter;
use crate::io::dataset::Conversation;
use crate::edge::{EdgeOptions, Mode};
use crate::error::Result;
use crate::decode::{DraftStats, SamplingParams};
use crate::net::LocalMiddle;
use crate::model::Model;
use crate::net::protocol::WireDtype;
use crate::split::{CloudBundle, DeviceBundle};

use crate::train::config::TrainConfig;
use crate::train::report::Evaluation;
use crate::train::teacher::{Sample, Trainer, sequence_ids};

/// The held-out side of a run: the teacher's view of the held-out conversations (for top-1
/// agreement) and the first `eval_prompts` of their prompts (for acceptance).
pub struct HeldOut {
    pub(crate) samples: Vec<Sample>,
    pub(crate) prompts: Vec<Vec<u32>>,
}

impl HeldOut {
    pub fn new(t: &Trainer, conversations: &[Conversation]) -> Result<Self> {
        let cfg = &t.config;
        let mut samples = Vec::new();
        for c in conversations {
            if let Some(ids) = sequence_ids(t.device, c, cfg.seq_len)? {
                samples.push(t.teach(&ids)?);
            }
        }
        let prompts = conversations
            .iter()
            .filter_map(|c| c.first_prompt())
            .take(cfg.eval_prompts)
            .map(|p| t.device.tokenizer.encode_prompt_within(p, true, cfg.seq_len))
            .collect::<Result<_>>()?;
        Ok(Self { samples, prompts })
    }
}

/// `hat train-adapter --evaluate`: the held-out evaluation of `adapter` on the `held_out`
/// conversations with `config`'s evaluation settings. How the adapter is conditioned and what it
/// drafts behind come from the adapter, whatever `config` says.
pub fn evaluate_adapter(model: &Model, device: &DeviceBundle, cloud: &CloudBundle, config: TrainConfig, held_out: &[Conversation], adapter: &Adapter) -> Result<Evaluation> {
    let config = TrainConfig { conditioned: adapter.is_conditioned(), draft_context: adapter.draft_context, ..config };
    let trainer = Trainer { model, device, cloud, config };
    let held = HeldOut::new(&trainer, held_out)?;
    evaluate(&trainer, adapter, &held, 0, 0.0)
}

/// Evaluates `adapter` on held-out data: top-1 agreement with the model (teacher-forced) and
/// mean accepted tokens per round at γ = `eval_draft_len`, greedy (the real decoding loop).
pub fn evaluate(t: &Trainer, adapter: &Adapter, held: &HeldOut, step: usize, elapsed: f64) -> Result<Evaluation> {
    let (mut agree, mut total) = (0usize, 0usize);
    for s in &held.samples {
        let x = s.input_hidden.unsqueeze(0)?;
        let middle = s.middle_hidden.as_ref().map(|m| m.unsqueeze(0)).transpose()?;
        let (y, _) = adapter.draft_hidden(&t.device.output, &x, middle.as_ref())?;
        let logits = t.device.head.forward(&y)?.squeeze(0)?;
        let student: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        let teacher: Vec<u32> = s.top_ids.i((.., 0))?.to_vec1()?;
        agree += student.iter().zip(&teacher).filter(|(a, b)| a == b).count();
        total += student.len();
    }
    let opts = EdgeOptions {
        fallback: Default::default(),
        mode: Mode::Hat,
        draft_len: t.config.eval_draft_len,
        chunking: crate::edge::Chunking::Fixed(0),
        sampling: SamplingParams::greedy(),
        max_tokens: t.config.eval_tokens,
        max_context: usize::MAX,
        // The adapter itself: every draft of γ scored by the full head in f32, none ahead.
        draft: crate::edge::DraftOptions::plain(),
    };
    let mut stats = DraftStats::new(opts.draft_len);
    for ids in &held.prompts {
        let mut link = LocalMiddle::new(&t.cloud.middle, WireDtype::F16);
        let r = crate::edge::generate(t.device, adapter, &mut link, ids, &opts, |_| Ok(crate::decode::Flow::Continue))?;
        stats.add(&r.draft_stats());
    }
    Ok(Evaluation {
        step,
        elapsed_s: elapsed,
        top1_agreement: if total > 0 { agree as f64 / total as f64 } else { 0.0 },
        mean_accepted: stats.mean_accepted(),
        acceptance_rate: stats.acceptance_rate(),
        acceptance_by_position: stats.acceptance_by_position(),
    })
}

