//! A range of decoder layers run on hidden states ([`LayerStack`]), with one KV cache per layer
//! ([`StackCache`]) that takes blocks of several positions and truncates back (rollback).

use std::ops::Range;
use std::sync::Arc;

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::error::{Error, Result};
use crate::model::cache::KvCache;
use crate::model::config::ModelConfig;
use crate::model::layer::{AttentionMask, DecoderLayer};
use crate::model::ops::Ops;
use crate::model::rope::Rope;
use crate::model::tree::TreeMask;

/// The KV caches of a [`LayerStack`], one per layer; all hold the same number of positions.
#[derive(Debug, Clone, Default)]
pub struct StackCache {
    pub(crate) layers: Vec<KvCache>,
    /// Positions held (tracked here too, so that a stack of zero layers follows positions).
    pub(crate) len: usize,
}

impl StackCache {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rolls back to the first `len` positions (e.g. after rejected drafts).
    pub fn truncate(&mut self, len: usize) {
        self.layers.iter_mut().for_each(|c| c.truncate(len));
        self.len = self.len.min(len);
    }

    /// Takes back truncated positions up to `len` ([`KvCache::restore`]).
    pub fn restore(&mut self, len: usize) -> Result<()> {
        for c in &mut self.layers {
            c.restore(len)?;
        }
        self.len = self.len.max(len);
        Ok(())
    }

    /// Keeps the positions of a path through a draft tree whose row 0 sits at `start`: rows
    /// `rows` (increasing) move to `start, start + 1, …`, and the rest is dropped
    /// ([`KvCache::keep_rows`]).
    pub fn keep_path(&mut self, start: usize, rows: &[usize]) -> Result<()> {
        // Checked before any layer moves, so that a bad path changes nothing.
        if rows.windows(2).any(|w| w[0] >= w[1]) || rows.last().is_some_and(|&r| start + r >= self.len) {
            return Err(Error::invalid(format!("cannot keep rows {rows:?} after position {start} of {}", self.len)));
        }
        for c in &mut self.layers {
            c.keep_rows(start, rows)?;
        }
        self.len = start + rows.len();
        Ok(())
    }

    /// Forgets every position and frees the memory.
    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(KvCache::clear);
        self.len = 0;
    }
}

/// One session's block in a packed pass ([`LayerStack::forward_packed`]).
pub struct PackedBlock<'a> {
    /// Hidden states `(1, rows, hidden)` of positions `cache.len()..`.
    pub x: Tensor,
    pub cache: &'a mut StackCache,
    /// The block's tree mask when it is a draft tree (not a chain).
    pub tree: Option<Arc<TreeMask>>,
}

/// Whether a block of `rows` (a draft tree or not) computes exactly alone, so that it may join a
/// packed pass: trees always do (up to [`crate::model::tree::MAX_TREE_NODES`] rows), sequences
/// up to [`crate::model::kernels::SMALL_M`] rows (beyond, gemm computes them).
pub fn packable(rows: usize, tree: bool) -> bool {
    if tree {
        rows <= crate::model::tree::MAX_TREE_NODES
    } else {
        rows <= crate::model::kernels::SMALL_M
    }
}

/// Decoder layers `[start, end)` of a model, run on hidden states.
#[derive(Debug, Clone)]
pub struct LayerStack {
    pub(crate) range: Range<usize>,
    pub(crate) layers: Vec<DecoderLayer>,
    pub(crate) rope: Arc<Rope>,
    pub(crate) ops: Ops,
}

