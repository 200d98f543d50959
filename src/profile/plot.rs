//! SVG charts of a profile, written by hand (no plotting or font library): each stage's
//! measured time against block rows with its fitted model, and the predicted TTFT against the
//! chunk size for a few prompt lengths (drawn by [`crate::util::svg`]).

pub use crate::util::svg::{chart, write, Series};
use crate::sched::{fixed_chunks, FittedStage, PipelineCosts, Timing};

/// Measured points and the fitted line of a stage at each measured start position.
pub fn stage_series(name: &str, stage: &FittedStage, timings: &[Timing]) -> Vec<Series> {
    let mut starts: Vec<usize> = timings.iter().map(|t| t.start).collect();
    starts.sort_unstable();
    starts.dedup();
    let mut rows: Vec<usize> = timings.iter().map(|t| t.rows).collect();
    rows.sort_unstable();
    rows.dedup();
    let mut out = Vec::new();
    for &start in &starts {
        let label = format!("{name} @{start}");
        out.push(Series {
            name: format!("{label} measured"),
            points: timings.iter().filter(|t| t.start == start).map(|t| (t.rows as f64, t.ms)).collect(),
            markers: true,
        });
        out.push(Series { name: format!("{label} model"), points: rows.iter().map(|&r| (r as f64, stage.cost.predict(r, start))).collect(), markers: false });
    }
    out
}

/// Predicted TTFT against a fixed chunk size (8 … the prompt) for several prompt lengths, within
/// the block sizes the models were fitted on.
pub fn ttft_series(costs: &PipelineCosts, lengths: &[usize]) -> Vec<Series> {
    let limit = costs.max_chunk();
    lengths
        .iter()
        .map(|&len| {
            let mut points = Vec::new();
            let mut size = 8;
            while size < len && size <= limit {
                points.push((size as f64, costs.simulate(&fixed_chunks(len, size)).ttft_ms));
                size *= 2;
            }
            if len <= limit {
                points.push((len as f64, costs.simulate(&[len]).ttft_ms));
            }
            Series { name: format!("{len} tokens"), points, markers: false }
        })
        .collect()
}
