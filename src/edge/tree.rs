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
//! sent). A node joins while `p ≥ r / T`. Drafting a level further costs a draft step (`c` ms,
//! measured) before the block can go, and pays through the level's children: the best of them
//! has about `p · q` (`p` the level's best node, `q` the draft's measured mean probability of
//! its most likely next token), worth `p · q · T` for its row, so a level is drafted further
//! while `p · q ≥ (r + c) / T`. (Comparing `p` alone with `c / T` drafted levels whose children
//! then fell below the node threshold: a step on the critical path for nothing in about half the
//! rounds that were not drafted ahead.) With sampling the costs stay at their priors, so that a
//! seeded run does not depend on timings (`q` depends on the draws only).
//!
//! ## Drafting ahead (`--no-draft-overlap` switches it off)
//! While the cloud verifies a tree the device grows it further, best first by cumulative draft
//! probability, with nodes the cloud does not see ([`Edge::grow_ahead`]); a node's cumulative
//! probability is also the draft's estimate of the chance that verification ends on it. When
//! the reply's bonus token is one of those nodes (a child of the accepted path's last node), the
//! next round is drafted already: every cache keeps the path, that node and its descendants
//! ([`Edge::keep_tree_ahead`]), and the next round sends the best of them
//! ([`Edge::reseed_tree`]) with one more level of leaves, without a draft step on the critical
//! path. The LLM path stays exact: a node's input-submodel state depends only on its ancestors,
//! which the kept path and subtree hold at the same positions; the draft path of those nodes was
//! conditioned on predicted middle outputs, which only changes what is drafted.
//!
//! ## Extending the sent tree (`--draft-pipeline`, greedy)
//! Drafting ahead alone still waits for the reply before the next block goes. With the
//! pipeline on (the default), at the first step of drafting ahead after which some of the nodes
//! drafted ahead are worth it, the device sends them, best first, as rows that extend the sent
//! tree ([`Edge::send_extension`]; the protocol's extension block: each row's parent an earlier
//! row of the whole tree, nothing kept, nothing truncated), and the cloud computes them right
//! after the tree. The tree's reply comes first; verification walks down it, and only when the
//! walk reaches an extension row does the device wait for the extension's reply (usually much
//! less than a round: the cloud started on it as soon as the tree was done). When the walk
//! ends in the first rows, the extension's reply is dropped unread and the next block's kept
//! path, which indexes the whole tree, keeps what verification accepted. Rows keep their
//! positions and ancestors, so every state the cloud computes is the one it computes without
//! the extension.
//!
//! How many rows ([`ExtensionSizing`]): the walk reaches the first `m` with about their summed
//! cumulative probability `P(m)`; then it commits a token more without another round (`T` ms,
//! the measured time per committed token) but waits for the extension's pass and verifies its
//! rows (`W(m)`: the cloud's cost model for the pass plus the device's measured share of a
//! row's cost, per row); otherwise the extension costs nothing on the critical path, as long
//! as the cloud is done with it before the next block arrives (at most the measured link time
//! of a round). The prefix that maximises `P(m) · (T - W(m))` goes. Sent when the cloud was expected to be done with the
//! tree (the previous rule), extensions waited for an idle cloud and their replies came late:
//! on two one-core machines at 50 Mbit/s, 20 ms, the wait for the extension's reply ate what
//! the round saved.
//!
//! ## Sending a tree as two blocks (`--draft-tree-split`, greedy)
//! The cloud's reply to a tree comes once every row has been through the middle layers, and
//! each row past the first costs ~3 ms of a one-core cloud, though the walk reaches only some
//! of them. With the split on, a round sends the tree's first `k` rows (a prefix in node order:
//! the likeliest levels and siblings) as a block of their own and the other rows right after,
//! as an extension of them (the same protocol block as the pipeline's); the cloud replies to
//! the first block as soon as it is done, and the walk waits for the second reply only when it
//! reaches one of its rows. The second block's pass pays the cloud's fixed cost of a pass
//! again, so a walk into it (and into an extension behind it) waits that much longer than for
//! the whole tree in one block. [`split_point`] weighs the two with the draft's cumulative
//! probabilities, the cloud's passes (measured from its replies, [`super::drafter::PassTimes`],
//! or its cost model until measured) and the measured verification per row, and splits where
//! the expected saving is largest (nowhere when none is positive). Rows keep their positions
//! and ancestors, so every state is the one the whole tree in one block gets.

use std::time::Instant;

use candle_core::Tensor;

use crate::adapter::DraftContext;
use crate::decode::timing::ms;
use crate::decode::Sampler;
use crate::edge::drafter::DraftLength;
use crate::edge::state::Edge;
use crate::error::{Error, Result};
use crate::model::tree::{TreeShape, MAX_TREE_NODES, ROOT};
use crate::model::StackCache;
use crate::net::{MiddleLink, MiddleReply};
use crate::util::stats::{mean_of, median_of, push_recent};

/// How many of its most likely next tokens a drafted node keeps (drafting ahead looks further
/// down the list than a round's `branch`).
const KEPT_NEXT: usize = 8;
/// Recent rounds the clock and the policy keep.
const RECENT: usize = 16;
/// Nodes added per step of drafting ahead (one pass of the input submodel and the draft path).
const AHEAD_WIDTH: usize = 8;

/// Whether a step of drafting ahead gives up between its parts when the reply comes in
/// (`HAT_AHEAD_INTERRUPT=off` lets every step finish first, to measure one against the other).
/// Finishing read the first reply 2.2 ms after it was in on average (16 prompts on two one-core
/// machines, 50 Mbit/s, 20 ms), giving up 1.0 ms: a step of eight nodes takes ~8 ms, its parts
/// about a third each.
fn interrupt_steps_ahead() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("HAT_AHEAD_INTERRUPT").as_deref() != Ok("off"))
}

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
    /// A draft step's cost over the time per token: with `node_threshold`, what a level must
    /// promise to be drafted further before the block goes (see the module doc).
    pub level_threshold: f32,
    /// The draft's typical probability of its most likely next token at a node (measured).
    pub top_prob: f32,
}

impl TreeLimits {
    /// Whether a level whose best node has cumulative probability `best` is worth a draft step
    /// on the critical path: its best child, at about `best · top_prob`, must pay for its own
    /// row and for the step, `best · top_prob ≥ node_threshold + level_threshold` (both
    /// thresholds are 0 for fixed trees: every level is drafted further).
    fn worth_expanding(&self, best: f32) -> bool {
        best * self.top_prob >= self.node_threshold + self.level_threshold
    }
}

