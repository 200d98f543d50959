//! HAT vs U-shape over emulated links, on the default model, cloud and edge in one process over
//! loopback QUIC (they share this machine's cores).
//!
//! Table 1: TTFT and TBT of `u-shape` and `hat` at 10, 50 and 200 Mbit/s with 20 ms RTT.
//! Table 2: TTFT of a ~1000-token prompt at 10 Mbit/s, 20 ms, for chunk sizes 0, 16, 64, 256.
//!
//! `cargo bench --bench link`. Environment: HAT_BENCH_ADAPTER (adapter file; default: the
//! shipped one for this split if present, else none), HAT_BENCH_TOKENS (generated tokens, 48),
//! HAT_BENCH_REPEATS (2), HAT_BENCH_DRAFT_LENS (γ values for hat, "1,2,4"; the last one is used
//! for the chunking table), HAT_BENCH_WIRE (f16).
//! Table 3: how often f16/bf16 hidden states on the wire change a greedy token (in-process).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device};
use hat::adapter::Adapter;
use hat::cloud::{BackgroundServer, CloudConfig};
use hat::edge::{EdgeOptions, EdgeReport, Mode};
use hat::generate::SamplingParams;
use hat::link::{ConnectOptions, LinkEmulation, QuicLink};
use hat::protocol::WireDtype;
use hat::source::{assets_dir, LoadedModel, ModelSpec, DEFAULT_ASSET_GGUF};
use hat::split::{write_split, CloudBundle, DeviceBundle, SplitPlan};
use hat::tls::Trust;

const PROMPTS: [&str; 3] = [
    "Explain how a refrigerator keeps food cold.",
    "Write a short story about a robot who learns to paint.",
    "What are the main differences between Python and Rust?",
];

const WIRE_PROMPTS: [&str; 8] = [
    "What is the capital of Australia, and why was it chosen?",
    "Give me three tips for learning to play the guitar.",
    "Summarise the plot of Romeo and Juliet in four sentences.",
    "How do vaccines train the immune system?",
    "Write a haiku about autumn leaves.",
    "Explain recursion to a ten-year-old.",
    "What should I pack for a week-long hiking trip?",
    "Describe the water cycle.",
];

fn env<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { f64::NAN } else { v[v.len() / 2] }
}

struct Bench {
    device: DeviceBundle,
    adapter: Adapter,
    server: BackgroundServer,
    wire: WireDtype,
}

impl Bench {
    fn run(&self, ids: &[u32], mode: Mode, chunk: usize, gamma: usize, tokens: usize, link: LinkEmulation) -> anyhow::Result<EdgeReport> {
        let mut q = QuicLink::connect(ConnectOptions {
            addr: self.server.addr,
            trust: Trust::Fingerprint(self.server.fingerprint.clone()),
            token: None,
            split_id: self.device.manifest.split_id.clone(),
            hidden_size: self.device.manifest.hidden_size,
            dtype: self.wire,
            emulation: link,
            tap: None,
        })?;
        let opts = EdgeOptions { mode, draft_len: gamma, chunk_size: chunk, sampling: SamplingParams::greedy(), max_tokens: tokens, max_context: q.max_context };
        Ok(hat::edge::generate(&self.device, &self.adapter, &mut q, ids, &opts, |_| Ok(()))?)
    }
}

