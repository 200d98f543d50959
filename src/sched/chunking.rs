//! Choosing how a prompt is cut: the chunking with the least predicted TTFT.
//!
//! Candidates: every equal cut into 1…128 chunks, and ramps (a small first chunk that starts the
//! pipeline sooner, each next one `g` times longer, for several first sizes and growth factors).
//! The best candidate is then improved by local search over unequal chunks: moving each
//! boundary by ±1, 2, 4 … positions, splitting a chunk in two and merging neighbours, keeping
//! any change the schedule ([`PipelineCosts::simulate`]) predicts faster, until none is. TeraPipe
//! plans such non-uniform slices with a dynamic program; here the device's interleaving of input
//! and output work breaks the DP's independence between slices, so the exact schedule is
//! searched instead (a few thousand schedules of at most a few hundred chunks: milliseconds).

use serde::Serialize;

use crate::sched::pipeline::PipelineCosts;

/// The planner's choice for one prompt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChunkPlan {
    /// Chunk lengths, in order; they sum to the prompt's length.
    pub chunks: Vec<usize>,
    pub predicted_ttft_ms: f64,
    /// The best equal chunking and its prediction (for comparison).
    pub best_equal: Vec<usize>,
    pub best_equal_ms: f64,
}

/// Most chunks a plan may have.
pub const MAX_CHUNKS: usize = 256;

/// `len` positions cut into `parts` chunks as equal as possible (longer ones first).
pub fn equal_chunks(len: usize, parts: usize) -> Vec<usize> {
    let parts = parts.clamp(1, len.max(1));
    (0..parts).map(|i| len / parts + usize::from(i < len % parts)).collect()
}

/// `len` positions in chunks of `size` (the last one shorter); `size` 0 = one chunk.
pub fn fixed_chunks(len: usize, size: usize) -> Vec<usize> {
    if size == 0 || size >= len {
        return vec![len];
    }
    let mut v = vec![size; len / size];
    if len % size > 0 {
        v.push(len % size);
    }
    v
}

/// A ramp: `first`, then each chunk `growth` times the previous, the rest as the last chunk
/// when it would be shorter than half the previous one.
fn ramp(len: usize, first: usize, growth: f64) -> Vec<usize> {
    let mut v = Vec::new();
    let (mut left, mut size) = (len, first as f64);
    while left > 0 {
        let mut take = (size.round() as usize).max(1).min(left);
        if left - take > 0 && ((left - take) as f64) < size * growth / 2.0 {
            take = left;
        }
        v.push(take);
        left -= take;
        size *= growth;
    }
    v
}

