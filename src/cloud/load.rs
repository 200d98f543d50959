//! How busy the cloud has been for a session: the compute intervals of every *other* open
//! session over the last seconds, summed into "sessions computing at once", time per position
//! and time per block, for the edges' planners. A session's intervals go when it closes (a
//! finished session no longer loads the cloud).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::net::protocol::CloudLoad;

/// The window the load is averaged over.
const WINDOW: Duration = Duration::from_secs(2);

#[derive(Debug, Default)]
struct Intervals {
    /// Finished blocks: session, start, end, positions.
    done: VecDeque<(u64, Instant, Instant, usize)>,
    /// Blocks computing now: session, start.
    running: Vec<(u64, Instant)>,
}

/// Compute intervals of every session (shared by the server's sessions).
#[derive(Debug, Default)]
pub struct LoadMeter {
    inner: Mutex<Intervals>,
}

impl LoadMeter {
    /// A block of `session` starts computing; pass the returned instant to [`LoadMeter::end`].
    pub fn begin(&self, session: u64) -> Instant {
        let now = Instant::now();
        if let Ok(mut g) = self.inner.lock() {
            g.running.push((session, now));
        }
        now
    }

    /// The block of `session` that began at `start` is done, after `rows` positions.
    pub fn end(&self, session: u64, start: Instant, rows: usize) {
        let now = Instant::now();
        if let Ok(mut g) = self.inner.lock() {
            if let Some(i) = g.running.iter().position(|&r| r == (session, start)) {
                g.running.swap_remove(i);
            }
            g.done.push_back((session, start, now, rows));
            while g.done.front().is_some_and(|&(_, _, end, _)| now.duration_since(end) > WINDOW) {
                g.done.pop_front();
            }
        }
    }

    /// `session` closed: its work no longer counts.
    pub fn forget(&self, session: u64) {
        if let Ok(mut g) = self.inner.lock() {
            g.done.retain(|&(s, ..)| s != session);
            g.running.retain(|&(s, _)| s != session);
        }
    }

    /// The load the other sessions put on the cloud, as `session` sees it, with `sessions` open.
    pub fn load(&self, sessions: usize, session: u64) -> CloudLoad {
        let now = Instant::now();
        let from = now.checked_sub(WINDOW).unwrap_or(now);
        let Ok(g) = self.inner.lock() else { return CloudLoad { sessions: sessions as u32, ..Default::default() } };
        let overlap = |s: Instant, e: Instant| e.saturating_duration_since(s.max(from)).as_secs_f64();
        let others = g.done.iter().filter(|d| d.0 != session);
        let busy: f64 = others.clone().map(|&(_, s, e, _)| overlap(s, e)).sum::<f64>()
            + g.running.iter().filter(|r| r.0 != session).map(|&(_, s)| overlap(s, now)).sum::<f64>();
        let (time, rows, blocks) = others.fold((0.0, 0usize, 0usize), |(t, r, b), &(_, s, e, n)| (t + (e - s).as_secs_f64(), r + n, b + 1));
        CloudLoad {
            sessions: sessions as u32,
            // (+ 0.0: an empty float sum is -0.0)
            busy: (busy / WINDOW.as_secs_f64() + 0.0) as f32,
            us_per_row: if rows > 0 { (time * 1e6 / rows as f64) as f32 } else { 0.0 },
            block_ms: if blocks > 0 { (time * 1e3 / blocks as f64) as f32 } else { 0.0 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_cloud_has_no_load_and_a_busy_one_some() {
        let m = LoadMeter::default();
        assert_eq!(m.load(1, 1).busy, 0.0);
        let s = m.begin(7);
        std::thread::sleep(Duration::from_millis(30));
        let mid = m.load(2, 1);
        assert!(mid.busy > 0.01 && mid.sessions == 2, "{mid:?}");
        assert_eq!(m.load(2, 7).busy, 0.0, "a session's own work is not load");
        m.end(7, s, 10);
        let after = m.load(2, 1);
        assert!(after.busy > 0.01 && after.us_per_row >= 2500.0 && after.block_ms >= 25.0, "{after:?}");
        m.forget(7);
        assert_eq!(m.load(1, 1).busy, 0.0, "a closed session's work is not load");
    }
}
