//! Row-scaled 8-bit matrices and their small-m matmul: the draft path's compact compute.
//!
//! A [`Q8Matrix`] holds `w` `(n, k)` as `q` (i8, `(n, k)`) and one f32 scale per row, with
//! `w[j, c] ≈ q[j, c] · scale[j]`, `scale[j] = max_c |w[j, c]| / 127` (the rule of the adapter
//! file's int8 storage, so quantising an int8-stored adapter gives its stored integers back).
//! [`Q8Matrix::matmul`] computes `x · wᵀ` for `x` `(..., k)` with at most [`EXACT_ROWS`] rows, reading
//! a quarter of the bytes an f32 matrix needs: for a decode step, memory-bound, that is most of
//! the time. Draft compute uses it (the adapter's layers and the reduced draft head); the LLM
//! path stays f32 and exact, and uses it only to screen the head's rows for greedy decoding
//! ([`crate::model::screen`]), whose result is the f32 head's.
//!
//! With AVX-512 VNNI, [`Q8Matrix::matmul`] rounds each input row to 16 bits ([`Q16States`]) and
//! multiplies in exact integers ([`crate::model::kernels::vnni`]): each output moves by at most
//! `scale_j · s_x / 2 · Σ_c |q_jc|` (`s_x = max |x| / 32767`), a few hundred times less than
//! rounding the weights to 8 bits already moves it, for a sixth of the instructions.
//! [`Q8Matrix::matmul_rows`] keeps f32 states (the screen's bound for its fallback assumes them).

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::model::kernels::{has_vnni, Isa, EXACT_ROWS};

/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// A row-scaled 8-bit matrix `(rows, cols)`.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    q: Vec<i8>,
    scale: Vec<f32>,
    /// `Σ_c q_jc` per row (what the unsigned states' offset adds to an integer dot product).
    q_sum: Vec<i32>,
    rows: usize,
    cols: usize,
}

/// Input rows `(m, k)` rounded to 16 bits for the integer kernels: `r = round(x / scale)` in
/// `[-32767, 32767]` with `scale = max |x| / 32767` per row, held as the unsigned bytes `hi = (r
/// >> 8) + 128` and `lo = r & 255` (`256 · hi + lo = r + 32768`).
#[derive(Debug, Clone)]
pub struct Q16States {
    pub(crate) hi: Vec<u8>,
    pub(crate) lo: Vec<u8>,
    /// Each row's scale, `(m,)`.
    pub scale: Vec<f32>,
    pub(crate) k: usize,
}

impl Q16States {
    /// Rounds the rows of `xs` `(m, k)`, row-major.
    pub fn new(xs: &[f32], k: usize) -> Self {
        let k = k.max(1);
        let m = xs.len() / k;
        let (mut hi, mut lo) = (vec![0u8; m * k], vec![0u8; m * k]);
        let mut scale = Vec::with_capacity(m);
        for ((row, h), l) in xs.chunks_exact(k).zip(hi.chunks_mut(k)).zip(lo.chunks_mut(k)) {
            let max = row.iter().fold(0f32, |a, v| a.max(v.abs()));
            let s = (max / 32767.0).max(f32::MIN_POSITIVE);
            for ((h, l), v) in h.iter_mut().zip(l.iter_mut()).zip(row) {
                let r = round_half_away(v / s).clamp(-32767, 32767);
                *h = ((r >> 8) + 128) as u8;
                *l = (r & 0xff) as u8;
            }
            scale.push(s);
        }
        Self { hi, lo, scale, k }
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.scale.len()
    }
}

