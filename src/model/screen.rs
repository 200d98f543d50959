//! The LM head's argmax without reading the whole f32 head: screen every vocabulary row with a
//! row-scaled 8-bit copy (a quarter of the bytes), keep the rows whose logit could still be the
//! largest under a proven error bound, and compute those rows exactly with the f32 kernel the
//! full head uses.
//!
//! Vocabulary row `j` is stored as `q_j` (i8) with scale `s_j = max |w_j| / 127`. With AVX-512
//! VNNI the state `x` `(hidden)` is rounded to 16 bits (`r = round(x / s_x)`, `s_x = max |x| /
//! 32767`), split into two bytes, and the screened logit `a_j = s_j · s_x · Σ q_j r` is exact
//! integer arithmetic (two instructions per 64 products; 8 bits for `x` would widen the bound
//! below ~250×, and the candidates with it, as the final norm's outliers set `s_x`); otherwise
//! `a_j = s_j · Σ q_j x` in f32 ([`Q8Matrix`]'s kernel, `s_x` taken as 0 below). The f32 head's logit `l_j` then differs from `a_j` by at most
//!
//! `e_j = 1.02 · s_j · ((0.5 + 127 γ) · ‖x‖₁ + 0.5 · s_x · ‖q_j‖₁) + 1e-6 · (|a_j| + 1)`:
//!
//! rounding each weight to its step moves the dot product by at most `s_j / 2 · ‖x‖₁`, rounding
//! `x` by at most `s_j · s_x / 2 · ‖q_j‖₁`, and the f32 head's own accumulation by at most
//! `γ · Σ |w_j| |x| ≤ 127 γ s_j ‖x‖₁` with `γ = hidden · 2⁻²⁴ · 1.01`; the factor 1.02 and the last
//! term cover the rounding of these figures themselves. Every row whose interval `[a_j − e_j,
//! a_j + e_j]` reaches the largest lower end is a candidate; the f32 head's maximum is always
//! among them (its upper end is at least its logit, which is at least every other row's logit,
//! which is at least that row's lower end), and so is every row tied with it. The candidates are
//! computed by [`small_m_matmul`], whose every output element is computed the same way whatever
//! the other rows are, so their logits are bit for bit the full head's.
//!
//! [`ScreenedHead::logits`] returns full-width logits with `-inf` outside the candidates: the
//! argmax (and the tie rule of whoever takes it) is the full head's, and nothing else about the
//! distribution is meaningful, so only greedy decoding may use it.

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::model::kernels::{has_vnni, is_cpu_f32, small_m_matmul, EXACT_ROWS};
use crate::model::q8::{Q16States, Q8Matrix};

/// Above this many candidates in a row the whole row is computed in f32 (in practice a few to a
/// few hundred).
const MAX_CANDIDATES: usize = 4096;

/// An LM head weight `(vocab, hidden)` with its 8-bit screening copy.
#[derive(Debug)]
pub struct ScreenedHead {
    q8: Q8Matrix,
    /// `Σ_c |q_jc|` per row (the bound's term for rounding `x`).
    q_l1: Vec<f32>,
}

/// How the rows are screened (each with its bound, see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Screen {
    /// 8-bit weights, 16-bit states, integer dot products (AVX-512 VNNI).
    Int8,
    /// 8-bit weights, f32 states ([`Q8Matrix::matmul_rows`]).
    F32,
}

impl ScreenedHead {
    /// Quantises the head's f32 weight `(vocab, hidden)`.
    pub fn new(weight: &Tensor) -> Result<Self> {
        let q8 = Q8Matrix::quantize(weight)?;
        let k = q8.cols().max(1);
        let q_l1 = q8.ints().chunks(k).map(|r| r.iter().map(|&v| (v as i32).abs()).sum::<i32>() as f32).collect();
        Ok(Self { q8, q_l1 })
    }

    /// Whether [`Self::logits`] can serve normalised states `x` against the f32 head `weight`
    /// (CPU f32, at most [`EXACT_ROWS`] rows; otherwise the caller computes the full head).
    pub fn serves(x: &Tensor, weight: &Tensor) -> bool {
        let k = x.dims().last().copied().unwrap_or(0);
        is_cpu_f32(x) && is_cpu_f32(weight) && k > 0 && x.elem_count() / k <= EXACT_ROWS
    }

    /// Logits of normalised states `x` `(..., hidden)` (at most [`EXACT_ROWS`] rows, CPU f32)
    /// against the f32 head `weight` `(vocab, hidden)`: `(..., vocab)`, the full head's values at
    /// every row that could be the largest, `-inf` elsewhere (see the module doc).
    pub fn logits(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        self.logits_with(x, weight, Screen::best())
    }

