//! Link emulation on the edge's side of a real connection: a rate each way and a round-trip
//! propagation delay, applied to every frame the edge sends and receives.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// An emulated network link, applied by the edge to what it sends and receives: each frame
/// waits for the link to be free, takes `bytes * 8 / rate` to serialise, then half the
/// round-trip time to propagate. Emulation only: the real transport underneath is loopback.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LinkEmulation {
    /// Uplink rate (device → cloud), Mbit/s; `None` = unlimited.
    pub up_mbps: Option<f64>,
    /// Downlink rate (cloud → device), Mbit/s; `None` = unlimited.
    pub down_mbps: Option<f64>,
    /// Round-trip propagation delay.
    pub rtt_ms: f64,
}

impl LinkEmulation {
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [("--link-up-mbps", self.up_mbps), ("--link-down-mbps", self.down_mbps)] {
            if let Some(v) = v {
                if !(v > 0.0 && v.is_finite()) {
                    return Err(Error::invalid(format!("{name} {v} must be a positive number")));
                }
            }
        }
        if !(self.rtt_ms >= 0.0 && self.rtt_ms.is_finite()) {
            return Err(Error::invalid(format!("--link-rtt-ms {} must be >= 0", self.rtt_ms)));
        }
        Ok(())
    }
}

/// One direction of an emulated link: a FIFO with a rate and a propagation delay.
#[derive(Debug)]
pub(crate) struct Pipe {
    mbps: Option<f64>,
    one_way: Duration,
    free_at: Instant,
}

impl Pipe {
    pub(crate) fn new(mbps: Option<f64>, rtt_ms: f64) -> Self {
        Self { mbps, one_way: Duration::from_secs_f64(rtt_ms / 2e3), free_at: Instant::now() }
    }

    /// When a frame of `bytes` handed to the link at `at` arrives at the other end.
    pub(crate) fn arrival(&mut self, at: Instant, bytes: usize) -> Instant {
        let start = at.max(self.free_at);
        let serialise = self.mbps.map_or(Duration::ZERO, |r| Duration::from_secs_f64(bytes as f64 * 8.0 / (r * 1e6)));
        self.free_at = start + serialise;
        self.free_at + self.one_way
    }
}