/// The chunking of `len` prompt positions with the least predicted TTFT, no chunk longer than
/// the stages' models were fitted on ([`PipelineCosts::max_chunk`]).
pub fn plan(costs: &PipelineCosts, len: usize) -> ChunkPlan {
    let len = len.max(1);
    let limit = costs.max_chunk().max(1);
    let eval = |c: &[usize]| if c.iter().any(|&x| x > limit) { f64::INFINITY } else { costs.simulate(c).ttft_ms };
    let fewest = len.div_ceil(limit);
    let mut best_equal = equal_chunks(len, fewest);
    let mut best_equal_ms = eval(&best_equal);
    for parts in fewest + 1..=len.min(fewest.max(128)) {
        let c = equal_chunks(len, parts);
        let t = eval(&c);
        if t < best_equal_ms {
            (best_equal, best_equal_ms) = (c, t);
        }
    }
    let (mut best, mut best_ms) = (best_equal.clone(), best_equal_ms);
    for first in [4, 8, 16, 32, 64, 128, 256] {
        for growth in [1.25, 1.5, 2.0, 3.0] {
            if first >= len {
                continue;
            }
            let c: Vec<usize> = ramp(len, first, growth).into_iter().flat_map(|x| equal_chunks(x, x.div_ceil(limit))).collect();
            if c.len() <= MAX_CHUNKS {
                let t = eval(&c);
                if t < best_ms {
                    (best, best_ms) = (c, t);
                }
            }
        }
    }
    // Local search over unequal chunks.
    let mut improved = true;
    let mut rounds = 0;
    while improved && rounds < 50 {
        improved = false;
        rounds += 1;
        let mut candidates: Vec<Vec<usize>> = Vec::new();
        for i in 0..best.len().saturating_sub(1) {
            let mut step = 1;
            while step < best[i].max(best[i + 1]) {
                for (from, to) in [(i, i + 1), (i + 1, i)] {
                    if best[from] > step {
                        let mut c = best.clone();
                        c[from] -= step;
                        c[to] += step;
                        candidates.push(c);
                    }
                }
                step *= 2;
            }
            let mut merged = best.clone();
            merged[i] += merged.remove(i + 1);
            candidates.push(merged);
        }
        if best.len() < MAX_CHUNKS {
            for i in 0..best.len() {
                if best[i] >= 2 {
                    let mut c = best.clone();
                    let half = c[i] / 2;
                    c[i] -= half;
                    c.insert(i, half);
                    candidates.push(c);
                }
            }
        }
        for c in candidates {
            let t = eval(&c);
            if t < best_ms - 1e-6 {
                (best, best_ms) = (c, t);
                improved = true;
            }
        }
    }
    ChunkPlan { chunks: best, predicted_ttft_ms: best_ms, best_equal, best_equal_ms }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sched::cost::StageCost;
    use crate::sched::pipeline::LinkEstimate;

    fn costs(input: f64, cloud: f64, ctx: f64, fixed: f64, mbps: f64, rtt: f64) -> PipelineCosts {
        PipelineCosts {
            input: StageCost { fixed_ms: fixed, per_row_ms: input, per_row_ctx_ms: 0.0, ..Default::default() },
            output: StageCost { fixed_ms: fixed, per_row_ms: input / 4.0, per_row_ctx_ms: 0.0, ..Default::default() },
            head_ms: 0.0,
            draft_prefill: None,
            draft_conditioned: false,
            cloud: StageCost { fixed_ms: fixed, per_row_ms: cloud, per_row_ctx_ms: ctx, ..Default::default() },
            link: LinkEstimate { rtt_ms: rtt, up_mbps: mbps, down_mbps: mbps },
            up_bytes_per_row: 1152.0,
            up_bytes_per_frame: 14.0,
            down_bytes_per_row: 1152.0,
            down_bytes_per_frame: 22.0,
        }
    }

    #[test]
    fn chunk_helpers_cover_the_prompt() {
        assert_eq!(equal_chunks(10, 3), vec![4, 3, 3]);
        assert_eq!(fixed_chunks(10, 4), vec![4, 4, 2]);
        assert_eq!(fixed_chunks(10, 0), vec![10]);
        for (f, g) in [(4, 1.5), (16, 2.0), (1, 3.0)] {
            assert_eq!(ramp(1000, f, g).iter().sum::<usize>(), 1000);
        }
    }

    #[test]
    fn one_chunk_wins_when_each_chunk_costs_a_lot_of_fixed_time() {
        // A fixed 50 ms per block on every stage and a fast link: cutting only adds blocks.
        let c = costs(0.01, 0.01, 0.0, 50.0, 10_000.0, 1.0);
        let p = plan(&c, 300);
        assert_eq!(p.chunks, vec![300], "{p:?}");
    }

    #[test]
    fn the_planner_finds_the_known_optimum_of_balanced_stages() {
        // Uplink-bound: 10 Mbit/s carries 1152 B/row in ~0.92 ms; the device and cloud cost
        // 0.9 ms/row, fixed costs are tiny. With three balanced stages the TTFT of n equal chunks
        // is about T·(1 + 2/n) + n·fixed-ish costs: many chunks win, and the plan must be at
        // least as good as the best equal cut (which it starts from) and as every fixed size.
        let c = costs(0.9, 0.9, 0.0, 0.05, 10.0, 20.0);
        let p = plan(&c, 1000);
        assert!(p.chunks.len() > 8, "{p:?}");
        assert_eq!(p.chunks.iter().sum::<usize>(), 1000);
        for size in [0, 16, 32, 64, 128, 256, 512] {
            let t = c.simulate(&fixed_chunks(1000, size)).ttft_ms;
            assert!(p.predicted_ttft_ms <= t + 1e-9, "size {size}: {t} < {}", p.predicted_ttft_ms);
        }
        // Against brute force over every equal cut: never worse.
        let brute = (1..=200).map(|k| c.simulate(&equal_chunks(1000, k)).ttft_ms).fold(f64::INFINITY, f64::min);
        assert!(p.predicted_ttft_ms <= brute + 1e-9);
        assert!((p.predicted_ttft_ms - c.simulate(&p.chunks).ttft_ms).abs() < 1e-9);
    }

    #[test]
    fn unequal_chunks_win_when_attention_grows_with_position() {
        // Cloud-bound with a large per-position attention cost: later chunks cost more, so the
        // best plan has chunks that are not all equal, and it beats the best equal cut.
        let c = costs(0.2, 0.5, 0.004, 2.0, 1000.0, 20.0);
        let p = plan(&c, 1000);
        let first = p.chunks[0];
        assert!(p.chunks.iter().any(|&x| x != first), "{p:?}");
        assert!(p.predicted_ttft_ms < p.best_equal_ms * 0.999, "{p:?}");
    }

    #[test]
    fn on_a_short_prompt_the_plan_is_the_optimum_over_every_chunking() {
        // 14 positions: all 2^13 chunkings, brute force. Several cost shapes, including
        // growing attention cost, where the optimum is not an equal cut.
        for c in [costs(1.0, 3.0, 0.05, 0.5, 0.05, 4.0), costs(2.0, 1.0, 0.0, 0.2, 0.1, 2.0), costs(0.5, 2.0, 0.2, 1.0, 1.0, 10.0)] {
            let len = 14;
            let mut best = f64::INFINITY;
            for mask in 0u32..(1 << (len - 1)) {
                let mut chunks = vec![1usize];
                for i in 0..len - 1 {
                    if mask & (1 << i) != 0 {
                        chunks.push(1);
                    } else {
                        *chunks.last_mut().unwrap() += 1;
                    }
                }
                best = best.min(c.simulate(&chunks).ttft_ms);
            }
            let p = plan(&c, len);
            assert!(p.predicted_ttft_ms <= best * 1.0 + 1e-9, "plan {p:?} vs optimum {best}");
        }
    }

    #[test]
    fn no_chunk_is_longer_than_the_models_were_fitted_on() {
        let mut c = costs(0.01, 0.01, 0.0, 50.0, 10_000.0, 1.0);
        c.cloud.max_rows = 128;
        let p = plan(&c, 300);
        assert!(p.chunks.iter().all(|&x| x <= 128) && p.chunks.iter().sum::<usize>() == 300, "{p:?}");
        assert_eq!(p.chunks.len(), 3, "fixed costs still favour the fewest chunks: {p:?}");
    }

    #[test]
    fn the_schedule_matches_a_hand_computed_case() {
        // Two chunks of 10 rows; device 1 ms/row in, 0 out; link 1 ms per 10 rows each way,
        // rtt 2; cloud 2 ms/row.
        let mut c = costs(1.0, 2.0, 0.0, 0.0, 1.0, 2.0);
        c.output = StageCost::default();
        c.up_bytes_per_row = 12.5; // 10 rows = 125 B = 1 ms at 1 Mbit/s
        c.down_bytes_per_row = 12.5;
        c.up_bytes_per_frame = 0.0;
        c.down_bytes_per_frame = 0.0;
        let s = c.simulate(&[10, 10]);
        // chunk 0: input 10, up 11, +1 = 12 at cloud, computed 32, down 33 + 1 = 34.
        // chunk 1: input 20, up 21, at 22, computed max(22,32)+20 = 52, down 53 + 1 = 54.
        assert_eq!(s.chunks[0][..4], [10.0, 12.0, 32.0, 34.0]);
        assert_eq!(s.chunks[1][..4], [20.0, 22.0, 52.0, 54.0]);
        assert_eq!(s.ttft_ms, 54.0);
    }
}
