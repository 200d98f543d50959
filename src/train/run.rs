//! A training run: the teacher once, then steps over epoch batches, evaluations, checkpoints,
//! and the adapter and its report at the end.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rand::SeedableRng;

use crate::adapter::{DraftContext, StoredAdapter};
use crate::train::config::AdapterInit;
use crate::io::dataset::Conversation;
use crate::decode::timing::ms;
use crate::error::{Error, Result};
use crate::model::Ops;

use crate::train::report::{CurvePoint, StepTotals, TrainReport};
use crate::train::optim::{AdamW, clip_factor, scale_grads};
use crate::train::teacher::{Sample, Trainer, sequence_ids};
use crate::train::weights::AdapterWeights;
use crate::train::checkpoint::{CheckpointState, load_checkpoint, save_checkpoint};
use crate::train::eval::{HeldOut, evaluate};
use crate::train::batches::epoch_batches;
use crate::train::samples::distilled_samples;

/// Inputs of a training run.
pub struct TrainRun<'a> {
    pub trainer: Trainer<'a>,
    /// Full model weights (for the initial adapter).
    pub weights: candle_nn::VarBuilder<'static>,
    pub train: Vec<Conversation>,
    pub held_out: Vec<Conversation>,
    /// Where self-distilled samples are kept between runs (`--resume` reuses them); `None`: not kept.
    pub self_distill_cache: Option<PathBuf>,
    pub out: PathBuf,
    pub resume: bool,
    /// Set (e.g. by Ctrl-C) to checkpoint and stop.
    pub stop: Arc<AtomicBool>,
    /// Stop (with a checkpoint, as if interrupted) once this many steps are done.
    pub stop_at_step: Option<usize>,
    pub progress: indicatif::ProgressBar,
}

/// The draft vocabulary of training sequences `ids`: every token seen, most frequent first,
/// `size` of them scored by default.
pub fn draft_vocab<'a>(ids: impl IntoIterator<Item = &'a [u32]>, size: usize, source: &str) -> crate::adapter::DraftVocab {
    let ids = crate::adapter::head::by_frequency(ids);
    crate::adapter::DraftVocab { size: size.min(ids.len()), ids, source: source.to_string() }
}

/// The draft vocabulary of conversations `train` as training tokenises them (at most
/// `seq_len` tokens each; the model's own replies are not generated here).
pub fn conversations_vocab(device: &crate::split::DeviceBundle, train: &[Conversation], seq_len: usize, size: usize) -> Result<crate::adapter::DraftVocab> {
    let ids = train.iter().map(|c| crate::train::teacher::sequence_ids(device, c, seq_len)).collect::<Result<Vec<_>>>()?;
    let ids: Vec<Vec<u32>> = ids.into_iter().flatten().collect();
    if ids.is_empty() {
        return Err(Error::invalid("no usable conversation to count tokens in"));
    }
    Ok(draft_vocab(ids.iter().map(Vec::as_slice), size, &format!("{} training conversations", ids.len())))
}

