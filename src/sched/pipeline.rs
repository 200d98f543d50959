//! The prefill pipeline as a schedule: what TTFT a chunking of the prompt gives, from the stage
//! costs, the link and the cloud's load.
//!
//! It follows the edge's prefill ([`crate::edge`]) step by step. The device runs the input
//! submodel on each chunk and hands it to the uplink; between chunks it runs the output
//! submodel on every reply that has arrived; after the last chunk it runs the draft path over
//! what it can, then waits for the remaining replies in order, and runs the head on the last
//! position. Uplink and downlink are
//! FIFOs with a rate and half the round trip each; the cloud runs one session's blocks in order.
//! The device is one resource: its input and output work never overlap.

use serde::{Deserialize, Serialize};

use crate::sched::cost::StageCost;

/// A link as measured: round trip and throughput each way.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkEstimate {
    pub rtt_ms: f64,
    pub up_mbps: f64,
    pub down_mbps: f64,
}

impl LinkEstimate {
    /// Milliseconds to serialise `bytes` at `mbps`.
    fn transfer_ms(bytes: f64, mbps: f64) -> f64 {
        bytes * 8.0 / (mbps * 1e3)
    }
}

/// Everything the schedule needs.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineCosts {
    /// Embedding + input submodel.
    pub input: StageCost,
    /// Output submodel.
    pub output: StageCost,
    /// The head on one position (the prompt's last).
    pub head_ms: f64,
    /// The draft path's prefill (adapter, and the draft output submodel when it keeps its own
    /// cache); `None` when not drafting.
    pub draft_prefill: Option<StageCost>,
    /// Whether the draft path needs each position's middle output (a feature-conditioned
    /// adapter): it then runs chunk by chunk as replies arrive.
    pub draft_conditioned: bool,
    /// The middle layers, including the cloud's load.
    pub cloud: StageCost,
    pub link: LinkEstimate,
    /// Bytes per position and per frame, each way.
    pub up_bytes_per_row: f64,
    pub up_bytes_per_frame: f64,
    pub down_bytes_per_row: f64,
    pub down_bytes_per_frame: f64,
}

/// When each stage of each chunk ended, ms from the start of the prefill.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
pub struct Schedule {
    pub ttft_ms: f64,
    /// Per chunk: input done (sent), arrived at the cloud, computed, arrived back, output done.
    pub chunks: Vec<[f64; 5]>,
    /// Total time of each resource: device, uplink, cloud, downlink.
    pub busy_ms: [f64; 4],
}

impl PipelineCosts {
    /// The longest chunk every stage's model was fitted on (`usize::MAX` when unknown).
    pub fn max_chunk(&self) -> usize {
        let stages = [Some(self.input), Some(self.output), self.draft_prefill, Some(self.cloud)];
        stages.iter().flatten().map(|s| s.max_rows).filter(|&m| m > 0).min().unwrap_or(usize::MAX)
    }

    /// The schedule of a prefill cut into `chunks` (lengths, summing to the prompt's).
    pub fn simulate(&self, chunks: &[usize]) -> Schedule {
        let half_rtt = self.link.rtt_ms / 2.0;
        let n = chunks.len();
        let mut times = vec![[0.0f64; 5]; n];
        let (mut device, mut up_free, mut cloud_free, mut down_free) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        let mut busy = [0.0f64; 4];
        let mut starts = Vec::with_capacity(n);
        let mut pos = 0;
        let mut done = 0; // replies processed
        let mut drafted = 0; // positions through the draft path
        let output = |device: &mut f64, busy: &mut [f64; 4], times: &mut Vec<[f64; 5]>, j: usize, rows: usize, start: usize| {
            *device = device.max(times[j][3]);
            let t = self.output.predict(rows, start);
            *device += t;
            busy[0] += t;
            times[j][4] = *device;
        };
        for (i, &rows) in chunks.iter().enumerate() {
            starts.push(pos);
            let t = self.input.predict(rows, pos);
            device += t;
            busy[0] += t;
            times[i][0] = device;
            let up = LinkEstimate::transfer_ms(self.up_bytes_per_row * rows as f64 + self.up_bytes_per_frame, self.link.up_mbps);
            up_free = up_free.max(device) + up;
            busy[1] += up;
            times[i][1] = up_free + half_rtt;
            let c = self.cloud.predict(rows, pos);
            cloud_free = cloud_free.max(times[i][1]) + c;
            busy[2] += c;
            times[i][2] = cloud_free;
            let down = LinkEstimate::transfer_ms(self.down_bytes_per_row * rows as f64 + self.down_bytes_per_frame, self.link.down_mbps);
            down_free = down_free.max(cloud_free) + down;
            busy[3] += down;
            times[i][3] = down_free + half_rtt;
            pos += rows;
            while done < i + 1 && times[done][3] <= device {
                output(&mut device, &mut busy, &mut times, done, chunks[done], starts[done]);
                done += 1;
            }
        }
        let mut draft_path = |device: &mut f64, busy: &mut [f64; 4], upto: usize| {
            if let Some(d) = &self.draft_prefill {
                if upto > drafted {
                    let t = d.predict(upto - drafted, drafted);
                    *device += t;
                    busy[0] += t;
                    drafted = upto;
                }
            }
        };
        // Positions the draft path can run: all of them, or (conditioned) those whose previous
        // position's middle output has arrived.
        let ready = |done: usize| if self.draft_conditioned { if done == n { pos } else { starts.get(done).map_or(pos, |&s| s + 1).min(pos) } } else { pos };
        draft_path(&mut device, &mut busy, ready(done));
        // The rest of the draft path waits for the first draft round.
        while done < n {
            output(&mut device, &mut busy, &mut times, done, chunks[done], starts[done]);
            done += 1;
        }
        device += self.head_ms;
        busy[0] += self.head_ms;
        Schedule { ttft_ms: device, chunks: times, busy_ms: busy }
    }

    /// The pipeline's bound for a prompt of `len` positions in chunks of about `chunk`: the
    /// busiest resource's total time plus the other stages' time for one chunk.
    pub fn bound(&self, chunks: &[usize]) -> f64 {
        let s = self.simulate(chunks);
        let (busiest, max) = s.busy_ms.iter().enumerate().fold((0, 0.0f64), |b, (i, &v)| if v > b.1 { (i, v) } else { b });
        let first = chunks.first().copied().unwrap_or(0);
        let one = [
            self.input.predict(first, 0) + self.output.predict(first, 0) + self.head_ms,
            LinkEstimate::transfer_ms(self.up_bytes_per_row * first as f64, self.link.up_mbps),
            self.cloud.predict(first, 0),
            LinkEstimate::transfer_ms(self.down_bytes_per_row * first as f64, self.link.down_mbps),
        ];
        max + self.link.rtt_ms + one.iter().enumerate().filter(|&(i, _)| i != busiest).map(|(_, v)| v).sum::<f64>()
    }
}
