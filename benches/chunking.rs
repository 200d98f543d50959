//! Does the chunk planner choose well? `run-edge --chunk-size auto` against every fixed chunk
//! size, measured side by side, as a user deploys it (`hat serve-cloud` and `hat run-edge` as
//! processes).
//!
//! For each placement (two one-core machines: cloud `taskset -c 1`, edge `taskset -c 0`, one
//! thread each; then shared cores): `hat profile` measures the cloud (served to edges with
//! `serve-cloud --profile`), the device, and each emulated link through a real session
//! (`profile --cloud … --link-only`). Then, interleaved (every repeat visits every cell in
//! turn), TTFT of prompts of 128, 512, 1000 and 2000 tokens (held-out text: this repository's
//! README, through the model's tokenizer) over links of 10, 50 and 200 Mbit/s at 20 ms and
//! 50 Mbit/s at 80 ms, for `auto` and the fixed sizes 0 (unchunked), 16, 32, 64, 128, 256, 512,
//! each repeated 5 times; medians compared. Last, with the cloud busy serving another session
//! (a u-shape edge decoding without pause), the same for 1000 and 2000 tokens at 50 Mbit/s.
//!
//! Per cell: auto's median TTFT, its prediction (fixed before the first chunk) and error, the
//! hindsight-best fixed size and auto's ratio to it, auto's ratio to unchunked, and the
//! pipeline's bound (the busiest resource's total plus one chunk of the other stages, from the
//! same profiles). Every run's JSON goes to `target/bench-chunking-PLACEMENTS.json`.
//!
//! `cargo bench --bench chunking` (or `recipes/bench-chunking.sh`). Environment:
//! HAT_BENCH_REPEATS (5), HAT_BENCH_LENGTHS (`128,512,1000,2000`), HAT_BENCH_LINKS
//! (`10/20,50/20,200/20,50/80`), HAT_BENCH_SIZES (`0,16,32,64,128,256,512`),
//! HAT_BENCH_PLACEMENTS (`machines,shared`), HAT_BENCH_BUSY (`1`: the busy-cloud table, two
//! machines only), HAT_BENCH_BUSY_LENGTHS (`1000,2000`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hat::profile::Profile;
use hat::sched::fixed_chunks;
use hat::split::DeviceBundle;
use hat::testing::bench::{env_or, median};
use hat::testing::default_gguf;
use hat::testing::procs::{run_edge, Cloud, Link, Placement};
use serde_json::Value;

const HAT: &str = env!("CARGO_BIN_EXE_hat");

/// One configuration of `--chunk-size`.
fn configs(sizes: &[usize]) -> Vec<String> {
    std::iter::once("auto".to_string()).chain(sizes.iter().map(|s| s.to_string())).collect()
}

fn profile(placement: Placement, core: usize, args: &[&str], extra: &[String]) -> anyhow::Result<()> {
    let status = placement.command(HAT, core).arg("profile").args(args).args(extra).env("HAT_NO_PROGRESS", "1").stdout(Stdio::null()).status()?;
    anyhow::ensure!(status.success(), "hat profile {args:?} failed");
    Ok(())
}

/// A cell's runs: per configuration, the JSON of each repeat.
struct Cell {
    len: usize,
    link: Link,
    runs: Vec<Vec<Value>>,
}

fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or(f64::NAN)
}

struct Bench {
    split: PathBuf,
    out: PathBuf,
    prompts: Vec<(usize, PathBuf)>,
    links: Vec<Link>,
    sizes: Vec<usize>,
    repeats: usize,
}

impl Bench {
    /// Profiles for `placement`: the cloud's, and the device's with each link (one file per link).
    fn profiles(&self, placement: Placement, tag: &str) -> anyhow::Result<PathBuf> {
        let cloud = self.out.join(format!("cloud-{tag}.json"));
        profile(placement, 1, &["--bundle", path(&self.split.join("cloud")), "--out", path(&cloud)], &[])?;
        Ok(cloud)
    }

