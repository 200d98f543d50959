//! What the device drafts with, and how far: the [`Drafter`] (the adapter, with 8-bit copies of
//! its matrices when asked, and the [`DraftHead`] over the draft vocabulary) and the stopping
//! rule ([`DraftLength`]), with the costs it is derived from.
//!
//! ## When to stop drafting
//! Before each further draft step the edge knows the chain's cumulative draft probability `p`
//! (the product of the draft's probabilities of the tokens drafted this round: an estimate of
//! the chance that all of them, and so the next one, are accepted), what a draft step costs the
//! device (`c`, measured) and what a committed token costs (`T`, measured: milliseconds per
//! token so far). A draft kept adds about `p` tokens worth `T` each for `c`: the edge drafts on
//! while `p ≥ c / T` (as SpecDec++ and llama.cpp's `p_min` stop on low confidence, with the
//! threshold from measured costs instead of a constant). `--draft-threshold` fixes it. With
//! sampling and no `--draft-threshold` the threshold stays at its prior, so that a seeded run
//! does not depend on timings.

use serde::Serialize;

use crate::adapter::{Adapter, DraftHead};
use crate::error::{Error, Result};
use crate::model::LayerStack;
use crate::split::DeviceBundle;
use crate::util::stats::{median_of, push_recent};

/// Measurements kept per window (draft steps, top probabilities, rounds for the row cost).
const RECENT: usize = 64;

/// The threshold used before the costs are measured (and with sampling, unless given).
pub const PRIOR_THRESHOLD: f32 = 0.15;
/// Bounds of the measured threshold.
const THRESHOLD_RANGE: (f32, f32) = (0.02, 0.6);

/// The shape of each round's drafts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeChoice {
    /// One chain of drafts (with drafting ahead while the cloud verifies).
    Chain,
    /// A tree of at most `nodes` drafts, `depth` levels (`None`: `--draft-len`), grown in equal
    /// levels without thresholds.
    Fixed { nodes: usize, depth: Option<usize> },
    /// A tree sized each round from measured acceptance and costs ([`super::tree`]).
    Auto,
}

/// Whether and how sent trees are extended with rows drafted ahead (`--draft-pipeline`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pipeline {
    Off,
    /// As many rows as are expected to save time, from measured costs (`on`).
    Auto,
    /// Up to this many rows, the likeliest first, whenever drafting ahead grew any (for
    /// experiments and tests: no costs decide).
    Rows(usize),
}

impl Pipeline {
    /// `on`, `off` or a number of rows.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match RowsSetting::parse("--draft-pipeline", s)? {
            RowsSetting::On => Self::Auto,
            RowsSetting::Off => Self::Off,
            RowsSetting::Rows(rows) => Self::Rows(rows),
        })
    }
}

/// A flag's `on`, `off` or number of tree rows (1 to [`crate::model::tree::MAX_TREE_NODES`] − 1).
enum RowsSetting {
    On,
    Off,
    Rows(usize),
}

impl RowsSetting {
    fn parse(flag: &str, s: &str) -> Result<Self> {
        match s {
            "on" => Ok(Self::On),
            "off" => Ok(Self::Off),
            n => match n.parse::<usize>() {
                Ok(rows) if (1..crate::model::tree::MAX_TREE_NODES).contains(&rows) => Ok(Self::Rows(rows)),
                _ => Err(Error::invalid(format!("{flag} {s}: expected on, off or a number of rows from 1 to {}", crate::model::tree::MAX_TREE_NODES - 1))),
            },
        }
    }
}

/// Whether a tree's rows go to the cloud as two blocks (`--draft-tree-split`): the first rows,
/// whose reply the walk usually needs alone, and the rest right after them ([`super::tree`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeSplit {
    Off,
    /// Where the expected saving is largest, from the cloud's measured passes (its cost model
    /// until measured), the measured cost of a row and the draft's probabilities (`on`).
    Auto,
    /// The first this many rows first, whenever the tree has more (for experiments and tests:
    /// no costs decide).
    Rows(usize),
}