    /// [`Self::logits`] screened as `how` says ([`Screen::Int8`] falls back to [`Screen::F32`]
    /// on a CPU without it).
    pub fn logits_with(&self, x: &Tensor, weight: &Tensor, how: Screen) -> Result<Tensor> {
        let how = if has_vnni() { how } else { Screen::F32 };
        let dims = x.dims().to_vec();
        let k = self.q8.cols();
        let vocab = self.q8.rows();
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let m = xs.len() / k.max(1);
        // Screened logits (m, vocab) and each row's s_x (0: states not rounded).
        let (approx, s_x) = match how {
            Screen::Int8 => self.int8_logits(&xs, k)?,
            Screen::F32 => (self.q8.matmul_rows(&xs, m), vec![0f32; m]),
        };
        let scales = self.q8.scales();
        let gamma = k as f32 * 2f32.powi(-24) * 1.01;
        let mut out = vec![f32::NEG_INFINITY; m * vocab];
        for (i, row) in xs.chunks(k).enumerate() {
            let a = &approx[i * vocab..(i + 1) * vocab];
            let l1: f32 = row.iter().map(|v| v.abs()).sum();
            let bounds: Vec<f32> = (0..vocab).map(|j| 1.02 * scales[j] * ((0.5 + 127.0 * gamma) * l1 + 0.5 * s_x[i] * self.q_l1[j]) + 1e-6 * (a[j].abs() + 1.0)).collect();
            let lower = a.iter().zip(&bounds).map(|(a, e)| a - e).fold(f32::NEG_INFINITY, f32::max);
            let candidates: Vec<u32> = (0..vocab).filter(|&j| a[j] + bounds[j] >= lower).map(|j| j as u32).collect();
            let xi = Tensor::from_slice(row, (1, k), &Device::Cpu)?;
            let dst = &mut out[i * vocab..(i + 1) * vocab];
            if !lower.is_finite() || candidates.len() > MAX_CANDIDATES || a.iter().any(|v| v.is_nan()) {
                // Non-finite values (a NaN logit is the argmax of the full head's rule) or a flat
                // row: the whole row, exactly.
                dst.copy_from_slice(&small_m_matmul(&xi, weight)?.flatten_all()?.to_vec1::<f32>()?);
                continue;
            }
            let idx = Tensor::from_vec(candidates.clone(), candidates.len(), weight.device())?;
            let exact = small_m_matmul(&xi, &weight.index_select(&idx, 0)?)?.flatten_all()?.to_vec1::<f32>()?;
            for (&j, v) in candidates.iter().zip(exact) {
                dst[j as usize] = v;
            }
        }
        let mut shape = dims;
        if let Some(last) = shape.last_mut() {
            *last = vocab;
        }
        Ok(Tensor::from_vec(out, shape, x.device())?)
    }

    /// [`Screen::Int8`]: each state rounded to 16 bits, integer dot products against every
    /// row ([`Q8Matrix::matmul_q16`]): `(m, vocab)` screened logits and each state's scale.
    fn int8_logits(&self, xs: &[f32], k: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let states = Q16States::new(xs, k);
        Ok((self.q8.matmul_q16(&states)?, states.scale))
    }
}

impl Screen {
    /// The fastest this CPU has: [`Screen::Int8`] with VNNI, for any number of states (with the
    /// 8-bit copy out of the caches, as between verifications, one core took 2.14 / 2.86 / 4.28
    /// ms for 1 / 3 / 5 states against 3.02 / 3.70 / 4.81 with [`Screen::F32`]; AMD EPYC,
    /// `cargo bench --bench engine`, the integer kernel of [`crate::model::kernels::vnni`]).
    pub fn best() -> Self {
        if has_vnni() {
            Self::Int8
        } else {
            Self::F32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The index candle's greedy sampler picks: the last of the largest (`max_by`).
    fn argmax(v: &[f32]) -> usize {
        v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i).unwrap()
    }

    #[test]
    fn screened_argmax_and_candidate_logits_are_the_full_heads() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (vocab, k) = (3000, 96);
        let mut w: Vec<f32> = (0..vocab * k).map(|_| rng.random::<f32>() - 0.5).collect();
        // Near-ties the 8-bit copy cannot tell apart: rows 10..20 equal to row 5 up to one ulp
        // of noise, and rows 30 and 31 identical (a true tie: the last one wins).
        for r in 10..20 {
            for c in 0..k {
                w[r * k + c] = w[5 * k + c] * (1.0 + 1e-7 * (r as f32 - 15.0));
            }
        }
        let row30: Vec<f32> = w[30 * k..31 * k].to_vec();
        w[31 * k..32 * k].copy_from_slice(&row30);
        let weight = Tensor::from_vec(w, (vocab, k), &Device::Cpu).unwrap();
        let screen = ScreenedHead::new(&weight).unwrap();
        let mut rows: Vec<Vec<f32>> = (0..6).map(|_| (0..k).map(|_| rng.random::<f32>() * 4.0 - 2.0).collect()).collect();
        // States aligned with rows 5 and 30: their near-ties and ties decide the argmax.
        rows.push(weight.get(5).unwrap().to_vec1().unwrap());
        rows.push(weight.get(30).unwrap().to_vec1().unwrap());
        let m = rows.len();
        let x = Tensor::from_vec(rows.concat(), (1, m, k), &Device::Cpu).unwrap();
        assert!(ScreenedHead::serves(&x, &weight));
        let full = small_m_matmul(&x, &weight).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
        let screens = if has_vnni() { vec![Screen::Int8, Screen::F32] } else { vec![Screen::F32] };
        for how in screens {
            let screened = screen.logits_with(&x, &weight, how).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
            for (i, (f, s)) in full.iter().zip(&screened).enumerate() {
                assert_eq!(argmax(f), argmax(s), "{how:?}, row {i}");
                let kept: Vec<usize> = (0..vocab).filter(|&j| s[j].is_finite()).collect();
                assert!(kept.len() < vocab / 4, "{how:?}, row {i}: {} candidates", kept.len());
                for &j in &kept {
                    assert_eq!(s[j].to_bits(), f[j].to_bits(), "{how:?}, row {i}, vocabulary row {j}");
                }
            }
            // Near-ties the 8-bit copy cannot separate all stay candidates.
            assert!([5].iter().chain(&[10, 11, 12, 13, 14, 15, 16, 17, 18, 19]).all(|&j| screened[6][j].is_finite()), "{how:?}");
            assert_eq!(argmax(&screened[7]), 31, "{how:?}: a true tie keeps the full head's rule");
        }
    }
}
