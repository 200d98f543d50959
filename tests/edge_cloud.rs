//! HAT inference across device and cloud over loopback QUIC, on the real default model.
//!
//! Adapters: `none` (the untrained default: drafts are mostly rejected), and "oracle" adapters
//! made of the cloud bundle's own middle layers, written through the real adapter file format
//! (all of them: the SLM equals the LLM, nearly every draft is accepted; a subset: partial
//! acceptance). Together they exercise rejection, acceptance, bonus tokens and every rollback.
//! Feature-conditioned variants of both run the EAGLE-style draft path (middle outputs fed back).
//! Both draft contexts run: `partial` and `conditioned` draft over their own output states
//! (`drafted`), `oracle` and `conditioned-oracle` behind the verified ones (`verified`). Drafts are also
//! checked against the teacher-forced draft path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::{DType, Device, Tensor, D};
use hat::adapter::{Adapter, DraftContext, DraftVocab};
use hat::cloud::BackgroundServer;
use hat::decode::{generate, ModelDecoder, SamplingParams};
use hat::edge::{DraftOptions, EdgeOptions, EdgeReport, Mode, Pipeline, TreeChoice, TreeSplit};
use hat::io::source::{LoadedModel, ModelSpec};
use hat::model::Model;
use hat::net::protocol::{kind, WireDtype};
use hat::net::tls::Trust;
use hat::net::{ConnectOptions, Direction, FrameTap, LinkEmulation, QuicLink};
use hat::testing::{cloud_config, default_gguf, oracle_adapter, SplitWorld};

struct World {
    split: SplitWorld,
    model: Model,
    server: BackgroundServer,
    oracle: PathBuf,
    partial: PathBuf,
    conditioned_oracle: PathBuf,
    conditioned: PathBuf,
}

impl std::ops::Deref for World {
    type Target = SplitWorld;
    fn deref(&self) -> &SplitWorld {
        &self.split
    }
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let loaded = LoadedModel::load(&ModelSpec::Gguf(default_gguf().unwrap())).unwrap();
        // In a static, never dropped: its folder goes where later runs clean it up.
        let split = SplitWorld::new_in(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")), &loaded, 2, 2).unwrap();
        let (dir, cloud_dir, cloud) = (split.dir.path(), split.split_dir().join("cloud"), &split.cloud);
        let oracle = dir.join("oracle.safetensors");
        oracle_adapter(&cloud_dir, cloud, 2..28, None, DraftContext::Verified, &oracle).unwrap();
        let partial = dir.join("partial.safetensors");
        oracle_adapter(&cloud_dir, cloud, 2..16, None, DraftContext::Drafted, &partial).unwrap();
        // Conditioned: all middle layers with a little of the features mixed in (most drafts
        // accepted, not all); half the layers with an even mix (few accepted).
        let eye = Tensor::eye(576, DType::F32, &Device::Cpu).unwrap();
        let conditioned_oracle = dir.join("conditioned-oracle.safetensors");
        oracle_adapter(&cloud_dir, cloud, 2..28, Some(Tensor::cat(&[&(&eye * 0.5).unwrap(), &eye], 1).unwrap()), DraftContext::Verified, &conditioned_oracle).unwrap();
        let conditioned = dir.join("conditioned.safetensors");
        oracle_adapter(&cloud_dir, cloud, 2..16, Some((Tensor::cat(&[&eye, &eye], 1).unwrap() * 0.5).unwrap()), DraftContext::Drafted, &conditioned).unwrap();
        let server = split.serve("state", None, 8, 4096).unwrap();
        World { model: loaded.model(DType::F32, &Device::Cpu).unwrap(), split, server, oracle, partial, conditioned_oracle, conditioned }
    })
}

fn connect(w: &World, dtype: WireDtype, tap: Option<FrameTap>) -> QuicLink {
    hat::testing::connect(&w.server, &w.device, dtype, LinkEmulation::default(), tap).unwrap()
}

fn adapter(w: &World, which: &str) -> Adapter {
    let rope = w.device.rope.clone();
    match which {
        "none" => Adapter::none(rope),
        "oracle" => Adapter::load(&w.oracle, &w.device.manifest, rope, &Device::Cpu).unwrap(),
        "partial" => Adapter::load(&w.partial, &w.device.manifest, rope, &Device::Cpu).unwrap(),
        "conditioned-oracle" => Adapter::load(&w.conditioned_oracle, &w.device.manifest, rope, &Device::Cpu).unwrap(),
        "conditioned" => Adapter::load(&w.conditioned, &w.device.manifest, rope, &Device::Cpu).unwrap(),
        _ => unreachable!(),
    }
}

fn options(mode: Mode, draft_len: usize, chunk_size: usize, sampling: SamplingParams, max_tokens: usize) -> EdgeOptions {
    EdgeOptions { mode, draft_len, chunking: hat::edge::Chunking::Fixed(chunk_size), sampling, max_tokens, max_context: 4096, draft: DraftOptions::default(), fallback: Default::default() }
}

fn run(w: &World, adapter: &Adapter, ids: &[u32], opts: EdgeOptions, dtype: WireDtype) -> EdgeReport {
    let mut link = connect(w, dtype, None);
    hat::edge::generate(&w.device, adapter, &mut link, ids, &opts, |_| Ok(hat::decode::Flow::Continue)).unwrap()
}

/// `hat generate`'s greedy tokens for these ids (the unsplit reference).
fn reference(w: &World, ids: &[u32], max_tokens: usize) -> Vec<u32> {
    static CACHE: OnceLock<Mutex<HashMap<(Vec<u32>, usize), Vec<u32>>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(t) = cache.lock().unwrap().get(&(ids.to_vec(), max_tokens)) {
        return t.clone();
    }
    let eos = &w.device.tokenizer.eos_token_ids;
    let t = generate(&mut ModelDecoder::new(&w.model), ids, max_tokens, &SamplingParams::greedy(), eos, |_| Ok(())).unwrap().token_ids;
    cache.lock().unwrap().insert((ids.to_vec(), max_tokens), t.clone());
    t
}

fn prompts(w: &World) -> Vec<Vec<u32>> {
    let tok = &w.device.tokenizer;
    vec![
        tok.encode_prompt("Write a short poem about the sea.", true).unwrap(),
        tok.encode_prompt("List three prime numbers and explain why they are prime.", true).unwrap(),
        // Shorter than one chunk of 16.
        tok.encode_prompt("Hi", false).unwrap(),
    ]
}

#[test]
fn greedy_hat_with_f32_on_the_wire_equals_hat_generate() {
    let w = world();
    let max = 24;
    for (p, ids) in prompts(w).iter().enumerate() {
        let want = reference(w, ids, max);
        for (which, gamma) in [("partial", 1), ("oracle", 4), ("none", 8), ("conditioned", 8), ("conditioned-oracle", 4)] {
            let a = adapter(w, which);
            for chunk in [0, 1, 16] {
                // Every mechanism on, but always γ drafts (the measured threshold would cut drafting
                // short for adapters that cost as much as the cloud's layers).
                let draft = DraftOptions { threshold: Some(0.0), ..DraftOptions::default() };
                let opts = EdgeOptions { draft, ..options(Mode::Hat, gamma, chunk, SamplingParams::greedy(), max) };
                let r = run(w, &a, ids, opts, WireDtype::F32);
                assert_eq!(r.token_ids, want, "prompt {p}, adapter {which}, γ={gamma}, chunk={chunk}");
                if which == "oracle" {
                    // Its drafts are the model's tokens (how many a round sends is the measured
                    // tree rule's choice, which depends on timing).
                    assert!(r.acceptance_rate > 0.9 && r.mean_accepted > 1.5, "oracle adapter should be accepted: {r:?}");
                }
            }
        }
    }
}

/// A draft vocabulary for adapters that have none: the first `n` token ids (so drafts the model
/// wants are often outside it).
fn with_vocab(mut a: Adapter, n: usize) -> Adapter {
    a.draft_vocab = Some(DraftVocab { ids: (0..2 * n as u32).collect(), size: n, source: "test".into() });
    a
}

