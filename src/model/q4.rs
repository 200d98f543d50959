//! Weights that are exactly 4-bit affine blocks, held as those blocks: the LLM path's small-m
//! matmuls read a fifth of the bytes and compute **the same bits** as from f32.
//!
//! The default model's GGUF stores every decoder-layer matrix as Q4_1: blocks of 32 weights
//! `w = q · d + m`, `q` in 0..16 and `d`, `m` f16, and loading decodes them to f32 (rounding
//! the product, then the sum). A decode step is memory-bound, so those f32 matrices, four bytes
//! per weight, cost the time: the 26 middle layers, 364 MB, take ~19 ms on one core. When every
//! block of an f32 matrix is such a block, [`PackedQ4::detect`] finds its `d`, `m` and indices
//! and checks that they give back every value bit for bit (else the matrix stays f32 alone), so
//! the split bundle's f32 files, the GGUF and anything else that holds these values qualify
//! alike, and nothing is approximated. [`PackedQ4::matmul`] ([`crate::model::kernels::q4`])
//! rebuilds each block's sixteen values in a register and multiplies exactly as the f32 small-m
//! kernel does, in the same order: a block of rows gives the same bits either way, so greedy
//! output stays `hat generate`'s, and a split still reproduces the unsplit model.
//!
//! Used for every block of the LLM path where the CPU has AVX-512 ([`crate::model::kernels`]'s
//! `Isa`): decode steps, verification blocks and trees (where the f32 small-m kernel would run:
//! the same bits) and prefill chunks (where gemm over the f32 weights ran: one core took 92 ms
//! for a 16-row block of the 26 middle layers, this kernel 60; long blocks go in slices of
//! [`EXACT_ROWS`] rows and cost about what gemm does, ~0.11 ms per row and layer). So a packed
//! model computes every projection of a row the same way whatever the block, prompts included.
//! Elsewhere the f32 weights serve as before. `HAT_PACKED_WEIGHTS=off` keeps every matrix f32
//! (to measure one against the other).
//! Trainable weights are never packed (a packed copy would not follow their updates).

use candle_core::Tensor;
use half::f16;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::kernels::{Isa, EXACT_ROWS};

/// Weights per block.
const BLOCK: usize = 32;
/// Weight rows per parallel task (as the f32 kernel's).
const ROWS_PER_TASK: usize = 32;

/// An `(rows, cols)` matrix of 4-bit affine blocks along each row: `w[j, 32b + i] = fl(fl(q ·
/// d) + m)` with `(d, m) = dm[j * cols / 32 + b]` and `q` the low nibble of `qs[(j * cols / 32 +
/// b) * 16 + i]` for `i < 16`, the high nibble of byte `i - 16` after.
#[derive(Debug, Clone)]
pub struct PackedQ4 {
    qs: Vec<u8>,
    dm: Vec<[f32; 2]>,
    rows: usize,
    cols: usize,
}

/// Whether packing is on (`HAT_PACKED_WEIGHTS=off` turns it off) and the kernel can run here.
pub fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| Isa::detected() == Isa::Avx512 && std::env::var("HAT_PACKED_WEIGHTS").as_deref() != Ok("off"))
}

impl PackedQ4 {
    /// The blocks of `w` `(rows, cols)` (f32 on the CPU, `cols` a multiple of 32), if every
    /// value of it is one of its block's `fl(fl(q · d) + m)` for f16 `d >= 0`, `m` (checked bit
    /// for bit); `None` otherwise, when packing is off ([`enabled`]), or for a trainable
    /// tensor.
    pub fn detect(w: &Tensor) -> Result<Option<Self>> {
        let Ok((rows, cols)) = w.dims2() else { return Ok(None) };
        if !enabled() || w.track_op() || !crate::model::kernels::is_cpu_f32(w) || cols % BLOCK != 0 || rows == 0 {
            return Ok(None);
        }
        // The values in place (a copy would page in the whole matrix again).
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) = &*storage else { return Ok(None) };
        let Some((start, end)) = layout.contiguous_offsets() else { return Ok(None) };
        let values = &data[start..end];
        let nb = cols / BLOCK;
        // Each row's blocks straight into the matrix's buffers; any row that is not Q4_1 blocks
        // stops the search.
        let (mut qs, mut dm) = (vec![0u8; rows * nb * 16], vec![[0f32; 2]; rows * nb]);
        let all_blocks = values.par_chunks(cols).zip(qs.par_chunks_mut(nb * 16)).zip(dm.par_chunks_mut(nb)).all(|((row, qs), dm)| {
            for ((block, qs), dm) in row.chunks_exact(BLOCK).zip(qs.chunks_exact_mut(16)).zip(dm.iter_mut()) {
                let Some((d, m, q)) = fit_block(block) else { return false };
                for (i, byte) in qs.iter_mut().enumerate() {
                    *byte = q[i] | (q[i + 16] << 4);
                }
                *dm = [d, m];
            }
            true
        });
        if !all_blocks {
            return Ok(None);
        }
        Ok(Some(Self { qs, dm, rows, cols }))
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held (indices and block scales).
    pub fn bytes(&self) -> usize {
        self.qs.len() + 8 * self.dm.len()
    }