    fn device_profiles(&self, placement: Placement, tag: &str, cloud: &Cloud) -> anyhow::Result<Vec<PathBuf>> {
        let base = self.out.join(format!("device-{tag}.json"));
        profile(placement, 0, &["--bundle", path(&self.split.join("device")), "--out", path(&base)], &[])?;
        let mut files = Vec::new();
        for link in &self.links {
            let file = self.out.join(format!("device-{tag}-{:.0}-{:.0}.json", link.mbps, link.rtt_ms));
            std::fs::copy(&base, &file)?;
            let mut extra = cloud.flags();
            extra.extend(link.flags());
            extra.push("--link-only".into());
            profile(placement, 0, &["--bundle", path(&self.split.join("device")), "--out", path(&file)], &extra)?;
            files.push(file);
        }
        Ok(files)
    }

    /// Every cell of `lengths` × `links` (with their device profiles), interleaved.
    fn measure(&self, placement: Placement, cloud: &Cloud, lengths: &[usize], links: &[(Link, PathBuf)], all: &mut Vec<Value>, label: &str) -> anyhow::Result<Vec<Cell>> {
        let configs = configs(&self.sizes);
        let mut cells: Vec<Cell> = Vec::new();
        for (link, _) in links {
            for &len in lengths {
                cells.push(Cell { len, link: *link, runs: vec![Vec::new(); configs.len()] });
            }
        }
        for r in 0..self.repeats {
            for cell in cells.iter_mut() {
                let file = &links.iter().find(|(l, _)| *l == cell.link).map(|(_, f)| f.clone()).unwrap_or_default();
                let prompt = &self.prompts.iter().find(|(n, _)| *n == cell.len).map(|(_, p)| p.clone()).unwrap_or_default();
                // Rotate the order each repeat so no configuration always runs first.
                for k in 0..configs.len() {
                    let i = (k + r) % configs.len();
                    let flags: Vec<String> = ["--prompt-file", path(prompt), "--no-chat-template", "--max-tokens", "1", "--chunk-size", &configs[i], "--profile", path(file)]
                        .iter()
                        .map(|s| s.to_string())
                        .collect();
                    // A run that fails is retried once, then left out of its cell (and said).
                    let run = run_edge(HAT, placement, &self.split, cloud, cell.link, &flags).or_else(|e| {
                        eprintln!("retrying after: {e}");
                        std::thread::sleep(std::time::Duration::from_secs(2));
                        run_edge(HAT, placement, &self.split, cloud, cell.link, &flags)
                    });
                    let mut v = match run {
                        Ok(v) => v,
                        Err(e) => {
                            eprintln!("left out: {e}");
                            continue;
                        }
                    };
                    v["bench"] = serde_json::json!({"placement": format!("{placement:?}"), "condition": label, "link": cell.link.name(), "length": cell.len, "chunk": configs[i], "repeat": r});
                    v.as_object_mut().map(|o| o.remove("token_ids"));
                    cell.runs[i].push(v.clone());
                    all.push(v);
                }
            }
            eprintln!("{label}: repeat {} of {} done", r + 1, self.repeats);
            std::fs::write(self.out.join(format!("runs-{label}.json")), serde_json::to_string(&all)?)?;
        }
        Ok(cells)
    }

