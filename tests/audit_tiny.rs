//! `hat audit`'s public-weights attacks on a tiny in-process model: the replay inversion recovers
//! the uplink exactly, the public head reads greedy answers exactly, the chat template's tokens
//! are not counted, and bad input is a clear error; the learned inverters beat a unigram baseline;
//! a secret rotation hides nothing from a cloud with the public weights, and noise costs
//! agreement with the model.

use candle_core::{DType, Device};
use hat::audit::{run, samples, AuditOptions, Defence, Sample};
use hat::io::dataset::{Conversation, Turn};
use hat::io::source::{LoadedModel, ModelSpec};
use hat::net::protocol::WireDtype;
use hat::testing::{tiny_model, TinySpec};

fn conversation(text: &str) -> Conversation {
    Conversation { id: text.into(), turns: vec![Turn { role: "user".into(), text: text.into() }] }
}

/// The tiny model (its directory, kept alive by the caller), loaded in f32.
fn tiny() -> (tempfile::TempDir, LoadedModel, hat::model::Model) {
    let dir = tempfile::tempdir().unwrap();
    tiny_model(dir.path(), TinySpec::default()).unwrap();
    let loaded = LoadedModel::load(&ModelSpec::HfDir(dir.path().to_path_buf())).unwrap();
    let model = loaded.model(DType::F32, &Device::Cpu).unwrap();
    (dir, loaded, model)
}

#[test]
fn public_weights_recover_the_uplink_and_read_greedy_answers() {
    let (_dir, loaded, model) = tiny();
    let opts = AuditOptions { input_layers: vec![1, 2], output_layers: 1, prompt_tokens: 32, reply_tokens: 6, wire: WireDtype::F16, candidates: 300, defences: vec![Defence::None], finetune: Default::default() };
    let convs: Vec<Conversation> = ["hello there", "what is a byte?", "tiny models say odd things"].iter().map(|t| conversation(t)).collect();
    let ss = samples(&model, &loaded.tokenizer, &convs, &opts).unwrap();
    // Every candidate is tried (the tiny vocabulary is 264 tokens), so the replay cannot miss.
    // Only the user's text (one token per byte here) and the reply count, not the template.
    let prompt_len = |s: &Sample| s.ids.len() - opts.reply_tokens;
    for (s, c) in ss.iter().zip(&convs) {
        let text = c.first_prompt().unwrap();
        assert_eq!(s.content[..prompt_len(s)].iter().filter(|&&c| c).count(), text.len(), "{text}");
    }
    let own: Vec<Vec<u32>> = ["the attacker's own text, some of it", "more text of its own, for the probe"].iter().map(|t| loaded.tokenizer.encode(t).unwrap()).collect();
    let results = run(&model, &ss, &own, &opts, &mut |_| {}).unwrap().results;
    for r in results.iter().filter(|r| r.attack == "public-weights" && r.direction == "up") {
        assert_eq!(r.top1, 1.0, "the replay recovers every content token: {r:?}");
    }
    // The reply alone: the public head reads every greedy token.
    let replies: Vec<Sample> = ss.iter().map(|s| Sample { ids: s.ids.clone(), content: (0..s.ids.len()).map(|i| i >= prompt_len(s)).collect() }).collect();
    for r in run(&model, &replies, &own, &opts, &mut |_| {}).unwrap().results.iter().filter(|r| r.attack == "public-weights" && r.direction == "down") {
        assert_eq!(r.top1, 1.0, "{r:?}");
    }
    // Bad input.
    assert!(samples(&model, &loaded.tokenizer, &[], &opts).unwrap_err().to_string().contains("no conversation"));
    let deep = AuditOptions { input_layers: vec![5], ..opts.clone() };
    assert!(run(&model, &ss, &own, &deep, &mut |_| {}).unwrap_err().to_string().contains("do not split"));
}

