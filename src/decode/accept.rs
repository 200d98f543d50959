//! The speculative acceptance rule, as pure functions of the drafts and the target model's
//! distributions, and the statistics of a run of rounds.
//!
//! A round drafts `k` tokens `d_0 … d_{k-1}`; verification gives the target's distribution `p_i`
//! at the position of each draft and `p_k` after the last one. The round commits the accepted
//! drafts and one more token: the target's correction at the first rejected draft, or the
//! "bonus" token after the last one when all were accepted.
//! - **Greedy**: `d_i` is accepted while it is the target's argmax; the next token is the argmax
//!   where it stopped. The output is the target's greedy output, token for token.
//! - **Sampling** (Leviathan et al. 2023, Chen et al. 2023): `d_i`, drawn from the draft's `q_i`,
//!   is accepted with probability `min(1, p_i(d_i) / q_i(d_i))`; at the first rejection the next
//!   token is drawn from the residual `max(0, p_i - q_i)`, renormalised (from `p_i` itself if that
//!   is empty, which happens only when `q_i = p_i`); after `k` acceptances the bonus is drawn
//!   from `p_k`. Every committed token is distributed exactly as the target's `p`.
//! - **Trees** ([`accept_tree`]): the candidates at each node (its children's tokens) are chosen
//!   without randomness (the draft's most likely tokens). Starting at the root, the target's
//!   token at the node is selected as decoding would select it (argmax, or a draw from `p`); if
//!   a child carries that token, verification moves to it, else the token is committed and the
//!   round ends. Each committed token is therefore exactly the target's selection (for greedy,
//!   token for token; for sampling, a draw from `p` itself) — the point-mass case of recursive
//!   rejection sampling, where a candidate `c` is accepted with probability `p(c)` and the
//!   residual excludes it.

use serde::{Deserialize, Serialize};

use crate::decode::sampling::Sampler;
use crate::error::{Error, Result};

/// What verification decided for one round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acceptance {
    /// Drafts accepted (a prefix of the round's drafts).
    pub accepted: usize,
    /// The token committed after them: the correction, or the bonus token.
    pub next: u32,
}

/// Greedy verification. `argmax(i)` is the target's most likely token at the position of draft
/// `i` (`i = drafts.len()`: after the last one); it is asked only for the positions needed.
pub fn accept_greedy(drafts: &[u32], mut argmax: impl FnMut(usize) -> Result<u32>) -> Result<Acceptance> {
    for (i, &d) in drafts.iter().enumerate() {
        let want = argmax(i)?;
        if want != d {
            return Ok(Acceptance { accepted: i, next: want });
        }
    }
    Ok(Acceptance { accepted: drafts.len(), next: argmax(drafts.len())? })
}

/// What verification of a draft tree decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeAcceptance {
    /// The accepted path's rows, root (row 0) first: `path.len() - 1` drafts accepted.
    pub path: Vec<usize>,
    /// The token committed after them.
    pub next: u32,
}

/// Tree verification. `children(i)` lists row `i`'s children and their tokens; `select(i)` is
/// the target's selection at row `i` (asked only for the rows the walk reaches, in order).
pub fn accept_tree(children: impl Fn(usize) -> Vec<(usize, u32)>, mut select: impl FnMut(usize) -> Result<u32>) -> Result<TreeAcceptance> {
    let mut path = vec![0];
    let mut at = 0;
    loop {
        let want = select(at)?;
        match children(at).into_iter().find(|&(_, t)| t == want) {
            Some((child, _)) => {
                path.push(child);
                at = child;
            }
            None => return Ok(TreeAcceptance { path, next: want }),
        }
    }
}

