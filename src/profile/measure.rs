//! Timing the stages: each one run on blocks of several sizes at several context positions,
//! the median of a few runs per point, then fitted ([`crate::sched::fit`]).

use std::time::Instant;

use candle_core::{Device, Tensor};

use crate::adapter::DraftContext;
use crate::edge::Drafter;
use crate::error::{Error, Result};
use crate::model::{LayerStack, StackCache};
use crate::sched::Timing;
use crate::util::stats::median;
use crate::split::{CloudBundle, DeviceBundle};

/// Which blocks are timed.
#[derive(Debug, Clone, PartialEq)]
pub struct Grid {
    pub rows: Vec<usize>,
    pub starts: Vec<usize>,
    /// Runs per point (the median is kept), after one warm-up run.
    pub repeats: usize,
    /// The model's context: points past it are skipped.
    pub max_positions: usize,
}

impl Grid {
    /// The default grid: seconds to a minute on the default model.
    pub fn full() -> Self {
        Self { rows: vec![1, 4, 16, 64, 256, 512], starts: vec![0, 512, 1536], repeats: 3, max_positions: usize::MAX }
    }

    /// `--quick`: a few seconds.
    pub fn quick() -> Self {
        Self { rows: vec![1, 4, 16, 64, 256], starts: vec![0, 1024], repeats: 1, max_positions: usize::MAX }
    }

    /// Fitted to a model's context of `max` positions: starts past half of it are replaced by
    /// its middle, and points that would run past it are skipped.
    pub fn within(mut self, max: usize) -> Self {
        self.max_positions = max;
        let before = self.starts.len();
        self.starts.retain(|&s| s < max / 2 || s == 0);
        if self.starts.len() < before && max >= 8 {
            self.starts.push(max / 2);
        }
        self.starts.sort_unstable();
        self.starts.dedup();
        self
    }

    /// The points that fit the context.
    fn fits(&self, rows: usize, start: usize) -> bool {
        start + rows <= self.max_positions
    }

    /// Timed points in all (for progress bars).
    pub fn points(&self) -> usize {
        self.starts.iter().map(|&s| self.rows.iter().filter(|&&r| self.fits(r, s)).count()).sum()
    }
}

/// Times `run(rows, start)` on every point of `grid`; `fill(upto)` grows the context first
/// (called with increasing starts), `tick` after each point.
fn time_grid(grid: &Grid, mut fill: impl FnMut(usize) -> Result<()>, mut run: impl FnMut(usize, usize) -> Result<()>, tick: &mut (dyn FnMut() + Send)) -> Result<Vec<Timing>> {
    let mut out = Vec::new();
    let mut starts = grid.starts.clone();
    starts.sort_unstable();
    for &start in &starts {
        fill(start)?;
        for &rows in grid.rows.iter().filter(|&&r| grid.fits(r, start)) {
            run(rows, start)?; // warm-up
            let mut times = Vec::with_capacity(grid.repeats);
            for _ in 0..grid.repeats.max(1) {
                let t = Instant::now();
                run(rows, start)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            out.push(Timing { rows, start, ms: median(&times) });
            tick();
        }
    }
    Ok(out)
}

/// Random hidden states `(1, rows, hidden)` (values do not change the cost).
fn hidden(rows: usize, size: usize) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 1.0, (1, rows, size), &Device::Cpu)?)
}

/// Grows `cache` of `stack` to `upto` positions (from what it holds), in blocks.
fn fill_stack(stack: &LayerStack, cache: &mut StackCache, upto: usize, size: usize) -> Result<()> {
    cache.truncate(upto.min(cache.len()));
    while cache.len() < upto {
        let n = (upto - cache.len()).min(256);
        stack.forward(&hidden(n, size)?, cache.len(), cache)?;
    }
    Ok(())
}

