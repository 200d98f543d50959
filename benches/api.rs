//! The API's overhead: the same prompts answered by `hat run-edge` and through `hat serve-edge`'s
//! OpenAI API (streamed, as a chat client reads it), against one `hat serve-cloud`, on the same
//! emulated link, interleaved prompt by prompt.
//!
//! Placement: two one-core machines when the host can pin (cloud `taskset -c 1`, edge and
//! service `taskset -c 0`, one thread each), else shared cores. Both sides count TTFT from the
//! moment the cloud session is sought (run-edge: its `session_ms` + `ttft_ms`; the API: the
//! request sent → the first text chunk read, HTTP, chat template and planning included) and
//! TBT as (last token − first token) / (tokens − 1) (the API: over the chunks read, the token
//! count from `usage`). The greedy text must be the same.
//!
//! `cargo bench --bench api`. Environment: HAT_BENCH_PROMPTS (8), HAT_BENCH_TOKENS (64),
//! HAT_BENCH_LINKS (`50/20`: Mbit/s / RTT ms).

use std::io::BufRead;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hat::testing::bench::{env_or, median};
use hat::testing::procs::{run_edge, Cloud, Link, Placement};
use hat::testing::default_gguf;
use serde_json::{json, Value};

const HAT: &str = env!("CARGO_BIN_EXE_hat");
const API_PORT: u16 = 8097;

/// A running `hat serve-edge`; killed when dropped.
struct Service(std::process::Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One streamed chat completion: (TTFT ms, TBT ms, text, tokens).
fn api_answer(prompt: &str, tokens: usize) -> anyhow::Result<(f64, f64, String, usize)> {
    let body = json!({"model": "bench", "messages": [{"role": "user", "content": prompt}], "max_tokens": tokens, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let sent = Instant::now();
    let resp = ureq::post(&format!("http://127.0.0.1:{API_PORT}/v1/chat/completions")).set("Content-Type", "application/json").send_string(&body.to_string())?;
    let (mut first, mut last, mut text, mut n) = (None, sent, String::new(), 0usize);
    for line in std::io::BufReader::new(resp.into_reader()).lines() {
        let line = line?;
        let Some(data) = line.strip_prefix("data: ") else { continue };
        if data == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(data)?;
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
            text.push_str(t);
        }
        if let Some(c) = v["usage"]["completion_tokens"].as_u64() {
            n = c as usize;
        }
    }
    let first = first.ok_or_else(|| anyhow::anyhow!("no text streamed"))?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok((ms(first - sent), if n > 1 { ms(last - first) / (n - 1) as f64 } else { 0.0 }, text, n))
}

fn main() -> anyhow::Result<()> {
    let tokens = env_or("HAT_BENCH_TOKENS", 64usize);
    let link = Link::parse_list(&env_or("HAT_BENCH_LINKS", "50/20".to_string())).first().copied().unwrap_or(Link { mbps: 50.0, rtt_ms: 20.0 });
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let file: Value = serde_json::from_str(&std::fs::read_to_string(root.join("benches/prompts.json"))?)?;
    let mut prompts: Vec<String> = file["prompts"].as_array().into_iter().flatten().filter_map(|p| p["text"].as_str().map(String::from)).collect();
    prompts.truncate(env_or("HAT_BENCH_PROMPTS", 8));

    let split = root.join("target/bench-split");
    if !split.join("device/manifest.json").exists() {
        let status = Command::new(HAT).args(["split", "--force", "--input-layers", "2", "--output-layers", "2", "--model"]).arg(default_gguf()?).arg("--out").arg(&split).stdout(Stdio::null()).stderr(Stdio::null()).status()?;
        anyhow::ensure!(status.success(), "hat split failed");
    }
    let placement = if Placement::can_pin() { Placement::TwoMachines } else { Placement::Shared };
    let cloud = Cloud::start(HAT, placement, &split, 4610, &[])?;
    let _service = Service(
        placement
            .command(HAT, 0)
            .args(["serve-edge", "--bundle"])
            .arg(split.join("device"))
            .args(cloud.flags())
            .args(link.flags())
            .args(["--listen", &format!("127.0.0.1:{API_PORT}"), "--model-name", "bench", "--parallel", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let ready = Instant::now();
    while ureq::get(&format!("http://127.0.0.1:{API_PORT}/health")).call().is_err() {
        anyhow::ensure!(ready.elapsed() < Duration::from_secs(120), "serve-edge did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    // One unmeasured answer each, so that caches (the quick device profile) are warm.
    api_answer("Hello!", 4)?;
    run_edge(HAT, placement, &split, &cloud, link, &["--prompt".into(), "Hello!".into(), "--max-tokens".into(), "4".into()])?;

    println!("\n### API overhead: {}; {} prompts × {tokens} tokens, greedy, {}\n", placement.title(), prompts.len(), link.name());
    let (mut edge_ttft, mut edge_tbt, mut api_ttft, mut api_tbt, mut same) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0);
    for p in &prompts {
        let v = run_edge(HAT, placement, &split, &cloud, link, &["--prompt".into(), p.clone(), "--max-tokens".into(), tokens.to_string()])?;
        let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        edge_ttft.push(f("session_ms") + f("ttft_ms"));
        edge_tbt.push(f("tbt_ms"));
        let (ttft, tbt, text, _) = api_answer(p, tokens)?;
        api_ttft.push(ttft);
        api_tbt.push(tbt);
        same += usize::from(v["text"].as_str() == Some(text.as_str()));
    }
    let ratio = |a: &[f64], b: &[f64]| median(&a.iter().zip(b).map(|(x, y)| x / y).collect::<Vec<_>>());
    println!("| path | TTFT ms (median) | TBT ms (median) |");
    println!("|---|---|---|");
    println!("| run-edge | {:.1} | {:.2} |", median(&edge_ttft), median(&edge_tbt));
    println!("| serve-edge API (streamed) | {:.1} | {:.2} |", median(&api_ttft), median(&api_tbt));
    println!("| API / run-edge (median of per-prompt ratios) | {:.3} | {:.3} |", ratio(&api_ttft, &edge_ttft), ratio(&api_tbt, &edge_tbt));
    println!("\nsame greedy text: {same}/{} prompts", prompts.len());
    Ok(())
}