fn main() -> anyhow::Result<()> {
    let tokens = env("HAT_BENCH_TOKENS", 48usize);
    let repeats = env("HAT_BENCH_REPEATS", 2usize);
    let gammas: Vec<usize> = env("HAT_BENCH_DRAFT_LENS", "1,2,4".to_string()).split(',').filter_map(|g| g.trim().parse().ok()).collect();
    let gamma = *gammas.last().unwrap_or(&4);
    let wire = WireDtype::parse(&env("HAT_BENCH_WIRE", "f16".to_string()))?;
    let gguf = assets_dir().join(DEFAULT_ASSET_GGUF);
    let loaded = LoadedModel::load(&ModelSpec::Gguf(gguf))?;
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("split");
    write_split(&loaded, &SplitPlan::new(30, 2, 2)?, &out, DType::F32, false, &indicatif::ProgressBar::hidden())?;
    let device = DeviceBundle::load(&out.join("device"), &Device::Cpu)?;
    let cloud = Arc::new(CloudBundle::load(&out.join("cloud"), &Device::Cpu)?);
    let cloud_middle = cloud.clone();
    let adapter_path = std::env::var("HAT_BENCH_ADAPTER").ok().map(PathBuf::from).or_else(|| {
        let shipped = hat::adapter::default_adapter_path(&device.manifest);
        shipped.exists().then_some(shipped)
    });
    let (adapter, adapter_name) = match &adapter_path {
        Some(p) => (Adapter::load(p, &device.manifest, device.rope.clone(), &Device::Cpu)?, p.display().to_string()),
        None => (Adapter::none(device.rope.clone()), "none".to_string()),
    };
    let server = BackgroundServer::start(
        cloud,
        CloudConfig {
            listen: "127.0.0.1:0".parse()?,
            state_dir: dir.path().join("state"),
            token: None,
            max_sessions: 4,
            max_context: 8192,
            idle_timeout: Duration::from_secs(120),
        },
    )?;
    let b = Bench { device, adapter, server, wire };
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| b.device.tokenizer.encode_prompt(p, true)).collect::<Result<_, _>>()?;
    eprintln!("adapter: {adapter_name}; γ ∈ {gammas:?}; {tokens} tokens; wire {}; {repeats} repeats × {} prompts", wire.name(), prompts.len());

    println!("| link | mode | TTFT ms | TBT ms | tokens/round | drafts accepted | device ms | cloud ms | wait ms |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut tbt_ratio = Vec::new();
    for mbps in [10.0, 50.0, 200.0] {
        let link = LinkEmulation { up_mbps: Some(mbps), down_mbps: Some(mbps), rtt_ms: 20.0 };
        let mut tbts = Vec::new();
        let configs = std::iter::once((Mode::UShape, 0, 0)).chain(gammas.iter().map(|&g| (Mode::Hat, 64, g)));
        for (mode, chunk, g) in configs {
            let mut rs = Vec::new();
            for _ in 0..repeats {
                for ids in &prompts {
                    rs.push(b.run(ids, mode, chunk, g, tokens, link)?);
                }
            }
            let m = |f: &dyn Fn(&EdgeReport) -> f64| median(rs.iter().map(f).collect());
            tbts.push((g, m(&|r| r.tbt_ms)));
            println!(
                "| {mbps:.0} Mbit/s, 20 ms | {} | {:.0} | {:.1} | {:.2} | {:.0}% | {:.0} | {:.0} | {:.0} |",
                if mode == Mode::Hat { format!("hat γ={g}") } else { "u-shape".to_string() },
                m(&|r| r.ttft_ms),
                tbts.last().map_or(f64::NAN, |t| t.1),
                m(&|r| r.mean_accepted),
                100.0 * m(&|r| r.acceptance_rate),
                m(&|r| r.device_compute_ms),
                m(&|r| r.cloud_compute_ms),
                m(&|r| r.network_wait_ms),
            );
        }
        let base = tbts[0].1;
        let (best_g, best) = tbts[1..].iter().copied().fold((0, f64::INFINITY), |a, b| if b.1 < a.1 { b } else { a });
        tbt_ratio.push((mbps, best_g, best / base));
    }
    for (mbps, g, r) in tbt_ratio {
        println!("TBT best hat (γ={g}) / u-shape at {mbps:.0} Mbit/s: {r:.2}x");
    }

    // Half precision on the wire: how often does it change a greedy token? (In-process, u-shape.)
    let wire_prompts: Vec<Vec<u32>> = WIRE_PROMPTS.iter().map(|p| b.device.tokenizer.encode_prompt(p, true)).collect::<Result<_, _>>()?;
    println!();
    println!("| wire dtype | prompts identical to f32 (64 tokens) | tokens before first divergence (mean) |");
    println!("|---|---|---|");
    let greedy = |dtype: WireDtype, ids: &[u32]| -> anyhow::Result<Vec<u32>> {
        let mut link = hat::link::LocalMiddle::new(&cloud_middle.middle, dtype);
        let opts = EdgeOptions { mode: Mode::UShape, draft_len: 0, chunk_size: 0, sampling: SamplingParams::greedy(), max_tokens: 64, max_context: 8192 };
        Ok(hat::edge::generate(&b.device, &b.adapter, &mut link, ids, &opts, |_| Ok(()))?.token_ids)
    };
    let reference: Vec<Vec<u32>> = wire_prompts.iter().map(|ids| greedy(WireDtype::F32, ids)).collect::<anyhow::Result<_>>()?;
    for dtype in [WireDtype::F16, WireDtype::BF16] {
        let (mut same, mut prefix) = (0usize, 0usize);
        for (ids, want) in wire_prompts.iter().zip(&reference) {
            let got = greedy(dtype, ids)?;
            same += usize::from(&got == want);
            prefix += want.iter().zip(&got).take_while(|(a, b)| a == b).count();
        }
        println!("| {} | {same}/{} | {:.1} of {:.1} |", dtype.name(), wire_prompts.len(), prefix as f64 / wire_prompts.len() as f64,
            reference.iter().map(Vec::len).sum::<usize>() as f64 / wire_prompts.len() as f64);
    }

    // A ~1000-token prompt: chunked prefill at 10 Mbit/s.
    let long_text = PROMPTS.iter().cycle().take(150).cloned().collect::<Vec<_>>().join(" ");
    let mut long = b.device.tokenizer.encode_prompt(&long_text, true)?;
    long.truncate(1000);
    let link = LinkEmulation { up_mbps: Some(10.0), down_mbps: Some(10.0), rtt_ms: 20.0 };
    println!();
    println!("| prompt | chunk size | TTFT ms (median of {}) | vs unchunked |", repeats.max(2));
    println!("|---|---|---|---|");
    let mut base = f64::NAN;
    for chunk in [0usize, 16, 64, 256] {
        let ttft = median((0..repeats.max(2)).map(|_| b.run(&long, Mode::Hat, chunk, gamma, 1, link).map(|r| r.ttft_ms)).collect::<anyhow::Result<_>>()?);
        if chunk == 0 {
            base = ttft;
        }
        println!("| {} tokens, 10 Mbit/s, 20 ms | {chunk} | {ttft:.0} | {:.2}x |", long.len(), ttft / base);
    }
    Ok(())
}