/// Trains, checkpointing every `checkpoint_every` steps and when stopped; writes the adapter and
/// `OUT.report.json`.
pub fn train(run: TrainRun) -> Result<TrainReport> {
    let t = &run.trainer;
    let cfg = &t.config;
    cfg.validate()?;
    let manifest = &t.device.manifest;
    let mcfg = &manifest.config;
    // The student first: a warm start is checked before the long teacher pass (a resumed run
    // takes its weights from the checkpoint).
    let weights = AdapterWeights::init(&run.weights, mcfg, manifest.plan.middle_range(), cfg.adapter_layers, &cfg.init, cfg.conditioned)?.with_draft_context(cfg.draft_context);
    if let (AdapterInit::Adapter(path), false) = (&cfg.init, run.resume) {
        weights.warm_start(&StoredAdapter::read(path, manifest, &candle_core::Device::Cpu)?, path)?;
        crate::util::progress::say(&run.progress, format!("starting from the weights of {}", path.display()));
    }

    // Teacher pass (once).
    let started = Instant::now();
    let pb = &run.progress;
    let mut samples: Vec<Sample> = if cfg.self_distill_tokens > 0 {
        distilled_samples(t, &run.train, run.self_distill_cache.as_deref(), pb)?
    } else {
        let ids = run.train.iter().map(|c| sequence_ids(t.device, c, cfg.seq_len)).collect::<Result<Vec<_>>>()?;
        let ids: Vec<Vec<u32>> = ids.into_iter().flatten().collect();
        if ids.is_empty() {
            return Err(Error::invalid("the data set has no usable training conversation (a user prompt of at least 8 tokens)"));
        }
        pb.set_length(ids.len() as u64);
        pb.set_position(0);
        pb.set_message("teacher");
        ids.iter().map(|ids| t.teach(ids).inspect(|_| pb.inc(1))).collect::<Result<_>>()?
    };
    if cfg.draft_context == DraftContext::Verified {
        // Drafts attend to the output submodel's states over the true middle outputs: the same
        // every step, so computed once here.
        pb.set_length(samples.len() as u64);
        pb.set_position(0);
        pb.set_message("verified context");
        for s in &mut samples {
            s.output_kv = Some(t.device.output.keys_values(&s.middle()?.unsqueeze(0)?)?);
            pb.inc(1);
        }
    }
    let held = HeldOut::new(t, &run.held_out)?;
    let teacher_seconds = started.elapsed().as_secs_f64();
    let train_tokens: usize = samples.iter().map(|s| s.ids.len()).sum();
    crate::util::progress::say(
        pb,
        format!("teacher: {} training sequences ({train_tokens} tokens) and {} held-out in {teacher_seconds:.0} s", samples.len(), held.samples.len()),
    );
    // Optimiser.
    let eval_at = |step: usize, elapsed: f64| evaluate(t, &weights.adapter(manifest, t.device.rope.clone(), Ops::Fused)?, &held, step, elapsed);
    let mut opt = AdamW::new(weights.vars.iter().map(|(n, v)| (n.clone(), v.clone())).collect())?;
    let mut state = CheckpointState { config: cfg.clone(), split_id: manifest.split_id.clone(), step: 0, elapsed_s: 0.0, curve: vec![], evals: vec![], timed: StepTotals::default() };
    if run.resume {
        state = load_checkpoint(&run.out, &weights, &mut opt, cfg, &manifest.split_id)?;
        state.config = cfg.clone();
    }
    // `state.elapsed_s` counts training steps only: evaluations and checkpoints are not part of
    // the time budget (or of the learning-rate schedule it paces).
    let per_epoch = samples.len().div_ceil(cfg.batch_size);
    let lengths: Vec<usize> = samples.iter().map(|s| s.ids.len()).collect();
    let mut batches: Option<(usize, Vec<Vec<usize>>)> = None;
    pb.set_length(cfg.steps as u64);
    pb.set_position(state.step as u64);
    pb.set_message("training");
    let mut stopped_by = "steps".to_string();
    if !run.resume {
        state.evals.push(eval_at(0, 0.0)?);
    }
    while state.step < cfg.steps {
        if run.stop.load(Ordering::Relaxed) || run.stop_at_step.is_some_and(|s| state.step >= s) {
            stopped_by = "interrupted".into();
            break;
        }
        if cfg.time_budget_s.is_some_and(|b| state.elapsed_s >= b) {
            stopped_by = "time budget".into();
            break;
        }
        let step_started = Instant::now();
        let (epoch, slot) = (state.step / per_epoch, state.step % per_epoch);
        if batches.as_ref().is_none_or(|(e, _)| *e != epoch) {
            batches = Some((epoch, epoch_batches(&lengths, cfg.batch_size, cfg.seed, epoch)));
        }
        let batch: Vec<&Sample> = batches.as_ref().map_or(&[][..], |(_, b)| b[slot].as_slice()).iter().map(|&i| &samples[i]).collect();

        let lr = cfg.lr_at(state.step, state.elapsed_s);
        let t0 = Instant::now();
        let mut neg_rng = rand::rngs::StdRng::seed_from_u64(cfg.seed.wrapping_add(0x9e37).wrapping_add(state.step as u64));
        let negatives: Vec<u32> = rand::seq::index::sample(&mut neg_rng, mcfg.vocab_size, cfg.negatives.min(mcfg.vocab_size)).into_iter().map(|i| i as u32).collect();
        let adapter = weights.adapter(manifest, t.device.rope.clone(), Ops::Differentiable)?;
        let (loss, positions) = t.batch_loss(&adapter, &batch, &negatives, cfg.seed.wrapping_add(0x5bd1).wrapping_mul(1_000_003).wrapping_add(state.step as u64))?;
        let t1 = Instant::now();
        let mut grads = loss.backward()?;
        let t2 = Instant::now();
        let f = clip_factor(&grads, &weights.vars, cfg.clip)?;
        scale_grads(&mut grads, &weights.vars, f)?;
        opt.update(&grads, lr, cfg.weight_decay)?;
        let t3 = Instant::now();
        let loss_v = loss.to_scalar::<f32>()? as f64;
        if !loss_v.is_finite() {
            return Err(Error::invalid(format!("training diverged at step {} (loss {loss_v}); try a lower --lr", state.step)));
        }
        let timed = &mut state.timed;
        timed.student_forward_ms += ms(t1 - t0);
        timed.backward_ms += ms(t2 - t1);
        timed.optimizer_ms += ms(t3 - t2);
        timed.steps += 1;
        timed.tokens += positions;
        state.step += 1;
        state.elapsed_s += step_started.elapsed().as_secs_f64();
        state.curve.push(CurvePoint { step: state.step, elapsed_s: state.elapsed_s, loss: loss_v, lr, tokens: positions });
        pb.set_position(state.step as u64);
        pb.set_message(format!("loss {loss_v:.3} lr {lr:.1e} {:.0} tok/s", state.timed.means().tokens_per_s));
        if state.step % cfg.eval_every == 0 && state.step < cfg.steps {
            let e = eval_at(state.step, state.elapsed_s)?;
            let by_position: Vec<String> = e.acceptance_by_position.iter().map(|a| format!("{:.0}%", a * 100.0)).collect();
            crate::util::progress::say(
                pb,
                format!("step {}: top-1 agreement {:.1}%, mean accepted {:.2} tokens/round (drafts accepted by position: {})", e.step, e.top1_agreement * 100.0, e.mean_accepted, by_position.join(" ")),
            );
            state.evals.push(e);
        }
        if state.step % cfg.checkpoint_every == 0 {
            let recent = &state.curve[state.curve.len().saturating_sub(cfg.checkpoint_every)..];
            let mean = recent.iter().map(|p| p.loss).sum::<f64>() / recent.len().max(1) as f64;
            crate::util::progress::say(pb, format!("step {}: mean loss {mean:.3} over the last {} steps, {:.0} s, checkpoint saved", state.step, recent.len(), state.elapsed_s));
            save_checkpoint(&run.out, &weights, &opt, &state)?;
        }
    }
    save_checkpoint(&run.out, &weights, &opt, &state)?;
    // The final evaluation is of the weights as the adapter file stores them.
    if state.evals.last().map(|e| e.step) == Some(state.step) {
        state.evals.pop();
    }
    let stored = weights.stored_adapter(cfg.storage, manifest, t.device.rope.clone())?;
    state.evals.push(evaluate(t, &stored, &held, state.step, state.elapsed_s)?);
    pb.finish_with_message("done");
    let report = TrainReport {
        config: cfg.clone(),
        split_id: manifest.split_id.clone(),
        train_sequences: samples.len(),
        train_tokens,
        held_out_sequences: held.samples.len(),
        teacher_seconds,
        curve: state.curve.clone(),
        evals: state.evals.clone(),
        steps_done: state.step,
        stopped_by,
        time_per_step_ms: state.timed.means(),
    };
    let training = serde_json::json!({
        "config": cfg, "steps_done": state.step, "final_eval": state.evals.last(), "train_tokens": train_tokens,
    });
    let vocab = (cfg.draft_vocab > 0).then(|| draft_vocab(samples.iter().map(|s| s.ids.as_slice()), cfg.draft_vocab, "training sequences (with self-distilled replies when on)"));
    weights.save(&run.out, manifest, cfg.storage, vocab.as_ref(), &training)?;
    let report_path = run.out.with_extension("report.json");
    let text = serde_json::to_string_pretty(&report).map_err(|e| Error::bad_file(&report_path, e))?;
    std::fs::write(&report_path, text).map_err(|e| Error::io(&report_path, e))?;
    Ok(report)
}
