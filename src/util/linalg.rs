//! Small dense linear algebra in f64 for least-squares fits (ridge probes, recovering a
//! rotation): the inverse of a symmetric positive (semi-)definite matrix by Cholesky; and a
//! standard normal draw from any seeded generator.

use crate::error::{Error, Result};

/// `(a + ridge·I)⁻¹` for a symmetric positive semi-definite `a` (Cholesky), flattened row-major.
pub fn invert_spd(mut a: Vec<Vec<f64>>, ridge: f64) -> Result<Vec<f64>> {
    let n = a.len();
    for (i, row) in a.iter_mut().enumerate() {
        row[i] += ridge.max(1e-12);
    }
    // a = L Lᵀ, L in the lower triangle.
    for j in 0..n {
        let d = a[j][j] - (0..j).map(|k| a[j][k] * a[j][k]).sum::<f64>();
        if d <= 0.0 || !d.is_finite() {
            return Err(Error::invalid("a linear system to solve is singular (a least-squares fit had too little data)"));
        }
        a[j][j] = d.sqrt();
        for i in j + 1..n {
            a[i][j] = (a[i][j] - (0..j).map(|k| a[i][k] * a[j][k]).sum::<f64>()) / a[j][j];
        }
    }
    let mut inv = vec![0f64; n * n];
    for c in 0..n {
        // Solve L z = e_c, then Lᵀ x = z.
        let mut z = vec![0f64; n];
        for i in 0..n {
            let e = if i == c { 1.0 } else { 0.0 };
            z[i] = (e - (0..i).map(|k| a[i][k] * z[k]).sum::<f64>()) / a[i][i];
        }
        for i in (0..n).rev() {
            let x = (z[i] - (i + 1..n).map(|k| a[k][i] * inv[k * n + c]).sum::<f64>()) / a[i][i];
            inv[i * n + c] = x;
        }
    }
    Ok(inv)
}

/// One draw of a standard normal variable (Box–Muller), from a generator the caller seeds.
pub fn standard_normal(rng: &mut impl rand::Rng) -> f64 {
    (-2.0 * (1.0 - rng.random::<f64>()).ln()).sqrt() * (std::f64::consts::TAU * rng.random::<f64>()).cos()
}