impl TreeSplit {
    /// `on`, `off` or a number of rows.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match RowsSetting::parse("--draft-tree-split", s)? {
            RowsSetting::On => Self::Auto,
            RowsSetting::Off => Self::Off,
            RowsSetting::Rows(rows) => Self::Rows(rows),
        })
    }
}

/// Most drafts of an automatic tree, per level, and candidates per node.
pub const AUTO_TREE: (usize, usize, usize) = (24, 6, 4);
/// The node threshold before costs are measured (and with sampling).
pub const PRIOR_NODE_THRESHOLD: f32 = 0.05;
/// The draft's probability of its most likely next token at a node, before any is seen.
pub const PRIOR_TOP_PROB: f32 = 0.6;

impl TreeChoice {
    /// `auto`, `chain`, `NODES` or `NODESxDEPTH`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || Error::invalid(format!("--draft-tree {s}: expected auto, chain, NODES or NODESxDEPTH (e.g. 16x4), with 1 to {} nodes", crate::model::tree::MAX_TREE_NODES - 1));
        match s {
            "auto" => Ok(Self::Auto),
            "chain" => Ok(Self::Chain),
            _ => {
                let (n, d) = match s.split_once('x') {
                    Some((n, d)) => (n, Some(d.parse::<usize>().map_err(|_| bad())?)),
                    None => (s, None),
                };
                let nodes = n.parse::<usize>().map_err(|_| bad())?;
                if nodes == 0 || nodes >= crate::model::tree::MAX_TREE_NODES || d == Some(0) {
                    return Err(bad());
                }
                Ok(Self::Fixed { nodes, depth: d })
            }
        }
    }

    pub fn name(&self) -> String {
        match self {
            Self::Chain => "chain".into(),
            Self::Auto => "auto".into(),
            Self::Fixed { nodes, depth: None } => format!("{nodes}"),
            Self::Fixed { nodes, depth: Some(d) } => format!("{nodes}x{d}"),
        }
    }
}

/// How the device drafts; each mechanism can be switched off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DraftOptions {
    /// Rows of the draft head: `None`, the adapter's stored draft vocabulary at its default size
    /// (the whole vocabulary for an adapter without one); `Some(0)`, the whole vocabulary;
    /// `Some(n)`, the adapter's `n` most frequent tokens.
    pub vocab: Option<usize>,
    /// Draft compute (adapter layers, draft head) from row-scaled 8-bit matrices.
    pub int8: bool,
    /// Stop drafting on low confidence: `None`, the threshold from measured costs; `Some(t)`,
    /// fixed (`Some(0.0)`: always draft `--draft-len`).
    pub threshold: Option<f32>,
    /// Draft the next round while the cloud verifies this one (a chain on its guess of the
    /// reply; a tree grown on with nodes the cloud does not see).
    pub overlap: bool,
    /// Trees drafted ahead, greedy: send the likeliest nodes drafted ahead as an extension of
    /// the sent tree before its reply (the cloud computes it right after the tree; verification
    /// walks into it when the bonus token is there).
    pub pipeline: Pipeline,
    /// Trees, greedy: send a tree's likeliest first rows as a block of their own, the rest
    /// right after them.
    pub split: TreeSplit,
    /// Chains or trees.
    pub tree: TreeChoice,
    /// Trees drafted ahead: a round whose draft path lags by many positions (the prompt's,
    /// after prefill) sends its root alone and runs the draft path while the cloud verifies it.
    pub catch_up: bool,
    /// A reduced draft head also scores the tokens of the generation's own text (prompt and
    /// answer so far) that it lacks ([`DraftHead::add_context`]).
    pub context_rows: bool,
}

impl Default for DraftOptions {
    fn default() -> Self {
        Self { vocab: None, int8: true, threshold: None, overlap: true, pipeline: Pipeline::Auto, split: TreeSplit::Auto, tree: TreeChoice::Auto, catch_up: true, context_rows: true }
    }
}

impl DraftOptions {
    /// Everything off: the full head in f32, a chain of fixed length, no drafting ahead.
    pub fn plain() -> Self {
        Self { vocab: Some(0), int8: false, threshold: Some(0.0), overlap: false, pipeline: Pipeline::Off, split: TreeSplit::Off, tree: TreeChoice::Chain, catch_up: false, context_rows: false }
    }

