//! Summary statistics of measurements.

/// The median of `values` (the upper one of an even count; NaN when empty).
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Appends `x` to a window of recent measurements, dropping the oldest beyond `cap`.
pub fn push_recent<T>(window: &mut Vec<T>, x: T, cap: usize) {
    window.push(x);
    if window.len() > cap {
        window.remove(0);
    }
}
