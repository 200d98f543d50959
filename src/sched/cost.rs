//! The cost model of one stage, milliseconds, for a block of `r` consecutive positions whose
//! first is `start`:
//!
//! ```text
//! t(r, start) = fixed + per_row · r + per_row_sq · r² + per_row_ctx · r · (start + r/2)
//!             + [r > matmul_rows] · large_block        (gemm instead of the small-block matmul)
//!             + [r ≤ attention_rows] · (small_per_row_ctx − per_row_ctx) · r · (start + r/2)
//! ```
//!
//! `r · (start + r/2)` is attention (each row attends to about `start + r/2` positions); `r²`
//! the superlinear cost of large blocks (caches). The engine's regimes are explicit: blocks of
//! at most `matmul_rows` rows multiply through the small-block kernel (a fixed step up beyond),
//! blocks of at most `attention_rows` attend through the row-by-row kernel (exact for any block
//! size, costlier per position at long contexts). Fitted to measured timings by least squares on
//! relative error, with its residuals.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where an engine changes kernels with the block size (see the module doc); 0 = no regime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Regimes {
    pub matmul_rows: usize,
    pub attention_rows: usize,
}

/// One stage's cost, milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct StageCost {
    pub fixed_ms: f64,
    pub per_row_ms: f64,
    #[serde(default)]
    pub per_row_sq_ms: f64,
    /// Per row and per position attended.
    pub per_row_ctx_ms: f64,
    /// Blocks of at most `regimes.attention_rows` rows: per row and position attended.
    #[serde(default)]
    pub small_per_row_ctx_ms: f64,
    /// Blocks of more than `regimes.matmul_rows` rows: a fixed step.
    #[serde(default)]
    pub large_block_ms: f64,
    #[serde(default)]
    pub regimes: Regimes,
    /// The largest block it was fitted on (0: unknown); planners keep within it rather than
    /// extrapolate.
    #[serde(default)]
    pub max_rows: usize,
}

/// One measurement: a block of `rows` at positions `start..start + rows` took `ms`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Timing {
    pub rows: usize,
    pub start: usize,
    pub ms: f64,
}

/// How well a fit explains its timings (relative errors, `|predicted - measured| / measured`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Residuals {
    pub points: usize,
    pub rms_rel: f64,
    pub max_rel: f64,
}

/// A fitted stage: its coefficients and residuals.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct FittedStage {
    #[serde(flatten)]
    pub cost: StageCost,
    pub residuals: Residuals,
}

impl StageCost {
    /// Milliseconds for `rows` positions from `start`.
    pub fn predict(&self, rows: usize, start: usize) -> f64 {
        let f = features(rows, start, self.regimes);
        self.coefficients().iter().zip(f).map(|(c, x)| c * x).sum()
    }

    /// The coefficients in a fixed order (the wire's): fixed, per row, per row², per row and
    /// position, the same for small blocks, large-block step.
    pub fn coefficients(&self) -> [f64; FEATURES] {
        [self.fixed_ms, self.per_row_ms, self.per_row_sq_ms, self.per_row_ctx_ms, self.small_per_row_ctx_ms, self.large_block_ms]
    }

    /// The inverse of [`StageCost::coefficients`].
    pub fn from_coefficients(c: [f64; FEATURES], regimes: Regimes, max_rows: usize) -> Self {
        Self { fixed_ms: c[0], per_row_ms: c[1], per_row_sq_ms: c[2], per_row_ctx_ms: c[3], small_per_row_ctx_ms: c[4], large_block_ms: c[5], regimes, max_rows }
    }

    /// Relative errors of this model on `timings`.
    pub fn residuals(&self, timings: &[Timing]) -> Residuals {
        let rel: Vec<f64> = timings.iter().map(|t| (self.predict(t.rows, t.start) - t.ms).abs() / t.ms.max(1e-9)).collect();
        let n = rel.len().max(1) as f64;
        Residuals {
            points: rel.len(),
            rms_rel: (rel.iter().map(|r| r * r).sum::<f64>() / n).sqrt(),
            max_rel: rel.iter().copied().fold(0.0, f64::max),
        }
    }

    pub fn validate(&self, what: &str) -> Result<()> {
        let ok = self.coefficients().iter().all(|v| v.is_finite() && *v >= 0.0);
        if !ok || self.per_row_ms + self.fixed_ms <= 0.0 {
            return Err(Error::invalid(format!("the cost model of {what} is not usable: {self:?}")));
        }
        Ok(())
    }
}

/// The cloud's cost model as it tells its edges: the middle layers alone, and how much slower
/// a block runs with `k` blocks computing at once on the cloud's cores (`slowdown[k - 1]`,
/// `slowdown[0] = 1`; measured, reported: the planner's load model is
/// [`CloudModel::under_load`], since serve-cloud runs blocks in turn).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CloudModel {
    pub middle: StageCost,
    pub slowdown: Vec<f64>,
}

