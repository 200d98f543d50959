//! `hat profile`: measure the device, the cloud or the link, fit cost models, write a profile.

use std::path::{Path, PathBuf};

use anyhow::Context;
use hat::profile::{Grid, Profile};
use hat::sched::PipelineCosts;
use hat::split::{CloudBundle, DeviceBundle};

use crate::ConnectArgs;

/// Measure what a prompt's chunks cost, so that `run-edge --chunk-size auto` can plan them.
///
/// On the device (`--bundle DIR/device`): the input submodel, the output submodel and the draft
/// path's prefill, each on blocks of 1…512 positions at several context positions, the head on one
/// position, and one draft step. With `--cloud ADDR` also the link to that cloud: round trip and
/// throughput each way, measured through a real session with probe frames of zero padding (the
/// `--link-*` flags emulate a link, measured like any other), and the cloud's cost model from its
/// handshake. On the cloud (`--bundle DIR/cloud`): the middle layers the same way, alone and with
/// 2 and 4 blocks computing at once (`serve-cloud --profile FILE` serves it).
///
/// Each stage is fitted by least squares on relative error to `fixed + a·r + b·r² + c·r·(start +
/// r/2)` ms for blocks of r positions from `start`, with the engine's kernel regimes apart (a step
/// for blocks beyond the small-block matmul, its own attention term for blocks the row-by-row
/// attention kernel runs); the table shows the fits and their residuals. An existing --out file of
/// the same split and threads keeps the parts not measured now, so one file can hold device, link
/// and cloud.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A device or cloud bundle (DIR/device or DIR/cloud from `hat split`).
    #[arg(long)]
    pub bundle: PathBuf,

    /// Where to write the profile (JSON).
    #[arg(long)]
    pub out: PathBuf,

    /// Fewer block sizes and positions, one repeat: a few seconds.
    #[arg(long)]
    pub quick: bool,

    /// Also draw SVG charts into this folder.
    #[arg(long)]
    pub plot: Option<PathBuf>,

    /// Measure nothing: draw the charts of the existing --out profile (with --plot).
    #[arg(long, requires = "plot")]
    pub replot: bool,

    /// With --cloud: measure only the link and add it to the existing --out profile (the
    /// device stages stay as they were measured).
    #[arg(long, requires = "cloud")]
    pub link_only: bool,

    /// The draft adapter the device profile's draft path is measured with (as run-edge).
    #[arg(long, default_value = "auto")]
    pub adapter: String,

    #[command(flatten)]
    pub connect: ConnectArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = candle_core::Device::Cpu;
    let is_cloud = hat::split::read_manifest(&args.bundle, hat::split::Role::Cloud).is_ok();
    let threads = hat::util::threads::count();
    let grid = if args.quick { Grid::quick() } else { Grid::full() };
    let resolved = match args.connect.cloud.first() {
        Some(_) if is_cloud => anyhow::bail!("--cloud measures the link from a device: give --bundle DIR/device"),
        Some(_) => Some(args.connect.resolve()?),
        None => None,
    };
    if args.replot {
        let split_id = hat::split::read_manifest(&args.bundle, if is_cloud { hat::split::Role::Cloud } else { hat::split::Role::Device })?.split_id;
        let profile = Profile::load(&args.out, &split_id)?;
        print_table(&profile);
        for p in plots(&profile, args.plot.as_deref().unwrap_or(Path::new(".")))? {
            eprintln!("hat-profile: chart {}", p.display());
        }
        return Ok(());
    }
    let mut profile;
    if is_cloud {
        let bundle = CloudBundle::load(&args.bundle, &device)?;
        profile = start(&args.out, &bundle.manifest, threads, args.quick)?;
        let points = grid.clone().within(bundle.middle.max_positions()).points();
        let pb = hat::util::progress::bar((points + hat::profile::measure::CONCURRENCY.len()) as u64, "cloud");
        let cloud = hat::profile::profile_cloud(&bundle, &grid, &mut || pb.inc(1))?;
        pb.finish_and_clear();
        profile.cloud = Some(cloud);
    } else {
        let bundle = DeviceBundle::load(&args.bundle, &device).context("--bundle is neither a cloud nor a device bundle")?;
        profile = start(&args.out, &bundle.manifest, threads, args.quick)?;
        if args.link_only {
            anyhow::ensure!(profile.device.is_some(), "--link-only adds the link to an existing device profile, and {} has none", args.out.display());
        } else {
            let (adapter, adapter_name) = hat::adapter::load_choice(&args.adapter, &bundle, &device)?;
            let drafter = hat::edge::Drafter::new(&bundle, &adapter, Default::default())?;
            let points = grid.clone().within(bundle.input.max_positions()).points();
            let pb = hat::util::progress::bar((3 * points + 1) as u64, "device");
            hat::util::progress::say(&pb, format!("hat-profile: device stages of split {} (adapter {adapter_name}), {threads} threads", bundle.manifest.split_id));
            let dev = hat::profile::profile_device(&bundle, &drafter, &grid, &mut || pb.inc(1))?;
            pb.finish_and_clear();
            profile.device = Some(dev);
        }
        if let Some(resolved) = resolved {
            let mut link = args.connect.open(&bundle, &resolved)?;
            let link = link.session();
            let cloud = args.connect.cloud.first().cloned().unwrap_or_default();
            eprintln!("hat-profile: measuring the link to {cloud} with probes");
            profile.link = Some(hat::profile::profile_link(link, &cloud, args.quick)?);
        }
        profile.threads = threads;
    }
    if !args.link_only {
        profile.quick = args.quick;
    }
    profile.save(&args.out)?;
    print_table(&profile);
    if let Some(dir) = &args.plot {
        for p in plots(&profile, dir)? {
            eprintln!("hat-profile: chart {}", p.display());
        }
    }
    eprintln!("hat-profile: wrote {}", args.out.display());
    Ok(())
}