impl LayerStack {
    /// Loads layers `range` from `vb` rooted at the checkpoint (`model.layers.{i}` inside).
    pub fn load(vb: &VarBuilder, cfg: &ModelConfig, range: Range<usize>, rope: Arc<Rope>) -> Result<Self> {
        if range.start > range.end || range.end > cfg.num_hidden_layers {
            return Err(Error::invalid(format!(
                "layer range [{}, {}) is not inside the model's {} layers",
                range.start, range.end, cfg.num_hidden_layers
            )));
        }
        let vb_layers = vb.pp("model.layers");
        let layers = range
            .clone()
            .map(|i| DecoderLayer::load(vb_layers.pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { range, layers, rope, ops: Ops::Fused })
    }

    /// Builds a stack from layers made elsewhere (e.g. a trained adapter).
    pub fn from_layers(range: Range<usize>, layers: Vec<DecoderLayer>, rope: Arc<Rope>) -> Self {
        Self { range, layers, rope, ops: Ops::Fused }
    }

    /// Layers `range` (model layer numbers) of this stack as a stack of their own (the weights
    /// are shared).
    pub fn slice(&self, range: Range<usize>) -> Result<Self> {
        if range.start < self.range.start || range.end > self.range.end || range.start > range.end {
            return Err(Error::invalid(format!("layers [{}, {}) are not inside [{}, {})", range.start, range.end, self.range.start, self.range.end)));
        }
        let layers = self.layers[range.start - self.range.start..range.end - self.range.start].to_vec();
        Ok(Self { range, layers, rope: self.rope.clone(), ops: self.ops })
    }

    /// The f32 projection weights of layer `layer` (a model layer number), `(out, in)` each, in
    /// the order a layer multiplies them: fused QKV, output, fused gate/up, down (benchmarks).
    pub fn projection_weights(&self, layer: usize) -> Result<Vec<Tensor>> {
        let l = layer
            .checked_sub(self.range.start)
            .and_then(|i| self.layers.get(i))
            .ok_or_else(|| Error::invalid(format!("layer {layer} is not in [{}, {})", self.range.start, self.range.end)))?;
        Ok([&l.self_attn.qkv_proj, &l.self_attn.o_proj, &l.mlp.gate_up_proj, &l.mlp.down_proj].map(|p| p.weight().clone()).to_vec())
    }

    /// How many of the layers' projections compute short blocks from exact 4-bit blocks
    /// ([`crate::model::q4::PackedQ4`]), and how many there are.
    pub fn packed_projections(&self) -> (usize, usize) {
        let projections = self.layers.iter().flat_map(|l| [&l.self_attn.qkv_proj, &l.self_attn.o_proj, &l.mlp.gate_up_proj, &l.mlp.down_proj]);
        projections.fold((0, 0), |(packed, all), p| (packed + usize::from(p.is_packed()), all + 1))
    }

    /// A copy whose layers compute short blocks from 8-bit weights ([`DecoderLayer::with_q8`]).
    pub fn with_q8(&self) -> Result<Self> {
        let layers = self.layers.iter().map(DecoderLayer::with_q8).collect::<Result<Vec<_>>>()?;
        Ok(Self { layers, ..self.clone() })
    }

    pub fn with_ops(mut self, ops: Ops) -> Self {
        self.ops = ops;
        self
    }

    /// The dtype its weights compute in (`None` for a stack of no layers).
    pub fn compute_dtype(&self) -> Option<candle_core::DType> {
        self.layers.first().map(|l| l.self_attn.qkv_proj.weight().dtype())
    }

    /// The model layers this stack runs.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn max_positions(&self) -> usize {
        self.rope.max_positions()
    }

    /// An empty cache for this stack.
    pub fn new_cache(&self) -> StackCache {
        StackCache { layers: vec![KvCache::new(); self.layers.len()], len: 0 }
    }

    /// Runs `x`, `(batch, seq, hidden)`, the hidden states of positions `pos..pos + seq`, through
    /// the layers. `pos` must equal `cache.len()`: truncate the cache first to roll back.
    pub fn forward(&self, x: &Tensor, pos: usize, cache: &mut StackCache) -> Result<Tensor> {
        self.run(x, pos, cache, None)
    }

    /// Runs rows of a draft tree, `(1, seq, hidden)`, appended to the cache after its
    /// `cache.len()` slots, each row attending and rotated as `mask` says
    /// ([`crate::model::tree::TreeShape::mask`]); every row computes bitwise what it would in a
    /// sequence of its ancestors alone.
    pub fn forward_tree(&self, x: &Tensor, cache: &mut StackCache, mask: std::sync::Arc<TreeMask>) -> Result<Tensor> {
        if mask.rows() != x.dim(1)? || x.dim(1)? > crate::model::tree::MAX_TREE_NODES {
            return Err(Error::invalid(format!("a tree mask of {} rows for a block of {}", mask.rows(), x.dim(1)?)));
        }
        if let Some(&p) = mask.positions.iter().max() {
            if p >= self.rope.max_positions() {
                return Err(Error::ContextTooLong { needed: p + 1, limit: self.rope.max_positions() });
            }
        }
        self.run(x, cache.len(), cache, Some(mask))
    }

