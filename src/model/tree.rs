//! Draft trees as the layers see them: a block of positions whose rows form a tree
//! ([`TreeShape`]: each row's parent is an earlier row, the first row follows the cached
//! positions), the attention mask and rotary positions that shape implies ([`TreeMask`]: a row
//! sees the cached prefix, its ancestors and itself, at position `start + depth`), and keeping
//! one root-to-leaf path of it in a cache afterwards ([`crate::model::StackCache::keep_path`]).
//!
//! A row of a tree computes bitwise what the same token computes in a sequence that holds only
//! its ancestors: it attends to the same keys in the same order (the kernel walks the cache's
//! slots in order and the ancestors' slots come before their descendants'), at the same rotary
//! position, through row-invariant matmuls.

use std::sync::Arc;

use crate::error::{Error, Result};

/// Most rows of a tree block (the row-invariant kernels serve blocks up to this size).
pub const MAX_TREE_NODES: usize = crate::model::kernels::EXACT_ROWS;

/// The parent entry of a tree's first row: the position before the block.
pub const ROOT: u16 = u16::MAX;

/// The shape of a block that forms a tree: `parents[0] == ROOT`, `parents[i] < i` otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeShape {
    parents: Vec<u16>,
    depths: Vec<usize>,
}

impl TreeShape {
    /// Checks and builds a shape from the parent of each row.
    pub fn new(parents: Vec<u16>) -> Result<Self> {
        let n = parents.len();
        if n == 0 || n > MAX_TREE_NODES {
            return Err(Error::invalid(format!("a tree of {n} rows (1 to {MAX_TREE_NODES})")));
        }
        if parents[0] != ROOT {
            return Err(Error::invalid(format!("a tree's first row must be its root, not a child of row {}", parents[0])));
        }
        let mut depths = vec![0usize; n];
        for i in 1..n {
            let p = parents[i] as usize;
            if p >= i {
                return Err(Error::invalid(format!("tree row {i} names row {} as its parent: parents come first", parents[i])));
            }
            depths[i] = depths[p] + 1;
        }
        Ok(Self { parents, depths })
    }

    /// A chain of `n` rows (each the parent of the next).
    pub fn chain(n: usize) -> Result<Self> {
        Self::new((0..n).map(|i| if i == 0 { ROOT } else { (i - 1) as u16 }).collect())
    }

    pub fn len(&self) -> usize {
        self.parents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.parents.is_empty()
    }

    pub fn parents(&self) -> &[u16] {
        &self.parents
    }

    /// The parent row of row `i` (`None` for the root).
    pub fn parent(&self, i: usize) -> Option<usize> {
        self.parents.get(i).filter(|&&p| p != ROOT).map(|&p| p as usize)
    }

    /// Edges from the root to row `i`.
    pub fn depth(&self, i: usize) -> usize {
        self.depths[i]
    }

    /// Whether every row is the child of the row before it.
    pub fn is_chain(&self) -> bool {
        self.parents.iter().enumerate().skip(1).all(|(i, &p)| p as usize == i - 1)
    }

    /// The rows from the root to row `i`, root first.
    pub fn path_to(&self, i: usize) -> Vec<usize> {
        let mut path = vec![i];
        let mut at = i;
        while let Some(p) = self.parent(at) {
            path.push(p);
            at = p;
        }
        path.reverse();
        path
    }

    /// The children of row `i`, in row order.
    pub fn children(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        self.parents.iter().enumerate().filter(move |&(_, &p)| p as usize == i && p != ROOT).map(|(c, _)| c)
    }

    /// Checks that `path` runs from the root down parent links (what a cache may keep).
    pub fn check_path(&self, path: &[usize]) -> Result<()> {
        match path.first() {
            Some(0) => {}
            _ => return Err(Error::invalid(format!("a kept path must start at the tree's root, not {path:?}"))),
        }
        for w in path.windows(2) {
            if w[1] >= self.len() || self.parent(w[1]) != Some(w[0]) {
                return Err(Error::invalid(format!("row {} is not a child of row {} in the previous tree", w[1], w[0])));
            }
        }
        Ok(())
    }

    /// The mask for rows `rows` of this tree when row 0 sits at cache slot `start` and every row
    /// `i` at slot `start + i` (rows before `rows.start` already cached).
    pub fn mask(&self, start: usize, rows: std::ops::Range<usize>) -> Arc<TreeMask> {
        let visible = rows.clone().map(|i| self.path_to(i).into_iter().map(|a| start + a).collect()).collect();
        let positions = rows.map(|i| start + self.depths[i]).collect();
        Arc::new(TreeMask { prefix: start, visible, positions })
    }
}

/// Which cached keys each row of a block sees, and its rotary position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeMask {
    /// Every row sees slots `[0, prefix)`.
    pub prefix: usize,
    /// Per row: the further slots it sees (its ancestors' and its own), increasing.
    pub visible: Vec<Vec<usize>>,
    /// Per row: its rotary position.
    pub positions: Vec<usize>,
}