impl Q8Matrix {
    /// Quantises an f32 matrix `(rows, cols)` row by row (symmetric, `max |w| / 127`).
    pub fn quantize(w: &Tensor) -> Result<Self> {
        let (rows, cols) = w.dims2()?;
        let data = w.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut q = vec![0i8; rows * cols];
        let mut scale = vec![0f32; rows];
        for (j, (row, out)) in data.chunks(cols.max(1)).zip(q.chunks_mut(cols.max(1))).enumerate() {
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = (max / 127.0).max(f32::MIN_POSITIVE);
            scale[j] = s;
            for (o, v) in out.iter_mut().zip(row) {
                *o = round_half_away(v / s).clamp(-127, 127) as i8;
            }
        }
        let q_sum = q.chunks(cols.max(1)).map(|r| r.iter().map(|&v| v as i32).sum()).collect();
        Ok(Self { q, scale, q_sum, rows, cols })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The integers, row-major `(rows, cols)`.
    pub fn ints(&self) -> &[i8] {
        &self.q
    }

    /// Each row's scale, `(rows,)`.
    pub fn scales(&self) -> &[f32] {
        &self.scale
    }

    /// Each row's sum of integers, `(rows,)`.
    pub fn sums(&self) -> &[i32] {
        &self.q_sum
    }

    /// Bytes held (integers, scales and sums).
    pub fn bytes(&self) -> usize {
        self.q.len() + 8 * self.scale.len()
    }

    /// The matrix as f32, `(rows, cols)` (what [`Q8Matrix::matmul`] multiplies by).
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let w: Vec<f32> = self.q.chunks(self.cols.max(1)).zip(&self.scale).flat_map(|(r, &s)| r.iter().map(move |&v| v as f32 * s)).collect();
        Ok(Tensor::from_vec(w, (self.rows, self.cols), device)?)
    }

    /// `x · wᵀ` for `x` f32 `(..., cols)` with at most [`EXACT_ROWS`] rows on the CPU: `(..., rows)`.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = self.cols;
        if dims.last() != Some(&k) {
            return Err(Error::invalid(format!("q8 matmul: input {dims:?} does not end in {k}")));
        }
        let xs = x.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let m = xs.len() / k.max(1);
        if m > EXACT_ROWS {
            return Err(Error::invalid(format!("q8 matmul: {m} rows (at most {EXACT_ROWS})")));
        }
        let out = match has_vnni() {
            true => self.matmul_q16(&Q16States::new(&xs, k))?,
            false => self.matmul_rows(&xs, m),
        };
        let mut shape = dims;
        if let Some(last) = shape.last_mut() {
            *last = self.rows;
        }
        Ok(Tensor::from_vec(out, shape, x.device())?)
    }

    /// `x` `(m, cols)` row-major → `(m, rows)` row-major.
    pub fn matmul_rows(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_rows_in(Isa::detected(), x, m)
    }

    /// `x · wᵀ` for states rounded to 16 bits, in exact integers then scaled: `(m, rows)`
    /// row-major. Needs AVX-512 VNNI ([`has_vnni`]); without it, the same values from a scalar
    /// loop (tests only).
    pub fn matmul_q16(&self, x: &Q16States) -> Result<Vec<f32>> {
        let (n, k, m) = (self.rows, self.cols, x.rows());
        if x.k != k {
            return Err(Error::invalid(format!("q8 matmul: states of width {} against a matrix of {k} columns", x.k)));
        }
        thread_local! {
            static SUMS: std::cell::RefCell<Vec<i64>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        Ok(crate::model::kernels::by_weight_rows(n, m, ROWS_PER_TASK, n * k > 1 << 18, |j0, block| {
            let rows = block.len() / m;
            SUMS.with_borrow_mut(|sums| {
                sums.resize(block.len(), 0);
                q16_dots(&self.q[j0 * k..(j0 + rows) * k], x, k, m, sums);
                for (r, (out, s)) in block.chunks_mut(m).zip(sums.chunks(m)).enumerate() {
                    let (scale, offset) = (self.scale[j0 + r] as f64, 32768 * self.q_sum[j0 + r] as i64);
                    for ((o, &s), &sx) in out.iter_mut().zip(s).zip(&x.scale) {
                        *o = ((s - offset) as f64 * scale * sx as f64) as f32;
                    }
                }
            })
        }))
    }

    /// [`Q8Matrix::matmul_rows`] in `isa`'s kernels (AVX2 and AVX-512 give the same bits).
    fn matmul_rows_in(&self, isa: Isa, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        crate::model::kernels::by_weight_rows(n, m, ROWS_PER_TASK, n * k > 1 << 18, |j0, block| {
            crate::model::kernels::dot_rows(isa, &self.q[j0 * k..(j0 + block.len() / m) * k], x, k, m, block);
            for (r, out) in block.chunks_mut(m).enumerate() {
                out.iter_mut().for_each(|o| *o *= self.scale[j0 + r]);
            }
        })
    }
}