impl CloudModel {
    /// Most entries of `slowdown` (the wire's limit).
    pub const MAX_SLOWDOWN: usize = 16;

    /// The slowdown with `k` sessions computing at once (fractional `k`: interpolated; beyond
    /// the table: extrapolated from its last step).
    pub fn slowdown_at(&self, k: f64) -> f64 {
        let s = &self.slowdown;
        if s.is_empty() || k <= 1.0 {
            return 1.0;
        }
        let i = (k - 1.0).floor() as usize;
        if i + 1 < s.len() {
            let f = k - 1.0 - i as f64;
            return s[i] + f * (s[i + 1] - s[i]);
        }
        let last = s[s.len() - 1];
        let step = if s.len() >= 2 { (last - s[s.len() - 2]).max(0.0) } else { last - 1.0 };
        last + step * (k - s.len() as f64)
    }

    /// The middle layers' cost for a session while other sessions keep the cloud `busy` (their
    /// compute time per wall time) with blocks of `block_ms` each. The cloud runs blocks in turn
    /// (one compute thread per core), so each block of this session waits, on average, for
    /// `busy` of the others' blocks: a fixed cost of `busy · block_ms` per block (a long block
    /// runs alone; the others' short blocks go in between).
    pub fn under_load(&self, busy: f64, block_ms: f64) -> StageCost {
        StageCost { fixed_ms: self.middle.fixed_ms + busy.max(0.0) * block_ms.max(0.0), ..self.middle }
    }
}

/// Coefficients of a [`StageCost`].
pub const FEATURES: usize = 6;

fn features(rows: usize, start: usize, regimes: Regimes) -> [f64; FEATURES] {
    let r = rows as f64;
    let attention = r * (start as f64 + r / 2.0);
    let small = rows <= regimes.attention_rows;
    let large = regimes.matmul_rows > 0 && rows > regimes.matmul_rows;
    [1.0, r, r * r, if small { 0.0 } else { attention }, if small { attention } else { 0.0 }, if large { 1.0 } else { 0.0 }]
}

/// Which term goes first when the timings cannot determine them all.
const DROP_ORDER: [usize; FEATURES] = [2, 5, 4, 3, 0, 1];

/// Fits a [`StageCost`] to `timings` with the engine's `regimes` (see the module doc):
/// least squares on relative error (each equation divided by its measured time, so small blocks
/// count as much as large ones), coefficients kept non-negative (a term that fits negative is
/// dropped and the rest refitted). A term no timing exercises stays 0.
pub fn fit(timings: &[Timing], regimes: Regimes) -> Result<FittedStage> {
    let usable: Vec<Timing> = timings.iter().copied().filter(|t| t.ms.is_finite() && t.ms > 0.0 && t.rows > 0).collect();
    if usable.len() < 3 {
        return Err(Error::invalid(format!("a cost model needs at least 3 timings, got {}", usable.len())));
    }
    let mut active = [true; FEATURES];
    for (i, a) in active.iter_mut().enumerate() {
        *a = usable.iter().any(|t| features(t.rows, t.start, regimes)[i] > 0.0);
    }
    loop {
        let coef = match solve_weighted(&usable, &active, regimes) {
            Ok(c) => c,
            // The timings cannot tell some terms apart (e.g. r² and attention at start 0):
            // drop the least fundamental term still in, and refit.
            Err(e) => match DROP_ORDER.iter().find(|&&i| active[i]) {
                Some(&i) => {
                    active[i] = false;
                    continue;
                }
                None => return Err(e),
            },
        };
        match (0..FEATURES).filter(|&i| active[i] && coef[i] < 0.0).min_by(|&a, &b| coef[a].total_cmp(&coef[b])) {
            Some(worst) => active[worst] = false,
            None => {
                let max_rows = usable.iter().map(|t| t.rows).max().unwrap_or(0);
                let cost = StageCost::from_coefficients(coef, regimes, max_rows);
                return Ok(FittedStage { residuals: cost.residuals(&usable), cost });
            }
        }
        if !active.iter().any(|&a| a) {
            return Err(Error::invalid("no cost model fits these timings"));
        }
    }
}

