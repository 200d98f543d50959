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

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::model::kernels::{Isa, EXACT_ROWS};

/// Weight rows per parallel task.
const ROWS_PER_TASK: usize = 64;

/// A row-scaled 8-bit matrix `(rows, cols)`.
#[derive(Debug, Clone)]
pub struct Q8Matrix {
    q: Vec<i8>,
    scale: Vec<f32>,
    rows: usize,
    cols: usize,
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
                *o = (v / s).round().clamp(-127.0, 127.0) as i8;
            }
        }
        Ok(Self { q, scale, rows, cols })
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

    /// Bytes held (integers and scales).
    pub fn bytes(&self) -> usize {
        self.q.len() + 4 * self.scale.len()
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
        let out = self.matmul_rows(&xs, m);
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
            let got = q.matmul(&x)?;
            let want = x.broadcast_matmul(&deq.t()?)?;
            assert_eq!(got.dims(), [1, m, n]);
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
}