/// Every drafting mechanism alone and all together (reduced draft vocabulary, int8 draft compute,
/// a draft-length threshold, drafting ahead) keeps greedy output equal to `hat generate`; each
/// one does what it says in the report.
#[test]
fn every_drafting_mechanism_keeps_greedy_exact() {
    let w = world();
    let max = 24;
    let plain = DraftOptions::plain();
    let variants = [
        ("plain", plain),
        ("vocab", DraftOptions { vocab: Some(3000), ..plain }),
        ("vocab and its context rows", DraftOptions { vocab: Some(3000), context_rows: true, ..plain }),
        ("int8", DraftOptions { int8: true, ..plain }),
        ("threshold", DraftOptions { threshold: Some(0.3), ..plain }),
        ("ahead", DraftOptions { overlap: true, ..plain }),
        ("tree 12x3", DraftOptions { tree: TreeChoice::Fixed { nodes: 12, depth: Some(3) }, ..plain }),
        ("tree 40, int8", DraftOptions { tree: TreeChoice::Fixed { nodes: 40, depth: None }, int8: true, ..plain }),
        ("chain, all on", DraftOptions { tree: TreeChoice::Chain, ..DraftOptions::default() }),
        ("all (defaults: auto tree)", DraftOptions::default()),
        ("all, trees extended", DraftOptions { pipeline: Pipeline::Rows(4), ..DraftOptions::default() }),
    ];
    for ids in prompts(w).iter().take(2) {
        let want = reference(w, ids, max);
        for (which, gamma) in [("conditioned-oracle", 4), ("partial", 3), ("conditioned", 2), ("none", 2)] {
            let a = with_vocab(adapter(w, which), 4000);
            for (name, draft) in variants {
                let opts = EdgeOptions { draft, ..options(Mode::Hat, gamma, 16, SamplingParams::greedy(), max) };
                let r = run(w, &a, ids, opts, WireDtype::F32);
                assert_eq!(r.token_ids, want, "adapter {which}, γ={gamma}, {name}");
                let d = &r.drafting;
                let rows = match draft.vocab {
                    Some(0) => 49152,
                    Some(n) => n,
                    None => 4000, // the adapter's default size
                };
                assert_eq!(d.draft_vocab, rows, "{name}");
                // The prompts hold tokens past the first 8,000 ids, which a reduced head adds.
                assert_eq!(d.draft_context_rows > 0, draft.context_rows && draft.vocab != Some(0), "{name}: {d:?}");
                let chain = draft.tree == TreeChoice::Chain;
                assert_eq!((d.draft_int8, d.overlap), (draft.int8, draft.overlap), "{name}");
                assert_eq!(d.tree_nodes > 0, !chain, "{name}: {d:?}");
                if !draft.overlap {
                    assert_eq!(d.ahead_rounds, 0, "{name}");
                }
                if draft.threshold == Some(0.0) {
                    // Every round but the last (no token left to draft) drafts.
                    assert!(r.draft_checks[0] + 1 >= r.rounds, "{name}: fixed γ: {r:?}");
                }
                if which == "conditioned-oracle" {
                    eprintln!("{which}, {name}: {:.2} tokens/round, {:.1} nodes/round, {} of {} rounds drafted ahead and used", r.mean_accepted, d.tree_nodes_per_round, d.ahead_hits, d.ahead_rounds);
                }
            }
        }
    }
}

/// Trees drafted ahead while the cloud verifies (a 60 ms round trip leaves the device time to
/// grow them) keep greedy output equal to `hat generate`, with an adapter whose drafts are
/// right (what was drafted ahead is used: as the next round, or, with the pipeline, as
/// extensions verification walks into) and one whose drafts are mostly wrong.
#[test]
fn trees_drafted_ahead_keep_greedy_exact_and_get_used() {
    let w = world();
    let max = 24;
    let link = LinkEmulation { rtt_ms: 60.0, ..Default::default() };
    for (which, gamma) in [("conditioned-oracle", 4), ("conditioned", 3)] {
        let a = adapter(w, which);
        let (mut hits, mut walks) = (0, 0);
        for ids in prompts(w).iter().take(2) {
            let want = reference(w, ids, max);
            for tree in [TreeChoice::Auto, TreeChoice::Fixed { nodes: 6, depth: Some(2) }] {
                for pipeline in [Pipeline::Auto, Pipeline::Off] {
                    // Fixed trees with the pipeline also go as two blocks (the first two rows,
                    // then the rest) before their extension.
                    let split = if pipeline == Pipeline::Auto && matches!(tree, TreeChoice::Fixed { .. }) { TreeSplit::Rows(2) } else { TreeSplit::Auto };
                    let opts = EdgeOptions { draft: DraftOptions { tree, pipeline, split, ..DraftOptions::default() }, ..options(Mode::Hat, gamma, 16, SamplingParams::greedy(), max) };
                    let mut l = hat::testing::connect(&w.server, &w.device, WireDtype::F32, link, None).unwrap();
                    let r = hat::edge::generate(&w.device, &a, &mut l, ids, &opts, |_| Ok(hat::decode::Flow::Continue)).unwrap();
                    assert_eq!(r.token_ids, want, "{which}, {tree:?}, {pipeline:?}");
                    let d = &r.drafting;
                    assert!(d.overlap && d.ahead_rounds > 0, "{which}, {tree:?}, {pipeline:?}: {d:?}");
                    match pipeline {
                        Pipeline::Off => hits += d.ahead_hits,
                        _ => walks += d.extensions_used,
                    }
                    eprintln!(
                        "{which}, {tree:?}, {pipeline:?}, {split:?}: {:.2} tokens/round, {} of {} rounds drafted ahead used; walked into {} of {} extensions and {} of {} second blocks",
                        r.mean_accepted, d.ahead_hits, d.ahead_rounds, d.extensions_used, d.extensions, d.tree_splits_used, d.tree_splits
                    );
                }
            }
        }
        if which == "conditioned-oracle" {
            assert!(hits > 0 && walks > 0, "an oracle's trees drafted ahead are used: {hits} next rounds prepared, {walks} walks into extensions");
        }
    }
}

/// A tree whose every branch is wrong: the draft vocabulary holds only tokens the model's greedy
/// answer never uses, so verification rejects every node of every tree, and the output is still
/// `hat generate`'s (each round commits the LLM's own token at the root).
#[test]
fn trees_whose_every_branch_is_wrong_keep_greedy_exact() {
    let w = world();
    let max = 16;
    let ids = &prompts(w)[0];
    let want = reference(w, ids, max);
    let unused: Vec<u32> = (30_000u32..).filter(|t| !want.contains(t)).take(64).collect();
    let mut a = adapter(w, "conditioned-oracle");
    a.draft_vocab = Some(DraftVocab { ids: unused, size: 64, source: "test: never the answer".into() });
    for tree in [TreeChoice::Fixed { nodes: 12, depth: Some(3) }, TreeChoice::Auto] {
        // Without the context's rows, which would let the answer's own tokens be drafted.
        let draft = DraftOptions { tree, threshold: Some(0.0), context_rows: false, ..DraftOptions::default() };
        let opts = EdgeOptions { draft, ..options(Mode::Hat, 4, 16, SamplingParams::greedy(), max) };
        let r = run(w, &a, ids, opts, WireDtype::F32);
        assert_eq!(r.token_ids, want, "{tree:?}");
        assert_eq!(r.drafts_accepted, 0, "{tree:?}: {r:?}");
        if matches!(tree, TreeChoice::Fixed { .. }) {
            // Full trees but in the last rounds (fewer levels near --max-tokens).
            assert!(r.drafting.tree_nodes >= 12 * (r.rounds - 3), "{tree:?}: full trees were sent: {r:?}");
        }
    }
}