    /// Runs several sessions' blocks in one pass: each block's rows go through the layers
    /// packed with the others' (one pass over the weights for all), attending to its own cache
    /// only; returns each block's output, `(1, rows, hidden)`, in order. Every block must be
    /// [`packable`], and all of them together at most [`crate::model::kernels::EXACT_ROWS`]
    /// rows (the row-invariant kernels' range): then every row computes bitwise as
    /// [`LayerStack::forward`] (or
    /// [`LayerStack::forward_tree`]) of its block alone, on the CPU in f32 (on a GPU, or in
    /// another compute dtype, within that dtype's rounding). A failure leaves every cache as it
    /// was.
    pub fn forward_packed(&self, blocks: &mut [PackedBlock<'_>]) -> Result<Vec<Tensor>> {
        let Some(first) = self.layers.first() else {
            return Ok(blocks.iter().map(|b| b.x.clone()).collect());
        };
        let n_rep = first.self_attn.num_heads / first.self_attn.num_kv_heads;
        let xs = blocks.iter().map(|b| self.adopt(&b.x)).collect::<Result<Vec<_>>>()?;
        let mut shapes = Vec::with_capacity(blocks.len());
        for (b, x) in blocks.iter().zip(&xs) {
            let (rows, pos) = (x.dim(1)?, b.cache.len());
            if b.cache.layers.len() != self.layers.len() {
                return Err(Error::invalid("cache was made for another layer stack"));
            }
            if !packable(rows, b.tree.is_some()) {
                return Err(Error::invalid(format!("internal: a block of {rows} rows cannot join a packed pass")));
            }
            let mask = match &b.tree {
                Some(t) => {
                    if t.rows() != rows {
                        return Err(Error::invalid(format!("a tree mask of {} rows for a block of {rows}", t.rows())));
                    }
                    if let Some(&p) = t.positions.iter().max() {
                        if p >= self.rope.max_positions() {
                            return Err(Error::ContextTooLong { needed: p + 1, limit: self.rope.max_positions() });
                        }
                    }
                    AttentionMask::Tree(t.clone())
                }
                None => {
                    if pos + rows > self.rope.max_positions() {
                        return Err(Error::ContextTooLong { needed: pos + rows, limit: self.rope.max_positions() });
                    }
                    AttentionMask::causal(x, rows, pos, n_rep, self.ops)?
                }
            };
            shapes.push((rows, pos, mask));
        }
        let total: usize = shapes.iter().map(|s| s.0).sum();
        if total > crate::model::kernels::EXACT_ROWS {
            return Err(Error::invalid(format!("internal: a packed pass of {total} rows (at most {})", crate::model::kernels::EXACT_ROWS)));
        }
        let mut h = Tensor::cat(&xs, 1)?;
        let run = |h: &mut Tensor, blocks: &mut [PackedBlock<'_>]| -> Result<()> {
            for (l, layer) in self.layers.iter().enumerate() {
                let mut parts: Vec<(usize, usize, &mut KvCache, &AttentionMask)> =
                    blocks.iter_mut().zip(&shapes).map(|(b, (rows, pos, mask))| (*rows, *pos, &mut b.cache.layers[l], mask)).collect();
                *h = layer.forward_packed(h, &mut parts, &self.rope)?;
            }
            Ok(())
        };
        if let Err(e) = run(&mut h, blocks) {
            for (b, (_, pos, _)) in blocks.iter_mut().zip(&shapes) {
                b.cache.layers.iter_mut().for_each(|c| c.truncate(*pos));
            }
            return Err(e);
        }
        let mut out = Vec::with_capacity(blocks.len());
        let mut offset = 0;
        for (b, (rows, pos, _)) in blocks.iter_mut().zip(&shapes) {
            b.cache.len = pos + rows;
            out.push(h.narrow(1, offset, *rows)?);
            offset += rows;
        }
        Ok(out)
    }

    /// `x` on this stack's device in its compute dtype (its weights'): blocks arrive as f32 on
    /// the CPU (from the wire, or a profile's random states), and a GPU holds the weights in
    /// their stored dtype. A no-op (no copy) when they already match.
    fn adopt(&self, x: &Tensor) -> Result<Tensor> {
        match self.layers.first() {
            Some(l) => {
                let w = l.self_attn.qkv_proj.weight();
                Ok(x.to_device(w.device())?.to_dtype(w.dtype())?)
            }
            None => Ok(x.clone()),
        }
    }

    fn run(&self, x: &Tensor, pos: usize, cache: &mut StackCache, tree: Option<std::sync::Arc<TreeMask>>) -> Result<Tensor> {
        if cache.layers.len() != self.layers.len() {
            return Err(Error::invalid("cache was made for another layer stack"));
        }
        if pos != cache.len() {
            return Err(Error::invalid(format!(
                "position {pos} does not follow the cache, which holds {} positions",
                cache.len()
            )));
        }
        let needed = pos + x.dim(1)?;
        if needed > self.rope.max_positions() && tree.is_none() {
            return Err(Error::ContextTooLong { needed, limit: self.rope.max_positions() });
        }
        let mut h = self.adopt(x)?;
        if let Some(first) = self.layers.first() {
            let n_rep = first.self_attn.num_heads / first.self_attn.num_kv_heads;
            let run = |h: &mut Tensor, caches: &mut [KvCache]| -> Result<()> {
                let mask = match &tree {
                    Some(t) => AttentionMask::Tree(t.clone()),
                    None => AttentionMask::causal(h, h.dim(1)?, pos, n_rep, self.ops)?,
                };
                for (layer, c) in self.layers.iter().zip(caches.iter_mut()) {
                    *h = layer.forward(h, pos, &self.rope, c, self.ops, &mask)?;
                }
                Ok(())
            };
            if let Err(e) = run(&mut h, &mut cache.layers) {
                // Keep every layer's cache at `pos`, as if this call never happened.
                cache.layers.iter_mut().for_each(|c| c.truncate(pos));
                return Err(e);
            }
        }
        cache.len = needed;
        Ok(h)
    }
}