/// A round's extension of the sent tree (`--draft-pipeline`, [`Edge::send_extension`]): sent at
/// the first step of drafting ahead after which some of the nodes drafted ahead are worth it,
/// so that it reaches the cloud while the tree computes (or soon after) and its reply follows
/// the tree's closely.
#[derive(Debug)]
pub(super) struct ExtendPlan {
    pub rows: ExtensionRows,
    /// Rows sent (0: none yet).
    pub sent: usize,
}

/// How many rows an extension takes.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum ExtensionRows {
    /// Up to this many (0: none, e.g. until the costs are measured).
    Fixed(usize),
    /// As many as are expected to save most.
    Sized(ExtensionSizing),
}

/// What an extension of the sent tree costs and saves. Verification walks into it with about
/// the summed cumulative draft probability of its rows; then it commits at least one token more
/// without another round (`token_ms` saved, the measured time per committed token: a round's
/// worth of time would overstate it, as a round commits more than one) but the device waits for
/// the extension's reply and verifies its rows (`wait_ms[m - 1]` for `m` rows); otherwise it
/// costs the device nothing (the cloud computes it while the reply travels). The rows sent, in
/// node order, are the prefix that maximises `P(m) · (token_ms - wait_ms[m - 1])`, `P(m)` the
/// first `m` rows' summed probability.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ExtensionSizing {
    pub token_ms: f64,
    /// The wait for `m` rows at index `m - 1`; as many entries as the cloud can compute before
    /// the next block would reach it.
    pub wait_ms: Vec<f64>,
}

impl ExtensionSizing {
    /// How many of the rows whose cumulative probabilities are `cums` (in sending order) to
    /// send: 0 when no prefix is expected to save time.
    pub(super) fn rows(&self, cums: impl IntoIterator<Item = f32>) -> usize {
        let (mut reach, mut best, mut rows) = (0.0f64, 0.0f64, 0);
        for (m, (cum, wait)) in cums.into_iter().zip(&self.wait_ms).enumerate() {
            reach += f64::from(cum.max(0.0));
            let gain = reach.min(1.0) * (self.token_ms - wait);
            if gain > best {
                (best, rows) = (gain, m + 1);
            }
        }
        rows
    }
}

/// What splitting a tree of `n` rows into two blocks costs and saves ([`split_point`]).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct SplitCosts {
    /// The cloud's predicted pass over `m` rows (ms) at index `m`, for `m` up to the tree's
    /// rows (index 0 unused).
    pub pass_ms: Vec<f64>,
    /// The device's verification of a row (ms: the output submodel and the head).
    pub device_row_ms: f64,
    /// The share of rounds whose verification walks into an extension of the tree (whose
    /// reply the second block delays).
    pub extension_share: f64,
}

/// Where to split a tree of parents `parents` and cumulative draft probabilities `cums` (node
/// order, the root first) into a first block of rows `[0, k)` and a second of the rest: the
/// `k` that maximises the expected saving, or `n` (no split) when none is expected to save.
///
/// The first block's reply comes `pass(n) − pass(k)` sooner, and the device verifies `n − k`
/// fewer rows, when the walk stays in the first rows; it enters the second with about the
/// summed cumulative probability `P` of the held-back rows whose parents are in the first
/// block, and then waits `pass(k) + pass(n − k) − pass(n)` longer than for the whole tree in
/// one block (the second pass's fixed cost), as the extension's reply does in the rounds that
/// walk into one. Saving: `(1 − P) · (pass(n) − pass(k) + (n − k) · device_row) − (P + (1 − P) ·
/// extension_share) · extra`.
pub(super) fn split_point(parents: &[u16], cums: &[f32], costs: &SplitCosts) -> usize {
    let n = parents.len();
    if cums.len() != n || costs.pass_ms.len() != n + 1 {
        return n;
    }
    let pass = |m: usize| costs.pass_ms[m];
    let (mut best, mut at) = (0.0f64, n);
    for k in 1..n {
        let reach: f64 = (k..n).filter(|&i| (parents[i] as usize) < k).map(|i| f64::from(cums[i].max(0.0))).sum::<f64>().min(1.0);
        let saved = pass(n) - pass(k) + (n - k) as f64 * costs.device_row_ms;
        let extra = (pass(k) + pass(n - k) - pass(n)).max(0.0);
        let gain = (1.0 - reach) * saved - (reach + (1.0 - reach) * costs.extension_share) * extra;
        if gain > best {
            (best, at) = (gain, k);
        }
    }
    at
}

/// A node of a round's tree as the device drafted it.
#[derive(Clone)]
struct Node {
    /// Its parent's index ([`ROOT`] for the root).
    parent: u16,
    token: u32,
    depth: usize,
    /// The product of the draft's probabilities along the path from the root.
    cum: f32,
    /// Its input-submodel state, `(1, 1, hidden)`: what the cloud gets.
    hidden: Tensor,
    /// Once through the draft path: the adapter's prediction of its middle output `(1, 1,
    /// hidden)` (its children's condition), and the draft's most likely next tokens with their
    /// probabilities (none after an end-of-sequence token).
    predicted: Option<Tensor>,
    next: Vec<(u32, f32)>,
}

/// A round's draft tree: the nodes sent for verification (`shape`, `tokens`, `hidden`), and
/// after them those drafted ahead while the cloud verifies.
pub(super) struct TreeRound {
    /// The sent nodes' shape and tokens (node 0: the committed token).
    pub shape: TreeShape,
    pub tokens: Vec<u32>,
    /// Input-submodel states of the sent nodes, `(1, n, hidden)`.
    pub hidden: Tensor,
    nodes: Vec<Node>,
    /// Nodes `[0, expanded)` have been through the draft path: every draft-path cache holds them
    /// at the slots after the round's start, in node order.
    expanded: usize,
}

impl TreeRound {
    /// A tree of its root alone, not sent yet.
    fn root(token: u32, hidden: Tensor) -> Result<Self> {
        let node = Node { parent: ROOT, token, depth: 0, cum: 1.0, hidden: hidden.clone(), predicted: None, next: Vec::new() };
        Ok(Self { shape: TreeShape::chain(1)?, tokens: vec![token], hidden, nodes: vec![node], expanded: 0 })
    }

    /// The children of a sent node and their tokens (what verification may accept).
    pub fn children(&self, i: usize) -> Vec<(usize, u32)> {
        self.shape.children(i).map(|c| (c, self.tokens[c])).collect()
    }

