//! `hat loadgen`: many edge sessions against one running cloud, measuring the cloud alone.
//!
//! Each session opens its own QUIC session (one tokio runtime shared by all, each session's
//! blocking calls on a thread of its own), prefills a block of hidden states recorded once from
//! a real prompt through the device bundle's input submodel, then sends verification blocks of a
//! fixed shape in a closed loop (the next block when the reply is in, after an optional think
//! time), advancing by the positions a round would accept; a session that reaches the context
//! limit goes back to the end of its prefill (the cloud truncates its cache there). Nothing of
//! the model is computed while it runs.
//!
//! May use [`crate::net`], [`crate::split`], [`crate::model`] and [`crate::util`]; only the
//! commands use it.

use std::time::{Duration, Instant};

use candle_core::{IndexOp, Tensor};
use serde::Serialize;

use crate::error::{CloudFailure, Error, Result};
use crate::net::{ConnectOptions, MiddleLink, QuicLink};
use crate::split::DeviceBundle;
use crate::util::stats::median;

/// A paragraph of ordinary prose, repeated as needed: the recorded hidden states come from it.
const TEXT: &str = "The river runs past the old mill, where children once watched the wheel turn and the miller \
weighed the grain. In spring the water rises and floods the lower meadows; by summer it is slow and clear, and \
herons stand in the shallows. People from the town walk along the bank on Sunday afternoons, talk about the \
weather and the harvest, and stop at the bakery on the bridge for bread and coffee. ";

/// How the load is shaped.
#[derive(Clone)]
pub struct LoadOptions {
    /// The cloud (its `runtime` is replaced by the load generator's).
    pub cloud: ConnectOptions,
    /// Sessions at once.
    pub sessions: usize,
    /// How long the rounds run (after every session has prefilled).
    pub duration: Duration,
    /// Positions each session prefills (one block).
    pub prefill: usize,
    /// Rows of each verification block (γ + 1 for a chain).
    pub block_rows: usize,
    /// Positions a round accepts: the next block starts this much later.
    pub advance: usize,
    /// Device time between a reply and the next block (0: the next goes at once).
    pub think: Duration,
}

/// What the cloud did under the load.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub sessions: usize,
    pub block_rows: usize,
    pub duration_s: f64,
    pub rounds: usize,
    /// Verification positions computed per second, all sessions together (prefill not counted).
    pub positions_per_s: f64,
    /// Round latency: block sent → reply in, over every round.
    pub round_ms_p50: f64,
    pub round_ms_p99: f64,
    /// The cloud's own compute time per block (from its replies).
    pub cloud_compute_ms_p50: f64,
    /// Round latency minus the cloud's compute time: the network and the wait for the cloud.
    pub queue_ms_p50: f64,
    pub prefill_ms_p50: f64,
    /// Sessions refused as busy and retried.
    pub busy_refusals: usize,
}

/// One session's record.
#[derive(Default)]
struct SessionRecord {
    rounds: Vec<(f64, f64)>,
    prefill_ms: f64,
    busy: usize,
}

/// Hidden states of `len` positions of real text through `dev`'s input submodel, `(1, len, hidden)`.
pub fn recorded_states(dev: &DeviceBundle, len: usize) -> Result<Tensor> {
    let mut ids = dev.tokenizer.encode_prompt("", true)?;
    let text = dev.tokenizer.encode(TEXT)?;
    while ids.len() < len {
        ids.extend_from_slice(&text);
    }
    ids.truncate(len);
    let x = dev.embedder.embed_ids(&ids)?;
    dev.input.forward(&x, 0, &mut dev.input.new_cache())
}