    pub fn validate(&self) -> Result<()> {
        match self.threshold {
            Some(t) if !(0.0..=1.0).contains(&t) => Err(Error::invalid(format!("--draft-threshold {t} is not a probability in [0, 1]"))),
            _ => Ok(()),
        }
    }
}

/// The adapter as the device drafts with it, the output submodel's layers as drafts run
/// through them, and the draft head; and the adapter as loaded, for the SLM fallback.
#[derive(Debug, Clone)]
pub struct Drafter {
    /// The adapter's layers as drafting computes them (8-bit copies when `options.int8`).
    pub adapter: Adapter,
    /// The adapter as loaded (f32): what the SLM fallback decodes with. Nothing verifies the
    /// fallback's tokens, so they come from the trained SLM itself, not from the 8-bit copies
    /// that drafting may use (verification makes those exact; the fallback has none).
    pub slm_adapter: Adapter,
    /// The output submodel for drafted positions: the device bundle's layers, with 8-bit copies
    /// of their matrices when `options.int8` (their states at drafted positions are replaced by
    /// exact ones when the cloud's reply is verified).
    pub output: LayerStack,
    pub head: DraftHead,
    pub options: DraftOptions,
}

impl Drafter {
    pub fn new(dev: &DeviceBundle, adapter: &Adapter, options: DraftOptions) -> Result<Self> {
        options.validate()?;
        let ids = match (options.vocab, &adapter.draft_vocab) {
            (Some(0), _) | (None, None) => None,
            (None, Some(v)) => Some(v.first(None)),
            (Some(n), Some(v)) => Some(v.first(Some(n))),
            (Some(n), None) => {
                return Err(Error::invalid(format!(
                    "a draft vocabulary of {n} needs an adapter that stores one (this one does not; add one with `hat train-adapter --set-draft-vocab`)"
                )))
            }
        };
        let head = DraftHead::new(&dev.head, ids, options.int8)?;
        let slm_adapter = adapter.clone();
        let mut adapter = adapter.clone();
        let mut output = dev.output.clone();
        if options.int8 {
            adapter.layers = adapter.layers.with_q8()?;
            output = output.with_q8()?;
        }
        Ok(Self { adapter, slm_adapter, output, head, options })
    }
}

/// The stopping rule of one generation and the measurements it uses.
#[derive(Debug, Clone)]
pub(super) struct DraftLength {
    fixed: Option<f32>,
    /// Sampling without a fixed threshold: the prior stays.
    frozen: bool,
    /// Milliseconds of recent draft steps (critical-path ones).
    step_ms: Vec<f64>,
    pub(super) ms_per_token: Option<f64>,
    /// The draft's probability of its most likely next token at recent nodes of the critical
    /// path (trees): what a node's best child adds to its cumulative probability, typically.
    top_prob: Vec<f32>,
}

impl DraftLength {
    pub(super) fn new(threshold: Option<f32>, greedy: bool) -> Self {
        Self { fixed: threshold, frozen: !greedy && threshold.is_none(), step_ms: Vec::new(), ms_per_token: None, top_prob: Vec::new() }
    }

    /// The draft's probability of its most likely next token at a node just drafted.
    pub(super) fn record_top_prob(&mut self, p: f32) {
        push_recent(&mut self.top_prob, p, RECENT);
    }

    /// The mean of the recent [`Self::record_top_prob`]s ([`PRIOR_TOP_PROB`] before any). It
    /// depends on draft probabilities only, never on timings, so a seeded run stays seeded.
    pub(super) fn top_prob(&self) -> f32 {
        match self.top_prob.len() {
            0 => PRIOR_TOP_PROB,
            n => self.top_prob.iter().sum::<f32>() / n as f32,
        }
    }

    pub(super) fn record_step(&mut self, ms: f64) {
        push_recent(&mut self.step_ms, ms, RECENT);
    }

    /// The median draft step, ms.
    pub(super) fn step_ms(&self) -> Option<f64> {
        median_of(&self.step_ms)
    }

