//! Summary statistics of measurements.

/// The median of `values` (the upper one of an even count; NaN when empty).
pub fn median(values: &[f64]) -> f64 {
    median_of(values).unwrap_or(f64::NAN)
}

/// The median of `values` (the upper one of an even count); `None` when empty.
pub fn median_of(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

/// The mean of `values`; `None` when empty.
pub fn mean_of(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// Appends `x` to a window of recent measurements, dropping the oldest beyond `cap`.
pub fn push_recent<T>(window: &mut Vec<T>, x: T, cap: usize) {
    window.push(x);
    if window.len() > cap {
        window.remove(0);
    }
}
