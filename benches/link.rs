//! HAT vs U-shape over emulated links, the way a user deploys them: `hat serve-cloud` and
//! `hat run-edge` as two processes.
//!
//! Table 1, "two machines": the cloud on core 1 (`taskset -c 1 hat --threads 1 serve-cloud`), the
//! edge on core 0 (`taskset -c 0 hat --threads 1 run-edge`): two one-core machines. Table 2,
//! "shared cores": both processes on every core with default threads. Links: 10, 50 and 200
//! Mbit/s at 20 ms RTT and 50 Mbit/s at 80 ms RTT. Prompts: `benches/prompts.json` (held out:
//! checked to be absent from the training data when it is present), 64 tokens each, greedy, f16
//! on the wire; for each prompt `run-edge` at its default settings and `--mode u-shape` run
//! back to back (interleaved), then any extra configurations. Per configuration: median TBT,
//! the median of the per-prompt TBT ratios to u-shape, tokens per round, draft-tree nodes sent per
//! round (0 for chains), and where a round's
//! time goes (device drafting, verifying and drafting ahead, waiting, cloud compute), ms per
//! round. Every run's JSON goes to `target/bench-link.json`.
//!
//! Table 3 (in-process): how often f16/bf16 hidden states on the wire change a greedy token.
//! Prefill chunking (TTFT) has its own benchmark: `benches/chunking.rs`.
//!
//! `cargo bench --bench link` (or `recipes/bench-link.sh`). Environment:
//! - HAT_BENCH_TABLES: which tables, default `machines,shared,wire`;
//! - HAT_BENCH_PROMPTS: how many of the prompts (default all);
//! - HAT_BENCH_TOKENS (64); HAT_BENCH_LINKS (`10/20,50/20,200/20,50/80`: Mbit/s / RTT ms);
//! - HAT_BENCH_ADAPTER (`auto`: the shipped one);
//! - HAT_BENCH_INPUT_LAYERS: the device's input layers K1 (default 2; K2 stays 2); a K1 other
//!   than the default needs an adapter trained for that split in HAT_BENCH_ADAPTER;
//! - HAT_BENCH_CONFIGS: extra hat configurations, `name=run-edge flags;…` (e.g.
//!   `plain=--draft-len 1 --draft-threshold 0 --draft-compute f32 --draft-vocab full --draft-ahead off`;
//!   a configuration with its own `--adapter FILE` runs with that adapter instead).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hat::decode::SamplingParams;
use hat::edge::{EdgeOptions, Mode};
use hat::io::source::{LoadedModel, ModelSpec};
use hat::net::protocol::WireDtype;
use hat::net::LocalMiddle;
use hat::testing::bench::{env_or, median};
use hat::testing::procs::{run_edge, Cloud, Link, Placement};
use hat::testing::{default_gguf, SplitWorld};
use serde_json::Value;

const HAT: &str = env!("CARGO_BIN_EXE_hat");

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

struct Bench {
    split: PathBuf,
    adapter: String,
    tokens: usize,
}

impl Bench {
    fn edge(&self, placement: Placement, cloud: &Cloud, prompt: &str, link: Link, flags: &[String], max_tokens: usize) -> anyhow::Result<Value> {
        let mut all: Vec<String> = ["--max-tokens", &max_tokens.to_string(), "--prompt", prompt].iter().map(|s| s.to_string()).collect();
        // A configuration may name its own adapter (e.g. to compare two side by side).
        if !flags.iter().any(|f| f == "--adapter" || f.starts_with("--adapter=")) {
            all.extend(["--adapter".to_string(), self.adapter.clone()]);
        }
        all.extend_from_slice(flags);
        run_edge(HAT, placement, &self.split, cloud, link, &all)
    }

