//! SVG charts of an audit: top-1 recovery against K1 for every attack and defence, and the
//! learned inverters' top-1 against the attacker's training pairs.

use super::{Audit, AuditResult};
use crate::util::svg::{chart_to, Series};

/// `(file name without .svg, chart)` for each chart.
pub fn charts(audit: &Audit) -> Vec<(&'static str, String)> {
    let mut by_k1: Vec<Series> = Vec::new();
    let mut by_budget: Vec<Series> = Vec::new();
    // Against K1: the public-weights attacks, and each learned inverter at its largest budget.
    let largest_budget = |r: &AuditResult| {
        let same = audit.results.iter().filter(|o| o.inverter == r.inverter && o.input_layers == r.input_layers && o.defence == r.defence);
        r.train_tokens == same.filter_map(|o| o.train_tokens).max()
    };
    for r in &audit.results {
        if largest_budget(r) {
            push(&mut by_k1, &format!("{} {} ({})", r.inverter, r.direction, r.defence), (r.input_layers as f64, 100.0 * r.top1));
        }
        if let Some(n) = r.train_tokens.filter(|&n| n > 0) {
            push(&mut by_budget, &format!("{} K1={} ({})", r.inverter, r.input_layers, r.defence), (n as f64, 100.0 * r.top1));
        }
    }
    vec![
        ("audit-by-input-layers", chart_to("Content tokens recovered (top-1) by the device's input layers", "input layers on the device (K1)", "top-1 recovery, %", &by_k1, Some(100.0))),
        ("audit-by-budget", chart_to("Learned inverters against the attacker's training pairs", "attacker's (state, token) pairs", "top-1 recovery, %", &by_budget, Some(100.0))),
    ]
}

/// Adds `point` to the series named `name`, creating it.
fn push(series: &mut Vec<Series>, name: &str, point: (f64, f64)) {
    match series.iter_mut().find(|s| s.name == name) {
        Some(s) => s.points.push(point),
        None => series.push(Series { name: name.to_string(), points: vec![point], markers: false }),
    }
}
