//! Drafting a tree (EAGLE-2's dynamic tree over the SLM's draft path) and keeping the accepted
//! path of it.
//!
//! A round's tree grows level by level from the committed token (the root). At each level the
//! nodes just added offer their `branch` most likely next tokens; the candidates with the highest
//! cumulative draft probability (the product of the draft's probabilities along the path: an
//! estimate of the chance that the path is accepted) become the next level, up to `width` of
//! them and the node budget, while that probability stays above the node threshold. Each level's
//! nodes run through the input submodel (whose states go to the cloud) and, while a deeper level
//! is worth drafting, through the adapter, the output submodel and the draft head, as one block
//! with the tree's mask ([`crate::model::tree`]). Every cache of the device holds the tree's
//! nodes at consecutive slots after the round's start, in level order, the layout the cloud's
//! block has too.
//!
//! After verification ([`crate::decode::accept_tree`]) the input submodel's and the LLM output
//! submodel's caches keep the accepted path's entries, moved to consecutive positions
//! ([`crate::model::StackCache::keep_path`]); the cloud does the same when the next block tells it
//! the path. The draft path (adapter, SLM output) rolls back to the root and runs the accepted
//! drafts again as the next round's catch-up, as after a chain.
//!
//! ## Choosing the tree (`--draft-tree auto`)
//! A node with cumulative probability `p` is worth about `p` tokens (`p · T` ms, `T` the measured
//! time per committed token) and costs a row of verification (`r` ms: the measured slope of the
//! round's critical path, device verification plus waiting for the reply, against the rows
//! sent). A node joins while `p ≥ r / T`; a level is drafted further while its best node's `p`
//! is at least the chain's threshold, a draft step's cost over `T` ([`super::drafter`]). With
//! sampling both stay at their priors, so that a seeded run does not depend on timings.

use std::time::Instant;

use candle_core::Tensor;

use crate::adapter::DraftContext;
use crate::decode::timing::ms;
use crate::decode::Sampler;
use crate::edge::drafter::DraftLength;
use crate::edge::state::Edge;
use crate::error::{Error, Result};
use crate::model::tree::{TreeShape, MAX_TREE_NODES, ROOT};
use crate::net::{MiddleLink, MiddleReply};

/// How far a round's tree may grow.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct TreeLimits {
    /// Most nodes after the root.
    pub nodes: usize,
    /// Most levels after the root (drafts on one path).
    pub depth: usize,
    /// Most nodes per level.
    pub width: usize,
    /// Candidates each expanded node offers.
    pub branch: usize,
    /// A node joins while its cumulative draft probability is at least this.
    pub node_threshold: f32,
    /// A level is drafted further while its best node's cumulative probability is at least this.
    pub level_threshold: f32,
}

/// A round's draft tree, ready to verify.
pub(super) struct TreeRound {
    pub shape: TreeShape,
    /// The token of each node (node 0: the committed token).
    pub tokens: Vec<u32>,
    /// Input-submodel states of every node, `(1, n, hidden)`.
    pub hidden: Tensor,
}

impl TreeRound {
    /// The children of a node and their tokens.
    pub fn children(&self, i: usize) -> Vec<(usize, u32)> {
        self.shape.children(i).map(|c| (c, self.tokens[c])).collect()
    }
}

/// A node of the level being drafted: its draft probabilities over the draft head's rows.
struct Frontier {
    node: usize,
    cum: f32,
    probs: Vec<f32>,
}