    /// The f32 matrix it holds, `(rows, cols)` row-major.
    pub fn decode(&self) -> Vec<f32> {
        let nb = self.cols / BLOCK;
        let mut out = Vec::with_capacity(self.rows * self.cols);
        for (at, &[d, m]) in self.dm.iter().enumerate() {
            let bytes = &self.qs[at * 16..(at + 1) * 16];
            out.extend(bytes.iter().map(|&b| value(b & 15, d, m)));
            out.extend(bytes.iter().map(|&b| value(b >> 4, d, m)));
        }
        debug_assert_eq!(out.len(), self.rows * nb * BLOCK);
        out
    }

    /// `x · wᵀ` for `x` f32 `(..., cols)` with at most [`EXACT_ROWS`] rows on the CPU: `(...,
    /// rows)`, bit for bit the f32 small-m kernel's product with [`PackedQ4::decode`].
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = self.cols;
        if dims.last() != Some(&k) {
            return Err(Error::invalid(format!("q4 matmul: input {dims:?} does not end in {k}")));
        }
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let m = xs.len() / k.max(1);
        // Every row computes alone (the same bits in any block), so a long block (a prompt
        // chunk) goes in slices; a short one, every decode step, straight.
        let out = if m <= EXACT_ROWS {
            self.matmul_rows(&xs, m)?
        } else {
            let mut out = Vec::with_capacity(m * self.rows);
            for slice in xs.chunks(EXACT_ROWS * k) {
                out.extend_from_slice(&self.matmul_rows(slice, slice.len() / k)?);
            }
            out
        };
        let mut shape = dims;
        if let Some(last) = shape.last_mut() {
            *last = self.rows;
        }
        Ok(Tensor::from_vec(out, shape, x.device())?)
    }

    /// `x` `(m, cols)` row-major → `(m, rows)` row-major.
    fn matmul_rows(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        if !enabled() {
            return Err(Error::invalid("q4 matmul: this CPU has no AVX-512 (or HAT_PACKED_WEIGHTS=off)"));
        }
        #[cfg(target_arch = "x86_64")]
        {
            let k = self.cols;
            Ok(crate::model::kernels::by_weight_rows(self.rows, m, ROWS_PER_TASK, true, |j0, block| {
                // SAFETY: `enabled` checked AVX-512; `k` is a multiple of 32; the task's rows are
                // within the matrix; `x` holds `m * k` values.
                unsafe { crate::model::kernels::q4::dots(&self.qs, &self.dm, j0, x, k, m, block) }
            }))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (x, m);
            Err(Error::invalid("q4 matmul: x86-64 only"))
        }
    }
}

/// A block's value for index `q`: the product rounded, then the sum (as decoding Q4_1 does).
#[inline]
fn value(q: u8, d: f32, m: f32) -> f32 {
    (q as f32) * d + m
}