/// The adapter shipped for the default split (what `run-edge` drafts with by default) loads,
/// keeps greedy output exact and gets drafts accepted.
#[test]
fn the_shipped_adapter_fits_the_default_split_and_drafts() {
    let w = world();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(hat::adapter::default_adapter_path(&w.device.manifest));
    let a = Adapter::load(&path, &w.device.manifest, w.device.rope.clone(), &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
    assert!(a.is_conditioned() && a.num_layers() > 0);
    let (mut generated, mut rounds) = (0, 0);
    for ids in prompts(w).iter().take(2) {
        let r = run(w, &a, ids, options(Mode::Hat, 4, 16, SamplingParams::greedy(), 32), WireDtype::F32);
        assert_eq!(r.token_ids, reference(w, ids, 32));
        (generated, rounds) = (generated + r.generated_tokens - 1, rounds + r.rounds);
    }
    // Without an adapter every round yields one token.
    let mean = generated as f64 / rounds as f64;
    assert!(mean > 1.25, "{generated} tokens in {rounds} rounds");
}

#[test]
fn u_shape_equals_hat_generate() {
    let w = world();
    for ids in prompts(w).iter().take(2) {
        let r = run(w, &Adapter::none(w.device.rope.clone()), ids, options(Mode::UShape, 4, 0, SamplingParams::greedy(), 24), WireDtype::F32);
        assert_eq!(r.token_ids, reference(w, ids, 24));
        assert_eq!(r.rounds, r.generated_tokens - 1, "one round trip per token after the first");
        assert_eq!((r.drafts_sent, r.mean_accepted), (0, 1.0));
    }
}

#[test]
fn any_chunking_keeps_greedy_exact_and_the_planner_plans_from_measurements() {
    let w = world();
    let ids = &prompts(w)[1];
    let want = reference(w, ids, 12);
    let n = ids.len();
    let a = adapter(w, "conditioned");
    let plans = [vec![1, n - 1], vec![3, 9, n - 12], hat::sched::equal_chunks(n, 5), vec![n - 2, 1, 1]];
    for plan in plans {
        let opts = EdgeOptions { chunking: hat::edge::Chunking::Planned(plan.clone()), ..options(Mode::Hat, 4, 0, SamplingParams::greedy(), 12) };
        let r = run(w, &a, ids, opts, WireDtype::F32);
        assert_eq!(r.token_ids, want, "plan {plan:?}");
        assert_eq!(r.chunk_plan, plan);
    }
    // A plan that does not cover the prompt is refused.
    let bad = EdgeOptions { chunking: hat::edge::Chunking::Planned(vec![1, 2]), ..options(Mode::Hat, 4, 0, SamplingParams::greedy(), 4) };
    let mut link = connect(w, WireDtype::F32, None);
    let e = hat::edge::generate(&w.device, &a, &mut link, ids, &bad, |_| Ok(hat::decode::Flow::Continue)).err().expect("refused").to_string();
    assert!(e.contains("does not cover"), "{e}");

    // The planner end to end: a quick device profile, the cloud's cost model and load from the
    // handshake, the link probed on the session; its plan covers the prompt and keeps greedy exact.
    let drafter = hat::edge::Drafter::new(&w.device, &a, DraftOptions::default()).unwrap();
    let mut profile = hat::profile::Profile::new(&w.device.manifest.split_id, "test", w.device.manifest.hidden_size, hat::util::threads::count(), true);
    profile.device = Some(hat::profile::profile_device(&w.device, &drafter, &hat::profile::Grid::quick(), &mut || {}).unwrap());
    let mut link = connect(w, WireDtype::F32, None);
    let fake = Path::new("profile.json");
    let p = hat::profile::plan_session(&w.device, &drafter, &mut link, Some((&profile, fake)), n, WireDtype::F32, true).unwrap();
    assert_eq!(p.plan.chunks.iter().sum::<usize>(), n, "{p:?}");
    assert!(p.plan.predicted_ttft_ms > 0.0 && p.plan.predicted_ttft_ms <= p.plan.best_equal_ms + 1e-9, "{p:?}");
    assert_eq!(p.link_source, "probed in this session");
    assert_eq!(p.device_source, hat::profile::Source::File(fake.to_path_buf()));
    let opts = EdgeOptions { chunking: hat::edge::Chunking::Planned(p.plan.chunks.clone()), ..options(Mode::Hat, 4, 0, SamplingParams::greedy(), 12) };
    let r = hat::edge::generate_with(&w.device, &drafter, &mut link, ids, &opts, |_| Ok(hat::decode::Flow::Continue)).unwrap();
    assert_eq!(r.token_ids, want);
    assert!(link.load.sessions >= 1, "every reply carries the cloud's load: {:?}", link.load);
}

#[test]
fn sampling_is_deterministic_per_seed() {
    let w = world();
    let ids = &prompts(w)[0];
    let a = adapter(w, "partial");
    let s = |seed| {
        let sampling = SamplingParams { temperature: 0.8, top_p: Some(0.95), top_k: None, seed };
        run(w, &a, ids, options(Mode::Hat, 4, 16, sampling, 24), WireDtype::F16).token_ids
    };
    let first = s(11);
    assert_eq!(first, s(11));
    assert_ne!(first, s(12));
}

#[test]
fn refusals_are_clear() {
    let w = world();
    let base = ConnectOptions {
        addr: w.server.addr,
        trust: Trust::Fingerprint(w.server.fingerprint.clone()),
        token: None,
        split_id: w.device.manifest.split_id.clone(),
        hidden_size: w.device.manifest.hidden_size,
        dtype: WireDtype::F16,
        emulation: LinkEmulation::default(),
        tap: None,
        connect_timeout: hat::net::CONNECT_TIMEOUT,
        runtime: None,
    };
    let err = |o: ConnectOptions| QuicLink::connect(o).err().expect("refused").to_string();
    let e = err(ConnectOptions { split_id: "0123456789abcdef0123456789abcdef".into(), ..base.clone() });
    assert!(e.contains("split") && e.contains(&w.device.manifest.split_id) && e.ends_with("(SplitMismatch)"), "{e}");
    assert!(!e.contains('/') && !e.contains(".gguf"), "a refusal does not reveal the cloud's files: {e}");
    let e = err(ConnectOptions { trust: Trust::Fingerprint(format!("sha256:{}", "ab".repeat(32))), ..base.clone() });
    assert!(e.contains("fingerprint"), "{e}");
    for old in [1, 2] {
        let e = QuicLink::connect_with_version(base.clone(), old).err().expect("refused").to_string();
        assert!(e.contains(&format!("protocol version {old}")) && e.contains(&format!("speaks {}", hat::net::protocol::PROTOCOL_VERSION)) && e.ends_with("(VersionMismatch)"), "{e}");
    }
    let e = err(ConnectOptions { hidden_size: 64, ..base.clone() });
    assert!(e.contains("hidden size 64") && e.ends_with("(BadRequest)"), "{e}");

    // A server that wants a token.
    let dir = tempfile::tempdir().unwrap();
    let guarded = BackgroundServer::start(w.cloud.clone(), cloud_config(dir.path().to_path_buf(), Some("s3cret"), 1, 4096)).unwrap();
    let at = |token: Option<&str>| ConnectOptions {
        addr: guarded.addr,
        trust: Trust::CertFile(dir.path().join("cert.der")),
        token: token.map(str::to_string),
        ..base.clone()
    };
    for token in [None, Some("wrong")] {
        let e = err(at(token));
        assert!(e.contains("token") && e.ends_with("(Unauthorized)"), "{token:?}: {e}");
    }
    let first = QuicLink::connect(at(Some("s3cret"))).expect("the right token and the certificate file are accepted");
    let busy = QuicLink::connect(at(Some("s3cret"))).err().expect("busy");
    assert_eq!(busy.cloud_failure(), Some(hat::error::CloudFailure::Busy), "{busy}");
    let e = busy.to_string();
    assert!(e.contains("maximum of 1 sessions") && e.ends_with("(Busy)"), "{e}");
    drop(first);
}

/// A bare QUIC client endpoint that trusts `fingerprint` (for peers that misbehave); with
/// `window`, its receive windows are that small.
fn raw_endpoint(fingerprint: String, window: Option<u32>) -> quinn::Endpoint {
    raw_endpoint_at("127.0.0.1:0", fingerprint, window)
}

/// [`raw_endpoint`] bound to `bind` (another loopback address: another peer).
fn raw_endpoint_at(bind: &str, fingerprint: String, window: Option<u32>) -> quinn::Endpoint {
    let tls = hat::net::tls::client_config(&Trust::Fingerprint(fingerprint)).unwrap();
    let mut endpoint = quinn::Endpoint::client(bind.parse().unwrap()).unwrap();
    let mut cfg = quinn::ClientConfig::new(Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap()));
    let mut transport = hat::net::transport::transport_config();
    if let Some(w) = window {
        transport.stream_receive_window(quinn::VarInt::from_u32(w));
        transport.receive_window(quinn::VarInt::from_u32(2 * w));
    }
    cfg.transport_config(Arc::new(transport));
    endpoint.set_default_client_config(cfg);
    endpoint
}

/// A well-behaved edge's settings for `server`.
fn edge_options(w: &World, server: &BackgroundServer) -> ConnectOptions {
    ConnectOptions {
        addr: server.addr,
        trust: Trust::Fingerprint(server.fingerprint.clone()),
        token: None,
        split_id: w.device.manifest.split_id.clone(),
        hidden_size: w.device.manifest.hidden_size,
        dtype: WireDtype::F32,
        emulation: LinkEmulation::default(),
        tap: None,
        connect_timeout: hat::net::CONNECT_TIMEOUT,
        runtime: None,
    }
}

/// How a misbehaving peer behaves once its session is open.
#[derive(Clone, Copy)]
enum Stall {
    /// Sends four blocks of 64 positions in full, then never reads (nor grants stream credit).
    NeverReads,
    /// Starts a frame of 100 kB, sends ten bytes of it, and stops.
    HalfAFrame,
}