/// The `p`-th percentile (0–100) of `v` (nearest rank).
fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Runs the load; `states` from [`recorded_states`] (its length bounds the context used).
pub fn run(opts: &LoadOptions, states: &Tensor) -> Result<LoadReport> {
    if opts.sessions == 0 || opts.block_rows == 0 || opts.advance == 0 || opts.prefill == 0 {
        return Err(Error::invalid("sessions, block rows, advance and prefill must be at least 1"));
    }
    if opts.advance > opts.block_rows {
        return Err(Error::invalid(format!("a round cannot accept {} positions of a {}-row block", opts.advance, opts.block_rows)));
    }
    let len = states.dim(1)?;
    if opts.prefill + opts.block_rows > len {
        return Err(Error::invalid(format!("prefill {} + a block of {} exceed the {len} recorded positions", opts.prefill, opts.block_rows)));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).thread_name("hat-loadgen-net").enable_all().build().map_err(|e| Error::invalid(format!("cannot start a runtime: {e}")))?;
    let cloud = ConnectOptions { runtime: Some(runtime.handle().clone()), ..opts.cloud.clone() };
    // Every session prefills, then all start their rounds at once.
    let barrier = std::sync::Barrier::new(opts.sessions);
    let records: Vec<Result<SessionRecord>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..opts.sessions).map(|_| s.spawn(|| session(opts, &cloud, states, &barrier))).collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err(Error::invalid("a load session panicked")))).collect()
    });
    let records = records.into_iter().collect::<Result<Vec<_>>>()?;
    let mut round: Vec<f64> = records.iter().flat_map(|r| r.rounds.iter().map(|x| x.0)).collect();
    let mut compute: Vec<f64> = records.iter().flat_map(|r| r.rounds.iter().map(|x| x.1)).collect();
    let queue: Vec<f64> = records.iter().flat_map(|r| r.rounds.iter().map(|x| x.0 - x.1)).collect();
    let rounds = round.len();
    let secs = opts.duration.as_secs_f64();
    Ok(LoadReport {
        sessions: opts.sessions,
        block_rows: opts.block_rows,
        duration_s: secs,
        rounds,
        positions_per_s: (rounds * opts.block_rows) as f64 / secs,
        round_ms_p50: percentile(&mut round, 50.0),
        round_ms_p99: percentile(&mut round, 99.0),
        cloud_compute_ms_p50: percentile(&mut compute, 50.0),
        queue_ms_p50: median(&queue),
        prefill_ms_p50: median(&records.iter().map(|r| r.prefill_ms).collect::<Vec<_>>()),
        busy_refusals: records.iter().map(|r| r.busy).sum(),
    })
}

/// Opens a session, retrying while the cloud is busy (for up to a minute).
fn connect(cloud: &ConnectOptions, busy: &mut usize) -> Result<QuicLink> {
    let t = Instant::now();
    loop {
        match QuicLink::connect(cloud.clone()) {
            Err(e) if e.cloud_failure() == Some(CloudFailure::Busy) && t.elapsed() < Duration::from_secs(60) => {
                *busy += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

fn session(opts: &LoadOptions, cloud: &ConnectOptions, states: &Tensor, barrier: &std::sync::Barrier) -> Result<SessionRecord> {
    let mut rec = SessionRecord::default();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let link = connect(cloud, &mut rec.busy);
    let t = Instant::now();
    let prefilled = link.and_then(|mut link| {
        link.submit(0, &states.i((.., 0..opts.prefill, ..))?)?;
        link.receive()?;
        Ok(link)
    });
    rec.prefill_ms = ms(t.elapsed());
    // Wait for the others even after a failure, so that no session waits forever.
    barrier.wait();
    let mut link = prefilled?;
    let limit = states.dim(1)?.min(link.max_context);
    let end = Instant::now() + opts.duration;
    let mut start = opts.prefill;
    while Instant::now() < end {
        if start + opts.block_rows > limit {
            start = opts.prefill;
        }
        let t = Instant::now();
        link.submit(start, &states.i((.., start..start + opts.block_rows, ..))?)?;
        let reply = link.receive()?;
        rec.rounds.push((ms(t.elapsed()), ms(reply.cloud_compute)));
        start += opts.advance;
        if !opts.think.is_zero() {
            std::thread::sleep(opts.think);
        }
    }
    Ok(rec)
}