    /// Every node drafted.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    fn parents(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.parent).collect()
    }

    /// The sent nodes' cumulative draft probabilities (the root's is 1).
    pub fn sent_cums(&self) -> Vec<f32> {
        self.nodes[..self.shape.len()].iter().map(|n| n.cum).collect()
    }

    fn has_child(&self, parent: usize, token: u32) -> bool {
        self.nodes.iter().any(|n| n.parent as usize == parent && n.parent != ROOT && n.token == token)
    }

    /// The drafted-ahead child of node `parent` with this token: the next round's root, drafted
    /// already.
    pub fn ahead_child(&self, parent: usize, token: u32) -> Option<usize> {
        (self.shape.len()..self.nodes.len()).find(|&i| self.nodes[i].parent as usize == parent && self.nodes[i].token == token && i < self.expanded)
    }

    /// Node `c` and its descendants, in node order.
    fn subtree_rows(&self, c: usize) -> Vec<usize> {
        let mut inside = vec![false; self.nodes.len()];
        let mut rows = Vec::new();
        for i in c..self.nodes.len() {
            inside[i] = i == c || (self.nodes[i].parent != ROOT && inside[self.nodes[i].parent as usize]);
            if inside[i] {
                rows.push(i);
            }
        }
        rows
    }

    /// The tree of these nodes (increasing; the first is the new root, every other one's parent
    /// among them), re-indexed, with depths and cumulative probabilities from the new root.
    fn restrict(&self, rows: &[usize]) -> Result<Self> {
        let root = &self.nodes[rows[0]];
        let mut index = vec![None; self.nodes.len()];
        let mut nodes = Vec::with_capacity(rows.len());
        for (j, &i) in rows.iter().enumerate() {
            let n = &self.nodes[i];
            let parent = match j {
                0 => ROOT,
                _ => index[n.parent as usize].ok_or_else(|| Error::invalid("internal: a kept tree node without its parent"))?,
            };
            index[i] = Some(j as u16);
            nodes.push(Node { parent, depth: n.depth - root.depth, cum: if root.cum > 0.0 { n.cum / root.cum } else { 0.0 }, ..n.clone() });
        }
        let expanded = rows.iter().take_while(|&&i| i < self.expanded).count();
        let mut tree = Self { nodes, expanded, ..Self::root(root.token, root.hidden.clone())? };
        tree.nodes[0].parent = ROOT;
        Ok(tree)
    }

    /// Fixes every node drafted so far as the round's block.
    fn seal(&mut self) -> Result<()> {
        self.seal_to(self.nodes.len())
    }

    /// Fixes the first `k` nodes as what the cloud verifies.
    fn seal_to(&mut self, k: usize) -> Result<()> {
        let sent = &self.nodes[..k];
        self.shape = TreeShape::new(sent.iter().map(|n| n.parent).collect())?;
        self.tokens = sent.iter().map(|n| n.token).collect();
        let rows: Vec<&Tensor> = sent.iter().map(|n| &n.hidden).collect();
        self.hidden = if rows.len() == 1 { rows[0].clone() } else { Tensor::cat(&rows, 1)? };
        Ok(())
    }

    /// The best `count` new children of the nodes `from` (expanded ones), by cumulative
    /// probability: `(cum, parent, token)`, at least `threshold`, at most `depth` deep.
    fn candidates(&self, from: impl Iterator<Item = usize>, branch: usize, threshold: f32, depth: usize, count: usize) -> Vec<(f32, usize, u32)> {
        let mut candidates: Vec<(f32, usize, u32)> = Vec::new();
        for u in from {
            let n = &self.nodes[u];
            if n.depth >= depth {
                continue;
            }
            for &(token, p) in n.next.iter().take(branch) {
                if !self.has_child(u, token) {
                    candidates.push((n.cum * p, u, token));
                }
            }
        }
        candidates.sort_by(|a, b| b.0.total_cmp(&a.0));
        candidates.retain(|c| c.0 >= threshold && c.0 > 0.0);
        candidates.truncate(count);
        candidates
    }
}

/// When a tree's reply is expected, so that drafting ahead does not start a step that would
/// delay it: the time from sending a tree to its reply (measured when the device waited for it;
/// a lower bound when the reply came in during a step ahead) and what a step ahead costs, both
/// medians of recent rounds.
#[derive(Debug, Default)]
pub(super) struct AheadClock {
    sent: Option<Instant>,
    /// The last time the reply was not in yet, and whether it was seen arriving during a step.
    last_poll: Option<Instant>,
    arrived: bool,
    replies_ms: Vec<f64>,
    steps_ms: Vec<f64>,
    /// This round's plan to extend the sent tree, if any (set before drafting ahead, taken
    /// after).
    pub(super) extend: Option<ExtendPlan>,
}

impl AheadClock {
    /// A tree was sent at `at`.
    pub(super) fn sent_at(&mut self, at: Instant) {
        (self.sent, self.last_poll, self.arrived) = (Some(at), None, false);
    }

    /// Its reply is in (called when `receive` returns).
    pub(super) fn received(&mut self) {
        let Some(sent) = self.sent.take() else { return };
        let at = match (self.arrived, self.last_poll) {
            (true, Some(p)) => p,
            (true, None) => return,
            (false, _) => Instant::now(),
        };
        push_recent(&mut self.replies_ms, ms(at.duration_since(sent)), RECENT);
    }

    fn record_step(&mut self, d: std::time::Duration) {
        push_recent(&mut self.steps_ms, ms(d), RECENT);
    }

    /// Whether a step ahead started now would end before the reply is expected (always, until
    /// both are measured).
    fn time_for_a_step(&self) -> bool {
        match (self.sent, median_of(&self.replies_ms), median_of(&self.steps_ms)) {
            (Some(sent), Some(reply), Some(step)) => ms(sent.elapsed()) + step <= reply,
            _ => true,
        }
    }
}

/// Whether drafting ahead pays: it is free on a device of its own, but where the device shares
/// cores or a cache with the cloud (or anything else the reply waits on) it slows the cloud
/// down. The edge compares the cloud's compute time for trees verified while it drafted ahead
/// with those verified while it waited: a few rounds of each first, then a round of the other
/// kind every [`AheadPolicy::PROBE_EVERY`] rounds, the latest measurements deciding. Each time is
/// taken relative to what the cloud's cost model predicts for that block, so that trees of
/// other sizes compare (a row costs the cloud a tenth of a one-row block or more). Drafting
/// ahead stays on while what it costs the cloud per round, `(slowdown - 1) · cloud ms`, is at
/// most what it saves per round: the share of rounds drafted ahead that found the next round
/// prepared times the drafting such a round skips, plus what walking into extensions saved
/// (a token's time for each token they added, less the wait, `--draft-pipeline`), all
/// measured (until they are, a slowdown of [`AheadPolicy::SLOWDOWN`] at most). Comparing the
/// slowdown alone with a fixed bound switched drafting ahead off on two one-core machines
/// whenever a few noisy rounds (the two cores share a cache) read 10 % slower, although it
/// saved several times that.
#[derive(Debug, Default)]
pub(super) struct AheadPolicy {
    rounds: usize,
    with_ahead: Vec<f64>,
    without: Vec<f64>,
    /// The cloud's compute per round (ms), recent rounds.
    cloud_ms: Vec<f64>,
    /// Recent rounds drafted ahead: 1 when the next round was prepared, else 0.
    hits: Vec<f64>,
    /// Drafting on the critical path (ms) of recent rounds drafted afresh, and of rounds
    /// prepared ahead.
    fresh_ms: Vec<f64>,
    prepared_ms: Vec<f64>,
    /// What recent rounds drafted ahead saved by walking into an extension (ms; 0 without).
    extension_ms: Vec<f64>,
}