/// A server with one slot, taken by a peer that stalls as `stall` says; returns how long until
/// a well-behaved edge was served, and checks its output.
fn slot_comes_free_after(stall: Stall) -> std::time::Duration {
    use hat::net::protocol::{read_frame, write_frame, HiddenBlock, Message, PROTOCOL_VERSION};
    let w = world();
    let hidden = w.device.manifest.hidden_size;
    let dir = tempfile::tempdir().unwrap();
    let config = hat::cloud::CloudConfig {
        write_timeout: std::time::Duration::from_secs(2),
        handshake_timeout: std::time::Duration::from_secs(2),
        ..cloud_config(dir.path().to_path_buf(), None, 1, 4096)
    };
    let server = BackgroundServer::start(w.cloud.clone(), config).unwrap();
    // The peer, on a thread of its own (its connection stays up while it stalls), with 16 KiB
    // receive windows.
    let (addr, fingerprint, split_id) = (server.addr, server.fingerprint.clone(), w.device.manifest.split_id.clone());
    let (sent_tx, sent_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let endpoint = raw_endpoint(fingerprint, Some(16 << 10));
            let conn = endpoint.connect(addr, hat::net::tls::SERVER_NAME).unwrap().await.unwrap();
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            let hello = Message::Hello { version: PROTOCOL_VERSION, split_id, token: String::new(), hidden_size: hidden as u32, dtype: WireDtype::F16 };
            write_frame(&mut send, &hello.encode()).await.unwrap();
            read_frame(&mut recv, 1 << 20).await.unwrap().expect("a welcome");
            match stall {
                Stall::NeverReads => {
                    for i in 0..4 {
                        let block = HiddenBlock { start: 64 * i, count: 64, dtype: WireDtype::F16, data: vec![0; 64 * hidden * 2] };
                        write_frame(&mut send, &Message::Hidden(block).encode()).await.unwrap();
                    }
                }
                Stall::HalfAFrame => {
                    send.write_all(&100_000u32.to_le_bytes()).await.unwrap();
                    send.write_all(&[hat::net::protocol::kind::HIDDEN; 10]).await.unwrap();
                }
            }
            let _ = sent_tx.send(());
            tokio::time::sleep(std::time::Duration::from_secs(40)).await;
            drop((endpoint, conn, send, recv));
        });
    });
    sent_rx.recv_timeout(std::time::Duration::from_secs(30)).expect("the stalled peer got its session");
    let connect_options = edge_options(w, &server);
    // The one slot is the stalled peer's at first; it must come free within a few deadlines.
    let started = std::time::Instant::now();
    let mut link = loop {
        match QuicLink::connect(connect_options.clone()) {
            Ok(link) => break link,
            Err(e) if e.to_string().ends_with("(Busy)") && started.elapsed().as_secs() < 20 => std::thread::sleep(std::time::Duration::from_millis(250)),
            Err(e) => panic!("a well-behaved edge was refused {:?} after the peer stalled: {e}", started.elapsed()),
        }
    };
    let took = started.elapsed();
    let ids = &prompts(w)[1];
    let r = hat::edge::generate(&w.device, &Adapter::none(w.device.rope.clone()), &mut link, ids, &options(Mode::UShape, 0, 0, SamplingParams::greedy(), 8), |_| Ok(hat::decode::Flow::Continue)).unwrap();
    assert_eq!(r.token_ids, reference(w, ids, 8));
    took
}

