//! The device's view of the cloud: submit the input submodel's hidden states for a block of
//! positions, receive the middle submodel's output for them, in order ([`MiddleLink`]), with the
//! bytes each way counted and every frame visible to a [`FrameTap`].

use std::sync::Arc;
use std::time::Duration;

use candle_core::Tensor;

use crate::error::Result;

/// The middle layers' output for one submitted block.
#[derive(Debug, Clone)]
pub struct MiddleReply {
    pub start: usize,
    /// `(1, count, hidden)`, f32.
    pub hidden: Tensor,
    /// Time the cloud spent computing it.
    pub cloud_compute: Duration,
    /// The cloud's load when it sent the reply (`None` in process).
    pub load: Option<crate::net::protocol::CloudLoad>,
}

/// Bytes that crossed the link (frames with their length prefixes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Sessions opened again after losing the cloud ([`crate::net::ResilientLink`]).
    pub reconnects: u32,
    /// Time lost to those: waiting for the reply that showed the loss, finding a cloud again
    /// and replaying the session there.
    pub recovery: std::time::Duration,
    /// Notices from the cloud that a block was still queued or computing
    /// ([`crate::net::protocol::Message::Pending`]).
    pub pending_notices: u32,
}

/// The cloud's middle submodel as the device sees it.
pub trait MiddleLink {
    /// Sends hidden states `(1, count, hidden)` of positions `start..start + count`; the cloud
    /// first drops every cached position at or after `start`.
    fn submit(&mut self, start: usize, hidden: &Tensor) -> Result<()> {
        self.submit_tree(start, hidden, &[], &[])
    }
    /// [`MiddleLink::submit`] for a block that forms a draft tree (`parents`, one per row, see
    /// [`crate::model::tree::TreeShape`]; empty for a sequence) or follows one (`keep`: the rows
    /// of the previous tree that stay, root first; empty when it was not a tree).
    fn submit_tree(&mut self, start: usize, hidden: &Tensor, parents: &[u16], keep: &[u16]) -> Result<()>;
    /// The next reply, in submission order (blocks until it arrives).
    fn receive(&mut self) -> Result<MiddleReply>;
    /// The next reply if it has already arrived.
    fn try_receive(&mut self) -> Result<Option<MiddleReply>>;
    fn stats(&self) -> LinkStats;
    /// The cloud's predicted compute for a block of `rows` positions from `start` (ms), from
    /// the cost model its handshake sent (`None`: no model, e.g. a local middle).
    fn predicted_compute_ms(&self, rows: usize, start: usize) -> Option<f64> {
        let _ = (rows, start);
        None
    }
}

/// Which way a frame went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Up,
    Down,
}

/// Sees every frame body the edge sends or receives (for audits and tests).
pub type FrameTap = Arc<dyn Fn(Direction, &[u8]) + Send + Sync>;

