//! Cross-session batching: one scheduler thread collects the blocks every session has waiting
//! and runs those that compute exactly when packed ([`crate::model::packable`]: decode and
//! verification blocks, draft trees) through the middle layers in one pass, so the weights are
//! read once for all of them ([`crate::model::LayerStack::forward_packed`]). A pass holds at
//! most the row budget (as Sarathi-Serve's token budget); a block that cannot be packed (a
//! prefill chunk) runs in a pass of its own. Blocks are taken in arrival order and a session
//! has at most one block waiting, so no session waits more than one pass behind a newer one.
//! Every row computes bitwise as it would alone.
//!
//! Sessions answer each reply with their next block a moment later; a scheduler that started a
//! pass the instant one block was in would run the sessions one after the other, each block
//! alone, forever out of step. So when fewer blocks wait than sessions have been sending
//! lately, the scheduler waits for the others a little: at most a tenth of the last pass, and
//! [`MAX_WAIT`].
//!
//! A block that fails validation never gets here (the session checks it first); one that fails
//! in its pass fails only itself when it ran alone, and every block of a packed pass that fails
//! gets the error (their caches go back to their blocks' starts).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::Device;

use crate::cloud::load::LoadMeter;
use crate::cloud::metrics::CloudMetrics;
use crate::cloud::pending::PassClock;
use crate::cloud::CloudConfig;
use crate::error::{Error, Result};
use crate::model::tree::{BlockCache, PreparedBlock};
use crate::model::{packable, PackedBlock};
use crate::net::protocol::{HiddenBlock, WireDtype};
use crate::sched::StageCost;
use crate::split::CloudBundle;

/// The longest a pass waits for more sessions' blocks.
pub const MAX_WAIT: Duration = Duration::from_millis(5);
/// Sessions that sent a block within this long count as sending.
const RECENT: Duration = Duration::from_secs(1);

/// One session's block, waiting for a pass.
pub(crate) struct Job {
    pub session: u64,
    pub cache: BlockCache,
    pub block: HiddenBlock,
    pub parents: Vec<u16>,
    pub keep: Vec<u16>,
    pub hidden: usize,
    pub dtype: WireDtype,
    /// When the session received it (queue wait counts from here).
    pub received: Instant,
    pub reply: tokio::sync::oneshot::Sender<Done>,
}

/// A block's pass is over: the session's cache back, its output, the pass's compute time.
pub(crate) struct Done {
    pub cache: BlockCache,
    pub out: Result<HiddenBlock>,
    pub compute: Duration,
}

/// The handle sessions submit their blocks through.
pub(crate) struct Batcher {
    jobs: std::sync::mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts the scheduler thread; it stops when the last handle is dropped.
    pub(crate) fn start(bundle: Arc<CloudBundle>, metrics: Arc<CloudMetrics>, load: Arc<LoadMeter>, passes: Arc<PassClock>, config: &CloudConfig) -> Result<Self> {
        let (jobs, rx) = std::sync::mpsc::channel();
        let budget = config.batch_rows.clamp(1, crate::model::kernels::EXACT_ROWS);
        let (cost, pass_delay) = (config.cost.middle, config.pass_delay);
        std::thread::Builder::new()
            .name("hat-cloud-batch".into())
            .spawn(move || Scheduler { bundle, metrics, load, passes, cost, pass_delay, budget }.run(rx))
            .map_err(|e| Error::invalid(format!("cannot start the batch scheduler: {e}")))?;
        Ok(Self { jobs })
    }

    /// Queues a block; its [`Done`] comes back on the job's reply channel.
    pub(crate) fn submit(&self, job: Job) -> Result<()> {
        self.jobs.send(job).map_err(|_| Error::invalid("the batch scheduler has stopped"))
    }
}

struct Scheduler {
    bundle: Arc<CloudBundle>,
    metrics: Arc<CloudMetrics>,
    load: Arc<LoadMeter>,
    /// Each pass is on this clock while it runs (see [`crate::cloud::pending`]), predicted by
    /// `cost`.
    passes: Arc<PassClock>,
    cost: StageCost,
    /// Tests: each pass sleeps this long first.
    pass_delay: Duration,
    budget: usize,
}

/// A job whose block is decoded and whose cache is prepared.
struct Ready {
    job: Job,
    x: candle_core::Tensor,
    prepared: PreparedBlock,
}