    /// The cumulative draft probability below which drafting stops.
    pub(super) fn threshold(&self) -> f32 {
        if let Some(t) = self.fixed {
            return t;
        }
        match (self.frozen, self.step_ms(), self.ms_per_token) {
            (false, Some(c), Some(t)) if t > 0.0 => ((c / t) as f32).clamp(THRESHOLD_RANGE.0, THRESHOLD_RANGE.1),
            _ => PRIOR_THRESHOLD,
        }
    }

    pub(super) fn source(&self) -> &'static str {
        match (self.fixed, self.frozen) {
            (Some(_), _) => "fixed",
            (None, true) => "prior (sampling)",
            (None, false) if self.ms_per_token.is_some() && !self.step_ms.is_empty() => "measured",
            _ => "prior",
        }
    }
}

/// The marginal cost of a verified row on the critical path (device verification plus waiting
/// for the reply, against the rows sent), fitted over recent rounds.
#[derive(Debug, Clone, Default)]
pub(super) struct RowCost {
    rounds: Vec<(f64, f64)>,
}

impl RowCost {
    pub(super) fn record(&mut self, rows: usize, ms: f64) {
        push_recent(&mut self.rounds, (rows as f64, ms), RECENT);
    }

    /// The least-squares slope, ms per row; `None` until the rounds vary in size.
    pub(super) fn per_row_ms(&self) -> Option<f64> {
        let n = self.rounds.len() as f64;
        if self.rounds.len() < 6 {
            return None;
        }
        let (mx, my) = self.rounds.iter().fold((0.0, 0.0), |a, r| (a.0 + r.0 / n, a.1 + r.1 / n));
        let (sxx, sxy) = self.rounds.iter().fold((0.0, 0.0), |a, r| (a.0 + (r.0 - mx).powi(2), a.1 + (r.0 - mx) * (r.1 - my)));
        (sxx > 0.5 * n).then(|| (sxy / sxx).max(0.0))
    }
}

/// The cloud's compute for recent blocks by their rows, as its replies report it: where the
/// cloud's cost model (a line fitted over blocks of every size) misses the fixed cost of a pass
/// over the few rows of a tree's blocks, these do not.
#[derive(Debug, Clone, Default)]
pub(super) struct PassTimes {
    /// Recent passes (ms) of `rows` rows at index `rows`.
    by_rows: Vec<Vec<f64>>,
}

impl PassTimes {
    /// Passes measured at a size before [`PassTimes::predict`] trusts them over the model.
    const SAMPLES: usize = 3;

    pub(super) fn record(&mut self, rows: usize, ms: f64) {
        if self.by_rows.len() <= rows {
            self.by_rows.resize(rows + 1, Vec::new());
        }
        push_recent(&mut self.by_rows[rows], ms, RECENT);
    }

    /// A pass over `rows` rows (ms): the median of the recent ones of that size once there are
    /// enough, `model` otherwise.
    pub(super) fn predict(&self, rows: usize, model: Option<f64>) -> Option<f64> {
        match self.by_rows.get(rows) {
            Some(recent) if recent.len() >= Self::SAMPLES => median_of(recent),
            _ => model,
        }
    }
}