/// The profile to add to: `out` when it holds one of this split and version, else a new one.
fn start(out: &Path, m: &hat::split::Manifest, threads: usize, quick: bool) -> anyhow::Result<Profile> {
    let fresh = || Profile::new(&m.split_id, &m.source.name, m.hidden_size, threads, quick);
    if !out.exists() {
        return Ok(fresh());
    }
    match Profile::load(out, &m.split_id) {
        Ok(p) if p.threads == threads => {
            eprintln!("hat-profile: adding to {}", out.display());
            Ok(p)
        }
        Ok(p) => {
            eprintln!("hat-profile: {} was measured with {} threads, this run computes with {threads}: replacing it", out.display(), p.threads);
            Ok(fresh())
        }
        Err(e) => {
            eprintln!("hat-profile: replacing {} ({e})", out.display());
            Ok(fresh())
        }
    }
}

fn print_table(p: &Profile) {
    println!(
        "{:<14} {:>9} {:>9} {:>11} {:>13} {:>15} {:>11} {:>8} {:>8}",
        "stage", "fixed ms", "ms/row", "ms/row²", "ms/(row·pos)", "small-block att", "large-block", "rms err", "max err"
    );
    let row = |name: &str, s: &hat::sched::FittedStage| {
        let c = &s.cost;
        println!(
            "{:<14} {:>9.3} {:>9.4} {:>11.8} {:>13.7} {:>15.7} {:>11.3} {:>7.1}% {:>7.1}%",
            name,
            c.fixed_ms,
            c.per_row_ms,
            c.per_row_sq_ms,
            c.per_row_ctx_ms,
            c.small_per_row_ctx_ms,
            c.large_block_ms,
            s.residuals.rms_rel * 100.0,
            s.residuals.max_rel * 100.0
        )
    };
    if let Some(d) = &p.device {
        row("input", &d.input);
        row("output", &d.output);
        row("draft prefill", &d.draft_prefill);
        println!("head (one position): {:.2} ms; draft step: {:.2} ms", d.head_ms, d.draft_step_ms);
    }
    if let Some(c) = &p.cloud {
        row("middle", &c.middle);
        println!("slowdown with k blocks at once (k = 1…): {}", c.slowdown.iter().map(|s| format!("{s:.2}")).collect::<Vec<_>>().join(", "));
    }
    if let Some(l) = &p.link {
        println!(
            "link to {}: {:.2} ms round trip, {:.1} Mbit/s up, {:.1} Mbit/s down; cloud middle {:.3} ms + {:.4} ms/row (busy {:.2})",
            l.cloud_addr, l.estimate.rtt_ms, l.estimate.up_mbps, l.estimate.down_mbps, l.cloud.middle.fixed_ms, l.cloud.middle.per_row_ms, l.cloud_load.busy
        );
    }
}

/// Charts: each stage's timings and fit; with device, cloud model and link, the predicted TTFT
/// against the chunk size.
fn plots(p: &Profile, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    use hat::profile::plot::{chart, stage_series, ttft_series, write};
    let mut out = Vec::new();
    if let Some(d) = &p.device {
        let mut series = stage_series("input", &d.input, &d.timings.input);
        series.extend(stage_series("output", &d.output, &d.timings.output));
        out.push(write(dir, "device-stages", &chart("Device stages (measured and fitted)", "block rows", "ms", &series))?);
    }
    if let Some(c) = &p.cloud {
        out.push(write(dir, "cloud-middle", &chart("Cloud middle layers (measured and fitted)", "block rows", "ms", &stage_series("middle", &c.middle, &c.timings)))?);
    }
    if let (Some(d), Some(l)) = (&p.device, &p.link) {
        let costs: PipelineCosts = hat::profile::pipeline_costs(d, &l.cloud, &l.cloud_load, l.estimate, hat::net::protocol::WireDtype::F16, p.hidden_size, true);
        let title = format!("Predicted TTFT by chunk size ({:.0} ms RTT, {:.0} Mbit/s up)", l.estimate.rtt_ms, l.estimate.up_mbps);
        out.push(write(dir, "ttft-by-chunk", &chart(&title, "chunk size (positions)", "predicted TTFT, ms", &ttft_series(&costs, &[128, 512, 1000, 2000])))?);
    }
    Ok(out)
}