impl Scheduler {
    fn run(self, rx: std::sync::mpsc::Receiver<Job>) {
        let mut queue: VecDeque<Ready> = VecDeque::new();
        // When each session last sent a block, and how long the last pass took.
        let mut seen: std::collections::HashMap<u64, Instant> = Default::default();
        let mut last_pass = Duration::ZERO;
        loop {
            if queue.is_empty() {
                match rx.recv() {
                    Ok(job) => self.admit(job, &mut queue, &mut seen),
                    Err(_) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.admit(job, &mut queue, &mut seen);
            }
            // Wait a little for the sessions that have been sending and have no block here yet.
            seen.retain(|_, t| t.elapsed() < RECENT);
            let deadline = Instant::now() + (last_pass / 10).min(MAX_WAIT);
            while queue.len() < seen.len() && queue.iter().map(|r| r.x.dims().get(1).copied().unwrap_or(0)).sum::<usize>() < self.budget {
                match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                    Ok(job) => self.admit(job, &mut queue, &mut seen),
                    Err(_) => break,
                }
            }
            let began = Instant::now();
            let Some(first) = queue.pop_front() else { continue };
            let rows = first.x.dims().get(1).copied().unwrap_or(0);
            if !packable(rows, first.prepared.is_tree()) || rows > self.budget {
                self.guarded_pass(vec![first]);
                last_pass = began.elapsed();
                continue;
            }
            // The oldest block, then every later packable block that fits the budget, in order.
            let mut pass = vec![first];
            let mut total = rows;
            let mut i = 0;
            while i < queue.len() {
                let r = queue[i].x.dims().get(1).copied().unwrap_or(0);
                if packable(r, queue[i].prepared.is_tree()) && total + r <= self.budget {
                    total += r;
                    pass.extend(queue.remove(i));
                } else {
                    i += 1;
                }
            }
            self.guarded_pass(pass);
            last_pass = began.elapsed();
        }
    }

    /// [`Scheduler::pass`], with a panic confined to the pass: its sessions get no answer (they
    /// end with an internal error) and the scheduler goes on with the others.
    fn guarded_pass(&self, pass: Vec<Ready>) {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.pass(pass))).is_err() {
            crate::cloud::server::log("a pass through the middle layers panicked: its sessions end");
        }
    }

    /// Decodes a job's block and prepares its cache; a job that fails there is answered at once.
    fn admit(&self, mut job: Job, queue: &mut VecDeque<Ready>, seen: &mut std::collections::HashMap<u64, Instant>) {
        seen.insert(job.session, Instant::now());
        let (start, count) = (job.block.start as usize, job.block.count as usize);
        let ready = job.block.to_tensor(job.hidden, &Device::Cpu).and_then(|x| Ok((x, job.cache.prepare(start, count, &job.parents, &job.keep)?)));
        match ready {
            Ok((x, prepared)) => queue.push_back(Ready { job, x, prepared }),
            Err(e) => {
                let _ = job.reply.send(Done { cache: job.cache, out: Err(e), compute: Duration::ZERO });
            }
        }
    }

    /// Runs one pass (one block alone, or several packed) and answers every block in it.
    fn pass(&self, mut pass: Vec<Ready>) {
        let predicted_ms: f64 = pass.iter().map(|r| self.cost.predict(r.job.block.count as usize, r.job.block.start as usize).max(0.0)).sum();
        let _on_the_clock = self.passes.begin(Duration::from_secs_f64(predicted_ms / 1e3));
        let began = Instant::now();
        let starts: Vec<Instant> = pass
            .iter()
            .map(|r| {
                self.metrics.queue_wait_seconds.observe(r.job.received.elapsed().as_secs_f64());
                self.load.begin(r.job.session)
            })
            .collect();
        std::thread::sleep(self.pass_delay);
        let middle = &self.bundle.middle;
        // On a thread of the compute pool (see `in_pool`).
        let outs: Result<Vec<candle_core::Tensor>> = crate::util::threads::in_pool(|| {
            if pass.len() == 1 {
                let r = &mut pass[0];
                let y = match &r.prepared.mask {
                    Some(mask) => middle.forward_tree(&r.x, &mut r.job.cache.cache, mask.clone()),
                    None => middle.forward(&r.x, r.prepared.start, &mut r.job.cache.cache),
                };
                y.map(|y| vec![y])
            } else {
                let mut blocks: Vec<PackedBlock> = pass.iter_mut().map(|r| PackedBlock { x: r.x.clone(), cache: &mut r.job.cache.cache, tree: r.prepared.mask.clone() }).collect();
                middle.forward_packed(&mut blocks)
            }
        });
        let took = began.elapsed();
        let rows: usize = pass.iter().map(|r| r.job.block.count as usize).sum();
        self.metrics.pass(pass.len(), rows, took.as_secs_f64());
        let mut outs = match outs {
            Ok(v) => v.into_iter().map(Ok).collect::<Vec<_>>(),
            Err(e) => pass.iter().map(|_| Err(Error::invalid(e.to_string()))).collect(),
        };
        for ((r, out), start) in pass.into_iter().zip(outs.drain(..)).zip(starts) {
            let Ready { mut job, prepared, .. } = r;
            let count = job.block.count as usize;
            self.load.end(job.session, start, count);
            let tree = prepared.is_tree();
            job.cache.finish(prepared, out.is_ok());
            let out = out.and_then(|y| HiddenBlock::from_tensor(&y, job.block.start as usize, job.dtype));
            if out.is_ok() {
                self.metrics.block(tree, count);
            }
            let _ = job.reply.send(Done { cache: job.cache, out, compute: took });
        }
    }
}
