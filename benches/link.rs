//! HAT vs U-shape over emulated links, on the default model, cloud and edge in one process over
//! loopback QUIC (they share this machine's cores).
//!
//! Table 1: TTFT and TBT of `u-shape` and `hat` at 10, 50 and 200 Mbit/s with 20 ms RTT.
//! Table 2: TTFT of a ~1000-token prompt at 10 Mbit/s, 20 ms, for chunk sizes 0, 16, 64, 256.
//!
//! `cargo bench --bench link`. Environment: HAT_BENCH_ADAPTER (an adapter file, `none`, or
//! `auto`, the default: the shipped one for this split if present, else none), HAT_BENCH_TOKENS (generated tokens, 48),
//! HAT_BENCH_REPEATS (2), HAT_BENCH_DRAFT_LENS (γ values for hat, "1,2,4"; the last one is used
//! for the chunking table), HAT_BENCH_WIRE (f16).
//! Table 3: how often f16/bf16 hidden states on the wire change a greedy token (in-process).

use candle_core::Device;
use hat::adapter::{load_choice, Adapter};
use hat::cloud::BackgroundServer;
use hat::decode::SamplingParams;
use hat::edge::{EdgeOptions, EdgeReport, Mode};
use hat::io::source::{LoadedModel, ModelSpec};
use hat::net::protocol::WireDtype;
use hat::net::{LinkEmulation, LocalMiddle};
use hat::testing::bench::{env_or, median};
use hat::testing::{connect, default_gguf, SplitWorld};

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


/// Fields drop in order: the server stops before the split's folder goes.
struct Bench {
    server: BackgroundServer,
    world: SplitWorld,
    adapter: Adapter,
    wire: WireDtype,
}

impl Bench {
    fn run(&self, ids: &[u32], mode: Mode, chunk: usize, gamma: usize, tokens: usize, link: LinkEmulation) -> anyhow::Result<EdgeReport> {
        let mut q = connect(&self.server, &self.world.device, self.wire, link, None)?;
        let opts = EdgeOptions { mode, draft_len: gamma, chunk_size: chunk, sampling: SamplingParams::greedy(), max_tokens: tokens, max_context: q.max_context };
        Ok(hat::edge::generate(&self.world.device, &self.adapter, &mut q, ids, &opts, |_| Ok(()))?)
    }
}

fn main() -> anyhow::Result<()> {
    let tokens = env_or("HAT_BENCH_TOKENS", 48usize);
    let repeats = env_or("HAT_BENCH_REPEATS", 2usize);
    let gammas: Vec<usize> = env_or("HAT_BENCH_DRAFT_LENS", "1,2,4".to_string()).split(',').filter_map(|g| g.trim().parse().ok()).collect();
    let gamma = *gammas.last().unwrap_or(&4);
    let wire = WireDtype::parse(&env_or("HAT_BENCH_WIRE", "f16".to_string()))?;
    let loaded = LoadedModel::load(&ModelSpec::Gguf(default_gguf()?))?;
    let world = SplitWorld::new(&loaded, 2, 2)?;
    let adapter_choice = std::env::var("HAT_BENCH_ADAPTER").unwrap_or_else(|_| "auto".to_string());
    let (adapter, adapter_name) = load_choice(&adapter_choice, &world.device, &Device::Cpu)?;
    let server = world.serve("state", None, 4, 8192)?;
    let cloud_middle = world.cloud.clone();
    let b = Bench { server, world, adapter, wire };
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| b.world.device.tokenizer.encode_prompt(p, true)).collect::<Result<_, _>>()?;
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
            let m = |f: &dyn Fn(&EdgeReport) -> f64| median(&rs.iter().map(f).collect::<Vec<_>>());
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
    let wire_prompts: Vec<Vec<u32>> = WIRE_PROMPTS.iter().map(|p| b.world.device.tokenizer.encode_prompt(p, true)).collect::<Result<_, _>>()?;
    println!();
    println!("| wire dtype | prompts identical to f32 (64 tokens) | tokens before first divergence (mean) |");
    println!("|---|---|---|");
    let greedy = |dtype: WireDtype, ids: &[u32]| -> anyhow::Result<Vec<u32>> {
        let mut link = LocalMiddle::new(&cloud_middle.middle, dtype);
        let opts = EdgeOptions { mode: Mode::UShape, draft_len: 0, chunk_size: 0, sampling: SamplingParams::greedy(), max_tokens: 64, max_context: 8192 };
        Ok(hat::edge::generate(&b.world.device, &b.adapter, &mut link, ids, &opts, |_| Ok(()))?.token_ids)
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
    let mut long = b.world.device.tokenizer.encode_prompt(&long_text, true)?;
    long.truncate(1000);
    let link = LinkEmulation { up_mbps: Some(10.0), down_mbps: Some(10.0), rtt_ms: 20.0 };
    println!();
    println!("| prompt | chunk size | TTFT ms (median of {}) | vs unchunked |", repeats.max(2));
    println!("|---|---|---|---|");
    let mut base = f64::NAN;
    for chunk in [0usize, 16, 64, 256] {
        let ttft = median(&(0..repeats.max(2)).map(|_| b.run(&long, Mode::Hat, chunk, gamma, 1, link).map(|r| r.ttft_ms)).collect::<anyhow::Result<Vec<_>>>()?);
        if chunk == 0 {
            base = ttft;
        }
        println!("| {} tokens, 10 Mbit/s, 20 ms | {chunk} | {ttft:.0} | {:.2}x |", long.len(), ttft / base);
    }
    Ok(())
}
