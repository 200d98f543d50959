//! `hat loadgen`: many sessions against a running cloud, measuring the cloud alone.

use std::path::PathBuf;
use std::time::Duration;

use hat::loadgen::{LoadOptions, LoadReport};
use hat::split::DeviceBundle;

use crate::ConnectArgs;

/// Load a running `hat serve-cloud` with N edge sessions and measure what it sustains.
///
/// Each session prefills a block of hidden states (recorded once from real text through the
/// device bundle's input submodel), then sends verification blocks of --block-rows rows in a
/// closed loop, advancing --advance positions a round, for --duration seconds. Nothing of the
/// model is computed while it runs, so the figures are the cloud's: verification positions per
/// second (prefill not counted), round latency p50/p99, the cloud's compute time per block, the
/// rest of a round (network and waiting for the cloud), prefill time, and busy refusals. Link
/// emulation flags apply to every session.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The device bundle (DIR/device from `hat split`): its input submodel records the states.
    #[arg(long)]
    pub bundle: PathBuf,

    #[command(flatten)]
    pub connect: ConnectArgs,

    /// Sessions at once (the cloud's --max-sessions must allow them; busy ones retry).
    #[arg(long, default_value_t = 1)]
    pub sessions: usize,

    /// Seconds of rounds, after every session has prefilled.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,

    /// Positions each session prefills.
    #[arg(long, default_value_t = 128)]
    pub prefill: usize,

    /// Rows of each verification block (γ + 1 for a chain of γ drafts).
    #[arg(long, default_value_t = 5)]
    pub block_rows: usize,

    /// Positions a round accepts (the next block starts this much later).
    #[arg(long, default_value_t = 2)]
    pub advance: usize,

    /// Milliseconds between a reply and the next block (the device's work); 0 = at once.
    #[arg(long, default_value_t = 0.0)]
    pub think_ms: f64,

    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub json: bool,
}

/// Recorded positions: enough for a long run before a session wraps back to its prefill.
const RECORDED: usize = 1024;

pub fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.duration.is_finite() && args.duration > 0.0, "--duration must be a positive number of seconds");
    anyhow::ensure!(args.think_ms.is_finite() && args.think_ms >= 0.0, "--think-ms must be 0 or more");
    let resolved = args.connect.resolve()?;
    let bundle = DeviceBundle::load(&args.bundle, &candle_core::Device::Cpu)?;
    let states = hat::loadgen::recorded_states(&bundle, RECORDED.min(bundle.input.max_positions()))?;
    let cloud = args.connect.options(&bundle, &resolved, None).into_iter().next().ok_or_else(|| anyhow::anyhow!("no --cloud"))?;
    let opts = LoadOptions {
        cloud,
        sessions: args.sessions,
        duration: Duration::from_secs_f64(args.duration),
        prefill: args.prefill,
        block_rows: args.block_rows,
        advance: args.advance,
        think: Duration::from_secs_f64(args.think_ms / 1e3),
    };
    if !args.json {
        eprintln!("hat-loadgen: {} sessions, prefill {} then blocks of {} rows advancing {}, {:.0} s", opts.sessions, opts.prefill, opts.block_rows, opts.advance, args.duration);
    }
    let r: LoadReport = hat::loadgen::run(&opts, &states)?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} sessions: {:.0} positions/s ({} rounds); round p50 {:.1} ms, p99 {:.1} ms; cloud compute p50 {:.1} ms, rest p50 {:.1} ms; prefill p50 {:.0} ms; {} busy refusals",
            r.sessions, r.positions_per_s, r.rounds, r.round_ms_p50, r.round_ms_p99, r.cloud_compute_ms_p50, r.queue_ms_p50, r.prefill_ms_p50, r.busy_refusals
        );
    }
    Ok(())
}