impl AheadPolicy {
    const EXPLORE: usize = 6;
    const PROBE_EVERY: usize = 16;
    /// Until its savings are measured, drafting ahead stays on while the cloud's compute with
    /// it is at most this many times what it is without.
    const SLOWDOWN: f64 = 1.1;
    /// The prior share of hits (one in two) counts as this many hits and as many misses.
    const PRIOR_HITS: f64 = 2.0;

    /// Whether this round drafts ahead.
    pub(super) fn this_round(&self) -> bool {
        if self.rounds < Self::EXPLORE {
            return self.rounds % 2 == 1;
        }
        self.pays() != (self.rounds % Self::PROBE_EVERY == 0)
    }

    /// Whether drafting ahead saves the critical path more than it costs the cloud (yes until
    /// measured).
    pub(super) fn pays(&self) -> bool {
        let Some(slowdown) = self.slowdown() else { return true };
        match (median_of(&self.cloud_ms), self.saving_ms()) {
            (Some(cloud), Some(saving)) => (slowdown - 1.0).max(0.0) * cloud <= saving,
            _ => slowdown <= Self::SLOWDOWN,
        }
    }

    /// What drafting ahead saves the critical path per round drafted ahead (ms), once measured.
    fn saving_ms(&self) -> Option<f64> {
        // The share of hits, from a prior of one in two worth a few rounds: the first rounds
        // drafted ahead are too few to switch drafting ahead off on their own.
        let hit_rate = (self.hits.iter().sum::<f64>() + Self::PRIOR_HITS) / (self.hits.len() as f64 + 2.0 * Self::PRIOR_HITS);
        let drafting = hit_rate * (median_of(&self.fresh_ms)? - median_of(&self.prepared_ms).unwrap_or(0.0)).max(0.0);
        Some(drafting + mean_of(&self.extension_ms).unwrap_or(0.0))
    }

    /// The cloud's median compute with drafting ahead over that without, once both are measured.
    pub(super) fn slowdown(&self) -> Option<f64> {
        match (median_of(&self.with_ahead), median_of(&self.without)) {
            (Some(with), Some(without)) if without > 0.0 => Some(with / without),
            _ => None,
        }
    }

    /// A round's cloud compute (ms), whether the device drafted ahead meanwhile, and the
    /// compute the cloud's cost model predicts for the block (ms; `None` when there is none).
    pub(super) fn record(&mut self, ahead: bool, cloud_ms: f64, predicted_ms: Option<f64>) {
        self.rounds += 1;
        let relative = match predicted_ms {
            Some(p) if p > 0.0 => cloud_ms / p,
            _ => cloud_ms,
        };
        push_recent(if ahead { &mut self.with_ahead } else { &mut self.without }, relative, RECENT);
        push_recent(&mut self.cloud_ms, cloud_ms, RECENT);
    }

    /// What a walk along `path` (root first) into the extension of a tree of `sent` rows saved
    /// (ms): a token's time (`token_ms`) for each path node in the extension (the first of them
    /// was the tree's bonus token anyway; the last one's bonus comes after it) without another
    /// round, less the wait for the extension's reply (`wait_ms`).
    pub(super) fn walk_saving(path: &[usize], sent: usize, token_ms: f64, wait_ms: f64) -> f64 {
        path.iter().filter(|&&i| i >= sent).count() as f64 * token_ms - wait_ms
    }

    /// A round drafted ahead found the next round prepared (`hit`) or not.
    pub(super) fn record_hit(&mut self, hit: bool) {
        push_recent(&mut self.hits, f64::from(u8::from(hit)), RECENT);
    }

    /// What a round drafted ahead saved by walking into its extension (ms: the time per token
    /// for each token it added, less the wait; 0 when it did not walk into one).
    pub(super) fn record_extension(&mut self, saved_ms: f64) {
        push_recent(&mut self.extension_ms, saved_ms, RECENT);
    }

    /// A round's drafting on the critical path (ms), `prepared` ahead or afresh.
    pub(super) fn record_draft(&mut self, prepared: bool, ms: f64) {
        push_recent(if prepared { &mut self.prepared_ms } else { &mut self.fresh_ms }, ms, RECENT);
    }
}

/// Draft-path positions behind at which a round sends its root alone and catches up while the
/// cloud verifies it (`--draft-catch-up`). Drafting a tree after them would put the catch-up on
/// the critical path (the shipped 4-layer adapter: ~0.6 ms a position on one core, 22-44 ms
/// for a short prompt's, about a round trip); the round of the root alone gives up its drafts
/// (about one token) but hides the catch-up and drafts the next round after it. Measured on
/// two one-core machines at 50 Mbit/s, 20 ms: the first 8 tokens 13 ms sooner. After
/// verification a fresh round runs only the accepted path again (a few positions): this is
/// for the prompt's positions, whose middle outputs came back with the last chunk.
pub(super) const CATCH_UP_ROUND_ROWS: usize = 16;

