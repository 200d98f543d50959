//! A key/value cache for one attention layer that can be appended to in blocks and truncated back.
//!
//! candle-nn's `kv_cache::KvCache` pre-allocates and appends in place, but it cannot be rolled back:
//! speculative decoding must drop the positions of rejected drafts, so this cache keeps the same
//! pre-allocated layout (`(batch, kv_heads, capacity, head_dim)`, written with `slice_set`) and adds
//! [`KvCache::truncate`]. Truncation is O(1): it only moves the length; later appends overwrite.

use candle_core::{Result, Tensor};

/// Capacity added whenever the cache fills up (positions).
const GROW_BY: usize = 512;

/// Keys and values of one layer; shapes `(batch, kv_heads, len, head_dim)`.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Pre-allocated storage, `(batch, kv_heads, capacity, head_dim)` each.
    storage: Option<(Tensor, Tensor)>,
    len: usize,
    /// Positions of `storage` written since the last [`KvCache::clear`] (truncation keeps them;
    /// [`KvCache::restore`] may take them back).
    written: usize,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops every position at or after `len` (no-op if `len >= self.len()`).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Takes back positions up to `len` that a truncation dropped and no append has written
    /// over since (their keys and values are still in the storage). Whether they still belong
    /// after the positions before them changed is the caller's business: the speculative
    /// decoder uses it for draft-path states computed ahead, whose only effect is which tokens are
    /// drafted. Errors if positions up to `len` were never written.
    pub fn restore(&mut self, len: usize) -> Result<()> {
        if len > self.written {
            candle_core::bail!("cannot restore {len} positions: only {} were written", self.written)
        }
        self.len = self.len.max(len);
        Ok(())
    }

    /// Keeps, of the positions from `start` on, those at offsets `rows` (increasing: a path
    /// through a draft tree), moved to consecutive positions `start, start + 1, …`; drops the
    /// rest. The moved keys and values are copied bit for bit.
    pub fn keep_rows(&mut self, start: usize, rows: &[usize]) -> Result<()> {
        if rows.windows(2).any(|w| w[0] >= w[1]) || rows.last().is_some_and(|&r| start + r >= self.len) {
            candle_core::bail!("cannot keep rows {rows:?} after position {start} of {}", self.len)
        }
        if let Some((sk, sv)) = &self.storage {
            for (to, &from) in rows.iter().enumerate() {
                if from != to {
                    // A copy first: the source and the destination share the storage.
                    sk.slice_set(&sk.narrow(2, start + from, 1)?.contiguous()?.copy()?, 2, start + to)?;
                    sv.slice_set(&sv.narrow(2, start + from, 1)?.contiguous()?.copy()?, 2, start + to)?;
                }
            }
        }
        self.len = start + rows.len();
        Ok(())
    }

    /// Forgets everything and frees the storage.
    pub fn clear(&mut self) {
        self.storage = None;
        self.len = 0;
        self.written = 0;
    }

    /// Views of the cached keys and values, `(batch, kv_heads, len, head_dim)`, if any.
    pub fn current(&self) -> Result<Option<(Tensor, Tensor)>> {
        match &self.storage {
            Some((k, v)) if self.len > 0 => Ok(Some((k.narrow(2, 0, self.len)?, v.narrow(2, 0, self.len)?))),
            _ => Ok(None),
        }
    }

    /// Appends `k`, `v` of shape `(batch, kv_heads, new, head_dim)` and returns views of the whole
    /// cache, `(batch, kv_heads, len + new, head_dim)`.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let new = k.dim(2)?;
        let needed = self.len + new;
        let capacity = self.storage.as_ref().map_or(0, |(sk, _)| sk.dims()[2]);
        if needed > capacity {
            let capacity = needed.div_ceil(GROW_BY) * GROW_BY;
            let (b, h, _, d) = k.dims4()?;
            let grown_k = Tensor::zeros((b, h, capacity, d), k.dtype(), k.device())?;
            let grown_v = Tensor::zeros((b, h, capacity, d), v.dtype(), v.device())?;
            if let Some((old_k, old_v)) = &self.storage {
                // Every written position, so that truncated ones stay restorable.
                if self.written > 0 {
                    grown_k.slice_set(&old_k.narrow(2, 0, self.written)?.contiguous()?, 2, 0)?;
                    grown_v.slice_set(&old_v.narrow(2, 0, self.written)?.contiguous()?, 2, 0)?;
                }
            }
            self.storage = Some((grown_k, grown_v));
        }
        let Some((sk, sv)) = &self.storage else {
            candle_core::bail!("kv cache storage missing after allocation")
        };
        sk.slice_set(&k.contiguous()?, 2, self.len)?;
        sv.slice_set(&v.contiguous()?, 2, self.len)?;
        // Positions after the block keep what they held: still restorable.
        self.written = self.written.max(needed);
        self.len = needed;
        Ok((sk.narrow(2, 0, needed)?, sv.narrow(2, 0, needed)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    #[test]
    fn append_truncate_and_grow() -> Result<()> {
        let dev = Device::Cpu;
        let mut cache = KvCache::new();
        let block = |start: f32, n: usize| {
            Tensor::arange(start, start + n as f32, &dev)?.reshape((1, 1, n, 1))
        };
        let (k, _) = cache.append(&block(0., 3)?, &block(0., 3)?)?;
        assert_eq!(k.dims(), [1, 1, 3, 1]);
        cache.truncate(1);
        let (k, v) = cache.append(&block(10., 2)?, &block(20., 2)?)?;
        assert_eq!(k.flatten_all()?.to_vec1::<f32>()?, [0., 10., 11.]);
        assert_eq!(v.flatten_all()?.to_vec1::<f32>()?, [0., 20., 21.]);
        // Growing past the first allocation keeps the contents.
        let (k, _) = cache.append(&block(100., GROW_BY)?, &block(0., GROW_BY)?)?;
        assert_eq!(k.dims()[2], 3 + GROW_BY);
        assert_eq!(k.i((0, 0, 2, 0))?.to_scalar::<f32>()?, 11.);
        assert_eq!(k.i((0, 0, 3 + GROW_BY - 1, 0))?.to_scalar::<f32>()?, 100. + GROW_BY as f32 - 1.);
        // Restoring takes back truncated positions an append did not write over.
        cache.truncate(2);
        cache.append(&block(50., 1)?, &block(60., 1)?)?;
        cache.restore(5)?;
        let (k, _) = cache.current()?.expect("cached");
        assert_eq!(k.flatten_all()?.to_vec1::<f32>()?[..5], [0., 10., 50., 100., 101.]);
        assert!(cache.restore(3 + GROW_BY + 1).is_err());
        // Keeping a path: rows 0, 2 and 3 after position 1 move to positions 1, 2, 3.
        cache.truncate(5);
        cache.keep_rows(1, &[0, 2, 3])?;
        let (k, _) = cache.current()?.expect("cached");
        assert_eq!(k.flatten_all()?.to_vec1::<f32>()?, [0., 10., 100., 101.]);
        assert!(cache.keep_rows(1, &[2, 1]).is_err());
        assert!(cache.keep_rows(1, &[0, 3]).is_err());
        Ok(())
    }
}