/// A cloud slowed to `pass_delay` per pass; `sessions` edges each send one 16-position block
/// (a prefill chunk: a pass of its own) at once and wait for it. Returns each edge's outcome
/// (the reply's states, or the error), how long it waited and the pending notices it heard.
fn queue_behind_slow_passes(pass_delay: std::time::Duration, sessions: usize) -> (Tensor, Vec<(Result<Tensor, hat::Error>, std::time::Duration, u32)>) {
    use hat::net::MiddleLink;
    let w = world();
    let dir = tempfile::tempdir().unwrap();
    let config = hat::cloud::CloudConfig { pass_delay, ..cloud_config(dir.path().to_path_buf(), None, sessions, 4096) };
    let server = BackgroundServer::start(w.cloud.clone(), config).unwrap();
    let ids = &prompts(w)[0];
    assert!(ids.len() >= 16 && 16 > hat::model::kernels::SMALL_M, "a block of 16 positions runs in a pass of its own");
    let x = w.device.embedder.embed_ids(&ids[..16]).unwrap();
    let h = w.device.input.forward(&x, 0, &mut w.device.input.new_cache()).unwrap();
    let want = w.cloud.middle.forward(&h, 0, &mut w.cloud.middle.new_cache()).unwrap();
    // Every edge connects first and then all submit together, so that the blocks queue behind
    // each other however long the connections took (on a loaded machine a late connection
    // could find the first passes done).
    let connected = std::sync::Barrier::new(sessions);
    let outcomes = std::thread::scope(|s| {
        let handles: Vec<_> = (0..sessions)
            .map(|_| {
                let (h, options, connected) = (&h, edge_options(w, &server), &connected);
                s.spawn(move || {
                    // Unwrapped after the barrier: a failed connection must not leave the
                    // others waiting at it.
                    let link = QuicLink::connect(options);
                    connected.wait();
                    let mut link = link.unwrap();
                    let began = std::time::Instant::now();
                    link.submit(0, h).unwrap();
                    let out = link.receive().map(|r| r.hidden);
                    let (took, notices) = (began.elapsed(), link.stats().pending_notices);
                    if out.is_err() {
                        link.abandon();
                    }
                    (out, took, notices)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    (want, outcomes)
}

/// Blocks queued behind others' passes for longer than an edge's reply allowance (three prefill
/// chunks, each in a pass of 1.5 s: the last is answered after ~4.5 s, the allowance is ~3 s)
/// are not taken for a cloud gone: the cloud sends pending notices while its passes advance, and
/// every edge gets its states, exactly.
#[test]
fn edges_queued_behind_long_passes_keep_waiting() {
    let (want, outcomes) = queue_behind_slow_passes(std::time::Duration::from_millis(1500), 3);
    let slowest = outcomes.iter().map(|(_, took, _)| *took).max().unwrap();
    assert!(slowest > hat::net::client::OVERDUE_MIN, "the queue outlasted the allowance: {slowest:?}");
    for (out, took, notices) in outcomes {
        let got = out.unwrap_or_else(|e| panic!("an edge queued for {took:?} gave up: {e}"));
        assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert!(took < std::time::Duration::from_secs(2) || notices > 0, "waited {took:?} with {notices} notices");
    }
}

/// A pass that runs far past what an edge would allow for it (8 s for a block predicted at a
/// few ms) is a stuck cloud: its notices stop and the edge gives it up (`Lost`) before the pass
/// ends, instead of waiting as long as the cloud likes.
#[test]
fn an_edge_gives_up_a_cloud_whose_pass_is_stuck() {
    let (_, outcomes) = queue_behind_slow_passes(std::time::Duration::from_secs(8), 1);
    let (out, took, _) = &outcomes[0];
    let e = out.as_ref().expect_err("a stuck cloud is given up");
    assert_eq!(e.cloud_failure(), Some(hat::error::CloudFailure::Lost), "{e}");
    assert!(*took < std::time::Duration::from_secs(8), "given up after {took:?}: {e}");
}

/// A peer that opens a session, sends blocks and then never reads (nor grants stream credit)
/// loses its session at the cloud's write deadline: its slot goes to a well-behaved edge instead
/// of that edge being refused as busy for as long as the peer likes.
#[test]
fn a_peer_that_stops_reading_loses_its_slot() {
    let took = slot_comes_free_after(Stall::NeverReads);
    eprintln!("the slot came free after {:.1} s", took.as_secs_f64());
}

/// A peer that starts a frame and stalls mid-frame loses its session when the frame is overdue
/// (the handshake deadline plus its size at 100 kB/s), not at the idle timeout.
#[test]
fn a_peer_that_stalls_mid_frame_loses_its_slot() {
    let took = slot_comes_free_after(Stall::HalfAFrame);
    eprintln!("the slot came free after {:.1} s", took.as_secs_f64());
}

/// Connections that finish TLS but never open a session, or open a stream and send a few bytes
/// of a hello (slow loris), cannot crowd out edges: beyond the server's connection limit new ones
/// are refused, and each is closed at the handshake deadline, after which a well-behaved edge is
/// served.
#[test]
fn idle_and_slow_loris_connections_are_capped_and_closed_at_the_handshake_deadline() {
    let w = world();
    let dir = tempfile::tempdir().unwrap();
    let deadline = std::time::Duration::from_secs(2);
    let config = hat::cloud::CloudConfig { handshake_timeout: deadline, ..cloud_config(dir.path().to_path_buf(), None, 1, 4096) };
    let server = BackgroundServer::start(w.cloud.clone(), config).unwrap();
    let limit = hat::cloud::connection_limit(1);
    // The crowd: `limit` connections that never open a stream, kept alive on a thread of their own.
    let (addr, fingerprint) = (server.addr, server.fingerprint.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let endpoint = raw_endpoint(fingerprint, None);
            let (mut crowd, mut streams) = (Vec::new(), Vec::new());
            for i in 0..limit {
                let conn = endpoint.connect(addr, hat::net::tls::SERVER_NAME).unwrap().await.unwrap();
                if i % 2 == 1 {
                    // Slow loris: a stream, two bytes of a frame's length, and nothing more.
                    let (mut send, recv) = conn.open_bi().await.unwrap();
                    send.write_all(&[0x10, 0x00]).await.unwrap();
                    streams.push((send, recv));
                }
                crowd.push(conn);
            }
            let _ = ready_tx.send(());
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            drop((crowd, streams));
        });
    });
    ready_rx.recv_timeout(std::time::Duration::from_secs(30)).expect("the crowd connected");
    let connect_options = edge_options(w, &server);
    let started = std::time::Instant::now();
    let first = QuicLink::connect(connect_options.clone());
    let refused_at_first = first.is_err();
    drop(first);
    let mut link = loop {
        match QuicLink::connect(connect_options.clone()) {
            Ok(link) => break link,
            Err(_) if started.elapsed() < 5 * deadline => std::thread::sleep(std::time::Duration::from_millis(200)),
            Err(e) => panic!("a well-behaved edge was still refused {:?} after the crowd connected: {e}", started.elapsed()),
        }
    };
    eprintln!("refused at first: {refused_at_first}; served after {:.1} s", started.elapsed().as_secs_f64());
    assert!(refused_at_first, "the connection limit refuses connection {} at once", limit + 1);
    let ids = &prompts(w)[1];
    let r = hat::edge::generate(&w.device, &Adapter::none(w.device.rope.clone()), &mut link, ids, &options(Mode::UShape, 0, 0, SamplingParams::greedy(), 8), |_| Ok(hat::decode::Flow::Continue)).unwrap();
    assert_eq!(r.token_ids, reference(w, ids, 8));
}

#[test]
fn malformed_frames_end_one_session_not_the_server() {
    let w = world();
    let ids = &prompts(w)[1];
    // The cloud's frame limit for this session: its context of hidden states in its wire dtype
    // (f16) plus a header, or a link probe's largest padding, whichever is larger.
    let limit = (4096 * w.device.manifest.hidden_size * 2 + 64).max(hat::net::protocol::MAX_PROBE + 64);
    let mut oversized = vec![0u8; limit + 1];
    oversized[0] = kind::HIDDEN;
    // Tree blocks (protocol 3) that a well-behaved edge never sends.
    let tree = |start: u32, parents: Vec<u16>, keep: Vec<u16>| {
        let rows = parents.len().max(1);
        let block = hat::net::protocol::HiddenBlock { start, count: rows as u32, dtype: WireDtype::F16, data: vec![0; rows * w.device.manifest.hidden_size * 2] };
        hat::net::protocol::Message::Tree { block, parents, keep }.encode()
    };
    let root = hat::model::tree::ROOT;
    // A frame of a kind the cloud never takes from an edge: refused by its name, its bytes not echoed.
    let middle = hat::net::protocol::Message::Middle {
        block: hat::net::protocol::HiddenBlock { start: 0, count: 1, dtype: WireDtype::F16, data: vec![0xAB; w.device.manifest.hidden_size * 2] },
        compute_us: 0,
        load: Default::default(),
    };
    let cases: [(Vec<u8>, String); 7] = [
        (middle.encode(), "unexpected middle states frame".to_string()),
        (tree(0, vec![root], vec![0]), "a kept path, but the previous block was not a tree".to_string()),
        (tree(0, vec![root, 1], vec![]), "tree row 1 names row 1 as its parent".to_string()),
        (tree(3, vec![root, 0], vec![]), "block starts at position 3 but only 0 are cached".to_string()),
        (oversized, format!("malformed frame: frame of {} bytes (limit {limit})", limit + 1)),
        (vec![42u8, 1, 2, 3], "malformed frame: unknown frame kind 42".to_string()),
        // A hidden block claiming 5 positions with 2 bytes of payload.
        (vec![kind::HIDDEN, 0, 0, 0, 0, 5, 0, 0, 0, 1, 9, 9], "malformed frame: ".to_string()),
    ];
    for (garbage, want) in cases {
        let mut link = connect(w, WireDtype::F16, None);
        link.send_raw(garbage).unwrap();
        let e = hat::net::MiddleLink::receive(&mut link).err().expect("an error frame").to_string();
        assert!(e.starts_with("the cloud refused: ") && e.contains(&want) && e.ends_with("(BadRequest)"), "{e}");
    }
    // The server still serves.
    let r = run(w, &Adapter::none(w.device.rope.clone()), ids, options(Mode::UShape, 0, 0, SamplingParams::greedy(), 8), WireDtype::F32);
    assert_eq!(r.token_ids, reference(w, ids, 8));
}

#[test]
fn two_concurrent_edges_both_get_correct_output() {
    let w = world();
    let ps = prompts(w);
    let wants: Vec<Vec<u32>> = ps.iter().take(2).map(|ids| reference(w, ids, 16)).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = ps
            .iter()
            .take(2)
            .map(|ids| s.spawn(move || run(w, &adapter(w, "partial"), ids, options(Mode::Hat, 4, 16, SamplingParams::greedy(), 16), WireDtype::F32).token_ids))
            .collect();
        for (h, want) in handles.into_iter().zip(&wants) {
            assert_eq!(&h.join().unwrap(), want);
        }
    });
}

#[test]
fn only_hidden_states_cross_the_network() {
    let w = world();
    let prompt = "My secret phrase is blue-harvest-42. Repeat it.";
    let ids = w.device.tokenizer.encode_prompt(prompt, true).unwrap();
    let frames: Arc<Mutex<Vec<(Direction, Vec<u8>)>>> = Arc::default();
    let f = frames.clone();
    let tap: FrameTap = Arc::new(move |d, body| f.lock().unwrap().push((d, body.to_vec())));
    let mut link = connect(w, WireDtype::F32, Some(tap));
    // The link is probed first (as `--chunk-size auto` does without a profile's link figures).
    let measured = link.measure_link(4096, 2).unwrap();
    assert!(measured.rtt_ms >= 0.0 && measured.up_mbps > 0.0 && measured.down_mbps > 0.0, "{measured:?}");
    let a = adapter(w, "partial");
    // Draft trees with branches: blocks carry parent indices, and the next block the kept path.
    let opts = options(Mode::Hat, 4, 16, SamplingParams::greedy(), 16);
    // With extensions of sent trees too (when drafting ahead gets to them before a reply).
    let opts = EdgeOptions { draft: DraftOptions { tree: TreeChoice::Fixed { nodes: 10, depth: Some(4) }, pipeline: Pipeline::Rows(4), ..opts.draft }, ..opts };
    let r = hat::edge::generate(&w.device, &a, &mut link, &ids, &opts, |_| Ok(hat::decode::Flow::Continue)).unwrap();
    drop(link);
    // Per draft position: checked only after the ones before it were accepted.
    assert_eq!((r.draft_checks.len(), r.draft_hits.iter().sum::<usize>()), (4, r.drafts_accepted), "{r:?}");
    assert!(r.draft_checks[0] <= r.rounds && (0..4).all(|i| r.draft_hits[i] <= r.draft_checks[i] && (i == 3 || r.draft_checks[i + 1] <= r.draft_hits[i])), "{r:?}");
    let frames = frames.lock().unwrap();
    let hidden = w.device.manifest.hidden_size;

    // The first prompt chunk's input-submodel hidden states, computed here the same way.
    let x = w.device.embedder.embed_ids(&ids[..16]).unwrap();
    let h = w.device.input.forward(&x, 0, &mut w.device.input.new_cache()).unwrap();
    let first16: Vec<f32> = h.flatten_all().unwrap().to_vec1().unwrap();

    let (mut hidden_frames, mut probes, mut branching, mut tree_rows, mut extensions) = (0, 0, 0, 0, 0);
    for (d, body) in frames.iter() {
        let allowed = match d {
            Direction::Up => [kind::HELLO, kind::HIDDEN, kind::TREE, kind::PROBE, kind::CLOSE].contains(&body[0]),
            Direction::Down => [kind::WELCOME, kind::MIDDLE, kind::PENDING, kind::PROBE_ECHO].contains(&body[0]),
        };
        assert!(allowed, "frame kind {} {d:?}", body[0]);
        // A pending notice carries a block's start and nothing else.
        assert!(body[0] != kind::PENDING || body.len() == 5, "a pending notice of {} bytes", body.len());
        // Probes carry their echo size and zero padding, nothing else.
        if body[0] == kind::PROBE || body[0] == kind::PROBE_ECHO {
            let padding = if body[0] == kind::PROBE { &body[5..] } else { &body[1..] };
            assert!(padding.iter().all(|&b| b == 0), "probe padding must be zeros");
            probes += 1;
        }
        // Neither the text nor its ids (as u32 or u16 runs) appear in any frame.
        let hay = body.as_slice();
        assert!(!hay.windows(12).any(|w| w == &prompt.as_bytes()[..12]));
        let ids32: Vec<u8> = ids[5..9].iter().flat_map(|i| i.to_le_bytes()).collect();
        assert!(!hay.windows(ids32.len()).any(|w| w == ids32.as_slice()));
        let ids16: Vec<u8> = ids[5..9].iter().flat_map(|&i| u16::try_from(i).expect("the default vocabulary fits u16").to_le_bytes()).collect();
        assert!(!hay.windows(ids16.len()).any(|w| w == ids16.as_slice()));
        // A tree block: the kept rows of the previous block and one parent per row, each only an
        // index into a block (u16), then the block itself.
        let mut off = match body[0] {
            kind::HIDDEN => 1,
            kind::MIDDLE => 9 + hat::net::protocol::CloudLoad::WIRE_SIZE,
            _ => 0,
        };
        if body[0] == kind::TREE {
            let u16_at = |i: usize| u16::from_le_bytes([body[i], body[i + 1]]);
            let n_keep = u16_at(1) as usize;
            let keep: Vec<u16> = (0..n_keep).map(|i| u16_at(3 + 2 * i)).collect();
            let n_parents = u16_at(3 + 2 * n_keep) as usize;
            let parents: Vec<u16> = (0..n_parents).map(|i| u16_at(5 + 2 * n_keep + 2 * i)).collect();
            // A block extending the previous tree (its first row's parent is a row of that
            // tree) keeps nothing; its parents index earlier rows of the whole tree.
            let extends = parents.first().is_some_and(|&p| p != hat::model::tree::ROOT);
            let before = if extends { tree_rows } else { 0 };
            assert!(keep.iter().all(|&k| (k as usize) < tree_rows) && keep.first().is_none_or(|&k| k == 0) && !(extends && !keep.is_empty()), "kept rows index the previous tree: {keep:?}");
            assert!((extends || parents.first() == Some(&hat::model::tree::ROOT)) && parents.iter().enumerate().skip(usize::from(!extends)).all(|(i, &p)| (p as usize) < before + i), "parents index earlier rows: {parents:?}");
            extensions += usize::from(extends);
            tree_rows = before + parents.len();
            branching += usize::from(parents.len() > 1 && parents.iter().skip(1).any(|&p| parents.iter().skip(1).filter(|&&q| q == p).count() > 1));
            off = 5 + 2 * (n_keep + n_parents);
        }
        if off > 0 {
            // Middle: kind, compute time (8 bytes), the cloud's load (4 numbers), then the block.
            let count = u32::from_le_bytes(body[off + 4..off + 8].try_into().unwrap()) as usize;
            assert_eq!(body.len(), off + 9 + count * hidden * 4, "payload is exactly count × hidden f32 values");
            if *d == Direction::Up && body[0] == kind::HIDDEN {
                tree_rows = 0;
            }
            if body[0] == kind::HIDDEN && hidden_frames == 0 {
                let sent: Vec<f32> = body[off + 9..].chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
                assert!(sent == first16, "the first chunk is exactly the input submodel's hidden states");
            }
            if *d == Direction::Up {
                hidden_frames += 1;
            }
        }
    }
    assert!(hidden_frames >= 3 + r.rounds, "prefill chunks and one block per round: {hidden_frames}");
    assert_eq!(extensions, r.drafting.extensions + r.drafting.tree_splits, "blocks extending a tree: the extensions and the second blocks of split trees: {r:?}");
    assert!(branching > 0 && r.drafting.tree_nodes > r.rounds, "the test sent trees that branch: {r:?}");
    assert_eq!(probes, 2 * 4, "two round-trip probes and one each way for throughput, each answered");
}

/// How often do half-precision hidden states on the wire change a greedy token? (Measured and
/// printed; asserted only loosely: the rounding happens at the two cuts.)
#[test]
fn half_precision_wire_rarely_changes_tokens() {
    let w = world();
    let a = Adapter::none(w.device.rope.clone());
    let (mut same, mut total) = (0, 0);
    for ids in prompts(w).iter().take(2) {
        let want = reference(w, ids, 24);
        for dtype in [WireDtype::F16, WireDtype::BF16] {
            let got = run(w, &a, ids, options(Mode::UShape, 0, 0, SamplingParams::greedy(), 24), dtype).token_ids;
            let prefix = want.iter().zip(&got).take_while(|(a, b)| a == b).count();
            eprintln!("{}: identical prefix {prefix}/{}", dtype.name(), want.len());
            same += prefix;
            total += want.len();
            assert!(prefix >= 4, "{} diverged at token {prefix}", dtype.name());
        }
    }
    eprintln!("half-precision wire: {same}/{total} tokens before the first divergence");
}

/// A cloud that computes in f16 (what `serve-cloud --dtype f16` and a GPU run: candle's ops, the
/// tree's mask added to the scores, blocks converted from the wire's f32 and back) serves
/// prefill chunks, draft trees and u-shape's single positions; its answers follow the model's
/// until the rounding of 26 layers in f16 first tips a greedy choice.
#[test]
fn a_cloud_computing_in_half_precision_serves_chunks_and_trees() {
    let w = world();
    let cloud = Arc::new(hat::split::CloudBundle::load_as(&w.split_dir().join("cloud"), &Device::Cpu, Some(DType::F16)).unwrap());
    assert_eq!(cloud.middle.compute_dtype(), Some(DType::F16));
    let server = BackgroundServer::start(cloud, cloud_config(w.dir.path().join("state-f16"), None, 2, 4096)).unwrap();
    let a = adapter(w, "conditioned-oracle");
    let ids = &prompts(w)[0];
    let want = reference(w, ids, 16);
    for (mode, tree) in [(Mode::Hat, TreeChoice::Fixed { nodes: 6, depth: Some(3) }), (Mode::Hat, TreeChoice::Chain), (Mode::UShape, TreeChoice::Auto)] {
        let opts = EdgeOptions { draft: DraftOptions { tree, threshold: Some(0.0), ..DraftOptions::default() }, ..options(mode, 3, 16, SamplingParams::greedy(), 16) };
        let mut link = hat::testing::connect(&server, &w.device, WireDtype::F32, LinkEmulation::default(), None).unwrap();
        let r = hat::edge::generate(&w.device, &a, &mut link, ids, &opts, |_| Ok(hat::decode::Flow::Continue)).unwrap();
        let prefix = want.iter().zip(&r.token_ids).take_while(|(a, b)| a == b).count();
        eprintln!("f16 cloud, {mode:?} {tree:?}: identical prefix {prefix}/{}, {:.2} tokens/round", want.len(), r.mean_accepted);
        assert!(prefix >= 4, "{mode:?} {tree:?}: diverged at token {prefix}: {:?} vs {want:?}", r.token_ids);
        if mode == Mode::Hat {
            assert!(r.mean_accepted > 1.5, "{tree:?}: the oracle's drafts are accepted: {r:?}");
        }
    }
}

/// With γ = 1, every draft is the first of its round: a conditioned adapter's is made from the
/// cloud's middle outputs of all earlier positions, and with the `verified` draft context the
/// output submodel sees the verified states of all earlier positions. So the drafts must be
/// exactly the teacher-forced draft path's argmax on the final sequence: the number of accepted
/// drafts is predicted from one teacher-forced pass. (A feature off by one position, a drafted
/// feature or state where the verified one is known, breaks this.)
#[test]
fn first_drafts_equal_the_teacher_forced_draft_path() {
    let w = world();
    for which in ["partial", "oracle", "conditioned-oracle", "conditioned"] {
        first_drafts_are_teacher_forced(w, which);
    }
}

fn first_drafts_are_teacher_forced(w: &World, which: &str) {
    let a = adapter(w, which);
    let (mut all_accepted, mut all_rounds) = (0, 0);
    for ids in prompts(w).iter().take(2) {
        let opts = EdgeOptions { draft: DraftOptions::plain(), ..options(Mode::Hat, 1, 16, SamplingParams::greedy(), 32) };
        let r = run(w, &a, ids, opts, WireDtype::F32);
        let seq: Vec<u32> = ids.iter().chain(&r.token_ids).copied().collect();
        // Teacher-forced: middle outputs of the whole sequence, shifted by one, into the adapter.
        let x = w.device.embedder.embed_ids(&seq).unwrap();
        let h_in = w.device.input.forward(&x, 0, &mut w.device.input.new_cache()).unwrap();
        let mid = w.cloud.middle.forward(&h_in, 0, &mut w.cloud.middle.new_cache()).unwrap();
        let n = seq.len();
        let (y, _) = a.draft_hidden(&w.device.output, &h_in, Some(&mid)).unwrap();
        let slm: Vec<u32> = w.device.head.forward(&y).unwrap().squeeze(0).unwrap().argmax(D::Minus1).unwrap().to_vec1().unwrap();
        // Replay the rounds: the draft at position `base` is accepted iff it is the next token.
        let (mut base, mut accepted, mut rounds) = (ids.len(), 0, 0);
        while base + 1 < n {
            rounds += 1;
            if slm[base] == seq[base + 1] && base + 2 < n {
                accepted += 1;
                base += 2;
            } else {
                base += 1;
            }
        }
        assert_eq!((r.drafts_accepted, r.rounds), (accepted, rounds), "{which}: {r:?}");
        assert_eq!((r.draft_checks.clone(), r.draft_hits.clone()), (vec![r.drafts_sent], vec![accepted]), "{which}: one draft position at γ=1");
        eprintln!("{which} adapter ({:?}), γ=1: {accepted}/{rounds} drafts accepted", a.draft_context);
        (all_accepted, all_rounds) = (all_accepted + accepted, all_rounds + rounds);
    }
    if which == "conditioned-oracle" {
        assert!(all_accepted > 0 && all_accepted < all_rounds, "{which}: the features must matter: {all_accepted}/{all_rounds} accepted");
    }
}

/// How a cloud is lost in [`losing_the_cloud_mid_answer_changes_no_token`].
#[derive(Debug, Clone, Copy)]
enum Loss {
    /// It closes its connections (a server stopping).
    Close,
    /// It stops dead, as a killed process: no close, no reply.
    Crash,
}

/// A cloud of its own for the world's split (state in `dir`), and a tap for an edge's session
/// with it that signals the receiver once the edge has received `after_frames` frames from it
/// (the handshake's welcome is the first): the moment the test loses the cloud.
fn doomed_cloud(w: &World, dir: &Path, after_frames: usize) -> (BackgroundServer, FrameTap, std::sync::mpsc::Receiver<()>) {
    let doomed = BackgroundServer::start(w.cloud.clone(), cloud_config(dir.to_path_buf(), None, 4, 4096)).unwrap();
    let (kill_tx, kill_rx) = std::sync::mpsc::channel::<()>();
    let seen = std::sync::atomic::AtomicUsize::new(0);
    let kill_tx = Mutex::new(kill_tx);
    let tap: FrameTap = Arc::new(move |dir, _body: &[u8]| {
        if dir == Direction::Down && seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == after_frames {
            let _ = kill_tx.lock().unwrap().send(());
        }
    });
    (doomed, tap, kill_rx)
}

/// The cloud is lost at several points of an answer (right after the handshake, i.e. before
/// the prefill's first reply; mid-prefill; mid-decoding; closed or crashed): the edge finds the
/// other cloud, replays the session there, and the greedy tokens are still `hat generate`'s.
#[test]
fn losing_the_cloud_mid_answer_changes_no_token() {
    let w = world();
    let ids = &prompts(w)[1];
    let want = reference(w, ids, 24);
    let a = adapter(w, "conditioned");
    let quick = |o: ConnectOptions| ConnectOptions { connect_timeout: std::time::Duration::from_secs(1), ..o };
    for (after_frames, loss) in [(1, Loss::Close), (2, Loss::Crash), (6, Loss::Close), (11, Loss::Crash)] {
        let dir = tempfile::tempdir().unwrap();
        let (doomed, tap, kill_rx) = doomed_cloud(w, dir.path(), after_frames);
        let clouds = vec![ConnectOptions { tap: Some(tap), ..quick(edge_options(w, &doomed)) }, quick(edge_options(w, &w.server))];
        let killer = std::thread::spawn(move || {
            if kill_rx.recv().is_err() {
                return;
            }
            match loss {
                Loss::Close => drop(doomed),
                Loss::Crash => {
                    let frozen = doomed.crash();
                    // Its socket stays open, answering nothing, until the edge is done (the
                    // tap, and with it the sender, goes with the link).
                    let _ = kill_rx.recv();
                    drop(frozen);
                }
            }
        });
        let mut link = hat::net::ResilientLink::connect(clouds, std::time::Duration::from_secs(20)).unwrap();
        let opts = options(Mode::Hat, 4, 16, SamplingParams::greedy(), 24);
        let r = hat::edge::generate(&w.device, &a, &mut link, ids, &opts, |_| Ok(hat::decode::Flow::Continue)).unwrap_or_else(|e| panic!("lost after {after_frames} frames ({loss:?}): {e}"));
        drop(link);
        killer.join().unwrap();
        assert_eq!(r.token_ids, want, "lost after {after_frames} frames ({loss:?})");
        assert_eq!(r.cloud_reconnects, 1, "lost after {after_frames} frames ({loss:?})");
        eprintln!("lost after {after_frames} frames ({loss:?}): recovered in {:.0} ms, {} rounds", r.recovery_ms, r.rounds);
    }
}

/// The on-device SLM's greedy tokens after `ids`, each recomputed from scratch through the
/// teacher-forced draft path (an adapter that is neither conditioned nor drafting behind verified
/// states): the reference for `--fallback slm`.
fn slm_reference(w: &World, adapter: &Adapter, ids: &[u32], max_tokens: usize) -> Vec<u32> {
    let mut seq = ids.to_vec();
    let mut out = Vec::new();
    while out.len() < max_tokens {
        let x = w.device.embedder.embed_ids(&seq).unwrap();
        let h_in = w.device.input.forward(&x, 0, &mut w.device.input.new_cache()).unwrap();
        let (h, _) = adapter.draft_hidden(&w.device.output, &h_in, None).unwrap();
        let logits: Vec<f32> = w.device.head.forward_last(&h).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
        let t = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
        out.push(t);
        seq.push(t);
        if w.device.tokenizer.is_eos(t) {
            break;
        }
    }
    out
}

/// The only cloud closes mid-answer and none comes back: by default the generation fails (its
/// tokens so far were handed out); with `Fallback::Slm` the on-device SLM finishes the answer,
/// the report says from which token, and those tokens are the SLM's own.
#[test]
fn with_the_slm_fallback_an_answer_outlives_every_cloud() {
    let w = world();
    let ids = &prompts(w)[0];
    let want = reference(w, ids, 24);
    let a = adapter(w, "partial");
    for fallback in [hat::edge::Fallback::None, hat::edge::Fallback::Slm] {
        let dir = tempfile::tempdir().unwrap();
        let (doomed, tap, kill_rx) = doomed_cloud(w, dir.path(), 6);
        let only = vec![ConnectOptions { tap: Some(tap), connect_timeout: std::time::Duration::from_millis(300), ..edge_options(w, &doomed) }];
        let killer = std::thread::spawn(move || {
            if kill_rx.recv().is_ok() {
                drop(doomed);
            }
        });
        let mut link = hat::net::ResilientLink::connect(only, std::time::Duration::from_secs(1)).unwrap();
        let opts = EdgeOptions { fallback, ..options(Mode::Hat, 4, 16, SamplingParams::greedy(), 24) };
        let mut handed_out = Vec::new();
        let r = hat::edge::generate(&w.device, &a, &mut link, ids, &opts, |t| {
            handed_out.push(t);
            Ok(hat::decode::Flow::Continue)
        });
        drop(link);
        killer.join().unwrap();
        match fallback {
            hat::edge::Fallback::None => {
                assert_eq!(handed_out[..], want[..handed_out.len()], "the tokens before the loss are verified ones");
                let e = r.expect_err("no cloud, no fallback: an error");
                assert_eq!(e.cloud_failure(), Some(hat::error::CloudFailure::Unreachable), "{e}");
                assert!(e.to_string().contains("reached none within 1.0 s"), "{e}");
                assert!(handed_out.len() < 24);
            }
            hat::edge::Fallback::Slm => {
                let r = r.unwrap();
                let n = r.unverified_from.expect("marked");
                assert!(n < 24 && r.cloud_error.is_some(), "{n}");
                assert_eq!(r.token_ids, handed_out);
                assert_eq!(r.token_ids[..n], want[..n]);
                let context: Vec<u32> = ids.iter().chain(&want[..n]).copied().collect();
                assert_eq!(r.token_ids[n..], slm_reference(w, &a, &context, 24 - n)[..], "the rest is the SLM's own");
                eprintln!("fallback after {n} verified tokens");
            }
        }
    }
}

/// The value of the Prometheus sample `name` (with its labels) in `text`.
fn sample(text: &str, name: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())).unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// `hat loadgen`'s engine against a cloud that serves metrics: the load it reports is what the
/// cloud counted, block for block and row for row, and refusals are counted by code.
#[test]
fn the_cloud_metrics_count_what_a_load_generator_sends() {
    let w = world();
    let dir = tempfile::tempdir().unwrap();
    let config = hat::cloud::CloudConfig { metrics: Some("127.0.0.1:0".parse().unwrap()), ..cloud_config(dir.path().to_path_buf(), None, 2, 4096) };
    let server = BackgroundServer::start(w.cloud.clone(), config).unwrap();
    let states = hat::loadgen::recorded_states(&w.device, 256).unwrap();
    assert_eq!(states.dims(), [1, 256, 576]);
    let opts = hat::loadgen::LoadOptions { cloud: edge_options(w, &server), sessions: 2, duration: std::time::Duration::from_secs(1), prefill: 32, block_rows: 5, advance: 2, think: std::time::Duration::ZERO };
    let r = hat::loadgen::run(&opts, &states).unwrap();
    assert!(r.rounds >= 4 && r.positions_per_s > 0.0 && r.round_ms_p99 >= r.round_ms_p50 && r.round_ms_p50 >= r.cloud_compute_ms_p50, "{r:?}");
    // A session for another split is refused, and counted.
    let wrong = ConnectOptions { split_id: "0123456789abcdef0123456789abcdef".into(), ..edge_options(w, &server) };
    assert!(QuicLink::connect(wrong).is_err());

    let url = format!("http://{}/metrics", server.metrics_addr.unwrap());
    let text = ureq::get(&url).call().unwrap().into_string().unwrap();
    assert_eq!(sample(&text, "hat_cloud_sessions_total"), 2.0);
    assert_eq!(sample(&text, "hat_cloud_blocks_total{kind=\"sequence\"}"), (2 + r.rounds) as f64);
    assert_eq!(sample(&text, "hat_cloud_rows_total{kind=\"sequence\"}"), (2 * 32 + 5 * r.rounds) as f64);
    // Passes may hold both sessions' blocks (batching): every block and row is in one.
    assert_eq!(sample(&text, "hat_cloud_pass_blocks_sum"), (2 + r.rounds) as f64);
    assert_eq!(sample(&text, "hat_cloud_pass_rows_sum"), (2 * 32 + 5 * r.rounds) as f64);
    assert_eq!(sample(&text, "hat_cloud_pass_seconds_count"), sample(&text, "hat_cloud_pass_blocks_count"));
    assert_eq!(sample(&text, "hat_cloud_errors_total{code=\"SplitMismatch\"}"), 1.0);
    assert!(sample(&text, "hat_cloud_bytes_received_total") > (5 * r.rounds * 576 * 4) as f64);
    assert!(sample(&text, "hat_cloud_bytes_sent_total") > (5 * r.rounds * 576 * 4) as f64);
    assert!(sample(&text, "hat_cloud_resident_memory_bytes") > 1e6);
    assert!(text.contains("# TYPE hat_cloud_queue_wait_seconds histogram"), "{text}");
}

