//! Pending notices: while a session's block waits in the queue or computes, the session tells
//! its edge every [`PENDING_INTERVAL`] that the block is still pending
//! ([`Message::Pending`]), so an edge behind a long queue (32 sessions' prefills, say) keeps
//! waiting for a busy cloud instead of giving it up as gone.
//!
//! A notice is only a sign of life while the cloud's compute is advancing: [`PassClock`] holds
//! the passes running now, and once one of them has run past the allowance an edge would give
//! it ([`OVERDUE_MIN`] plus [`OVERDUE_FACTOR`] times its predicted cost, times the passes
//! sharing the cores), the notices stop, so an edge still finds a stuck cloud stuck.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::cloud::metrics::CloudMetrics;
use crate::error::Result;
use crate::net::client::{OVERDUE_FACTOR, OVERDUE_MIN};
use crate::net::protocol::{Message, PENDING_INTERVAL};

/// The passes through the middle layers running now, each with when it began and its predicted
/// cost.
#[derive(Default)]
pub(crate) struct PassClock {
    running: Mutex<HashMap<u64, (Instant, Duration)>>,
    next: AtomicU64,
}

/// A pass on the clock; it leaves the clock when dropped (also when the pass panics).
pub(crate) struct OnTheClock<'a> {
    clock: &'a PassClock,
    id: u64,
}

impl Drop for OnTheClock<'_> {
    fn drop(&mut self) {
        if let Ok(mut running) = self.clock.running.lock() {
            running.remove(&self.id);
        }
    }
}

impl PassClock {
    /// A pass begins, predicted to cost `predicted`.
    pub(crate) fn begin(&self, predicted: Duration) -> OnTheClock<'_> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut running) = self.running.lock() {
            running.insert(id, (Instant::now(), predicted));
        }
        OnTheClock { clock: self, id }
    }

    /// Whether every pass running now is within an edge's allowance for it (the passes running
    /// at once share the cores, so each may take that many times its prediction).
    pub(crate) fn advancing(&self) -> bool {
        let Ok(running) = self.running.lock() else { return false };
        let sharing = running.len().max(1) as f64;
        running.values().all(|(began, predicted)| began.elapsed() < OVERDUE_MIN + predicted.mul_f64(OVERDUE_FACTOR * sharing))
    }
}

/// Awaits `work` (a block queued or computing), sending the edge a pending notice for the
/// block at `start` every [`PENDING_INTERVAL`] while the cloud's passes are advancing. A notice
/// the edge does not take within `write_timeout` ends the session (an error).
pub(crate) async fn await_with_notices<T>(
    work: impl Future<Output = T>,
    clock: &Arc<PassClock>,
    metrics: &CloudMetrics,
    send: &mut quinn::SendStream,
    start: u32,
    write_timeout: Duration,
) -> Result<T> {
    tokio::pin!(work);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + PENDING_INTERVAL, PENDING_INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let notice = Message::Pending { start }.encode();
    loop {
        tokio::select! {
            out = &mut work => return Ok(out),
            _ = ticks.tick() => {
                if clock.advancing() {
                    crate::cloud::session::send_within(metrics, send, &notice, write_timeout).await?;
                    metrics.pending_notices.inc();
                }
            }
        }
    }
}