impl<L: MiddleLink> Edge<'_, L> {
    /// Runs the committed token `next` at `base` through the input submodel and drafts a tree
    /// after it within `limits`.
    pub(super) fn draft_tree(&mut self, next: u32, base: usize, limits: &TreeLimits, eos: &[u32], sampler: &Sampler, steps: &mut DraftLength) -> Result<TreeRound> {
        let mut tree = self.root_round(next)?;
        let t = Instant::now();
        self.expand_root(&mut tree, sampler, steps)?;
        steps.record_step(ms(t.elapsed()));
        let budget = limits.nodes.min(MAX_TREE_NODES - 1);
        let mut frontier = vec![0];
        for depth in 1..=limits.depth {
            let room = budget - (tree.len() - 1);
            let candidates = tree.candidates(frontier.iter().copied(), limits.branch, limits.node_threshold, depth, limits.width.min(room));
            if candidates.is_empty() {
                break;
            }
            let t = Instant::now();
            let first = tree.len();
            self.add_nodes(&mut tree, base, &candidates)?;
            let deeper = depth < limits.depth && tree.len() - 1 < budget && limits.worth_expanding(candidates[0].0);
            if !deeper {
                break;
            }
            // The level's draft path: the adapter on the nodes (conditioned on their parents'
            // predicted middle outputs), the output submodel, the draft head.
            self.expand(&mut tree, base, eos, sampler)?;
            steps.record_step(ms(t.elapsed()));
            frontier = (first..tree.len()).filter(|&i| !tree.nodes[i].next.is_empty()).collect();
            for &i in &frontier {
                steps.record_top_prob(tree.nodes[i].next[0].1);
            }
            if frontier.is_empty() {
                break;
            }
        }
        // The draft path holds the root and the expanded levels; what verification keeps of it
        // runs again (the catch-up of the next round), unless the next round was drafted ahead.
        tree.seal()?;
        Ok(tree)
    }

    /// The committed token `next` through the input submodel as a tree of its root alone,
    /// queued for the draft path but not run through it yet ([`Edge::expand_root`]).
    pub(super) fn root_round(&mut self, next: u32) -> Result<TreeRound> {
        let h = self.input_hidden(&[next])?;
        self.push_tail(&h)?;
        TreeRound::root(next, h)
    }

    /// Runs the draft path up to the root of a tree not through it yet (every position queued
    /// before the root too: the catch-up) and keeps the root's predicted middle output and most
    /// likely next tokens.
    pub(super) fn expand_root(&mut self, tree: &mut TreeRound, sampler: &Sampler, steps: &mut DraftLength) -> Result<()> {
        if tree.expanded != 0 {
            return Err(Error::invalid("internal: expanding a tree's root twice"));
        }
        let logits = self.draft_logits()?;
        tree.nodes[0].predicted = self.features.take();
        tree.nodes[0].next = self.next_tokens(&logits, sampler)?;
        if let Some(&(_, p)) = tree.nodes[0].next.first() {
            steps.record_top_prob(p);
        }
        tree.expanded = 1;
        self.last_logits = None;
        Ok(())
    }

    /// While the cloud verifies the sent tree at `base`: grows it with nodes the cloud does not
    /// see, the sent leaves through the draft path first, then [`AHEAD_WIDTH`] at a time, the most
    /// likely new children of any node, each step through the input submodel and the draft
    /// path; until the reply is in (a step under way then gives up between its parts, its new
    /// nodes dropped: [`interrupt_steps_ahead`]) or expected before a step would end (`clock`), the tree holds
    /// [`MAX_TREE_NODES`] nodes, or `slots` positions are used. With a plan
    /// (`clock.extend`), sends what it drafted as an extension of the sent tree on the plan's
    /// time, or when it stops before the reply. Returns whether anything was drafted ahead.
    pub(super) fn grow_ahead(&mut self, tree: &mut TreeRound, base: usize, slots: usize, eos: &[u32], sampler: &Sampler, clock: &mut AheadClock) -> Result<bool> {
        let mut grew = false;
        let cap = MAX_TREE_NODES.min(slots);
        if let Some((start, x, prev)) = self.refresh.take() {
            // The kept path of a tree drafted ahead, conditioned on the cloud's middle outputs
            // now (its later nodes keep what they drafted).
            let end = self.adapter_cache.len();
            self.adapter_cache.truncate(start);
            self.adapter.forward(&x, Some(&prev), start, &mut self.adapter_cache)?;
            self.adapter_cache.restore(end)?;
        }
        let interrupt = interrupt_steps_ahead();
        loop {
            if self.reply_arrived()? {
                clock.arrived = true;
                return Ok(grew);
            }
            if let Some(plan) = clock.extend.as_mut() {
                if plan.sent == 0 && grew {
                    plan.sent = self.send_extension(tree, base, &plan.rows)?;
                }
            }
            clock.last_poll = Some(Instant::now());
            if !clock.time_for_a_step() {
                break;
            }
            let t = Instant::now();
            let finished = if tree.expanded < tree.len() {
                self.expand_unless_reply(tree, base, eos, sampler, interrupt)?
            } else {
                let room = cap.saturating_sub(tree.len());
                let candidates = tree.candidates(0..tree.len(), KEPT_NEXT, 0.0, usize::MAX, AHEAD_WIDTH.min(room));
                if candidates.is_empty() {
                    break;
                }
                let first = tree.len();
                self.add_nodes(tree, base, &candidates)?;
                let reply_in = interrupt && self.reply_arrived()?;
                let finished = !reply_in && self.expand_unless_reply(tree, base, eos, sampler, interrupt)?;
                if !finished {
                    // The step's new nodes go with it (only expanded nodes are kept or sent).
                    tree.nodes.truncate(first);
                    self.input.truncate(base + first);
                }
                finished
            };
            if !finished {
                // The reply came in the middle of the step: it goes first.
                (clock.arrived, clock.last_poll) = (true, Some(Instant::now()));
                self.steps_given_up += 1;
                return Ok(grew);
            }
            clock.record_step(t.elapsed());
            grew = true;
        }
        // Drafting ahead stopped before the reply: the extension goes now if it has not.
        if let Some(plan) = clock.extend.as_mut() {
            if plan.sent == 0 && grew {
                plan.sent = self.send_extension(tree, base, &plan.rows)?;
            }
        }
        Ok(grew)
    }

    /// Adds nodes `(cum, parent, token)` after the tree's last and runs them through the input
    /// submodel (its cache holds every node of the tree at the slots after `base`).
    fn add_nodes(&mut self, tree: &mut TreeRound, base: usize, new: &[(f32, usize, u32)]) -> Result<()> {
        let t = Instant::now();
        let first = tree.len();
        let mut parents = tree.parents();
        parents.extend(new.iter().map(|&(_, parent, _)| parent as u16));
        let shape = TreeShape::new(parents)?;
        let tokens: Vec<u32> = new.iter().map(|c| c.2).collect();
        let x = self.dev.embedder.embed_ids(&tokens)?;
        let h = self.dev.input.forward_tree(&x, &mut self.input, shape.mask(base, first..first + new.len()))?;
        for (j, &(cum, parent, token)) in new.iter().enumerate() {
            let depth = tree.nodes[parent].depth + 1;
            tree.nodes.push(Node { parent: parent as u16, token, depth, cum, hidden: h.narrow(1, j, 1)?, predicted: None, next: Vec::new() });
        }
        self.device_time += t.elapsed();
        Ok(())
    }

    /// Runs the nodes not yet through the draft path through it, as one block with the tree's
    /// mask: the adapter (conditioned on their parents' predicted middle outputs), the output
    /// submodel and the draft head; keeps each node's predicted middle output and most likely
    /// next tokens.
    fn expand(&mut self, tree: &mut TreeRound, base: usize, eos: &[u32], sampler: &Sampler) -> Result<()> {
        self.expand_unless_reply(tree, base, eos, sampler, false).map(|_| ())
    }

    /// [`Edge::expand`]; with `interrupt`, given up after the adapter or after the output
    /// submodel if the cloud's reply is in by then: every draft-path cache back as it was, the
    /// nodes left unexpanded. Whether it finished.
    fn expand_unless_reply(&mut self, tree: &mut TreeRound, base: usize, eos: &[u32], sampler: &Sampler, interrupt: bool) -> Result<bool> {
        let range = tree.expanded..tree.len();
        if range.is_empty() {
            return Ok(true);
        }
        if self.adapter_cache.len() != base + range.start {
            return Err(Error::invalid(format!("internal: the draft path holds {} positions, not the tree's first {} after {base}", self.adapter_cache.len(), range.start)));
        }
        let t = Instant::now();
        let mask = TreeShape::new(tree.parents())?.mask(base, range.clone());
        let rows: Vec<&Tensor> = tree.nodes[range.clone()].iter().map(|n| &n.hidden).collect();
        let h = Tensor::cat(&rows, 1)?;
        let prev = match self.adapter.is_conditioned() {
            true => {
                let rows = tree.nodes[range.clone()]
                    .iter()
                    .map(|n| tree.nodes[n.parent as usize].predicted.clone().ok_or_else(|| Error::invalid("internal: a tree node without its parent's middle output")))
                    .collect::<Result<Vec<_>>>()?;
                Some(Tensor::cat(&rows, 1)?)
            }
            false => None,
        };
        let output_len = self.draft_output_cache().len();
        let m = self.adapter.forward_tree(&h, prev.as_ref(), &mut self.adapter_cache, mask.clone())?;
        let given_up = |edge: &mut Self, outputs: bool| -> Result<bool> {
            if !(interrupt && edge.reply_arrived()?) {
                return Ok(false);
            }
            edge.adapter_cache.truncate(base + range.start);
            if outputs {
                edge.draft_output_cache().truncate(output_len);
            }
            edge.device_time += t.elapsed();
            Ok(true)
        };
        if given_up(self, false)? {
            return Ok(false);
        }
        let y = match self.adapter.draft_context {
            DraftContext::Drafted => self.draft_output.forward_tree(&m, &mut self.slm_output, mask)?,
            DraftContext::Verified => self.draft_output.forward_tree(&m, &mut self.llm_output, mask)?,
        };
        if given_up(self, true)? {
            return Ok(false);
        }
        let logits = self.head.logits_all(&self.dev.head, &y)?; // (rows, draft rows)
        for (j, i) in range.clone().enumerate() {
            let next = match eos.contains(&tree.nodes[i].token) {
                true => Vec::new(),
                false => self.next_tokens(&logits.get(j)?, sampler)?,
            };
            let node = &mut tree.nodes[i];
            node.predicted = Some(m.narrow(1, j, 1)?);
            node.next = next;
        }
        tree.expanded = range.end;
        self.device_time += t.elapsed();
        Ok(true)
    }

    /// The cache the draft path's output submodel appends to: its own, or the LLM output's
    /// (drafting behind verified states).
    fn draft_output_cache(&mut self) -> &mut StackCache {
        match self.adapter.draft_context {
            DraftContext::Drafted => &mut self.slm_output,
            DraftContext::Verified => &mut self.llm_output,
        }
    }

    /// The draft's most likely next tokens at one node and their probabilities, `logits` `(rows,)`
    /// over the draft head's rows.
    fn next_tokens(&self, logits: &Tensor, sampler: &Sampler) -> Result<Vec<(u32, f32)>> {
        let probs = match sampler.is_greedy() {
            true => candle_nn::ops::softmax_last_dim(logits)?.to_vec1::<f32>()?,
            false => sampler.probs(logits)?,
        };
        Ok(top_rows(&probs, KEPT_NEXT).into_iter().map(|(row, p)| (self.head.token(row), p)).collect())
    }

    /// The LLM's logits at the rows of a verified tree that a reply holds, `(n, vocab)`: the
    /// output submodel on the cloud's reply with the tree's mask (`first`: the reply's first
    /// row in the tree, whose root sits at slot `r.start - first`), and the head on every row.
    pub(super) fn tree_logits(&mut self, r: &MiddleReply, shape: &TreeShape, first: usize) -> Result<Tensor> {
        let t = Instant::now();
        self.llm_output.truncate(r.start);
        let n = r.hidden.dim(1)?;
        let y = if first == 0 && shape.is_chain() {
            self.dev.output.forward(&r.hidden, r.start, &mut self.llm_output)?
        } else {
            self.dev.output.forward_tree(&r.hidden, &mut self.llm_output, shape.mask(r.start - first, first..first + n))?
        };
        let logits = if self.greedy { self.dev.head.forward_greedy(&y)? } else { self.dev.head.forward_exact(&y)? }.squeeze(0)?;
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
        self.refresh = None;
        let rows = |t: &Tensor, of: &[usize]| -> Result<Tensor> {
            let idx = Tensor::from_vec(of.iter().map(|&i| i as u32).collect::<Vec<_>>(), of.len(), t.device())?;
            Ok(t.index_select(&idx, 1)?)
        };
        self.tail = if path.len() > 1 { Some(rows(&round.hidden, &path[1..])?) } else { None };
        self.features = None;
        self.push_features(&rows(&reply.hidden, path)?)?;
        Ok(())
    }

    /// After verification of the tree at `base` when the bonus token is node `next` drafted
    /// ahead (a child of the path's last node): every cache keeps the path, `next` and its
    /// descendants at consecutive positions (the LLM output cache first takes back the draft
    /// states verification truncated), and returns them as the next round's tree, not sent yet.
    ///
    /// A conditioned adapter drafted the path's nodes after the root, and `next`, on predicted
    /// middle outputs; they run again on the cloud's (`reply`) when the next tree is drafted
    /// ahead, off the critical path ([`Edge::grow_ahead`]).
    pub(super) fn keep_tree_ahead(&mut self, base: usize, path: &[usize], next: usize, round: &TreeRound, reply: &MiddleReply) -> Result<TreeRound> {
        let subtree = round.subtree_rows(next);
        if round.expanded < round.len() {
            return Err(Error::invalid("internal: keeping a tree drafted ahead that is not through the draft path"));
        }
        let rows: Vec<usize> = path.iter().chain(&subtree).copied().collect();
        self.input.keep_path(base, &rows)?;
        self.adapter_cache.keep_path(base, &rows)?;
        match self.adapter.draft_context {
            DraftContext::Drafted => {
                self.slm_output.keep_path(base, &rows)?;
                self.llm_output.keep_path(base, path)?;
            }
            DraftContext::Verified => {
                self.llm_output.restore(base + round.len())?;
                self.llm_output.keep_path(base, &rows)?;
            }
        }
        self.tail = None;
        self.features = None;
        self.last_logits = None;
        self.refresh = None;
        if self.adapter.is_conditioned() {
            let rows: Vec<&Tensor> = path[1..].iter().chain([&next]).map(|&i| &round.nodes[i].hidden).collect();
            let idx = Tensor::from_vec(path.iter().map(|&i| i as u32).collect::<Vec<_>>(), path.len(), reply.hidden.device())?;
            self.refresh = Some((base + 1, Tensor::cat(&rows, 1)?, reply.hidden.index_select(&idx, 1)?));
        }
        round.restrict(&subtree)
    }

    /// The round after a hit ([`Edge::keep_tree_ahead`]) at `base` (its root's position): keeps
    /// the drafted-ahead nodes worth sending within `limits` (every cache drops the others), adds
    /// one level of leaves through the input submodel, and seals the block.
    pub(super) fn reseed_tree(&mut self, tree: TreeRound, base: usize, limits: &TreeLimits) -> Result<TreeRound> {
        let rows = worth_sending(&tree, limits);
        let mut tree = self.keep_rows(tree, base, &rows)?;
        let budget = limits.nodes.min(MAX_TREE_NODES - 1);
        let room = budget - (tree.len() - 1);
        let leaves = tree.candidates(0..tree.len(), limits.branch, limits.node_threshold, limits.depth, limits.width.min(room));
        if !leaves.is_empty() {
            self.add_nodes(&mut tree, base, &leaves)?;
        }
        tree.seal()?;
        Ok(tree)
    }

    /// Keeps `rows` of a tree drafted ahead at `base` (increasing, its root first, each one's
    /// parent among them): every cache drops the others.
    fn keep_rows(&mut self, tree: TreeRound, base: usize, rows: &[usize]) -> Result<TreeRound> {
        let t = Instant::now();
        for cache in [&mut self.input, &mut self.adapter_cache] {
            cache.keep_path(base, rows)?;
        }
        match self.adapter.draft_context {
            DraftContext::Drafted => self.slm_output.keep_path(base, rows)?,
            DraftContext::Verified => self.llm_output.keep_path(base, rows)?,
        }
        let tree = tree.restrict(rows)?;
        self.device_time += t.elapsed();
        Ok(tree)
    }

    /// While the cloud verifies the sent tree at `base`: sends the nodes drafted ahead so far,
    /// in node order (about best first), as many as `rows` says, as rows that extend it; they
    /// join the round's shape (verification may walk into them). Returns how many went.
    pub(super) fn send_extension(&mut self, tree: &mut TreeRound, base: usize, rows: &ExtensionRows) -> Result<usize> {
        let sent = tree.shape.len();
        let unsent = tree.nodes[sent..].iter().take_while(|n| n.cum > 0.0);
        let m = match rows {
            ExtensionRows::Fixed(most) => unsent.count().min(*most),
            ExtensionRows::Sized(sizing) => sizing.rows(unsent.map(|n| n.cum)),
        }
        .min(MAX_TREE_NODES - sent);
        self.send_rows(tree, base, sent + m)?;
        Ok(m)
    }

    /// Sends the tree's nodes after the sent ones up to node `end` (excluded) as a block that
    /// extends the sent tree (nothing when there are none); they join the round's shape.
    pub(super) fn send_rows(&mut self, tree: &mut TreeRound, base: usize, end: usize) -> Result<()> {
        let sent = tree.shape.len();
        if end <= sent {
            return Ok(());
        }
        let rows = &tree.nodes[sent..end];
        let parents: Vec<u16> = rows.iter().map(|n| n.parent).collect();
        let x = Tensor::cat(&rows.iter().map(|n| &n.hidden).collect::<Vec<_>>(), 1)?;
        self.link.submit_tree(base + sent, &x, &parents, &[])?;
        tree.seal_to(end)
    }

    /// Holds the sealed tree's rows from node `first` on back from its first block (they go
    /// with [`Edge::send_rows`] once the first block is sent); no-op when `first` is not
    /// inside the tree.
    pub(super) fn hold_back(&mut self, tree: &mut TreeRound, first: usize) -> Result<()> {
        if first == 0 || first >= tree.shape.len() {
            return Ok(());
        }
        tree.seal_to(first)
    }
}