    fn table(&self, title: &str, cells: &[Cell], profiles: &[(Link, PathBuf)], cloud_profile: &Path) -> anyhow::Result<()> {
        let configs = configs(&self.sizes);
        println!("\n### {title}\n");
        let sizes: Vec<String> = self.sizes.iter().map(|s| if *s == 0 { "unchunked".to_string() } else { s.to_string() }).collect();
        println!("| prompt | link | auto TTFT ms | predicted (error) | auto chunks | {} | best fixed | auto / best | auto / unchunked | pipeline bound ms (auto / bound) |", sizes.join(" | "));
        println!("|---|---|---|---|---|{}---|---|---|---|---|", "---|".repeat(sizes.len()));
        let (mut within10, mut ratios, mut errors) = (0, Vec::new(), Vec::new());
        for c in cells {
            let medians: Vec<f64> = c.runs.iter().map(|rs| median(&rs.iter().map(|v| f(v, "ttft_ms")).collect::<Vec<_>>())).collect();
            let auto = medians[0];
            let predicted = median(&c.runs[0].iter().map(|v| f(v, "predicted_ttft_ms")).collect::<Vec<_>>());
            let (best_i, best) = medians.iter().enumerate().skip(1).fold((0, f64::INFINITY), |b, (i, &m)| if m < b.1 { (i, m) } else { b });
            let unchunked = configs.iter().position(|c| c == "0").map_or(f64::NAN, |i| medians[i]);
            let chunks = c.runs[0].last().map(|v| v["chunk_plan"].as_array().map_or(0, |a| a.len())).unwrap_or(0);
            let prompt_tokens = c.runs[0].last().map_or(0, |v| v["prompt_tokens"].as_u64().unwrap_or(0));
            let bound = self.bound(c, profiles, cloud_profile).unwrap_or(f64::NAN);
            let ratio = auto / best;
            within10 += usize::from(ratio <= 1.10);
            ratios.push(ratio);
            errors.push((predicted - auto).abs() / auto);
            let fixed: Vec<String> = medians[1..].iter().map(|m| format!("{m:.0}")).collect();
            println!(
                "| {prompt_tokens} | {} | {auto:.0} | {predicted:.0} ({:+.0}%) | {chunks} | {} | {} ({best:.0}) | {ratio:.2} | {:.2} | {bound:.0} ({:.2}) |",
                c.link.name(),
                100.0 * (predicted - auto) / auto,
                fixed.join(" | "),
                configs[best_i],
                auto / unchunked,
                auto / bound
            );
        }
        println!(
            "\nauto within 10 % of the hindsight-best fixed size in {within10} of {} cells; median auto / best {:.3}; worst {:.3}; prediction error median {:.1} %, worst {:.1} %",
            cells.len(),
            median(&ratios),
            ratios.iter().copied().fold(0.0, f64::max),
            100.0 * median(&errors),
            100.0 * errors.iter().copied().fold(0.0, f64::max)
        );
        Ok(())
    }

    /// The pipeline's bound for a cell, from the profiles auto planned with and its chunk plan.
    fn bound(&self, c: &Cell, profiles: &[(Link, PathBuf)], cloud_profile: &Path) -> Option<f64> {
        let file = &profiles.iter().find(|(l, _)| *l == c.link)?.1;
        let m = hat::split::read_manifest(&self.split.join("device"), hat::split::Role::Device).ok()?;
        let p = Profile::load(file, &m.split_id).ok()?;
        let cloud = Profile::load(cloud_profile, &m.split_id).ok()?.cloud?;
        let (d, l) = (p.device?, p.link?);
        let costs = hat::profile::pipeline_costs(&d, &cloud.model(), &Default::default(), l.estimate, hat::net::protocol::WireDtype::F16, m.hidden_size, true);
        let plan: Vec<usize> = c.runs[0].last()?["chunk_plan"].as_array()?.iter().filter_map(|x| x.as_u64().map(|x| x as usize)).collect();
        Some(costs.bound(if plan.is_empty() { fixed_chunks(c.len, 128) } else { plan }.as_slice()))
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Prompts of about `len` tokens from held-out text (the README), written to files.
fn prompts(split: &Path, out: &Path, lengths: &[usize]) -> anyhow::Result<Vec<(usize, PathBuf)>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("README.md"))? + &std::fs::read_to_string(root.join("benches/README.md")).unwrap_or_default();
    let dev = DeviceBundle::load(&split.join("device"), &candle_core::Device::Cpu)?;
    let ids = dev.tokenizer.encode_prompt(&text, false)?;
    let mut files = Vec::new();
    for &len in lengths {
        anyhow::ensure!(ids.len() >= len, "the held-out text has {} tokens, fewer than {len}", ids.len());
        let file = out.join(format!("prompt-{len}.txt"));
        std::fs::write(&file, dev.tokenizer.decode(&ids[..len], false)?)?;
        files.push((len, file));
    }
    Ok(files)
}

/// A u-shape edge decoding without pause against `cloud` (the busy cloud's other session).
struct Load(std::process::Child);