impl<L: MiddleLink> Edge<'_, L> {
    /// Runs the committed token `next` at `base` through the input submodel and drafts a tree
    /// after it within `limits`.
    pub(super) fn draft_tree(&mut self, next: u32, base: usize, limits: &TreeLimits, eos: &[u32], sampler: &Sampler, steps: &mut DraftLength) -> Result<TreeRound> {
        let h = self.input_hidden(&[next])?;
        self.push_tail(&h)?;
        let mut parents = vec![ROOT];
        let mut tokens = vec![next];
        let mut hidden = vec![h];
        let t = Instant::now();
        let logits = self.draft_logits()?;
        steps.record_step(ms(t.elapsed()));
        // The adapter's predicted middle output of each node (its children's condition).
        let mut predicted = vec![self.features.take()];
        let mut frontier = vec![Frontier { node: 0, cum: 1.0, probs: self.draft_probs(&logits, sampler)? }];
        let budget = limits.nodes.min(MAX_TREE_NODES - 1);
        for depth in 1..=limits.depth {
            let room = budget - (tokens.len() - 1);
            let mut candidates: Vec<(f32, usize, u32)> = Vec::new();
            for f in &frontier {
                for (row, p) in top_rows(&f.probs, limits.branch) {
                    candidates.push((f.cum * p, f.node, self.head.token(row)));
                }
            }
            candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
            candidates.retain(|c| c.0 >= limits.node_threshold && c.0 > 0.0);
            candidates.truncate(limits.width.min(room));
            if candidates.is_empty() {
                break;
            }
            let t = Instant::now();
            let first = tokens.len();
            for &(_, parent, token) in &candidates {
                parents.push(parent as u16);
                tokens.push(token);
            }
            let shape = TreeShape::new(parents.clone())?;
            let mask = shape.mask(base, first..tokens.len());
            let x = self.dev.embedder.embed_ids(&tokens[first..])?;
            let h = self.dev.input.forward_tree(&x, &mut self.input, mask.clone())?;
            hidden.push(h.clone());
            let best = candidates[0].0;
            let deeper = depth < limits.depth && tokens.len() - 1 < budget && best >= limits.level_threshold;
            if !deeper {
                self.device_time += t.elapsed();
                break;
            }
            // The level's draft path: the adapter on the nodes (conditioned on their parents'
            // predicted middle outputs), the output submodel, the draft head.
            let prev = match self.adapter.is_conditioned() {
                true => {
                    let rows = candidates
                        .iter()
                        .map(|&(_, parent, _)| predicted[parent].clone().ok_or_else(|| Error::invalid("internal: a tree node without its parent's middle output")))
                        .collect::<Result<Vec<_>>>()?;
                    Some(Tensor::cat(&rows, 1)?)
                }
                false => None,
            };
            let m = self.adapter.forward_tree(&h, prev.as_ref(), &mut self.adapter_cache, mask.clone())?;
            let y = match self.adapter.draft_context {
                DraftContext::Drafted => self.draft_output.forward_tree(&m, &mut self.slm_output, mask)?,
                DraftContext::Verified => self.draft_output.forward_tree(&m, &mut self.llm_output, mask)?,
            };
            let logits = self.head.logits_all(&self.dev.head, &y)?; // (level, rows)
            frontier.clear();
            for (j, &(cum, _, token)) in candidates.iter().enumerate() {
                let node = first + j;
                predicted.push(Some(m.narrow(1, j, 1)?));
                if !eos.contains(&token) {
                    frontier.push(Frontier { node, cum, probs: self.draft_probs(&logits.get(j)?, sampler)? });
                }
            }
            self.device_time += t.elapsed();
            steps.record_step(ms(t.elapsed()));
            if frontier.is_empty() {
                break;
            }
        }
        // The draft path holds the root and the expanded levels; what verification keeps of it
        // runs again (the catch-up of the next round).
        self.last_logits = None;
        let hidden = if hidden.len() == 1 { hidden.remove(0) } else { Tensor::cat(&hidden, 1)? };
        Ok(TreeRound { shape: TreeShape::new(parents)?, tokens, hidden })
    }

    /// The draft's distribution over the draft head's rows at one node, `logits` `(rows,)`.
    fn draft_probs(&self, logits: &Tensor, sampler: &Sampler) -> Result<Vec<f32>> {
        if sampler.is_greedy() {
            Ok(candle_nn::ops::softmax_last_dim(logits)?.to_vec1::<f32>()?)
        } else {
            sampler.probs(logits)
        }
    }

    /// The LLM's logits at every node of a verified tree, `(n, vocab)`: the output submodel on
    /// the cloud's reply with the tree's mask, and the head on every row.
    pub(super) fn tree_logits(&mut self, r: &MiddleReply, shape: &TreeShape) -> Result<Tensor> {
        let t = Instant::now();
        self.llm_output.truncate(r.start);
        let n = r.hidden.dim(1)?;
        let y = if shape.is_chain() {
            self.dev.output.forward(&r.hidden, r.start, &mut self.llm_output)?
        } else {
            self.dev.output.forward_tree(&r.hidden, &mut self.llm_output, shape.mask(r.start, 0..n))?
        };
        let logits = self.dev.head.forward_exact(&y)?.squeeze(0)?;
        self.device_time += t.elapsed();
        Ok(logits)
    }

    /// After verification of the tree at `base`: the input and LLM output caches keep the
    /// accepted path (`path`, root first) at consecutive positions; the draft path rolls back to
    /// the root and queues the accepted drafts (with the cloud's middle outputs of the path for a
    /// conditioned adapter) to run again.
    pub(super) fn keep_tree_path(&mut self, base: usize, path: &[usize], round: &TreeRound, reply: &MiddleReply) -> Result<()> {
        self.input.keep_path(base, path)?;
        self.llm_output.keep_path(base, path)?;
        self.adapter_cache.truncate(base + 1);
        self.slm_output.truncate(base + 1);
        self.last_logits = None;
        let rows = |t: &Tensor, of: &[usize]| -> Result<Tensor> {
            let idx = Tensor::from_vec(of.iter().map(|&i| i as u32).collect::<Vec<_>>(), of.len(), t.device())?;
            Ok(t.index_select(&idx, 1)?)
        };
        self.tail = if path.len() > 1 { Some(rows(&round.hidden, &path[1..])?) } else { None };
        self.features = None;
        self.push_features(&rows(&reply.hidden, path)?)?;
        Ok(())
    }
}

/// The `k` largest entries of `p` (row, probability), largest first.
fn top_rows(p: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &x) in p.iter().enumerate() {
        if best.len() < k || best.last().is_some_and(|b| x > b.1) {
            let at = best.iter().position(|b| x > b.1).unwrap_or(best.len());
            best.insert(at, (i as u32, x));
            best.truncate(k);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::top_rows;

    #[test]
    fn top_rows_are_the_largest_first() {
        assert_eq!(top_rows(&[0.1, 0.5, 0.2, 0.05, 0.15], 3), vec![(1, 0.5), (2, 0.2), (4, 0.15)]);
        assert_eq!(top_rows(&[0.3], 4), vec![(0, 0.3)]);
    }
}