/// `q` rounded half away from zero to an integer, as `f32::round` does (up to the sum's own
/// rounding just below a half; NaN gives 0, out of range saturates), in instructions that
/// vectorise (`f32::round` is a library call here: it was most of the time of quantising the
/// draft path at start-up).
#[inline]
fn round_half_away(q: f32) -> i32 {
    (q + 0.5f32.copysign(q)) as i32
}

/// `sums[r * m + s] = Σ_c w[r·k + c] · (256 · hi + lo)[s·k + c]` for the weight rows in `w`
/// and the `m` states: VNNI where the CPU has it ([`has_vnni`]), else a scalar loop (the same
/// integers).
fn q16_dots(w: &[i8], x: &Q16States, k: usize, m: usize, sums: &mut [i64]) {
    #[cfg(target_arch = "x86_64")]
    if has_vnni() {
        // SAFETY: the CPU has VNNI; `w` holds `rows * k` values, the states `m * k`.
        return unsafe { crate::model::kernels::vnni::dots(w, &x.hi, &x.lo, k, m, sums) };
    }
    q16_dots_scalar(w, x, k, m, sums)
}

/// The integer sums of [`crate::model::kernels::vnni::dots`], without vector instructions.
fn q16_dots_scalar(w: &[i8], x: &Q16States, k: usize, m: usize, sums: &mut [i64]) {
    for (r, out) in sums.chunks_mut(m.max(1)).enumerate() {
        let wr = &w[r * k..(r + 1) * k];
        for (s, o) in out.iter_mut().enumerate() {
            let (h, l) = (&x.hi[s * k..(s + 1) * k], &x.lo[s * k..(s + 1) * k]);
            *o = wr.iter().zip(h.iter().zip(l)).map(|(&w, (&h, &l))| w as i64 * (256 * h as i64 + l as i64)).sum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel multiplies by exactly the dequantised matrix (up to f32 summation order), for
    /// every row count it serves and a width that is not a multiple of 16; quantisation keeps
    /// each weight within half a step.
    #[test]
    fn matmul_matches_dequantized_f32() -> Result<()> {
        let dev = Device::Cpu;
        let (n, k) = (37, 50);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let q = Q8Matrix::quantize(&w)?;
        let deq = q.dequantize(&dev)?;
        let step = (w.abs()?.max_keepdim(1)? / 127.0)?;
        let err = (w.sub(&deq)?.abs()?.broadcast_div(&step)?).max_all()?.to_scalar::<f32>()?;
        assert!(err <= 0.5 + 1e-4, "quantisation error {err} steps");
        for m in 1..=crate::model::kernels::SMALL_M {
            let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev)?;
            // f32 states (`matmul` rounds them to 16 bits on a CPU with VNNI: the next test).
            let got = Tensor::from_vec(q.matmul_rows(&x.flatten_all()?.to_vec1::<f32>()?, m), (1, m, n), &dev)?;
            let want = x.broadcast_matmul(&deq.t()?)?;
            assert_eq!(q.matmul(&x)?.dims(), [1, m, n]);
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4, "m = {m}: max diff {diff}");
        }
        assert!(q.matmul(&Tensor::zeros((1, EXACT_ROWS + 1, k), candle_core::DType::F32, &dev)?).is_err());
        // The vector kernels give the same bits in every instruction set the CPU has (k = 50: a
        // scalar tail of 2; 64: none; 45: a half chunk, which i8 sends to the tail).
        let vector: Vec<Isa> = Isa::supported().into_iter().filter(|&i| i >= Isa::Avx2).collect();
        for k in [50, 64, 45] {
            let q = Q8Matrix::quantize(&Tensor::randn(0f32, 1.0, (n, k), &dev)?)?;
            for m in [1, 2, 5, 7, EXACT_ROWS] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?.flatten_all()?.to_vec1::<f32>()?;
                let results: Vec<Vec<f32>> = vector.iter().map(|&isa| q.matmul_rows_in(isa, &x, m)).collect();
                assert!(results.windows(2).all(|p| p[0] == p[1]), "k = {k}, m = {m}: {vector:?} differ");
            }
        }
        assert!(q.matmul(&Tensor::zeros((1, 1, k + 1), candle_core::DType::F32, &dev)?).is_err());
        Ok(())
    }

    /// States rounded to 16 bits: the integer kernel (VNNI where the CPU has it) gives exactly
    /// the scalar loop's values, each row as it would alone, and each output is within the
    /// rounding bound `scale_j · s_x / 2 · Σ|q_j|` of the f32-state product; widths with and
    /// without a tail past the last 64 columns, and one wider than a 32-bit chunk.
    #[test]
    fn q16_states_match_the_scalar_sums_and_the_bound() -> Result<()> {
        let dev = Device::Cpu;
        for (n, k) in [(37, 50), (9, 64), (13, 576), (6, 2048 + 64 + 7)] {
            let q = Q8Matrix::quantize(&Tensor::randn(0f32, 1.0, (n, k), &dev)?)?;
            let deq = q.dequantize(&dev)?;
            for m in [1, 2, 3, 5, EXACT_ROWS] {
                let mut xs = Tensor::randn(0f32, 1.0, (m, k), &dev)?.flatten_all()?.to_vec1::<f32>()?;
                xs[0] = 40.0; // an outlier sets row 0's scale, as the attention sink's states do
                let states = Q16States::new(&xs, k);
                let got = q.matmul_q16(&states)?;
                let mut sums = vec![0i64; n * m];
                q16_dots_scalar(q.ints(), &states, k, m, &mut sums);
                for i in 0..m {
                    for j in 0..n {
                        let want = ((sums[j * m + i] - 32768 * q.sums()[j] as i64) as f64 * q.scales()[j] as f64 * states.scale[i] as f64) as f32;
                        assert_eq!(got[i * n + j], want, "k = {k}, m = {m}, ({i}, {j})");
                    }
                }
                // Row by row alone: the same values.
                for i in 0..m {
                    let alone = q.matmul_q16(&Q16States::new(&xs[i * k..(i + 1) * k], k))?;
                    assert_eq!(alone, got[i * n..(i + 1) * n], "k = {k}, m = {m}, row {i}");
                }
                let exact = Tensor::from_vec(xs.clone(), (m, k), &dev)?.matmul(&deq.t()?)?.flatten_all()?.to_vec1::<f32>()?;
                for i in 0..m {
                    for j in 0..n {
                        let l1: f32 = q.ints()[j * k..(j + 1) * k].iter().map(|&v| (v as f32).abs()).sum();
                        let bound = q.scales()[j] * states.scale[i] * 0.5 * l1 * 1.01 + 1e-4 * (1.0 + exact[i * n + j].abs());
                        let err = (got[i * n + j] - exact[i * n + j]).abs();
                        assert!(err <= bound, "k = {k}, m = {m}, ({i}, {j}): {err} > {bound}");
                    }
                }
            }
        }
        // The largest sums the kernel can meet: every weight ±127, every state at its bound
        // (hi = 255 or 0), over a 32-bit chunk and more.
        let k = 2048 + 64 + 7;
        for (weight, state) in [(1f64, 1f32), (-1.0, 1.0), (1.0, -1.0)] {
            let q = Q8Matrix::quantize(&(Tensor::ones((8, k), candle_core::DType::F32, &dev)? * weight)?)?;
            for m in [1, 3, 5] {
                let states = Q16States::new(&vec![state; m * k], k);
                let mut sums = vec![0i64; 8 * m];
                q16_dots_scalar(q.ints(), &states, k, m, &mut sums);
                let mut got = vec![0i64; 8 * m];
                q16_dots(q.ints(), &states, k, m, &mut got);
                assert_eq!(got, sums, "weights {weight}, states {state}, m = {m}");
            }
        }
        let q = Q8Matrix::quantize(&Tensor::randn(0f32, 1.0, (4, 8), &dev)?)?;
        assert!(q.matmul_q16(&Q16States::new(&[0.0; 9], 9)).is_err(), "a width other than the matrix's");
        Ok(())
    }
}