/// Weighted least squares over the active features (normal equations, Gaussian elimination).
fn solve_weighted(timings: &[Timing], active: &[bool; FEATURES], regimes: Regimes) -> Result<[f64; FEATURES]> {
    let idx: Vec<usize> = (0..FEATURES).filter(|&i| active[i]).collect();
    let n = idx.len();
    // Columns scaled to unit size so the normal equations stay well conditioned.
    let mut scale = vec![0.0f64; n];
    for t in timings {
        let f = features(t.rows, t.start, regimes);
        for (j, &i) in idx.iter().enumerate() {
            scale[j] = f64::max(scale[j], (f[i] / t.ms).abs());
        }
    }
    let mut ata = vec![vec![0.0f64; n + 1]; n];
    for t in timings {
        let f = features(t.rows, t.start, regimes);
        let row: Vec<f64> = idx.iter().enumerate().map(|(j, &i)| f[i] / t.ms / scale[j].max(1e-300)).collect();
        for a in 0..n {
            for b in 0..n {
                ata[a][b] += row[a] * row[b];
            }
            ata[a][n] += row[a]; // target: t.ms / t.ms
        }
    }
    for col in 0..n {
        let pivot = (col..n).max_by(|&a, &b| ata[a][col].abs().total_cmp(&ata[b][col].abs())).unwrap_or(col);
        ata.swap(col, pivot);
        let p = ata[col][col];
        if p.abs() < 1e-12 {
            return Err(Error::invalid("the timings do not determine a cost model (too few distinct block sizes or positions)"));
        }
        for r in 0..n {
            if r != col {
                let f = ata[r][col] / p;
                for c in col..=n {
                    ata[r][c] -= f * ata[col][c];
                }
            }
        }
    }
    let mut out = [0.0; FEATURES];
    for (j, &i) in idx.iter().enumerate() {
        out[i] = ata[j][n] / ata[j][j] / scale[j].max(1e-300);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_recovers_known_coefficients() {
        let regimes = Regimes { matmul_rows: 4, attention_rows: 8 };
        let truth = StageCost { fixed_ms: 0.8, per_row_ms: 1.7, per_row_sq_ms: 0.0003, per_row_ctx_ms: 0.0009, small_per_row_ctx_ms: 0.004, large_block_ms: 3.0, regimes, max_rows: 512 };
        let mut timings = Vec::new();
        let mut noise = 0.987f64;
        for rows in [1, 2, 4, 8, 16, 64, 256, 512] {
            for start in [0, 300, 1000, 1800] {
                noise = (noise * 7919.0).fract(); // deterministic ±1 % noise
                timings.push(Timing { rows, start, ms: truth.predict(rows, start) * (1.0 + 0.02 * (noise - 0.5)) });
            }
        }
        let fitted = fit(&timings, regimes).unwrap();
        let c = fitted.cost;
        assert!((c.fixed_ms - 0.8).abs() < 0.1, "{c:?}");
        assert!((c.per_row_ms - 1.7).abs() < 0.05, "{c:?}");
        assert!((c.per_row_sq_ms - 0.0003).abs() < 0.0001, "{c:?}");
        assert!((c.per_row_ctx_ms - 0.0009).abs() < 0.0001, "{c:?}");
        assert!((c.small_per_row_ctx_ms - 0.004).abs() < 0.0008, "{c:?}");
        assert!((c.large_block_ms - 3.0).abs() < 0.5, "{c:?}");
        assert!(fitted.residuals.max_rel < 0.02 && fitted.residuals.points == timings.len(), "{:?}", fitted.residuals);
        // Exact data is fitted exactly.
        let exact: Vec<Timing> = timings.iter().map(|t| Timing { ms: truth.predict(t.rows, t.start), ..*t }).collect();
        let f = fit(&exact, regimes).unwrap();
        // Without the regimes the timings cannot be fitted exactly.
        assert!(fit(&exact, Regimes::default()).unwrap().residuals.max_rel > 0.01);
        assert!(f.residuals.max_rel < 1e-9, "{:?}", f.residuals);
    }

    #[test]
    fn slowdown_interpolates_and_extrapolates() {
        let m = CloudModel { middle: StageCost { fixed_ms: 1.0, per_row_ms: 1.0, ..Default::default() }, slowdown: vec![1.0, 2.0, 3.0] };
        assert_eq!(m.slowdown_at(1.0), 1.0);
        assert!((m.slowdown_at(1.5) - 1.5).abs() < 1e-12);
        assert!((m.slowdown_at(5.0) - 5.0).abs() < 1e-12);
        assert!((m.under_load(0.5, 40.0).predict(1, 0) - 22.0).abs() < 1e-12);
        assert_eq!(CloudModel::default().slowdown_at(3.0), 1.0);
    }

    #[test]
    fn a_term_that_would_be_negative_is_dropped_and_too_little_data_is_refused() {
        // Pure per-row cost with no fixed part: the fit must not invent a negative fixed cost.
        let timings: Vec<Timing> = [1, 2, 8, 32].iter().map(|&r| Timing { rows: r, start: 0, ms: 2.0 * r as f64 - 0.01 }).collect();
        let f = fit(&timings, Regimes::default()).unwrap();
        assert!(f.cost.fixed_ms >= 0.0 && f.cost.per_row_ctx_ms >= 0.0, "{:?}", f.cost);
        assert!(fit(&timings[..2], Regimes::default()).is_err());
        let same: Vec<Timing> = (0..5).map(|_| Timing { rows: 4, start: 0, ms: 3.0 }).collect();
        // One distinct point: still a (degenerate) fit or a clear error, never a panic or NaN.
        if let Ok(f) = fit(&same, Regimes::default()) {
            assert!((f.cost.predict(4, 0) - 3.0).abs() < 1e-6);
        }
    }
}