/// The learned inverters of a cloud without the device's weights, on the tiny model: each is
/// reported for every K1 (the untrained one without pairs, the trained ones at each budget), and
/// a trained probe on a shallow split beats always guessing the most frequent content token.
#[test]
fn learned_inverters_beat_the_unigram_baseline() {
    let (_dir, loaded, model) = tiny();
    let opts = AuditOptions { input_layers: vec![1], output_layers: 1, prompt_tokens: 48, reply_tokens: 4, wire: WireDtype::F16, candidates: 8, defences: vec![Defence::None], finetune: Default::default() };
    let texts = ["the cat sat on the mat", "a dog ran in the park", "birds sing in the morning light", "where is the nearest train station?"];
    let convs: Vec<Conversation> = texts.iter().map(|t| conversation(t)).collect();
    let ss = samples(&model, &loaded.tokenizer, &convs, &opts).unwrap();
    // The attacker's own text: different sentences over the same letters (one token per byte).
    let own: Vec<Vec<u32>> = (0..60)
        .map(|i| loaded.tokenizer.encode(&format!("sentence {i}: the train in the morning, a cat and a dog at the station; birds near the park sing {i}")).unwrap())
        .collect();
    let results = run(&model, &ss, &own, &opts, &mut |_| {}).unwrap().results;
    let baseline = hat::audit::unigram_baseline(&ss);
    let learned: Vec<_> = results.iter().filter(|r| r.attack == "learned").collect();
    let names: Vec<_> = learned.iter().map(|r| (r.inverter, r.train_tokens.unwrap() > 0)).collect();
    assert_eq!(names.len(), 1 + 2 * hat::audit::BUDGETS.len(), "{names:?}");
    assert_eq!(names[0], ("nearest-embedding", false));
    for r in &learned {
        assert!((0.0..=1.0).contains(&r.top1) && r.top1 <= r.top10 && r.tokens > 0, "{r:?}");
    }
    let probe = learned.iter().filter(|r| r.inverter == "linear-probe").map(|r| r.top1).fold(0.0, f64::max);
    assert!(probe > baseline, "the trained probe ({probe}) beats the unigram baseline ({baseline})");
}

/// Defences on the tiny model: a secret rotation leaves outputs as they were and hides nothing
/// from a cloud that knows the public weights (it recovers the rotation and then the uplink
/// exactly); heavy noise on the uplink makes the device's tokens differ from the model's and the
/// replay miss (3× each state's RMS: the tiny model's shallow states are far apart, and the
/// replay still finds every token through noise as large as the state).
#[test]
fn a_rotation_hides_nothing_and_noise_costs_agreement() {
    let (_dir, loaded, model) = tiny();
    let defences = vec![Defence::None, Defence::Rotation, Defence::Noise { sigma: 3.0 }];
    let opts = AuditOptions { input_layers: vec![1], output_layers: 1, prompt_tokens: 32, reply_tokens: 6, wire: WireDtype::F32, candidates: 300, defences, finetune: Default::default() };
    let convs: Vec<Conversation> = ["hello there", "what is a byte?", "tiny models say odd things"].iter().map(|t| conversation(t)).collect();
    let ss = samples(&model, &loaded.tokenizer, &convs, &opts).unwrap();
    let own: Vec<Vec<u32>> = ["the attacker's own text, some of it", "more text of its own, for the probe"].iter().map(|t| loaded.tokenizer.encode(t).unwrap()).collect();
    // Every step is announced, as many as `steps` says (the progress bar's length).
    let mut announced = Vec::new();
    let audit = run(&model, &ss, &own, &opts, &mut |what| announced.push(what.to_string())).unwrap();
    assert_eq!(announced.len() as u64, hat::audit::steps(ss.len(), &opts), "{announced:?}");
    assert!(announced.iter().any(|a| a.starts_with("K1 = 1, rotation: MLP on ")), "{announced:?}");
    let replay = |d: &str| audit.results.iter().find(|r| r.defence == d && r.inverter == "replay").unwrap().top1;
    let cost = |d: &str| audit.costs.iter().find(|c| c.defence == d).unwrap();
    assert_eq!(audit.costs.len(), 3);
    assert!(audit.results.iter().all(|r| ["none", "rotation", "noise=3"].contains(&r.defence.as_str())), "{:?}", audit.results);
    assert_eq!(cost("none").agreement, 1.0, "f32 on the wire, no defence: the model's tokens");
    assert!(cost("rotation").agreement > 0.97, "a rotation keeps the outputs: {:?}", cost("rotation"));
    assert!(cost("rotation").rotation_error.unwrap() < 1e-3, "{:?}", cost("rotation"));
    assert!(cost("none").rotation_error.is_none() && cost("none").device_ms_per_token > 0.0);
    assert_eq!(replay("none"), 1.0);
    assert_eq!(replay("rotation"), 1.0, "the recovered rotation undoes the defence");
    assert!(cost("noise=3").agreement < 1.0, "{:?}", cost("noise=3"));
    assert!(replay("noise=3") < 1.0, "{}", replay("noise=3"));
    // The charts name every attack and defence.
    let charts = hat::audit::plot::charts(&audit);
    assert_eq!(charts.iter().map(|c| c.0).collect::<Vec<_>>(), ["audit-by-input-layers", "audit-by-budget"]);
    assert!(charts[0].1.contains("replay up (rotation)") && charts[1].1.contains("mlp-window K1=1 (noise=3)"), "{}", charts[0].1);
    let no = AuditOptions { defences: vec![], ..opts };
    assert!(run(&model, &ss, &own, &no, &mut |_| {}).unwrap_err().to_string().contains("at least one defence"));
}