impl Load {
    fn start(split: &Path, cloud: &Cloud, prompt: &Path) -> anyhow::Result<Self> {
        let script = format!(
            "while true; do nice -n 19 taskset -c 0 {HAT} --threads 1 run-edge --bundle {} {} --mode u-shape --max-tokens 100000 --prompt-file {} --no-chat-template --json >/dev/null 2>&1; done",
            path(&split.join("device")),
            cloud.flags().join(" "),
            path(prompt)
        );
        Ok(Self(Command::new("bash").args(["-c", &script]).process_group(0).spawn()?))
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        // The loop and its run-edge: the whole process group.
        let _ = Command::new("kill").args(["--", &format!("-{}", self.0.id())]).status();
        let _ = self.0.wait();
    }
}

use std::os::unix::process::CommandExt;

fn main() -> anyhow::Result<()> {
    let list = |k: &str, d: &str| -> Vec<usize> { env_or(k, d.to_string()).split(',').filter_map(|x| x.trim().parse().ok()).collect() };
    let lengths = list("HAT_BENCH_LENGTHS", "128,512,1000,2000");
    let sizes = list("HAT_BENCH_SIZES", "0,16,32,64,128,256,512");
    let links = Link::parse_list(&env_or("HAT_BENCH_LINKS", "10/20,50/20,200/20,50/80".to_string()));
    let repeats = env_or("HAT_BENCH_REPEATS", 5usize);
    let placements = env_or("HAT_BENCH_PLACEMENTS", "machines,shared".to_string());
    let busy = env_or("HAT_BENCH_BUSY", 1usize) == 1;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let split = root.join("target/bench-split");
    let out = root.join("target/bench-chunking");
    std::fs::create_dir_all(&out)?;
    let gguf = default_gguf()?;
    let status = Command::new(HAT).args(["split", "--force", "--input-layers", "2", "--output-layers", "2", "--model"]).arg(&gguf).arg("--out").arg(&split).stdout(Stdio::null()).stderr(Stdio::null()).status()?;
    anyhow::ensure!(status.success(), "hat split failed");
    let b = Bench { prompts: prompts(&split, &out, &lengths)?, split, out, links: links.clone(), sizes, repeats };
    let mut all = Vec::new();
    let mut chosen = Vec::new();
    if placements.contains("machines") && Placement::can_pin() {
        chosen.push((Placement::TwoMachines, "machines", 4620u16));
    }
    if placements.contains("shared") {
        chosen.push((Placement::Shared, "shared", 4621u16));
    }
    for (placement, tag, port) in chosen {
        let cloud_profile = b.profiles(placement, tag)?;
        let cloud = Cloud::start(HAT, placement, &b.split, port, &["--profile".to_string(), path(&cloud_profile).to_string()])?;
        let files: Vec<(Link, PathBuf)> = links.iter().copied().zip(b.device_profiles(placement, tag, &cloud)?).collect();
        let cells = b.measure(placement, &cloud, &lengths, &files, &mut all, tag)?;
        b.table(&format!("{}; TTFT, {} repeats per cell, medians", placement.title(), repeats), &cells, &files, &cloud_profile)?;
        if busy && placement == Placement::TwoMachines {
            let long = list("HAT_BENCH_BUSY_LENGTHS", "1000,2000");
            let link = links.iter().copied().find(|l| l.mbps == 50.0 && l.rtt_ms == 20.0).unwrap_or(links[0]);
            let busy_files: Vec<(Link, PathBuf)> = files.iter().filter(|(l, _)| *l == link).cloned().collect();
            let load = Load::start(&b.split, &cloud, &b.prompts[0].1)?;
            std::thread::sleep(std::time::Duration::from_secs(3));
            let cells = b.measure(placement, &cloud, &long, &busy_files, &mut all, "busy")?;
            drop(load);
            b.table(&format!("{}; the cloud busy with another session (a u-shape edge decoding without pause)", placement.title()), &cells, &busy_files, &cloud_profile)?;
        }
    }
    let json_path = root.join(format!("target/bench-chunking-{}.json", placements.replace(',', "-")));
    std::fs::write(&json_path, serde_json::to_string_pretty(&all)?)?;
    eprintln!("every run: {}", json_path.display());
    Ok(())
}