impl TreeMask {
    pub fn rows(&self) -> usize {
        self.visible.len()
    }

    /// The mask as added to attention scores, `(n_rep * rows, kv_len)` for the rows stacked as
    /// `n_rep` groups (the query heads that share a K/V head, as [`crate::model::layer`]
    /// stacks them): 0 where a row sees a slot, -inf elsewhere. The generic attention (a GPU,
    /// or a compute dtype other than f32) adds it; the CPU kernel walks the visible slots
    /// itself.
    pub fn additive(&self, n_rep: usize, kv_len: usize, dtype: candle_core::DType, device: &candle_core::Device) -> Result<candle_core::Tensor> {
        if self.prefix > kv_len || self.visible.iter().flatten().any(|&j| j >= kv_len) {
            return Err(Error::invalid(format!("a tree mask past the {kv_len} cached positions")));
        }
        let mut row = vec![f32::NEG_INFINITY; self.rows() * kv_len];
        for (i, seen) in self.visible.iter().enumerate() {
            let r = &mut row[i * kv_len..(i + 1) * kv_len];
            r[..self.prefix].fill(0.0);
            seen.iter().for_each(|&j| r[j] = 0.0);
        }
        Ok(candle_core::Tensor::from_vec(row.repeat(n_rep), (n_rep * self.rows(), kv_len), device)?.to_dtype(dtype)?)
    }
}

/// The middle layers' cache of one session as blocks arrive, some of them trees: before a
/// block runs, the path kept of the previous tree moves to consecutive positions and the cache is
/// truncated to the block's start (the cloud's session and the in-process link share this).
#[derive(Debug, Clone, Default)]
pub struct BlockCache {
    pub cache: crate::model::StackCache,
    /// The last block, when it was a tree: its start and shape.
    last_tree: Option<(usize, TreeShape)>,
}