/// Secret input-layer weights (`weights=S`): none at all computes the public states (the model's
/// tokens, every one replayed); heavy ones change the device's tokens and defeat the replay that
/// runs the public layers.
#[test]
fn secret_input_weights_cost_agreement_and_defeat_the_replay_when_heavy() {
    let (_dir, loaded, model) = tiny();
    let defences = vec![Defence::SecretWeights { sigma: 0.0 }, Defence::SecretWeights { sigma: 3.0 }];
    let opts = AuditOptions { input_layers: vec![1], output_layers: 1, prompt_tokens: 32, reply_tokens: 6, wire: WireDtype::F32, candidates: 300, defences, finetune: Default::default() };
    let convs: Vec<Conversation> = ["hello there", "what is a byte?", "tiny models say odd things"].iter().map(|t| conversation(t)).collect();
    let ss = samples(&model, &loaded.tokenizer, &convs, &opts).unwrap();
    let own: Vec<Vec<u32>> = ["the attacker's own text, some of it", "more text of its own, for the probe"].iter().map(|t| loaded.tokenizer.encode(t).unwrap()).collect();
    let audit = run(&model, &ss, &own, &opts, &mut |_| {}).unwrap();
    let replay = |d: &str| audit.results.iter().find(|r| r.defence == d && r.inverter == "replay").unwrap().top1;
    let cost = |d: &str| audit.costs.iter().find(|c| c.defence == d).unwrap();
    assert_eq!(cost("weights=0").agreement, 1.0, "unperturbed weights: the model's tokens");
    assert_eq!(replay("weights=0"), 1.0);
    assert!(cost("weights=3").agreement < 1.0, "{:?}", cost("weights=3"));
    assert!(replay("weights=3") < 1.0, "{}", replay("weights=3"));
}

/// A private fine-tune (`finetune=S`): each device trains its secret input layers to give the
/// model's answers again (its loss falls), the audit announces both fine-tunes as steps, and
/// every attack runs against the fine-tuned states.
#[test]
fn a_private_finetune_trains_both_devices_and_is_audited() {
    let (_dir, loaded, model) = tiny();
    let defences = vec![Defence::PrivateFineTune { sigma: 3.0 }];
    let finetune = hat::audit::finetune::FineTune { steps: 12, batch: 2, seq: 12, lr: 3e-3 };
    let opts = AuditOptions { input_layers: vec![1], output_layers: 1, prompt_tokens: 32, reply_tokens: 6, wire: WireDtype::F32, candidates: 300, defences, finetune };
    let convs: Vec<Conversation> = ["hello there", "what is a byte?"].iter().map(|t| conversation(t)).collect();
    let ss = samples(&model, &loaded.tokenizer, &convs, &opts).unwrap();
    let own: Vec<Vec<u32>> = ["the attacker's own text, some of it", "more text of its own, for the probe"].iter().map(|t| loaded.tokenizer.encode(t).unwrap()).collect();
    let mut announced = Vec::new();
    let audit = run(&model, &ss, &own, &opts, &mut |what| announced.push(what.to_string())).unwrap();
    assert_eq!(announced.len() as u64, hat::audit::steps(ss.len(), &opts), "{announced:?}");
    assert!(announced.iter().any(|a| a.ends_with("the victim's private fine-tune")), "{announced:?}");
    let cost = &audit.costs[0];
    assert_eq!(cost.defence, "finetune=3");
    let [first, last] = cost.finetune_loss.expect("the fine-tune's loss is reported");
    assert!(last < first, "{cost:?}");
    assert!(audit.results.iter().any(|r| r.defence == "finetune=3" && r.inverter == "replay"));
    // Texts shorter than one fine-tune sequence are refused with a clear error.
    let short = AuditOptions { finetune: hat::audit::finetune::FineTune { seq: 4096, ..finetune }, ..opts };
    assert!(run(&model, &ss, &own, &short, &mut |_| {}).unwrap_err().to_string().contains("private fine-tune needs texts"));
}