/// An address that keeps sending wrong tokens is shut out for a while (its connections refused
/// before any handshake); other addresses are served meanwhile, and it is served again after.
#[test]
fn repeated_wrong_tokens_shut_an_address_out() {
    use hat::net::protocol::{read_frame, write_frame, Message, PROTOCOL_VERSION};
    let w = world();
    let dir = tempfile::tempdir().unwrap();
    let server = BackgroundServer::start(w.cloud.clone(), cloud_config(dir.path().to_path_buf(), Some("s3cret"), 2, 4096)).unwrap();
    let (addr, split_id, hidden) = (server.addr, w.device.manifest.split_id.clone(), w.device.manifest.hidden_size as u32);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // One hello from 127.0.0.2: the answer's kind (or the connection's failure).
    let attempt = |token: &str| -> Result<String, String> {
        runtime.block_on(async {
            let endpoint = raw_endpoint_at("127.0.0.2:0", server.fingerprint.clone(), None);
            let conn = endpoint.connect(addr, hat::net::tls::SERVER_NAME).map_err(|e| e.to_string())?.await.map_err(|e| e.to_string())?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            let hello = Message::Hello { version: PROTOCOL_VERSION, split_id: split_id.clone(), token: token.into(), hidden_size: hidden, dtype: WireDtype::F16 };
            write_frame(&mut send, &hello.encode()).await.map_err(|e| e.to_string())?;
            let body = read_frame(&mut recv, 1 << 20).await.map_err(|e| e.to_string())?.ok_or("no answer")?;
            Ok(match Message::decode(&body).map_err(|e| e.to_string())? {
                Message::Error { code, .. } => format!("{code:?}"),
                other => other.kind_name().to_string(),
            })
        })
    };
    for i in 0..=hat::cloud::server::FREE_BAD_TOKENS {
        assert_eq!(attempt("wrong").as_deref(), Ok("Unauthorized"), "wrong token #{}", i + 1);
    }
    // One past the free ones: shut out (1 s), even with the right token.
    let e = attempt("s3cret").expect_err("shut out");
    assert!(e.contains("refused"), "{e}");
    // Another address is served meanwhile.
    let good = ConnectOptions { token: Some("s3cret".into()), ..edge_options(w, &server) };
    drop(QuicLink::connect(good).expect("127.0.0.1 is not shut out"));
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(attempt("s3cret").as_deref(), Ok("welcome"), "served again after the penalty");
}

