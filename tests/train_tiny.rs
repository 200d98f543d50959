//! `hat train-adapter` on tiny in-process models: the loss falls, resume continues the same run,
//! int8 storage keeps the weights, bad adapters are refused, truncated data sets train.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor};
use hat::adapter::{Adapter, DraftContext, Storage};
use hat::io::source::{LoadedModel, ModelSpec};
use hat::split::{write_split, CloudBundle, DeviceBundle, SplitPlan};
use hat::testing::{tiny_model, TinySpec};
use hat::train::{run_conversations, split_conversations, AdapterInit, TrainConfig, TrainReport, TrainRun, Trainer};

struct Tiny {
    dir: tempfile::TempDir,
    loaded: LoadedModel,
}

fn tiny() -> Tiny {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(&dir.path().join("model"), TinySpec::default()).unwrap();
    let loaded = LoadedModel::load(&ModelSpec::HfDir(dir.path().join("model"))).unwrap();
    write_split(&loaded, &SplitPlan::new(6, 1, 1).unwrap(), &dir.path().join("split"), DType::F32, false, &indicatif::ProgressBar::hidden()).unwrap();
    Tiny { dir, loaded }
}

impl Tiny {
    fn device(&self) -> DeviceBundle {
        DeviceBundle::load(&self.dir.path().join("split/device"), &Device::Cpu).unwrap()
    }

    fn cloud(&self) -> CloudBundle {
        CloudBundle::load(&self.dir.path().join("split/cloud"), &Device::Cpu).unwrap()
    }

    /// The whole model, f32.
    fn teacher(&self) -> hat::model::Model {
        self.loaded.model(DType::F32, &Device::Cpu).unwrap()
    }
}