/// `(d, m, q)` with every `value(q[i], d, m)` bit for bit `block[i]`, `d` and `m` f16 values and
/// `d >= 0`: `m` is the block's minimum (the value of index 0), `d` an f16 near `(max − m) / 15`.
fn fit_block(block: &[f32]) -> Option<(f32, f32, [u8; BLOCK])> {
    // (NaN never compares below or above: a block holding one fails the check by bits below.)
    let lo = block.iter().fold(f32::INFINITY, |a, &v| if v < a { v } else { a });
    let hi = block.iter().fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a });
    if !lo.is_finite() || !hi.is_finite() || f16::from_f32(lo).to_f32().to_bits() != lo.to_bits() {
        return None;
    }
    let near = f16::from_f64((hi as f64 - lo as f64) / 15.0).to_bits();
    for bits in [near, near.wrapping_add(1), near.wrapping_sub(1), near.wrapping_add(2), near.wrapping_sub(2)] {
        let d = f16::from_bits(bits).to_f32();
        if !d.is_finite() || d < 0.0 {
            continue;
        }
        let table: [u32; 16] = std::array::from_fn(|q| value(q as u8, d, lo).to_bits());
        // `v - lo >= 0`: adding a half and truncating rounds the estimate (`f32::round` is a
        // library call); the neighbours cover the quotient's own rounding.
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let mut q = [0u8; BLOCK];
        let fits = block.iter().zip(q.iter_mut()).all(|(&v, q)| {
            let guess = (((v - lo) * inv + 0.5) as usize).min(15);
            let v = v.to_bits();
            let found = [guess, guess.saturating_sub(1), (guess + 1).min(15)].into_iter().find(|&c| table[c] == v);
            found.map(|c| *q = c as u8).is_some()
        });
        if fits {
            return Some((d, lo, q));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    /// A random matrix of Q4_1 blocks as decoding a GGUF gives it: per block f16 `d`, `m` and
    /// indices that use 0 and 15, the values `q · d + m` in f32.
    fn q4_matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut out = Vec::with_capacity(rows * cols);
        for _ in 0..rows * cols / BLOCK {
            let d = f16::from_f32(rng.random_range(0.001f32..0.05)).to_f32();
            let m = f16::from_f32(rng.random_range(-0.4f32..0.0)).to_f32();
            for i in 0..BLOCK {
                let q = match i {
                    3 => 0,
                    17 => 15,
                    _ => rng.random_range(0u8..16),
                };
                out.push(value(q, d, m));
            }
        }
        out
    }

    /// Whether the kernel cannot run here (nothing packs then: `detect` gives `None`).
    fn without_kernel() -> bool {
        if !enabled() {
            eprintln!("no AVX-512 here (or HAT_PACKED_WEIGHTS=off): nothing packs, nothing to check");
        }
        !enabled()
    }

    /// Detection gives back every value bit for bit, and refuses what is not such blocks: a
    /// value nudged by one ulp, a width that is not a multiple of 32, trainable weights.
    #[test]
    fn detection_is_lossless_and_refuses_other_matrices() -> Result<()> {
        if without_kernel() {
            return Ok(());
        }
        let dev = Device::Cpu;
        let (rows, cols) = (70, 96);
        let mut values = q4_matrix(rows, cols, 1);
        let w = Tensor::from_vec(values.clone(), (rows, cols), &dev)?;
        let packed = PackedQ4::detect(&w)?.ok_or_else(|| Error::invalid("a Q4_1 matrix did not pack"))?;
        assert_eq!(packed.decode().iter().map(|v| v.to_bits()).collect::<Vec<_>>(), values.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        assert!(packed.bytes() * 5 < rows * cols * 4, "{} bytes", packed.bytes());
        values[cols * 40 + 7] = f32::from_bits(values[cols * 40 + 7].to_bits() + 1);
        assert!(PackedQ4::detect(&Tensor::from_vec(values, (rows, cols), &dev)?)?.is_none(), "one value off its block's grid");
        assert!(PackedQ4::detect(&Tensor::randn(0f32, 1.0, (8, 64), &dev)?)?.is_none(), "random f32");
        assert!(PackedQ4::detect(&Tensor::from_vec(q4_matrix(4, 64, 2), (8, 32), &dev)?.narrow(1, 0, 16)?.contiguous()?)?.is_none(), "16 columns");
        let var = candle_core::Var::from_tensor(&w)?;
        assert!(PackedQ4::detect(var.as_tensor())?.is_none(), "a trainable tensor");
        Ok(())
    }

    /// The packed product is the f32 small-m kernel's, bit for bit, for every row count a
    /// block may have (tiles of 6, 4, 2 and 1 input rows, weight rows in tiles and alone), and
    /// each row as it would be alone, in blocks longer than the small-m kernel's too.
    #[test]
    fn packed_matmul_gives_the_f32_kernels_bits() -> Result<()> {
        if without_kernel() {
            return Ok(());
        }
        let dev = Device::Cpu;
        for (rows, cols) in [(70, 96), (1536 * 2, 576), (9, 1536)] {
            let w = Tensor::from_vec(q4_matrix(rows, cols, rows as u64), (rows, cols), &dev)?;
            let packed = PackedQ4::detect(&w)?.ok_or_else(|| Error::invalid("did not pack"))?;
            for m in [1, 2, 3, 4, 5, 6, 7, 8, 13, EXACT_ROWS] {
                let x = Tensor::randn(0f32, 1.0, (1, m, cols), &dev)?;
                let want = crate::model::kernels::small_m_matmul(&x, &w)?.flatten_all()?.to_vec1::<f32>()?;
                let got = packed.matmul(&x)?;
                assert_eq!(got.dims(), [1, m, rows]);
                let got = got.flatten_all()?.to_vec1::<f32>()?;
                let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "({rows}, {cols}), m = {m}: the packed product differs from the f32 kernel's");
                if m == 7 {
                    for i in 0..m {
                        let alone = packed.matmul(&x.narrow(1, i, 1)?)?.flatten_all()?.to_vec1::<f32>()?;
                        assert_eq!(alone, got[i * rows..(i + 1) * rows], "row {i} alone");
                    }
                }
            }
            // A longer block (a prompt chunk) goes in slices: each row still as alone.
            let m = 2 * EXACT_ROWS + 3;
            let x = Tensor::randn(0f32, 1.0, (1, m, cols), &dev)?;
            let got = packed.matmul(&x)?.flatten_all()?.to_vec1::<f32>()?;
            for i in [0, EXACT_ROWS - 1, EXACT_ROWS, m - 1] {
                let alone = packed.matmul(&x.narrow(1, i, 1)?)?.flatten_all()?.to_vec1::<f32>()?;
                assert_eq!(alone, got[i * rows..(i + 1) * rows], "({rows}, {cols}): row {i} of {m} alone");
            }
            assert!(packed.matmul(&Tensor::zeros((1, 1, cols + 32), candle_core::DType::F32, &dev)?).is_err());
        }
        Ok(())
    }
}