/// Times a layer stack on blocks of the grid (`after` runs on its output, e.g. the head).
fn time_stack(stack: &LayerStack, size: usize, grid: &Grid, tick: &mut (dyn FnMut() + Send), after: &dyn Fn(&Tensor) -> Result<()>) -> Result<Vec<Timing>> {
    let mut cache = stack.new_cache();
    let cache = std::cell::RefCell::new(&mut cache);
    time_grid(
        grid,
        |upto| fill_stack(stack, &mut cache.borrow_mut(), upto, size),
        |rows, start| {
            let mut c = cache.borrow_mut();
            c.truncate(start);
            let x = hidden(rows, size)?;
            let y = stack.forward(&x, start, &mut c)?;
            // A GPU computes asynchronously: the time counts only once it is done.
            y.device().synchronize()?;
            after(&y)
        },
        tick,
    )
}

/// The device's stages, as timed.
#[derive(Debug, Clone)]
pub struct DeviceTimings {
    pub input: Vec<Timing>,
    pub output: Vec<Timing>,
    pub draft_prefill: Vec<Timing>,
    /// The head on one position, ms, median.
    pub head_ms: f64,
    /// One draft step (input, adapter, draft output submodel, draft head), ms, median.
    pub draft_step_ms: f64,
}

/// Times the device's stages: input submodel (embedding included), output submodel, the head
/// on one position, the draft path's prefill, and one draft step.
pub fn device(dev: &DeviceBundle, drafter: &Drafter, grid: &Grid, tick: &mut (dyn FnMut() + Send)) -> Result<DeviceTimings> {
    let size = dev.manifest.hidden_size;
    let vocab = dev.manifest.config.vocab_size;
    let grid = grid.clone().within(dev.input.max_positions());
    let ids = |rows: usize| -> Vec<u32> { (0..rows).map(|i| ((i * 7919 + 13) % vocab) as u32).collect() };
    // The input stage embeds token ids first.
    let mut cache = dev.input.new_cache();
    let cache_cell = std::cell::RefCell::new(&mut cache);
    let input = time_grid(
        &grid,
        |upto| fill_stack(&dev.input, &mut cache_cell.borrow_mut(), upto, size),
        |rows, start| {
            let mut c = cache_cell.borrow_mut();
            c.truncate(start);
            let x = dev.embedder.embed_ids(&ids(rows))?;
            dev.input.forward(&x, start, &mut c)?;
            Ok(())
        },
        tick,
    )?;
    let output = time_stack(&dev.output, size, &grid, tick, &|_| Ok(()))?;
    let one = hidden(1, size)?;
    let head_ms = median(
        &(0..7)
            .map(|_| {
                let t = Instant::now();
                dev.head.forward_last(&one).map(|_| t.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<Vec<f64>>>()?,
    );

    let adapter = &drafter.adapter;
    let mut a_cache = adapter.layers.new_cache();
    let mut o_cache = dev.output.new_cache();
    let state = std::cell::RefCell::new((&mut a_cache, &mut o_cache));
    let draft_rows = |rows: usize, start: usize, st: &mut (&mut StackCache, &mut StackCache)| -> Result<Tensor> {
        st.0.truncate(start);
        st.1.truncate(start);
        let x = hidden(rows, size)?;
        let prev = if adapter.is_conditioned() { Some(hidden(rows, size)?) } else { None };
        let m = adapter.forward(&x, prev.as_ref(), start, st.0)?;
        match adapter.draft_context {
            DraftContext::Drafted => drafter.output.forward(&m, start, st.1),
            DraftContext::Verified => Ok(m),
        }
    };
    let draft_prefill = time_grid(
        &grid,
        |upto| {
            let mut st = state.borrow_mut();
            let have = st.0.len().min(upto);
            if upto > have {
                draft_rows(upto - have, have, &mut st)?;
            }
            Ok(())
        },
        |rows, start| draft_rows(rows, start, &mut state.borrow_mut()).map(|_| ()),
        tick,
    )?;

    // One draft step at a mid-sized context: a row through every draft stage and the head.
    let start = 256.min(dev.input.max_positions().saturating_sub(2));
    let mut in_cache = dev.input.new_cache();
    fill_stack(&dev.input, &mut in_cache, start, size)?;
    let mut st = state.borrow_mut();
    draft_rows(start.max(1), 0, &mut st)?;
    let mut out_cache = dev.output.new_cache();
    fill_stack(&dev.output, &mut out_cache, start, size)?;
    let mut steps = Vec::new();
    for i in 0..12 {
        let t = Instant::now();
        in_cache.truncate(start);
        out_cache.truncate(start);
        st.0.truncate(start);
        let x = dev.embedder.embed_ids(&ids(1))?;
        let h = dev.input.forward(&x, start, &mut in_cache)?;
        let prev = if adapter.is_conditioned() { Some(hidden(1, size)?) } else { None };
        let m = adapter.forward(&h, prev.as_ref(), start, st.0)?;
        let y = drafter.output.forward(&m, start, &mut out_cache)?;
        drafter.head.logits(&dev.head, &y)?;
        if i >= 2 {
            steps.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    tick();
    Ok(DeviceTimings { input, output, draft_prefill, head_ms, draft_step_ms: median(&steps) })
}

/// The cloud's stage, as timed: alone, and the slowdown with `k` blocks computing at once.
#[derive(Debug, Clone)]
pub struct CloudTimings {
    pub middle: Vec<Timing>,
    /// `slowdown[k - 1]`: time of a block with k computing at once / alone.
    pub slowdown: Vec<f64>,
}

/// Blocks computing at once for the slowdown measurement.
pub const CONCURRENCY: [usize; 3] = [1, 2, 4];
/// Rows of each block in the slowdown measurement.
const CONCURRENT_ROWS: usize = 64;

/// Times the middle layers on the grid, then `k` blocks at once on k threads.
pub fn cloud(bundle: &CloudBundle, grid: &Grid, tick: &mut (dyn FnMut() + Send)) -> Result<CloudTimings> {
    let size = bundle.manifest.hidden_size;
    let grid = grid.clone().within(bundle.middle.max_positions());
    // On a thread of the compute pool, as the cloud computes its passes (`in_pool`).
    let middle = crate::util::threads::in_pool(|| time_stack(&bundle.middle, size, &grid, tick, &|_| Ok(())))?;
    let rows = CONCURRENT_ROWS.min(bundle.middle.max_positions());
    let mut per_k = Vec::new();
    for k in CONCURRENCY {
        let mut runs = Vec::new();
        for _ in 0..grid.repeats.max(1) {
            let times: Vec<f64> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..k)
                    .map(|_| {
                        s.spawn(|| -> Result<f64> {
                            let mut cache = bundle.middle.new_cache();
                            let x = hidden(rows, size)?;
                            let t = Instant::now();
                            crate::util::threads::in_pool(|| bundle.middle.forward(&x, 0, &mut cache))?;
                            Ok(t.elapsed().as_secs_f64() * 1e3)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().map_err(|_| Error::invalid("a profiling thread panicked"))?).collect::<Result<Vec<f64>>>()
            })?;
            runs.push(times.iter().sum::<f64>() / times.len() as f64);
        }
        per_k.push((k, median(&runs)));
        tick();
    }
    let alone = per_k[0].1.max(1e-9);
    // slowdown[k - 1] for k = 1..=max, interpolated between the measured k.
    let max_k = CONCURRENCY[CONCURRENCY.len() - 1];
    let slowdown = (1..=max_k)
        .map(|k| {
            let hi = per_k.iter().position(|&(m, _)| m >= k).unwrap_or(per_k.len() - 1);
            let (k1, t1) = per_k[hi];
            if k1 == k || hi == 0 {
                return (t1 / alone).max(1.0);
            }
            let (k0, t0) = per_k[hi - 1];
            let t = t0 + (t1 - t0) * (k - k0) as f64 / (k1 - k0) as f64;
            (t / alone).max(1.0)
        })
        .collect();
    Ok(CloudTimings { middle, slowdown })
}
