//! `hat train-adapter` on tiny in-process models: the loss falls, resume continues the same run,
//! bad adapters are refused, truncated data sets train.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{DType, Device};
use hat::adapter::Adapter;
use hat::source::{LoadedModel, ModelSpec};
use hat::split::{write_split, CloudBundle, DeviceBundle, SplitPlan};
use hat::testing::{tiny_model, TinySpec};
use hat::train::{split_conversations, AdapterInit, TrainConfig, TrainReport, TrainRun, Trainer};

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
    let cpu = Device::Cpu;
    let device = DeviceBundle::load(&t.dir.path().join("split/device"), &cpu).unwrap();
    let cloud = CloudBundle::load(&t.dir.path().join("split/cloud"), &cpu).unwrap();
    let model = t.loaded.model(DType::F32, &cpu).unwrap();
    // The packaged sample: three records, then one cut off mid-record.
    let data = hat::dataset::load_conversations(&Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/sharegpt-sample.json")).unwrap();
    assert!(data.truncated);
    let (train, held_out) = split_conversations(data.conversations, cfg.held_out, cfg.max_conversations, cfg.seed);
    hat::train::train(TrainRun {
        trainer: Trainer { model: &model, device: &device, cloud: &cloud, config: cfg },
        weights: t.loaded.weights.var_builder(DType::F32, &cpu).unwrap(),
        train,
        held_out,
        out: out.to_path_buf(),
        resume,
        stop: Arc::new(AtomicBool::new(false)),
        stop_at_step: stop_at,
        progress: indicatif::ProgressBar::hidden(),
    })
    .unwrap()
}

#[test]
fn a_few_steps_lower_the_loss_and_write_a_loadable_adapter() {
    for conditioned in [false, true] {
        lower_the_loss(conditioned);
    }
}

fn lower_the_loss(conditioned: bool) {
    let t = tiny();
    let out = t.dir.path().join("a.safetensors");
    let r = train(&t, TrainConfig { conditioned, ..config(12) }, &out, false, None);
    let first: f64 = r.curve[..3].iter().map(|p| p.loss).sum::<f64>() / 3.0;
    let last: f64 = r.curve[r.curve.len() - 3..].iter().map(|p| p.loss).sum::<f64>() / 3.0;
    assert!(last < first * 0.9, "loss {first} -> {last}");
    assert_eq!((r.steps_done, r.stopped_by.as_str()), (12, "steps"));
    assert!(r.evals.len() >= 2 && r.evals.iter().all(|e| e.mean_accepted >= 1.0));
    assert!(out.with_extension("report.json").exists());
    let device = DeviceBundle::load(&t.dir.path().join("split/device"), &Device::Cpu).unwrap();
    let a = Adapter::load(&out, &device.manifest, device.rope.clone(), &Device::Cpu).unwrap();
    assert_eq!((a.num_layers(), a.split_id.as_deref(), a.is_conditioned()), (1, Some(device.manifest.split_id.as_str()), conditioned));
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
    let device = DeviceBundle::load(&t.dir.path().join("split/device"), &cpu).unwrap();
    let cloud = CloudBundle::load(&t.dir.path().join("split/cloud"), &cpu).unwrap();
    let model = t.loaded.model(DType::F32, &cpu).unwrap();
    let data = hat::dataset::load_conversations(&Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/sharegpt-sample.json")).unwrap();
    let (train_c, held) = split_conversations(data.conversations, 1, 100, 0);
    let err = hat::train::train(TrainRun {
        trainer: Trainer { model: &model, device: &device, cloud: &cloud, config: TrainConfig { lr: 1.0, ..config(8) } },
        weights: t.loaded.weights.var_builder(DType::F32, &cpu).unwrap(),
        train: train_c,
        held_out: held,
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
}

#[test]
fn self_distillation_replaces_replies_and_caches_them() {
    let t = tiny();
    let cpu = Device::Cpu;
    let device = DeviceBundle::load(&t.dir.path().join("split/device"), &cpu).unwrap();
    let model = t.loaded.model(DType::F32, &cpu).unwrap();
    let data = hat::dataset::load_conversations(&Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/sharegpt-sample.json")).unwrap();
    let cache = t.dir.path().join("sd.jsonl");
    let mut convs = data.conversations.clone();
    hat::train::self_distill(&model, &device, &mut convs, 5, &cache, &indicatif::ProgressBar::hidden()).unwrap();
    let lines = std::fs::read_to_string(&cache).unwrap().lines().count();
    assert_eq!(lines, 3);
    for (c, orig) in convs.iter().zip(&data.conversations) {
        assert_eq!(c.first_prompt(), orig.first_prompt());
        assert_eq!(c.turns.len(), 2);
        assert_eq!(c.turns[1].role, "assistant");
    }
    // A second pass reuses the cache: same replies, nothing appended.
    let mut again = data.conversations.clone();
    hat::train::self_distill(&model, &device, &mut again, 5, &cache, &indicatif::ProgressBar::hidden()).unwrap();
    assert_eq!(std::fs::read_to_string(&cache).unwrap().lines().count(), lines);
    assert_eq!(again, convs);
}