/// Speculative sampling. `draft_probs[i]` is the distribution `d_i` was drawn from;
/// `target_probs(i)` the target's at the same position (`i = drafts.len()`: after the last one),
/// asked only for the positions needed. Random draws come from `rng`, in a fixed order, so a
/// seeded sampler makes a round reproducible.
pub fn accept_sampled(
    drafts: &[u32],
    draft_probs: &[Vec<f32>],
    mut target_probs: impl FnMut(usize) -> Result<Vec<f32>>,
    rng: &mut Sampler,
) -> Result<Acceptance> {
    if draft_probs.len() != drafts.len() {
        return Err(Error::invalid(format!("{} drafts but {} draft distributions", drafts.len(), draft_probs.len())));
    }
    for (i, (&d, q)) in drafts.iter().zip(draft_probs).enumerate() {
        let p = target_probs(i)?;
        let (pd, qd) = match (p.get(d as usize), q.get(d as usize)) {
            (Some(&pd), Some(&qd)) => (pd, qd),
            _ => return Err(Error::invalid(format!("draft token {d} is outside a distribution of {} tokens", p.len().min(q.len())))),
        };
        // Accepted with probability min(1, p/q).
        if rng.uniform() * (qd as f64) < pd as f64 {
            continue;
        }
        let residual: Vec<f32> = p.iter().zip(q).map(|(p, q)| (p - q).max(0.0)).collect();
        let next = if residual.iter().any(|&r| r > 0.0) { rng.draw(&residual) } else { rng.draw(&p) };
        return Ok(Acceptance { accepted: i, next });
    }
    let p = target_probs(drafts.len())?;
    Ok(Acceptance { accepted: drafts.len(), next: rng.draw(&p) })
}

/// Drafting statistics over rounds (one generation, or many added together).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DraftStats {
    /// Verification rounds.
    pub rounds: usize,
    /// Tokens committed by those rounds (every generated token after the first).
    pub committed: usize,
    pub drafts_sent: usize,
    pub drafts_accepted: usize,
    /// Per draft position of a round (0 = the first draft): how often it was checked (every
    /// draft before it accepted) and how often accepted.
    pub draft_checks: Vec<usize>,
    pub draft_hits: Vec<usize>,
}

impl DraftStats {
    /// Statistics for rounds of at most `max_drafts` drafts.
    pub fn new(max_drafts: usize) -> Self {
        Self { draft_checks: vec![0; max_drafts], draft_hits: vec![0; max_drafts], ..Self::default() }
    }

    /// Records a round that sent `drafted` drafts and accepted `accepted` of them.
    pub fn record(&mut self, drafted: usize, accepted: usize) {
        self.rounds += 1;
        self.drafts_sent += drafted;
        self.drafts_accepted += accepted;
        self.grow(drafted);
        for i in 0..drafted.min(accepted + 1) {
            self.draft_checks[i] += 1;
            self.draft_hits[i] += usize::from(i < accepted);
        }
    }

    /// Adds another run's statistics.
    pub fn add(&mut self, other: &DraftStats) {
        self.rounds += other.rounds;
        self.committed += other.committed;
        self.drafts_sent += other.drafts_sent;
        self.drafts_accepted += other.drafts_accepted;
        self.grow(other.draft_checks.len());
        for (i, (c, h)) in other.draft_checks.iter().zip(&other.draft_hits).enumerate() {
            self.draft_checks[i] += c;
            self.draft_hits[i] += h;
        }
    }

    fn grow(&mut self, n: usize) {
        if self.draft_checks.len() < n {
            self.draft_checks.resize(n, 0);
            self.draft_hits.resize(n, 0);
        }
    }

    /// Tokens committed per round (accepted drafts + the correction or bonus token).
    pub fn mean_accepted(&self) -> f64 {
        ratio(self.committed, self.rounds)
    }

    /// Accepted drafts / drafts sent.
    pub fn acceptance_rate(&self) -> f64 {
        ratio(self.drafts_accepted, self.drafts_sent)
    }

    /// The acceptance of each draft position given the ones before it (first draft first).
    pub fn acceptance_by_position(&self) -> Vec<f64> {
        self.draft_checks.iter().zip(&self.draft_hits).map(|(&c, &h)| ratio(h, c)).collect()
    }
}

/// `a / b`, 0 when `b` is 0.
fn ratio(a: usize, b: usize) -> f64 {
    if b > 0 {
        a as f64 / b as f64
    } else {
        0.0
    }
}