/// The rows of a tree drafted ahead (its root first) worth sending within `limits`: the nodes
/// whose depth and cumulative probability pass, best first up to the budget, whose parents
/// are kept too; increasing.
fn worth_sending(tree: &TreeRound, limits: &TreeLimits) -> Vec<usize> {
    let budget = limits.nodes.min(MAX_TREE_NODES - 1);
    let mut order: Vec<usize> = (1..tree.len()).filter(|&i| tree.nodes[i].depth <= limits.depth && tree.nodes[i].cum >= limits.node_threshold && tree.nodes[i].cum > 0.0).collect();
    // Stable: a parent (cum at least its child's, an earlier index) ranks first.
    order.sort_by(|&a, &b| tree.nodes[b].cum.total_cmp(&tree.nodes[a].cum));
    order.truncate(budget);
    order.sort_unstable();
    let mut chosen = vec![false; tree.len()];
    chosen[0] = true;
    let mut rows = vec![0];
    for i in order {
        if chosen[tree.nodes[i].parent as usize] {
            chosen[i] = true;
            rows.push(i);
        }
    }
    rows
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
    use super::{split_point, top_rows, AheadPolicy, ExtensionSizing, SplitCosts, TreeLimits};

    #[test]
    fn a_tree_is_split_where_holding_rows_back_saves_most() {
        // A pass costs 4 ms plus 3 ms a row; verifying a row on the device 1 ms.
        let costs = SplitCosts { pass_ms: (0..=5).map(|m| if m == 0 { 0.0 } else { 4.0 + 3.0 * m as f64 }).collect(), device_row_ms: 1.0, extension_share: 0.0 };
        // The root, its likely child (0.8), the child's child (0.6), and two unlikely siblings
        // of the first child (0.05 each), in node order: root, a, b, c, then a's child d.
        let (parents, cums) = ([u16::MAX, 0, 0, 0, 1], [1.0, 0.8, 0.05, 0.05, 0.6]);
        // Rows [0, 2) first: the walk enters the rest with 0.05 + 0.05 + 0.6 (d's parent is a);
        // rows [0, 4) first: only d is held back, entered with 0.6.
        // k = 1: reach 0.9, saves 0.1 · (12 + 4) − 0.9 · 4 = −2.
        // k = 2: reach 0.7, saves 0.3 · (9 + 3) − 0.7 · 4 = 0.8.
        // k = 3: reach 0.65, saves 0.35 · 8 − 0.65 · 4 = 0.2.
        // k = 4: reach 0.6, saves 0.4 · 4 − 0.6 · 4 = −0.8.
        assert_eq!(split_point(&parents, &cums, &costs), 2);
        // Extensions walked into every round, delayed by the second pass each time: no split
        // (k = 2 now saves 0.3 · 12 − 4 < 0).
        assert_eq!(split_point(&parents, &cums, &SplitCosts { extension_share: 1.0, ..costs.clone() }), 5);
        // Unlikely held-back rows only: the siblings go second, the likely path first (k = 3
        // saves 0.9 · 8 − 0.1 · 4 = 6.8), even with every round walking into an extension.
        let (parents, cums) = ([u16::MAX, 0, 1, 0, 0], [1.0, 0.8, 0.6, 0.05, 0.05]);
        assert_eq!(split_point(&parents, &cums, &costs), 3);
        assert_eq!(split_point(&parents, &cums, &SplitCosts { extension_share: 1.0, ..costs.clone() }), 3);
        // A likely path everywhere: nothing is worth holding back.
        let (parents, cums) = ([u16::MAX, 0, 1, 2], [1.0, 0.9, 0.85, 0.8]);
        assert_eq!(split_point(&parents, &cums, &SplitCosts { pass_ms: costs.pass_ms[..5].to_vec(), ..costs.clone() }), 4);
        // A tree of its root alone, and a cost model that does not fit the tree: no split.
        assert_eq!(split_point(&[u16::MAX], &[1.0], &SplitCosts { pass_ms: vec![0.0, 7.0], ..costs.clone() }), 1);
        assert_eq!(split_point(&[u16::MAX, 0, 0, 0, 0, 0, 0, 0], &[1.0, 0.9, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01], &costs), 8);
    }

    #[test]
    fn a_level_is_drafted_further_only_when_its_best_child_would_pay() {
        let limits = TreeLimits { nodes: 24, depth: 4, width: 6, branch: 4, node_threshold: 0.15, level_threshold: 0.1, top_prob: 0.6 };
        // 0.4 · 0.6 = 0.24 < 0.25: the step would buy a child below its row's worth.
        assert!(!limits.worth_expanding(0.4));
        assert!(limits.worth_expanding(0.5));
        // A node above both thresholds alone is not enough when the draft is seldom sure.
        assert!(!TreeLimits { top_prob: 0.2, ..limits }.worth_expanding(0.9));
        // Fixed trees: no thresholds, every level.
        assert!(TreeLimits { node_threshold: 0.0, level_threshold: 0.0, ..limits }.worth_expanding(0.001));
    }

    #[test]
    fn an_extension_sends_the_prefix_that_saves_most() {
        // 40 ms per token; waiting for m rows costs 10 + 4 m ms.
        let sizing = ExtensionSizing { token_ms: 40.0, wait_ms: (1..=6).map(|m| 10.0 + 4.0 * m as f64).collect() };
        // 0.2 · 26 = 5.2, 0.3 · 22 = 6.6, 0.32 · 18 = 5.8: two rows.
        assert_eq!(sizing.rows([0.2, 0.1, 0.02, 0.01]), 2);
        // Likelier rows pay for a longer wait: 0.55 · 22 = 12.1, 0.75 · 18 = 13.5, 0.9 · 14 = 12.6.
        assert_eq!(sizing.rows([0.3, 0.25, 0.2, 0.15]), 3);
        // No more rows than the cloud can compute before the next block (the entries of
        // `wait_ms`), and none when no wait leaves a saving.
        assert_eq!(ExtensionSizing { token_ms: 40.0, wait_ms: vec![14.0, 18.0] }.rows([0.3; 10]), 2);
        assert_eq!(ExtensionSizing { token_ms: 12.0, ..sizing.clone() }.rows([0.5, 0.5]), 0);
        assert_eq!(sizing.rows([]), 0);
    }

    #[test]
    fn a_walk_into_the_extension_saves_a_token_for_each_of_its_nodes_on_the_path() {
        // A tree of 4 rows; the walk enters the extension at row 5 and goes on to row 7.
        assert_eq!(AheadPolicy::walk_saving(&[0, 2, 5, 7], 4, 20.0, 12.0), 28.0);
        assert_eq!(AheadPolicy::walk_saving(&[0, 2, 5], 4, 20.0, 12.0), 8.0);
        // A long wait for one token costs more than it saves.
        assert_eq!(AheadPolicy::walk_saving(&[0, 4], 4, 10.0, 12.0), -2.0);
    }

    #[test]
    fn drafting_ahead_stays_on_while_it_saves_more_than_it_slows_the_cloud() {
        let policy = |slowdown: f64, hits: usize| {
            let mut p = AheadPolicy::default();
            for i in 0..16 {
                p.record(true, 20.0 * slowdown, Some(20.0));
                p.record(false, 20.0, Some(20.0));
                p.record_hit(i < hits);
                p.record_draft(true, 0.5);
                p.record_draft(false, 8.5);
            }
            p.pays()
        };
        // Two machines sharing a cache: a 15 % slower cloud (3.5 ms a round) against hits in
        // half the rounds, each skipping 8 ms of drafting.
        assert!(policy(1.15, 8));
        // Sharing cores: the cloud 70 % slower (14 ms a round).
        assert!(!policy(1.7, 8));
        // Drafting ahead that never prepares a round does not pay for any slowdown...
        assert!(!policy(1.05, 0));
        // ... unless its extensions save time.
        let mut p = AheadPolicy::default();
        for _ in 0..16 {
            p.record(true, 21.0, Some(20.0));
            p.record(false, 20.0, Some(20.0));
            p.record_hit(false);
            p.record_draft(false, 8.5);
            p.record_extension(6.0);
        }
        assert!(p.pays());
        // Until the savings are measured, a fixed bound.
        let mut p = AheadPolicy::default();
        p.record(true, 23.0, None);
        p.record(false, 20.0, None);
        assert!(!p.pays());
    }

    #[test]
    fn top_rows_are_the_largest_first() {
        assert_eq!(top_rows(&[0.1, 0.5, 0.2, 0.05, 0.15], 3), vec![(1, 0.5), (2, 0.2), (4, 0.15)]);
        assert_eq!(top_rows(&[0.3], 4), vec![(0, 0.3)]);
    }
}