impl BlockCache {
    pub fn new(stack: &crate::model::LayerStack) -> Self {
        Self { cache: stack.new_cache(), last_tree: None }
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Checks a block of `n` rows at `start` (a tree of `parents`, or a sequence when empty,
    /// after keeping rows `keep` of the previous tree) against the cache; returns its shape
    /// (for a block that extends the previous tree, the whole tree's), the rows to keep, and
    /// for an extension the previous tree's start and rows ([`CheckedBlock`]).
    ///
    /// A block extends the previous tree when its first row's parent is not [`ROOT`]: its rows
    /// follow that tree's rows (row `j` of the block is row `prev + j` of the tree, at slot
    /// `start + j`), every parent indexes an earlier row of the whole tree, nothing is kept,
    /// and it starts at the slot after the tree's last row, with nothing truncated. The next
    /// block's kept path then runs down the whole tree.
    pub fn check(&self, start: usize, n: usize, parents: &[u16], keep: &[u16]) -> Result<CheckedBlock> {
        if parents.first().is_some_and(|&p| p != ROOT) {
            let Some((s, t)) = &self.last_tree else {
                return Err(Error::invalid("a block extends a tree, but the previous block was not a tree"));
            };
            if !keep.is_empty() || start != s + t.len() || self.cache.len() != start || parents.len() != n {
                return Err(Error::invalid(format!(
                    "a block extending the tree at {s} of {} rows must start at {} with nothing kept (starts at {start}, keeps {} rows, {} cached)",
                    t.len(),
                    s + t.len(),
                    keep.len(),
                    self.cache.len()
                )));
            }
            let whole = TreeShape::new(t.parents().iter().chain(parents).copied().collect())?;
            return Ok(CheckedBlock { shape: Some(whole), keep: Vec::new(), extends: Some((*s, t.len())) });
        }
        let shape = if parents.is_empty() { None } else { Some(TreeShape::new(parents.to_vec())?) };
        if shape.as_ref().is_some_and(|t| t.len() != n) {
            return Err(Error::invalid(format!("a tree of {} rows for a block of {n} positions", parents.len())));
        }
        let keep: Vec<usize> = keep.iter().map(|&k| k as usize).collect();
        let held = match (&self.last_tree, keep.is_empty()) {
            (None, false) => return Err(Error::invalid("a kept path, but the previous block was not a tree")),
            (Some((s, t)), false) => {
                t.check_path(&keep)?;
                s + keep.len()
            }
            // After a tree nothing but its root follows without a kept path.
            (Some((s, _)), true) => self.cache.len().min(s + 1),
            (None, true) => self.cache.len(),
        };
        if start > held {
            return Err(Error::invalid(format!("block starts at position {start} but only {held} are cached")));
        }
        Ok(CheckedBlock { shape, keep, extends: None })
    }

    /// Runs `x`, `(1, n, hidden)`, at `start` through `stack`, as [`BlockCache::check`] allows:
    /// the kept path moves to consecutive positions, the cache is truncated to `start`, and the
    /// block runs as a tree or a sequence. A failed run leaves the cache at the block's start.
    pub fn run(&mut self, stack: &crate::model::LayerStack, x: &candle_core::Tensor, start: usize, parents: &[u16], keep: &[u16]) -> Result<candle_core::Tensor> {
        let n = x.dim(1)?;
        let block = self.prepare(start, n, parents, keep)?;
        let y = match &block.mask {
            Some(mask) => stack.forward_tree(x, &mut self.cache, mask.clone()),
            None => stack.forward(x, start, &mut self.cache),
        };
        self.finish(block, y.is_ok());
        y
    }

    /// The first half of [`BlockCache::run`], for a block that runs in a packed pass
    /// ([`crate::model::LayerStack::forward_packed`]): checks it, moves the kept path and
    /// truncates the cache to `start`. Hand the result to [`BlockCache::finish`] after the pass.
    pub fn prepare(&mut self, start: usize, n: usize, parents: &[u16], keep: &[u16]) -> Result<PreparedBlock> {
        let CheckedBlock { shape, keep, extends } = self.check(start, n, parents, keep)?;
        if let (Some((s, prev)), Some(whole)) = (extends, &shape) {
            let mask = whole.mask(s, prev..prev + n);
            return Ok(PreparedBlock { start, tree_start: s, shape, mask: Some(mask) });
        }
        if let Some((s, _)) = self.last_tree.take() {
            if !keep.is_empty() {
                self.cache.keep_path(s, &keep)?;
            }
        }
        self.cache.truncate(start);
        let mask = shape.as_ref().filter(|t| !t.is_chain()).map(|t| t.mask(start, 0..n));
        Ok(PreparedBlock { start, tree_start: start, shape, mask })
    }

    /// The second half of [`BlockCache::run`]: after a failed pass the cache goes back to the
    /// block's start (an extension leaves the tree it extends as it was); after a tree, its
    /// shape is kept for the next block's path.
    pub fn finish(&mut self, block: PreparedBlock, ok: bool) {
        if !ok {
            self.cache.truncate(block.start);
        } else if let Some(t) = block.shape {
            self.last_tree = Some((block.tree_start, t));
        }
    }
}

/// What [`BlockCache::check`] found a block to be.
#[derive(Debug)]
pub struct CheckedBlock {
    /// Its tree (for an extension, the whole tree's), or `None` for a sequence.
    pub shape: Option<TreeShape>,
    /// The previous tree's rows to keep.
    pub keep: Vec<usize>,
    /// For a block extending the previous tree: that tree's start and rows.
    pub extends: Option<(usize, usize)>,
}

/// A block checked and made ready by [`BlockCache::prepare`].
#[derive(Debug)]
pub struct PreparedBlock {
    pub start: usize,
    /// Where the tree's root sits (the block's start, unless it extends a tree).
    tree_start: usize,
    shape: Option<TreeShape>,
    /// The tree mask, when the block runs as a tree (not a sequence).
    pub mask: Option<std::sync::Arc<TreeMask>>,
}

impl PreparedBlock {
    /// Whether the block runs as a draft tree.
    pub fn is_tree(&self) -> bool {
        self.mask.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_are_checked_and_paths_follow_parents() {
        assert!(TreeShape::new(vec![]).is_err());
        assert!(TreeShape::new(vec![0]).is_err());
        assert!(TreeShape::new(vec![ROOT, 1]).is_err());
        assert!(TreeShape::new(vec![ROOT; MAX_TREE_NODES + 1]).is_err());
        //      0
        //    1   2
        //   3 4   5
        let t = TreeShape::new(vec![ROOT, 0, 0, 1, 1, 2]).unwrap();
        assert_eq!(t.path_to(4), [0, 1, 4]);
        assert_eq!(t.children(1).collect::<Vec<_>>(), [3, 4]);
        assert_eq!((t.depth(5), t.is_chain()), (2, false));
        assert!(TreeShape::chain(4).unwrap().is_chain());
        assert!(t.check_path(&[0, 2, 5]).is_ok());
        assert!(t.check_path(&[0, 1, 5]).is_err());
        assert!(t.check_path(&[1, 3]).is_err());
        assert!(t.check_path(&[0, 9]).is_err());
        // What a session's cache accepts after a tree at 4 (cache of 4 + 6 slots).
        let mut c = BlockCache::default();
        c.cache.len = 10;
        c.last_tree = Some((4, t.clone()));
        assert!(c.check(7, 1, &[], &[0, 2, 5]).is_ok(), "the kept path and the next position");
        assert!(c.check(8, 1, &[], &[0, 2, 5]).is_err(), "past the kept path");
        assert!(c.check(7, 1, &[], &[0, 1, 5]).unwrap_err().to_string().contains("not a child"));
        assert!(c.check(5, 1, &[], &[]).is_ok() && c.check(6, 1, &[], &[]).is_err(), "without a path only the root stays");
        assert!(c.check(5, 2, &[ROOT], &[]).is_err(), "one parent per row");
        let m = t.mask(10, 3..6);
        assert_eq!(m.visible, vec![vec![10, 11, 13], vec![10, 11, 14], vec![10, 12, 15]]);
        assert_eq!((m.prefix, m.positions.clone()), (10, vec![12, 12, 12]));
    }
}