    /// Table 1 or 2: every link, every prompt, u-shape and each hat configuration interleaved.
    fn table(&self, placement: Placement, links: &[Link], prompts: &[String], configs: &[(String, Vec<String>)], all: &mut Vec<Value>) -> anyhow::Result<()> {
        let cloud = Cloud::start(HAT, placement, &self.split, if placement == Placement::Shared { 4601 } else { 4600 }, &[])?;
        let title = placement.title();
        println!("\n### {title}; {} prompts × {} tokens, greedy, f16 wire\n", prompts.len(), self.tokens);
        println!("| link | mode | TBT ms (median) | TBT / u-shape (median of per-prompt ratios) | TTFT ms | tokens/round | tree nodes/round | drafts accepted | draft step ms | draft ms/round | verify ms/round | ahead ms/round (hits) | extended rounds (walked into) | split rounds (walked into) | wait ms/round | cloud ms/round |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        for &link in links {
            let mut runs: Vec<Vec<Value>> = vec![Vec::new(); configs.len()];
            for p in prompts {
                for (i, (name, flags)) in configs.iter().enumerate() {
                    let mut v = self.edge(placement, &cloud, p, link, flags, self.tokens)?;
                    v["bench"] = serde_json::json!({"placement": format!("{placement:?}"), "link": link.name(), "config": name, "prompt": p});
                    runs[i].push(v);
                }
            }
            let base: Vec<f64> = runs[0].iter().map(|v| f(v, "tbt_ms")).collect();
            let mut ratios = Vec::new();
            for ((name, _), rs) in configs.iter().zip(&runs) {
                let m = |g: &dyn Fn(&Value) -> f64| median(&rs.iter().map(g).collect::<Vec<_>>());
                let per_round = |k: &'static str| m(&move |v: &Value| f(v, k) / f(v, "rounds").max(1.0));
                let ratio: Vec<f64> = rs.iter().zip(&base).map(|(v, b)| f(v, "tbt_ms") / b).collect();
                let hits: f64 = rs.iter().map(|v| f(v, "ahead_hits")).sum::<f64>() / rs.iter().map(|v| f(v, "ahead_rounds")).sum::<f64>().max(1.0);
                let sum = |k: &str| rs.iter().map(|v| v[k].as_f64().unwrap_or(0.0)).sum::<f64>();
                let (extended, walked) = (sum("extensions") / sum("rounds").max(1.0), sum("extensions_used") / sum("extensions").max(1.0));
                let (split, split_walked) = (sum("tree_splits") / sum("rounds").max(1.0), sum("tree_splits_used") / sum("tree_splits").max(1.0));
                println!(
                    "| {} | {name} | {:.1} | {:.2} | {:.0} | {:.2} | {:.1} | {:.0}% | {:.1} | {:.1} | {:.1} | {:.1} ({:.0}%) | {:.0}% ({:.0}%) | {:.0}% ({:.0}%) | {:.1} | {:.1} |",
                    link.name(),
                    m(&|v| f(v, "tbt_ms")),
                    median(&ratio),
                    m(&|v| f(v, "ttft_ms")),
                    m(&|v| f(v, "mean_accepted")),
                    m(&|v| f(v, "tree_nodes_per_round")),
                    100.0 * m(&|v| f(v, "acceptance_rate")),
                    m(&|v| f(v, "draft_step_ms")),
                    per_round("draft_ms"),
                    per_round("verify_ms"),
                    per_round("ahead_ms"),
                    100.0 * hits,
                    100.0 * extended,
                    100.0 * walked,
                    100.0 * split,
                    100.0 * split_walked,
                    per_round("network_wait_ms"),
                    per_round("cloud_compute_ms"),
                );
                ratios.push((name.clone(), ratio));
            }
            for (name, r) in ratios.iter().skip(1) {
                let list: Vec<String> = r.iter().map(|x| format!("{x:.2}")).collect();
                println!("<!-- {}: {name} per-prompt TBT ratios: {} -->", link.name(), list.join(" "));
            }
            all.extend(runs.into_iter().flatten());
        }
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let tables = env_or("HAT_BENCH_TABLES", "machines,shared,wire".to_string());
    let tokens = env_or("HAT_BENCH_TOKENS", 64usize);
    let links = Link::parse_list(&env_or("HAT_BENCH_LINKS", "10/20,50/20,200/20,50/80".to_string()));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let file: Value = serde_json::from_str(&std::fs::read_to_string(root.join("benches/prompts.json"))?)?;
    let mut prompts: Vec<String> = file["prompts"].as_array().into_iter().flatten().filter_map(|p| p["text"].as_str().map(String::from)).collect();
    prompts.truncate(env_or("HAT_BENCH_PROMPTS", prompts.len()));
    check_held_out(&prompts, &root.join("assets/sharegpt/ShareGPT_V3_unfiltered_cleaned_split.json"))?;

    let gguf = default_gguf()?;
    let input_layers = env_or("HAT_BENCH_INPUT_LAYERS", 2usize);
    // Another K1 gets its own folder: the recipes reuse target/bench-split as the default split.
    let split = root.join(if input_layers == 2 { "target/bench-split".to_string() } else { format!("target/bench-split-k{input_layers}") });
    let input_layers = input_layers.to_string();
    let status = Command::new(HAT).args(["split", "--force", "--input-layers", &input_layers, "--output-layers", "2", "--model"]).arg(&gguf).arg("--out").arg(&split).stdout(Stdio::null()).stderr(Stdio::null()).status()?;
    anyhow::ensure!(status.success(), "hat split failed");
    let adapter = std::env::var("HAT_BENCH_ADAPTER").unwrap_or_else(|_| "auto".to_string());
    let b = Bench { split, adapter, tokens };
    let mut configs: Vec<(String, Vec<String>)> = vec![("u-shape".into(), vec!["--mode".into(), "u-shape".into()]), ("hat (defaults)".into(), vec![])];
    for c in env_or("HAT_BENCH_CONFIGS", String::new()).split(';').filter(|c| !c.trim().is_empty()) {
        let (name, flags) = c.split_once('=').unwrap_or((c, ""));
        configs.push((name.trim().to_string(), flags.split_whitespace().map(String::from).collect()));
    }
    let pinning = Placement::can_pin();
    eprintln!("input layers: {input_layers}; adapter: {}; {} prompts; links {links:?}; configurations {:?}", b.adapter, prompts.len(), configs.iter().map(|c| &c.0).collect::<Vec<_>>());
    let mut all = Vec::new();
    if tables.contains("machines") {
        if pinning {
            b.table(Placement::TwoMachines, &links, &prompts, &configs, &mut all)?;
        } else {
            println!("(two-machine table skipped: needs `taskset` and two cores)");
        }
    }
    if tables.contains("shared") {
        b.table(Placement::Shared, &links, &prompts, &configs, &mut all)?;
    }
    let json_path = root.join("target/bench-link.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&all)?)?;
    eprintln!("every run: {}", json_path.display());

    if tables.contains("wire") {
        wire_table(&gguf)?;
    }
    Ok(())
}

/// Fails if a benchmark prompt occurs in the training data (when the data is here).
fn check_held_out(prompts: &[String], data: &Path) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read(data) else {
        eprintln!("(training data {} absent: held-out check skipped)", data.display());
        return Ok(());
    };
    let text = String::from_utf8_lossy(&text);
    for p in prompts {
        let head: String = p.chars().take(40).collect();
        anyhow::ensure!(!text.contains(&head), "benchmark prompt {p:?} occurs in the training data");
    }
    Ok(())
}

/// Half precision on the wire: how often does it change a greedy token? (In-process, u-shape.)
fn wire_table(gguf: &Path) -> anyhow::Result<()> {
    let loaded = LoadedModel::load(&ModelSpec::Gguf(gguf.to_path_buf()))?;
    let world = SplitWorld::new(&loaded, 2, 2)?;
    let adapter = hat::adapter::Adapter::none(world.device.rope.clone());
    let prompts: Vec<Vec<u32>> = WIRE_PROMPTS.iter().map(|p| world.device.tokenizer.encode_prompt(p, true)).collect::<Result<_, _>>()?;
    println!("\n| wire dtype | prompts identical to f32 (64 tokens) | tokens before first divergence (mean) |");
    println!("|---|---|---|");
    let greedy = |dtype: WireDtype, ids: &[u32]| -> anyhow::Result<Vec<u32>> {
        let mut link = LocalMiddle::new(&world.cloud.middle, dtype);
        let opts = EdgeOptions { mode: Mode::UShape, draft_len: 0, chunking: hat::edge::Chunking::Fixed(0), sampling: SamplingParams::greedy(), max_tokens: 64, max_context: 8192, draft: Default::default(), fallback: Default::default() };
        Ok(hat::edge::generate(&world.device, &adapter, &mut link, ids, &opts, |_| Ok(hat::decode::Flow::Continue))?.token_ids)
    };
    let reference: Vec<Vec<u32>> = prompts.iter().map(|ids| greedy(WireDtype::F32, ids)).collect::<anyhow::Result<_>>()?;
    for dtype in [WireDtype::F16, WireDtype::BF16] {
        let (mut same, mut prefix) = (0usize, 0usize);
        for (ids, want) in prompts.iter().zip(&reference) {
            let got = greedy(dtype, ids)?;
            same += usize::from(&got == want);
            prefix += want.iter().zip(&got).take_while(|(a, b)| a == b).count();
        }
        println!(
            "| {} | {same}/{} | {:.1} of {:.1} |",
            dtype.name(),
            prompts.len(),
            prefix as f64 / prompts.len() as f64,
            reference.iter().map(Vec::len).sum::<usize>() as f64 / prompts.len() as f64
        );
    }
    Ok(())
}
