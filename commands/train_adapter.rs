//! `hat train-adapter`: distil the draft adapter against the unsplit model.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use hat::split::{CloudBundle, DeviceBundle};
use hat::train::{run_conversations, AdapterInit, TrainConfig, TrainRun, Trainer};

use crate::ModelArgs;

/// Train the device's draft adapter so the SLM drafts what the cloud would say.
///
/// The SLM is input submodel → adapter → output submodel → head; only the adapter trains, by
/// distilling the model's next-token distribution (soft cross-entropy against the teacher's
/// top-k) through the frozen output submodel and head, plus an optional per-position-normalised
/// regression onto the middle layers' output. With --conditioning features the adapter also reads
/// the previous position's middle output (EAGLE-style). Needs the whole model (--model, the teacher) and
/// the split it trains for (--split DIR with device/ and cloud/). Writes ADAPTER (safetensors
/// with metadata), ADAPTER.report.json (loss curve, evaluations) and ADAPTER.ckpt.* (checkpoint
/// every --checkpoint-every steps and on Ctrl-C; continue with --resume).
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// The split to train for (a `hat split` output folder).
    #[arg(long)]
    pub split: PathBuf,

    /// Training data: ShareGPT JSON (truncated files too), JSONL of prompts, or a text file of
    /// prompts separated by blank lines.
    #[arg(long)]
    pub dataset: PathBuf,

    /// The adapter file to write.
    #[arg(long, required_unless_present = "evaluate")]
    pub out: Option<PathBuf>,

    /// Do not train: evaluate this adapter on the held-out split (the same conversations, prompts
    /// and measures as a training run with these --dataset, --held-out, --seed, --eval-* and
    /// --seq-len settings) and print the evaluation as JSON.
    #[arg(long, value_name = "ADAPTER", conflicts_with_all = ["out", "resume"])]
    pub evaluate: Option<PathBuf>,

    /// Do not train: count the tokens of the training conversations (as training tokenises them,
    /// with --dataset, --held-out, --max-conversations, --seed, --seq-len) and store the draft
    /// vocabulary (--draft-vocab of them by default) in this existing adapter file, rewritten in
    /// place or to --out.
    #[arg(long, value_name = "ADAPTER", conflicts_with_all = ["evaluate", "resume"])]
    pub set_draft_vocab: Option<PathBuf>,

    /// Decoder layers in the adapter.
    #[arg(long, default_value_t = 1)]
    pub adapter_layers: usize,

    /// What the adapter reads: `none` (the input submodel's hidden state alone: the adapter
    /// stands in for the whole middle) or `features` (EAGLE-style: also the previous position's
    /// middle output, which the device holds for verified positions and predicts for drafts; the
    /// shipped default adapter is conditioned, trained on self-distilled data, see the README).
    #[arg(long, default_value = "none", value_parser = ["features", "none"])]
    pub conditioning: String,

    /// What the SLM's output submodel attends to at earlier positions when it drafts, in
    /// training as at run time: `verified` (the exact states the device computes over the
    /// cloud's middle outputs to verify: only drafted positions are the SLM's own) or `drafted`
    /// (its own states over the adapter's predictions at every position).
    #[arg(long, default_value = "verified", value_parser = ["verified", "drafted"])]
    pub draft_context: String,

    /// Drafts of a round to train at every position: draft k ≥ 2 reads the adapter's own
    /// prediction of the previous position's middle output, as at run time (training-time test;
    /// needs --conditioning features). Each step beyond the first costs about one more student
    /// pass.
    #[arg(long, default_value_t = 1)]
    pub draft_steps: usize,

    /// Initial weights: middle (copies of middle layers, evenly spaced), layer:N, identity, or
    /// adapter:PATH (a trained adapter for this split, to fine-tune on more or other data; its
    /// layers, conditioning and draft context must match this run's flags).
    #[arg(long, default_value = "middle")]
    pub init: String,

    /// Optimiser steps (also the length of the learning-rate schedule).
    #[arg(long, default_value_t = 400)]
    pub steps: usize,

    /// Stop after this many minutes of training steps (evaluations and checkpoints are not
    /// counted; the checkpoint and adapter are written); the learning-rate schedule ends with the
    /// budget when that comes first.
    #[arg(long)]
    pub time_budget: Option<f64>,

    /// Sequences per step.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,

    /// Tokens per training sequence, at most.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,

    /// Peak learning rate (AdamW; linear warm-up, cosine decay to a tenth).
    #[arg(long, default_value_t = 3e-4)]
    pub lr: f64,

    #[arg(long, default_value_t = 20)]
    pub warmup: usize,

    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,

    /// Clip gradients to this global norm.
    #[arg(long, default_value_t = 1.0)]
    pub clip: f64,

    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Evaluate on the held-out split every N steps (and at the start and end).
    #[arg(long, default_value_t = 100)]
    pub eval_every: usize,

    #[arg(long, default_value_t = 50)]
    pub checkpoint_every: usize,

    /// Continue from ADAPTER's checkpoint (same settings; --steps, --time-budget and --storage
    /// may change: a finished run resumed with another --storage only rewrites the adapter).
    #[arg(long)]
    pub resume: bool,

    /// Conversations held out for evaluation, never trained on.
    #[arg(long, default_value_t = 16)]
    pub held_out: usize,

    /// Training conversations used, at most.
    #[arg(long, default_value_t = 600)]
    pub max_conversations: usize,

    /// Pass over this many training conversations first (after the seeded shuffle; the held-out
    /// ones stay the same): with --init adapter:PATH, trains on conversations the first run
    /// (same --seed and --held-out, --max-conversations this many) never saw.
    #[arg(long, default_value_t = 0)]
    pub skip_conversations: usize,

    /// Teacher tokens kept per position (its top-k distribution).
    #[arg(long, default_value_t = 64)]
    pub teacher_top_k: usize,

    /// Negative tokens per step for the sampled softmax (0 = exact softmax over the whole
    /// vocabulary: ~20× slower on the default model).
    #[arg(long, default_value_t = 1024)]
    pub negatives: usize,

    /// Weight of the per-position-normalised feature regression onto the middle layers' output.
    #[arg(long, default_value_t = 0.0)]
    pub feature_weight: f64,

    /// Conditioned adapters: Gaussian noise added in training to the middle outputs the adapter
    /// reads, this many times each position's RMS (0 = off): drafts after the first read the
    /// adapter's own, imperfect predictions.
    #[arg(long, default_value_t = 0.0)]
    pub feature_noise: f64,

    /// Train on the model's own replies instead of the data set's: greedy, up to this many
    /// tokens, generated for the data set's prompts (cut to fit --seq-len, chat template kept)
    /// in batches, with the teacher's outputs recorded on the way. Kept in
    /// ADAPTER.selfdistill.safetensors, which --resume and later runs with the same data reuse.
    #[arg(long, value_name = "TOKENS", num_args = 0..=1, default_missing_value = "96")]
    pub self_distill: Option<usize>,

    /// Prompts generated for together in --self-distill (more: faster, more memory).
    #[arg(long, default_value_t = 64)]
    pub self_distill_batch: usize,

    /// Held-out prompts and generated tokens per evaluation of the acceptance.
    #[arg(long, default_value_t = 6)]
    pub eval_prompts: usize,

    #[arg(long, default_value_t = 48)]
    pub eval_tokens: usize,

    /// How the adapter file stores its weights: `f16`, or `int8` (each matrix row scaled to
    /// 8 bits, about half the size). Training runs in f32 either way, and the final evaluation
    /// is of the weights as stored.
    #[arg(long, default_value = "f16", value_parser = ["f16", "int8"])]
    pub storage: String,

    /// Draft vocabulary: while drafting, the SLM's head scores only the N most frequent tokens of
    /// the training data (stored with the adapter; `run-edge --draft-vocab` can change N). 0 =
    /// none: the whole vocabulary. Verification always uses the full head.
    #[arg(long, default_value_t = 8192)]
    pub draft_vocab: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let config = TrainConfig {
        adapter_layers: args.adapter_layers,
        conditioned: args.conditioning == "features",
        draft_context: hat::adapter::DraftContext::parse(&args.draft_context)?,
        draft_steps: args.draft_steps,
        init: AdapterInit::parse(&args.init)?,
        steps: args.steps,
        time_budget_s: args.time_budget.map(|m| m * 60.0),
        batch_size: args.batch_size,
        seq_len: args.seq_len,
        lr: args.lr,
        warmup: args.warmup,
        weight_decay: args.weight_decay,
        clip: args.clip,
        seed: args.seed,
        eval_every: args.eval_every,
        checkpoint_every: args.checkpoint_every,
        held_out: args.held_out,
        max_conversations: args.max_conversations,
        skip_conversations: args.skip_conversations,
        teacher_top_k: args.teacher_top_k,
        negatives: args.negatives,
        feature_weight: args.feature_weight,
        feature_noise: args.feature_noise,
        eval_prompts: args.eval_prompts,
        eval_tokens: args.eval_tokens,
        eval_draft_len: 4,
        self_distill_tokens: args.self_distill.unwrap_or(0),
        self_distill_batch: args.self_distill_batch,
        storage: hat::adapter::Storage::parse(&args.storage)?,
        draft_vocab: args.draft_vocab,
    };
    config.validate()?;
    let cpu = candle_core::Device::Cpu;
    let device = DeviceBundle::load(&args.split.join("device"), &cpu)?;
    let cloud = CloudBundle::load(&args.split.join("cloud"), &cpu)?;
    if let Some(path) = &args.set_draft_vocab {
        anyhow::ensure!(config.draft_vocab > 0, "--set-draft-vocab needs --draft-vocab N of at least 1 (the rows scored by default)");
        let data = hat::io::dataset::load_conversations(&args.dataset).with_context(|| format!("cannot read --dataset {}", args.dataset.display()))?;
        let (train, _) = run_conversations(data.conversations, &config);
        let vocab = hat::train::conversations_vocab(&device, &train, config.seq_len, config.draft_vocab)?;
        // Fails early, before rewriting, if the file is not an adapter for this split.
        hat::adapter::Adapter::load(path, &device.manifest, device.rope.clone(), &cpu)?;
        let out = args.out.clone().unwrap_or_else(|| path.clone());
        hat::adapter::Adapter::set_draft_vocab(path, &out, &vocab)?;
        println!("{}: draft vocabulary of {} tokens ({} seen in {})", out.display(), vocab.size, vocab.ids.len(), vocab.source);
        return Ok(());
    }
    let loaded = args.model.load()?;
    let hash = loaded.content_hash()?;
    if hash != device.manifest.source.content_hash {
        anyhow::bail!(
            "--model {} is not the model split in {} (content hash {hash} vs {}); pass the model the split was made from",
            loaded.name,
            args.split.display(),
            device.manifest.source.content_hash
        );
    }
    let model = loaded.model(candle_core::DType::F32, &cpu)?;
    let data = hat::io::dataset::load_conversations(&args.dataset).with_context(|| format!("cannot read --dataset {}", args.dataset.display()))?;
    eprintln!("hat: data set {}: {}", args.dataset.display(), data.summary());
    let (train, held_out) = run_conversations(data.conversations, &config);
    eprintln!("hat: {} training conversations, {} held out", train.len(), held_out.len());
    if let Some(path) = &args.evaluate {
        let adapter = hat::adapter::Adapter::load(path, &device.manifest, device.rope.clone(), &cpu)?;
        let e = hat::train::evaluate_adapter(&model, &device, &cloud, config, &held_out, &adapter)?;
        println!("{}", serde_json::to_string_pretty(&e)?);
        return Ok(());
    }
    let trainer = Trainer { model: &model, device: &device, cloud: &cloud, config };
    let Some(out) = args.out else { anyhow::bail!("--out is required to train") };
    let progress = hat::util::progress::bar(0, "preparing");
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
            rt.block_on(async {
                if tokio::signal::ctrl_c().await.is_ok() {
                    eprintln!("\nhat: interrupted; saving a checkpoint (Ctrl-C again to abort)");
                    flag.store(true, Ordering::Relaxed);
                    let _ = tokio::signal::ctrl_c().await;
                    std::process::exit(130);
                }
            });
        }
    });
    let report = hat::train::train(TrainRun {
        trainer,
        weights: loaded.weights.var_builder(candle_core::DType::F32, &cpu)?,
        train,
        held_out,
        self_distill_cache: Some(out.with_extension("selfdistill.safetensors")),
        out: out.clone(),
        resume: args.resume,
        stop,
        stop_at_step: None,
        progress,
    })?;
    let last = report.evals.last();
    println!(
        "adapter {} ({} steps, stopped by {}): top-1 agreement {:.1}%, mean accepted {:.2} tokens/round at γ=4; report {}",
        out.display(),
        report.steps_done,
        report.stopped_by,
        last.map_or(0.0, |e| e.top1_agreement * 100.0),
        last.map_or(0.0, |e| e.mean_accepted),
        out.with_extension("report.json").display()
    );
    Ok(())
}