/// What the edge reports about its drafting.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DraftingReport {
    /// Rows of the draft head (the model's vocabulary when not reduced).
    pub draft_vocab: usize,
    /// Rows the generation added to a reduced draft head from its own text
    /// (`--draft-vocab-context`).
    pub draft_context_rows: usize,
    pub draft_int8: bool,
    pub overlap: bool,
    /// The threshold at the end, and where it came from (`measured`, `prior`, `fixed`).
    pub draft_threshold: f32,
    pub threshold_source: String,
    /// Its inputs: median draft step (ms) and ms per committed token.
    pub draft_step_ms: f64,
    pub ms_per_token: f64,
    /// Device time on the critical path drafting, verifying (output submodel, head, acceptance,
    /// rollback), and drafting ahead while the cloud verifies, ms in all.
    pub draft_ms: f64,
    pub verify_ms: f64,
    pub ahead_ms: f64,
    /// Rounds that drafted ahead, and those whose work ahead was used (the guess of the
    /// verification's outcome was right).
    pub ahead_rounds: usize,
    pub ahead_hits: usize,
    /// Trees: steps of drafting ahead given up part-way because the reply came in (their new
    /// nodes dropped; `HAT_AHEAD_INTERRUPT=off` finishes them).
    pub ahead_steps_given_up: usize,
    /// Whether trees were extended with what drafting ahead grew (`--draft-pipeline`); rounds
    /// whose tree was, and those whose verification walked into the extension (the others'
    /// extension rows were computed for nothing).
    pub pipeline: bool,
    pub extensions: usize,
    pub extensions_used: usize,
    /// Rounds whose tree went as two blocks (`--draft-tree-split`), and those whose accepted
    /// path ran into the second (the others' second block was computed for nothing, off the
    /// critical path, though an extension's reply waits for it).
    pub tree_splits: usize,
    pub tree_splits_used: usize,
    /// Prompt positions the draft path ran during prefill, while the cloud worked on the
    /// prompt's chunks (the rest ran after the first token: in a catch-up round, or in the
    /// first draft round without them).
    pub prefill_draft_rows: usize,
    /// Trees: rounds that sent their root alone because the draft path lagged by many
    /// positions (`--draft-catch-up`), and the time (ms) the draft path took in them while the
    /// cloud verified the root.
    pub catch_up_rounds: usize,
    pub catch_up_ms: f64,
    /// Trees: the cloud's compute while the device drafted ahead over that while it waited
    /// (medians of recent rounds; 0 until both are measured). Drafting ahead stays on while this
    /// is at most 1.1 (it is ~1 on a device of its own, higher when they share cores).
    pub ahead_cloud_slowdown: f64,
    /// The tree setting (`chain`, `auto`, `NODESxDEPTH`); drafted nodes sent for verification in
    /// all (the roots not counted), and the mean per round.
    pub draft_tree: String,
    pub tree_nodes: usize,
    pub tree_nodes_per_round: f64,
    /// Automatic trees: the node threshold at the end and its input, the measured cost of a
    /// verified row (ms; 0 before it is measured).
    pub node_threshold: f32,
    pub row_cost_ms: f64,
    /// Trees: the draft's mean probability of its most likely next token at recent nodes (what
    /// decides whether a level is worth a draft step before the block goes; see
    /// [`super::tree`]).
    pub draft_top_prob: f32,
}

#[cfg(test)]
mod tests {
    use super::{PassTimes, Pipeline, TreeSplit};

    #[test]
    fn measured_passes_replace_the_cost_model_once_there_are_enough() {
        let mut passes = PassTimes::default();
        assert_eq!(passes.predict(2, Some(10.0)), Some(10.0));
        assert_eq!(passes.predict(2, None), None);
        passes.record(2, 7.0);
        passes.record(2, 9.0);
        assert_eq!(passes.predict(2, Some(10.0)), Some(10.0), "two passes are not enough");
        passes.record(2, 8.0);
        assert_eq!(passes.predict(2, Some(10.0)), Some(8.0), "the median of three");
        assert_eq!(passes.predict(2, None), Some(8.0));
        // Other sizes keep the model.
        assert_eq!(passes.predict(3, Some(12.0)), Some(12.0));
        assert_eq!(passes.predict(1, Some(6.0)), Some(6.0));
    }

    #[test]
    fn pipeline_and_tree_split_settings_parse_and_bad_ones_are_refused() {
        assert_eq!(Pipeline::parse("on").unwrap(), Pipeline::Auto);
        assert_eq!(Pipeline::parse("off").unwrap(), Pipeline::Off);
        assert_eq!(Pipeline::parse("4").unwrap(), Pipeline::Rows(4));
        assert_eq!(TreeSplit::parse("on").unwrap(), TreeSplit::Auto);
        assert_eq!(TreeSplit::parse("off").unwrap(), TreeSplit::Off);
        assert_eq!(TreeSplit::parse("2").unwrap(), TreeSplit::Rows(2));
        for bad in ["0", "64", "auto", "-1", ""] {
            for (flag, e) in [("--draft-pipeline", Pipeline::parse(bad).unwrap_err()), ("--draft-tree-split", TreeSplit::parse(bad).unwrap_err())] {
                let e = e.to_string();
                assert!(e.contains(flag) && e.contains("on, off"), "{bad}: {e}");
            }
        }
    }
}