/// Six edges at once on a cloud of its own (batching on, the default): their prefill chunks,
/// chains and trees interleave and their decode blocks share passes (the cloud's metrics show
/// passes of several blocks), and every edge's greedy output is still `hat generate`'s.
#[test]
fn sessions_sharing_passes_each_get_hat_generates_tokens() {
    let w = world();
    let dir = tempfile::tempdir().unwrap();
    let config = hat::cloud::CloudConfig { metrics: Some("127.0.0.1:0".parse().unwrap()), ..cloud_config(dir.path().to_path_buf(), None, 8, 4096) };
    let server = BackgroundServer::start(w.cloud.clone(), config).unwrap();
    let ps = prompts(w);
    let jobs: Vec<(&Vec<u32>, &str, TreeChoice, usize)> = vec![
        (&ps[0], "partial", TreeChoice::Auto, 16),
        (&ps[1], "conditioned", TreeChoice::Chain, 8),
        (&ps[2], "none", TreeChoice::Auto, 0),
        (&ps[1], "partial", TreeChoice::Fixed { nodes: 10, depth: Some(4) }, 16),
        (&ps[0], "conditioned", TreeChoice::Chain, 4),
        (&ps[2], "partial", TreeChoice::Auto, 1),
    ];
    let wants: Vec<Vec<u32>> = jobs.iter().map(|(ids, ..)| reference(w, ids, 20)).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|&(ids, which, tree, chunk)| {
                let server = &server;
                s.spawn(move || {
                    let mut link = hat::testing::connect(server, &w.device, WireDtype::F32, LinkEmulation::default(), None).unwrap();
                    let opts = EdgeOptions { draft: DraftOptions { tree, ..DraftOptions::default() }, ..options(Mode::Hat, 4, chunk, SamplingParams::greedy(), 20) };
                    hat::edge::generate(&w.device, &adapter(w, which), &mut link, ids, &opts, |_| Ok(hat::decode::Flow::Continue)).unwrap().token_ids
                })
            })
            .collect();
        for (i, (h, want)) in handles.into_iter().zip(&wants).enumerate() {
            assert_eq!(&h.join().unwrap(), want, "edge {i}");
        }
    });
    let text = ureq::get(&format!("http://{}/metrics", server.metrics_addr.unwrap())).call().unwrap().into_string().unwrap();
    let (passes, blocks) = (sample(&text, "hat_cloud_pass_blocks_count"), sample(&text, "hat_cloud_pass_blocks_sum"));
    eprintln!("{blocks} blocks in {passes} passes");
    assert!(blocks > passes, "some passes held several sessions' blocks: {blocks} blocks in {passes} passes");
    assert_eq!(blocks, sample(&text, "hat_cloud_blocks_total{kind=\"sequence\"}") + sample(&text, "hat_cloud_blocks_total{kind=\"tree\"}"));
}
