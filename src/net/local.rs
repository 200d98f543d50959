//! [`LocalMiddle`]: the middle layers run in this process (no network), with the wire's rounding
//! applied both ways and the bytes a real link would carry counted. Tests use it, and training
//! measures acceptance with it.

use std::collections::VecDeque;
use std::time::Instant;

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::tree::BlockCache;
use crate::model::LayerStack;
use crate::net::link::{LinkStats, MiddleLink, MiddleReply};
use crate::net::protocol::{WireDtype, HIDDEN_FRAME_OVERHEAD, MIDDLE_FRAME_OVERHEAD};

/// The middle layers run in this process, with the wire's rounding applied both ways.
pub struct LocalMiddle<'a> {
    middle: &'a LayerStack,
    cache: BlockCache,
    dtype: WireDtype,
    ready: VecDeque<MiddleReply>,
    stats: LinkStats,
}

impl<'a> LocalMiddle<'a> {
    pub fn new(middle: &'a LayerStack, dtype: WireDtype) -> Self {
        Self { middle, cache: BlockCache::new(middle), dtype, ready: VecDeque::new(), stats: LinkStats::default() }
    }
}

impl MiddleLink for LocalMiddle<'_> {
    fn submit_tree(&mut self, start: usize, hidden: &Tensor, parents: &[u16], keep: &[u16]) -> Result<()> {
        let t = Instant::now();
        let x = self.dtype.round_trip(hidden)?;
        let y = self.dtype.round_trip(&self.cache.run(self.middle, &x, start, parents, keep)?)?;
        let payload = hidden.elem_count() * self.dtype.size();
        let tree_bytes = if parents.is_empty() && keep.is_empty() { 0 } else { 4 + 2 * (parents.len() + keep.len()) };
        self.stats.bytes_up += (payload + HIDDEN_FRAME_OVERHEAD + tree_bytes) as u64;
        self.stats.bytes_down += (payload + MIDDLE_FRAME_OVERHEAD) as u64;
        self.ready.push_back(MiddleReply { start, hidden: y, cloud_compute: t.elapsed(), load: None });
        Ok(())
    }

    fn receive(&mut self) -> Result<MiddleReply> {
        self.ready.pop_front().ok_or_else(|| Error::invalid("receive without a submitted block"))
    }

    fn try_receive(&mut self) -> Result<Option<MiddleReply>> {
        Ok(self.ready.pop_front())
    }

    fn stats(&self) -> LinkStats {
        self.stats
    }
}