#[cfg(test)]
mod tree_tests {
    use super::*;

    #[test]
    fn a_tree_is_walked_down_the_children_that_carry_the_targets_tokens() {
        //        0
        //    1(a)  2(b)
        //    3(c)  4(d) 5(e)
        let parents = [usize::MAX, 0, 0, 1, 2, 2];
        let tokens = [0u32, 10, 11, 12, 13, 14];
        let children = |i: usize| (0..6).filter(|&c| parents[c] == i).map(|c| (c, tokens[c])).collect::<Vec<_>>();
        // The target picks b, then e, then 99: path 0 → 2 → 5, bonus 99.
        let targets = [11u32, 0, 14, 0, 0, 99];
        let mut asked = Vec::new();
        let got = accept_tree(children, |i| {
            asked.push(i);
            Ok(targets[i])
        })
        .unwrap();
        assert_eq!(got, TreeAcceptance { path: vec![0, 2, 5], next: 99 });
        assert_eq!(asked, [0, 2, 5], "only the rows on the walk are asked");
        // Every branch wrong: the root's target is committed.
        assert_eq!(accept_tree(children, |_| Ok(7)).unwrap(), TreeAcceptance { path: vec![0], next: 7 });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::sampling::SamplingParams;

    fn sampler(seed: u64) -> Sampler {
        Sampler::new(SamplingParams { temperature: 1.0, top_p: None, top_k: None, seed }).unwrap()
    }

    #[test]
    fn greedy_accepts_the_matching_prefix_and_corrects_the_first_miss() {
        let target = [3u32, 1, 4, 1, 5];
        let rule = |drafts: &[u32]| accept_greedy(drafts, |i| Ok(target[i])).unwrap();
        assert_eq!(rule(&[3, 1, 4, 1]), Acceptance { accepted: 4, next: 5 }, "all accepted: the bonus token");
        assert_eq!(rule(&[3, 1, 9, 1]), Acceptance { accepted: 2, next: 4 }, "third draft wrong");
        assert_eq!(rule(&[7, 1, 4, 1]), Acceptance { accepted: 0, next: 3 }, "first draft wrong");
        assert_eq!(rule(&[]), Acceptance { accepted: 0, next: 3 }, "no drafts: one plain step");
        // Positions after the first miss are never asked for.
        let mut asked = Vec::new();
        accept_greedy(&[3, 8, 4], |i| {
            asked.push(i);
            Ok(target[i])
        })
        .unwrap();
        assert_eq!(asked, [0, 1]);
    }

    #[test]
    fn sampling_by_hand_certain_acceptance_certain_rejection_and_the_residual() {
        let mut rng = sampler(1);
        // The draft is where the target puts all its mass: always accepted, whatever the draw.
        let p = vec![0.0, 1.0, 0.0];
        let got = accept_sampled(&[1], &[vec![0.2, 0.6, 0.2]], |i| Ok(if i == 0 { p.clone() } else { vec![0.0, 0.0, 1.0] }), &mut rng).unwrap();
        assert_eq!(got, Acceptance { accepted: 1, next: 2 });
        // The target gives the draft no mass: always rejected, and the residual max(0, p - q)
        // = (0, 0, 0.5) is all on token 2, although the target gives token 1 as much.
        let got = accept_sampled(&[0], &[vec![0.5, 0.5, 0.0]], |_| Ok(vec![0.0, 0.5, 0.5]), &mut rng).unwrap();
        assert_eq!(got, Acceptance { accepted: 0, next: 2 });
        // The second of two drafts rejected: the correction comes from the second position's residual.
        let targets = [vec![1.0, 0.0, 0.0], vec![0.0, 1.0, 0.0]];
        let got = accept_sampled(&[0, 2], &[vec![1.0, 0.0, 0.0], vec![0.0, 0.0, 1.0]], |i| Ok(targets[i].clone()), &mut rng).unwrap();
        assert_eq!(got, Acceptance { accepted: 1, next: 1 });
        // Mismatched inputs are refused, not indexed past.
        assert!(accept_sampled(&[0, 1], &[vec![1.0]], |_| Ok(vec![1.0]), &mut rng).is_err());
        assert!(accept_sampled(&[5], &[vec![1.0, 0.0]], |_| Ok(vec![1.0, 0.0]), &mut rng).is_err());
    }

    /// Total-variation distance between an empirical count and a distribution.
    fn total_variation(counts: &[usize], p: &[f32]) -> f64 {
        let n: usize = counts.iter().sum();
        counts.iter().zip(p).map(|(&c, &p)| (c as f64 / n as f64 - p as f64).abs()).sum::<f64>() / 2.0
    }

    #[test]
    fn speculative_sampling_with_a_wrong_draft_reproduces_the_target_distribution() {
        // Target distributions at three positions (the same whatever came before), and a draft
        // that is deliberately wrong at every one of them.
        let p = [vec![0.5f32, 0.2, 0.15, 0.1, 0.05], vec![0.05, 0.05, 0.1, 0.3, 0.5], vec![0.2, 0.2, 0.2, 0.2, 0.2]];
        let q = [vec![0.05f32, 0.1, 0.15, 0.2, 0.5], vec![0.6, 0.2, 0.1, 0.05, 0.05], vec![0.7, 0.1, 0.1, 0.05, 0.05]];
        for i in 0..3 {
            let draft_only: Vec<usize> = q[i].iter().map(|&x| (x * 1e4) as usize).collect();
            assert!(total_variation(&draft_only, &p[i]) > 0.3, "the draft must be far from the target for the test to mean something");
        }
        let trials = 40_000;
        // Committed tokens at positions 0 and 1 of the round (position 1 exists when draft 0 was accepted).
        let mut counts = [[0usize; 5]; 2];
        let mut greedy_like = [0usize; 5];
        let mut rng = sampler(42);
        for _ in 0..trials {
            let drafts: Vec<u32> = (0..2).map(|i| rng.draw(&q[i])).collect();
            let a = accept_sampled(&drafts, &q[..2], |i| Ok(p[i].clone()), &mut rng).unwrap();
            let committed: Vec<u32> = drafts[..a.accepted].iter().copied().chain([a.next]).collect();
            for (pos, &t) in committed.iter().take(2).enumerate() {
                counts[pos][t as usize] += 1;
            }
            // A naive rule that keeps the first draft: distributed as q, not p.
            greedy_like[drafts[0] as usize] += 1;
        }
        for pos in 0..2 {
            let tv = total_variation(&counts[pos], &p[pos]);
            assert!(tv < 0.015, "position {pos}: total variation {tv:.4} from the target ({:?})", counts[pos]);
        }
        assert!(total_variation(&greedy_like, &p[0]) > 0.3, "the naive rule must fail this test");
    }

    #[test]
    fn stats_count_rounds_positions_and_add_up() {
        let mut s = DraftStats::new(3);
        s.record(3, 1); // checks positions 0, 1; hit 0
        s.record(3, 3); // checks 0, 1, 2; hits all
        s.record(2, 0); // checks 0
        s.committed = (1 + 1) + (3 + 1) + 1;
        assert_eq!((s.rounds, s.drafts_sent, s.drafts_accepted), (3, 8, 4));
        assert_eq!(s.draft_checks, [3, 2, 1]);
        assert_eq!(s.draft_hits, [2, 1, 1]);
        assert!((s.mean_accepted() - 7.0 / 3.0).abs() < 1e-12);
        assert!((s.acceptance_rate() - 0.5).abs() < 1e-12);
        assert_eq!(s.acceptance_by_position(), [2.0 / 3.0, 0.5, 1.0]);
        let mut total = DraftStats::default();
        total.add(&s);
        total.add(&s);
        assert_eq!((total.rounds, total.committed, total.draft_checks.clone()), (6, 14, vec![6, 4, 2]));
        assert_eq!(DraftStats::default().mean_accepted(), 0.0);
    }
}