/// The packaged ShareGPT sample: three records, then one cut off mid-record.
fn sample_data() -> hat::io::dataset::LoadReport {
    hat::io::dataset::load_conversations(&Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/sharegpt-sample.json")).unwrap()
}

fn config(steps: usize) -> TrainConfig {
    TrainConfig {
        adapter_layers: 1,
        init: AdapterInit::Middle,
        steps,
        batch_size: 2,
        seq_len: 64,
        lr: 3e-3,
        warmup: 2,
        eval_every: 1000,
        checkpoint_every: 1000,
        held_out: 1,
        eval_prompts: 1,
        eval_tokens: 6,
        negatives: 64,
        feature_weight: 0.1,
        ..TrainConfig::default()
    }
}

fn train(t: &Tiny, cfg: TrainConfig, out: &Path, resume: bool, stop_at: Option<usize>) -> TrainReport {
    train_with(t, cfg, out, resume, stop_at, None)
}

fn train_with(t: &Tiny, cfg: TrainConfig, out: &Path, resume: bool, stop_at: Option<usize>, cache: Option<&Path>) -> TrainReport {
    try_train(t, cfg, out, resume, stop_at, cache).unwrap()
}

fn try_train(t: &Tiny, cfg: TrainConfig, out: &Path, resume: bool, stop_at: Option<usize>, cache: Option<&Path>) -> hat::Result<TrainReport> {
    let cpu = Device::Cpu;
    let device = t.device();
    let cloud = t.cloud();
    let model = t.teacher();
    let data = sample_data();
    assert!(data.truncated);
    let (train, held_out) = run_conversations(data.conversations, &cfg);
    hat::train::train(TrainRun {
        trainer: Trainer { model: &model, device: &device, cloud: &cloud, config: cfg },
        weights: t.loaded.weights.var_builder(DType::F32, &cpu).unwrap(),
        train,
        held_out,
        self_distill_cache: cache.map(Path::to_path_buf),
        out: out.to_path_buf(),
        resume,
        stop: Arc::new(AtomicBool::new(false)),
        stop_at_step: stop_at,
        progress: indicatif::ProgressBar::hidden(),
    })
}

#[test]
fn a_few_steps_lower_the_loss_and_write_a_loadable_adapter() {
    let run = |conditioned, draft_context, draft_steps, feature_noise| lower_the_loss(TrainConfig { conditioned, draft_context, draft_steps, feature_noise, ..config(12) });
    run(false, DraftContext::Drafted, 1, 0.0);
    let (_, _, clean) = run(true, DraftContext::Verified, 1, 0.0);
    // Noisy conditioning features still train, on another loss curve.
    let (_, _, noisy) = run(true, DraftContext::Verified, 1, 0.3);
    assert_ne!(clean.curve[1].loss, noisy.curve[1].loss);
    let (t, a, _) = run(true, DraftContext::Verified, 2, 0.0);
    later_drafts_read_their_own_predictions_behind_verified_states(&(t, a));
}

fn e_draft_len(r: &TrainReport) -> usize {
    r.config.eval_draft_len
}

/// Held-out evaluation tells a draft that is the LLM itself from the untrained default.
#[test]
fn evaluation_tells_an_exact_draft_from_none() {
    let t = tiny();
    let (device, cloud, model) = (t.device(), t.cloud(), t.teacher());
    let oracle = t.dir.path().join("oracle.safetensors");
    hat::testing::oracle_adapter(&t.dir.path().join("split/cloud"), &cloud, 1..5, None, DraftContext::Verified, &oracle).unwrap();
    let exact = Adapter::load(&oracle, &device.manifest, device.rope.clone(), &Device::Cpu).unwrap();
    let none = Adapter::none(device.rope.clone());
    let cfg = TrainConfig { eval_prompts: 2, eval_tokens: 21, eval_draft_len: 4, held_out: 2, ..config(1) };
    let (_, held_out) = split_conversations(sample_data().conversations, cfg.held_out, cfg.max_conversations, cfg.seed);
    let eval = |a: &Adapter| hat::train::evaluate_adapter(&model, &device, &cloud, cfg.clone(), &held_out, a).unwrap();
    let (e_exact, e_none) = (eval(&exact), eval(&none));
    // The wire's f16 rounding aside, the exact draft is the model: (nearly) every draft accepted.
    assert!(e_exact.top1_agreement > 0.95 && e_exact.acceptance_rate > 0.9 && e_exact.mean_accepted > 3.0, "{e_exact:?}");
    assert!(e_none.acceptance_rate < e_exact.acceptance_rate && e_none.mean_accepted < e_exact.mean_accepted, "{e_none:?}");
    assert_eq!(e_exact.acceptance_by_position.len(), 4);
}

fn lower_the_loss(cfg: TrainConfig) -> (Tiny, Adapter, TrainReport) {
    let t = tiny();
    let out = t.dir.path().join("a.safetensors");
    let (conditioned, draft_context) = (cfg.conditioned, cfg.draft_context);
    let r = train(&t, cfg, &out, false, None);
    let first: f64 = r.curve[..3].iter().map(|p| p.loss).sum::<f64>() / 3.0;
    let last: f64 = r.curve[r.curve.len() - 3..].iter().map(|p| p.loss).sum::<f64>() / 3.0;
    assert!(last < first * 0.9, "loss {first} -> {last}");
    assert_eq!((r.steps_done, r.stopped_by.as_str()), (12, "steps"));
    assert!(r.evals.len() >= 2, "{:?}", r.evals);
    for e in &r.evals {
        // At most every draft and the bonus token per round; one acceptance figure per draft position.
        assert!((1.0..=1.0 + e_draft_len(&r) as f64).contains(&e.mean_accepted), "{e:?}");
        assert_eq!(e.acceptance_by_position.len(), e_draft_len(&r), "{e:?}");
    }
    assert!(out.with_extension("report.json").exists());
    let device = t.device();
    let a = Adapter::load(&out, &device.manifest, device.rope.clone(), &Device::Cpu).unwrap();
    assert_eq!((a.num_layers(), a.split_id.as_deref(), a.is_conditioned()), (1, Some(device.manifest.split_id.as_str()), conditioned));
    assert_eq!(a.draft_context, draft_context);
    (t, a, r)
}

/// The training-time test's second draft at position t reads the adapter's own prediction for
/// t-1 while attending to adapter states made from true middle outputs at earlier positions:
/// what the edge's cache holds when it drafts the second token of a round.
fn later_drafts_read_their_own_predictions_behind_verified_states((t, a): &(Tiny, Adapter)) {
    let device = t.device();
    let hidden = device.manifest.hidden_size;
    let randn = |seed: f64| (Tensor::arange(0f32, (10 * hidden) as f32, &Device::Cpu).unwrap() * seed).unwrap().sin().unwrap().reshape((1, 10, hidden)).unwrap();
    let (h_in, middle, drafted) = (randn(0.37), randn(1.3), randn(2.1));
    let (_, predicted) = a.next_draft_hidden(&device.output, &h_in, &middle, &drafted, None).unwrap();
    let zero = Tensor::zeros((1, 1, hidden), DType::F32, &Device::Cpu).unwrap();
    let mut mismatch = 0f32;
    for p in 0..10 {
        let mut cache = a.layers.new_cache();
        if p > 0 {
            let prev = Tensor::cat(&[&zero, &middle.narrow(1, 0, p - 1).unwrap()], 1).unwrap();
            a.forward(&h_in.narrow(1, 0, p).unwrap(), Some(&prev), 0, &mut cache).unwrap();
        }
        let prev = if p > 0 { drafted.narrow(1, p - 1, 1).unwrap() } else { zero.clone() };
        let want = a.forward(&h_in.narrow(1, p, 1).unwrap(), Some(&prev), p, &mut cache).unwrap();
        let d = (predicted.narrow(1, p, 1).unwrap() - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        mismatch = mismatch.max(d);
    }
    assert!(mismatch < 1e-4, "{mismatch}");
    // The drafts matter: reading the true outputs instead gives other predictions.
    let (_, first) = a.draft_hidden(&device.output, &h_in, Some(&middle)).unwrap();
    let d = (first - &predicted).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(d > 1e-3, "{d}");
}

#[test]
fn resume_continues_the_same_run() {
    let t = tiny();
    let whole = train(&t, config(8), &t.dir.path().join("whole.safetensors"), false, None);
    let out = t.dir.path().join("parts.safetensors");
    let first = train(&t, config(8), &out, false, Some(3));
    assert_eq!((first.steps_done, first.stopped_by.as_str()), (3, "interrupted"));
    let resumed = train(&t, config(8), &out, true, None);
    assert_eq!(resumed.steps_done, 8);
    let losses = |r: &TrainReport| r.curve.iter().map(|p| (p.step, p.loss, p.lr)).collect::<Vec<_>>();
    assert_eq!(losses(&resumed), losses(&whole), "an interrupted and resumed run follows the uninterrupted one");
    // Other settings are refused on resume.
    let cpu = Device::Cpu;
    let device = t.device();
    let cloud = t.cloud();
    let model = t.teacher();
    let data = sample_data();
    let (train_c, held) = split_conversations(data.conversations, 1, 100, 0);
    let err = hat::train::train(TrainRun {
        trainer: Trainer { model: &model, device: &device, cloud: &cloud, config: TrainConfig { lr: 1.0, ..config(8) } },
        weights: t.loaded.weights.var_builder(DType::F32, &cpu).unwrap(),
        train: train_c,
        held_out: held,
        self_distill_cache: None,
        out,
        resume: true,
        stop: Arc::new(AtomicBool::new(false)),
        stop_at_step: None,
        progress: indicatif::ProgressBar::hidden(),
    })
    .err()
    .expect("mismatched settings")
    .to_string();
    assert!(err.contains("other settings"), "{err}");
}

/// The held-out evaluation of an adapter file, as `hat train-adapter --evaluate` runs it.
fn evaluate_file(t: &Tiny, cfg: TrainConfig, path: &Path) -> hat::train::Evaluation {
    let cpu = Device::Cpu;
    let device = t.device();
    let cloud = t.cloud();
    let model = t.teacher();
    let data = sample_data();
    let (_, held_out) = run_conversations(data.conversations, &cfg);
    let adapter = Adapter::load(path, &device.manifest, device.rope.clone(), &cpu).unwrap();
    hat::train::evaluate_adapter(&model, &device, &cloud, cfg, &held_out, &adapter).unwrap()
}

#[test]
fn int8_storage_keeps_each_weight_within_half_a_step_and_is_what_the_report_evaluates() {
    let t = tiny();
    let cfg = TrainConfig { conditioned: true, draft_context: DraftContext::Verified, ..config(4) };
    let out = t.dir.path().join("a.safetensors");
    let f16 = train(&t, cfg.clone(), &out, false, None);
    let f16_bytes = std::fs::metadata(&out).unwrap().len();
    // A finished run resumed with another storage only rewrites the adapter.
    let int8 = train(&t, TrainConfig { storage: Storage::Int8, ..cfg.clone() }, &out, true, None);
    assert_eq!((int8.steps_done, int8.curve.len()), (f16.steps_done, f16.curve.len()));
    let speed = |r: &TrainReport| r.time_per_step_ms.tokens_per_s;
    assert!(speed(&f16) > 0.0 && (speed(&int8) / speed(&f16) - 1.0).abs() < 1e-9, "the steps' times come from the checkpoint");
    let int8_bytes = std::fs::metadata(&out).unwrap().len();
    assert!(int8_bytes * 10 < f16_bytes * 7, "int8 {int8_bytes} bytes, f16 {f16_bytes}");

    // Every matrix within half a quantisation step (max |row| / 254) of the trained f32 weights.
    let trained = candle_core::safetensors::load(out.with_extension("ckpt.safetensors"), &Device::Cpu).unwrap();
    let stored = Storage::Int8.decode(candle_core::safetensors::load(&out, &Device::Cpu).unwrap()).unwrap();
    let mut matrices = 0;
    for (name, w) in stored.iter().filter(|(_, w)| w.rank() == 2) {
        let want = &trained[&format!("var.{name}")];
        let err = (w - want).unwrap().abs().unwrap().max(1).unwrap();
        let half_step = (want.abs().unwrap().max(1).unwrap() / 254.0).unwrap();
        let over = (err - (half_step * 1.0001).unwrap()).unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(over <= 0.0, "{name}: {over} beyond half a step");
        matrices += 1;
    }
    assert!(matrices >= 8, "{matrices} matrices");
    // The report's final evaluation is the file's.
    let from_file = evaluate_file(&t, cfg, &out);
    let last = int8.evals.last().unwrap();
    assert_eq!((last.top1_agreement, last.mean_accepted, last.acceptance_rate), (from_file.top1_agreement, from_file.mean_accepted, from_file.acceptance_rate));

    // A matrix whose scale is missing is refused, naming the tensor.
    let bytes = std::fs::read(&out).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut raw = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let dropped = raw.keys().find(|k| k.ends_with(".q8_scale")).unwrap().clone();
    raw.remove(&dropped);
    let broken = t.dir.path().join("broken.safetensors");
    safetensors::serialize_to_file(raw.iter(), header.metadata().clone(), &broken).unwrap();
    let device = t.device();
    let err = Adapter::load(&broken, &device.manifest, device.rope.clone(), &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("without its") && err.contains(dropped.trim_end_matches(".q8_scale")), "{err}");
}

#[test]
fn corrupt_and_mismatched_adapters_are_refused() {
    let t = tiny();
    let out = t.dir.path().join("a.safetensors");
    train(&t, config(2), &out, false, None);
    // Another split of the same model.
    let other = t.dir.path().join("other");
    write_split(&t.loaded, &SplitPlan::new(6, 2, 1).unwrap(), &other, DType::F32, false, &indicatif::ProgressBar::hidden()).unwrap();
    let device = DeviceBundle::load(&other.join("device"), &Device::Cpu).unwrap();
    let err = Adapter::load(&out, &device.manifest, device.rope.clone(), &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("trained for split"), "{err}");
    // Garbage, and a safetensors file that is not an adapter.
    let junk = t.dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"\x10\x00\x00\x00\x00\x00\x00\x00garbage!garbage!").unwrap();
    let err = Adapter::load(&junk, &device.manifest, device.rope.clone(), &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("not an adapter file"), "{err}");
    let plain = t.dir.path().join("plain.safetensors");
    let tensors = std::collections::HashMap::from([("x".to_string(), candle_core::Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap())]);
    candle_core::safetensors::save(&tensors, &plain).unwrap();
    let err = Adapter::load(&plain, &device.manifest, device.rope.clone(), &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains("not a hat adapter"), "{err}");
    let _ = AdapterInit::parse("layer:x").unwrap_err();
    let _ = AdapterInit::parse("adapter:").unwrap_err();
    assert_eq!(AdapterInit::parse("adapter:a/b.safetensors").unwrap(), AdapterInit::Adapter("a/b.safetensors".into()));
}

/// `--init adapter:PATH` starts from the file's weights: the run's first evaluation (step 0) is
/// the file's own, and its loss starts where the file's training ended, not where a fresh
/// adapter's starts. An adapter of another shape is refused, naming the flag.
#[test]
fn a_warm_start_begins_from_the_adapter_file() {
    let t = tiny();
    let cfg = TrainConfig { conditioned: true, draft_context: DraftContext::Verified, ..config(12) };
    let trained = t.dir.path().join("trained.safetensors");
    let first = train(&t, cfg.clone(), &trained, false, None);
    let warm_cfg = TrainConfig { init: AdapterInit::Adapter(trained.clone()), ..cfg.clone() };
    let warm = train(&t, TrainConfig { steps: 2, ..warm_cfg.clone() }, &t.dir.path().join("warm.safetensors"), false, None);
    let fresh = train(&t, TrainConfig { steps: 2, ..cfg.clone() }, &t.dir.path().join("fresh.safetensors"), false, None);
    let of_file = evaluate_file(&t, cfg.clone(), &trained);
    let (w0, f0) = (&warm.evals[0], &fresh.evals[0]);
    assert_eq!((w0.step, w0.top1_agreement, w0.mean_accepted), (0, of_file.top1_agreement, of_file.mean_accepted));
    assert_ne!((w0.top1_agreement, w0.mean_accepted), (f0.top1_agreement, f0.mean_accepted), "a fresh adapter evaluates like the trained one");
    let (start, end) = (fresh.curve[0].loss, first.curve.last().unwrap().loss);
    assert!(warm.curve[0].loss < start * 0.9 && (warm.curve[0].loss - end).abs() < (start - end).abs() * 0.5, "warm {} fresh {start} trained {end}", warm.curve[0].loss);
    assert_eq!(warm.config.init, warm_cfg.init);

    for (bad, flag) in [
        (TrainConfig { adapter_layers: 2, ..warm_cfg.clone() }, "--adapter-layers"),
        (TrainConfig { conditioned: false, ..warm_cfg.clone() }, "--conditioning"),
        (TrainConfig { draft_context: DraftContext::Drafted, ..warm_cfg.clone() }, "--draft-context"),
        (TrainConfig { init: AdapterInit::Adapter(t.dir.path().join("missing.safetensors")), ..warm_cfg.clone() }, "missing.safetensors"),
    ] {
        let err = try_train(&t, bad, &t.dir.path().join("bad.safetensors"), false, None, None).map(|_| ()).expect_err("refused").to_string();
        assert!(err.contains(flag), "{flag}: {err}");
    }
}

/// `--skip-conversations N` trains on the conversations after the first N; the held-out ones
/// stay the same.
#[test]
fn skipping_conversations_keeps_the_held_out_ones() {
    let all = |skip, max| run_conversations(sample_data().conversations, &TrainConfig { held_out: 1, skip_conversations: skip, max_conversations: max, ..config(1) });
    let ids = |c: &[hat::io::dataset::Conversation]| c.iter().map(|c| c.id.clone()).collect::<Vec<_>>();
    let (train, held) = all(0, 100);
    assert!(train.len() >= 2, "{}", train.len());
    let (later, held_later) = all(1, 100);
    assert_eq!((ids(&later), ids(&held_later)), (ids(&train[1..]), ids(&held)));
    let (one, _) = all(1, 1);
    assert_eq!(ids(&one), ids(&train[1..2]));
    assert!(all(train.len(), 100).0.is_empty());
}

#[test]
fn self_distillation_generates_the_models_greedy_replies_in_batches() {
    let t = tiny();
    let device = t.device();
    let cloud = t.cloud();
    let model = t.teacher();
    let trainer = Trainer { model: &model, device: &device, cloud: &cloud, config: config(1) };
    // Prompts of two lengths, three of one (a batch of two and a batch of one), different contents.
    let base: Vec<u32> = (1..12).map(|i| i * 7 % 60 + 3).collect();
    let mut prompts = vec![base.clone(), base[..7].to_vec()];
    for (i, v) in [(2, 40u32), (5, 41)] {
        let mut p = base.clone();
        p[i] = v;
        prompts.push(p);
    }
    let tokens = 9;
    let samples = trainer.self_distill(&prompts, tokens, 2, &indicatif::ProgressBar::hidden()).unwrap();
    assert_eq!(samples.len(), prompts.len());
    for (prompt, s) in prompts.iter().zip(&samples) {
        let reply = hat::decode::generate(&mut hat::decode::ModelDecoder::new(&model), prompt, tokens, &hat::decode::SamplingParams::greedy(), &device.tokenizer.eos_token_ids, |_| Ok(()))
            .unwrap()
            .token_ids;
        // Fed: the prompt and every reply token but the last (a target only).
        let fed: Vec<u32> = prompt.iter().chain(&reply[..reply.len() - 1]).copied().collect();
        assert_eq!(s.ids, fed, "the batched reply is the model's own greedy reply");
        let top1: Vec<u32> = s.top_ids.i((.., 0)).unwrap().to_vec1().unwrap();
        assert_eq!(&top1[prompt.len() - 1..], &reply[..], "the recorded teacher argmax is the reply");
        // The recorded teacher outputs are those of one teacher-forced pass over the sequence.
        let taught = trainer.teach(&s.ids).unwrap();
        let close = |a: &candle_core::Tensor, b: &candle_core::Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        // The same top-k, in the same order up to near-ties: the batched decode attends through
        // the row kernel and the teacher-forced pass through matmuls, so two tokens whose
        // probabilities differ by rounding may swap places (or the k-th with the (k+1)-th).
        let (ids_a, ids_b) = (s.top_ids.to_vec2::<u32>().unwrap(), taught.top_ids.to_vec2::<u32>().unwrap());
        let (pa, pb) = (s.top_probs.to_vec2::<f32>().unwrap(), taught.top_probs.to_vec2::<f32>().unwrap());
        for (i, (ra, rb)) in ids_a.iter().zip(&ids_b).enumerate() {
            for k in 0..ra.len() {
                if ra[k] != rb[k] {
                    let tie = match rb.iter().position(|&x| x == ra[k]) {
                        Some(j) => j.abs_diff(k) <= 2 && (pa[i][k] - pb[i][j]).abs() < 1e-4 && (pa[i][k] - pa[i][j]).abs() < 1e-5,
                        None => k + 1 >= ra.len().saturating_sub(1) && (pa[i][k] - pb[i][k]).abs() < 1e-5,
                    };
                    assert!(tie, "position {i}, rank {k}: {} vs {} is not a near-tie ({} vs {})", ra[k], rb[k], pa[i][k], pb[i][k]);
                }
            }
        }
        assert!(close(&s.top_probs, &taught.top_probs) < 1e-4);
        assert!(close(&s.input_hidden, &taught.input_hidden) < 1e-4);
        assert!(close(s.middle_hidden.as_ref().unwrap(), taught.middle_hidden.as_ref().unwrap()) < 1e-3);
    }
}

#[test]
fn self_distilled_data_is_cached_and_reused() {
    let t = tiny();
    let cfg = TrainConfig { self_distill_tokens: 6, self_distill_batch: 2, ..config(3) };
    let out = t.dir.path().join("sd.safetensors");
    let cache = out.with_extension("selfdistill.safetensors");
    let losses = |r: &TrainReport| r.curve.iter().map(|p| (p.step, p.loss)).collect::<Vec<_>>();
    let first = train_with(&t, cfg.clone(), &out, false, None, Some(&cache));
    assert!(first.train_tokens > 0);
    // Unchanged, the cache gives the same run.
    let again = train_with(&t, cfg.clone(), &t.dir.path().join("sd2.safetensors"), false, None, Some(&cache));
    assert_eq!(losses(&first), losses(&again));
    // Tamper with the cached states (keeping the key): a run that reuses the cache trains on
    // them, so its losses change; one that regenerated the data would repeat the first run.
    let mut stored = candle_core::safetensors::load(&cache, &Device::Cpu).unwrap();
    let halved = (stored["input_hidden"].clone() * 0.5).unwrap();
    stored.insert("input_hidden".to_string(), halved);
    candle_core::safetensors::save(&stored, &cache).unwrap();
    let tampered = train_with(&t, cfg.clone(), &t.dir.path().join("sd3.safetensors"), false, None, Some(&cache));
    assert_ne!(losses(&first), losses(&tampered), "the cache was reused, not regenerated");
    // Other settings make other data: the cache is replaced, not misused; back at the first
    // settings it is replaced again, and the first run comes back.
    let fewer = TrainConfig { self_distill_tokens: 5, ..cfg.clone() };
    let uncached = train_with(&t, fewer.clone(), &t.dir.path().join("sd4.safetensors"), false, None, None);
    let replaced = train_with(&t, fewer, &t.dir.path().join("sd5.safetensors"), false, None, Some(&cache));
    assert_eq!(losses(&uncached), losses(&replaced));
    let back = train_with(&t, cfg, &t.dir.path().join("sd6.safetensors"), false, None, Some(&cache));
    assert_eq!(losses(&first), losses(&back));
}

#[test]
fn batches_take_every_sample_once_and_group_similar_lengths() {
    use hat::train::epoch_batches;
    // 1,000 sequences of 8..=263 tokens in a random-looking order.
    let lengths: Vec<usize> = (0..1000).map(|i| 8 + (i * 7919) % 256).collect();
    let padded = |batches: &[Vec<usize>]| -> usize { batches.iter().map(|b| b.len() * b.iter().map(|&i| lengths[i]).max().unwrap_or(0)).sum() };
    let real: usize = lengths.iter().sum();
    for epoch in 0..3 {
        let batches = epoch_batches(&lengths, 8, 7, epoch);
        assert_eq!(batches.len(), lengths.len().div_ceil(8));
        let mut seen: Vec<usize> = batches.iter().flatten().copied().collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..lengths.len()).collect::<Vec<_>>(), "every sample exactly once");
        assert_eq!(batches, epoch_batches(&lengths, 8, 7, epoch), "seeded");
        // Random batches of lengths spread over 8..263 pad ~75 %; length-sorted pools pad little.
        assert!((padded(&batches) as f64) < 1.1 * real as f64, "padding: {} for {real} tokens", padded(&batches));
    }
    assert_ne!(epoch_batches(&lengths, 8, 7, 0), epoch_batches(&lengths, 8, 7, 1), "each epoch its own order");
    // A last, partial batch.
    assert_eq!(epoch_batches(&lengths[..13], 4, 0, 0).iter().map(Vec::len).sum::<usize>(), 13);
}
