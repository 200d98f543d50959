//! The cloud's Prometheus metrics (`serve-cloud --metrics ADDR`, text format), in a registry of
//! its own (so that a cloud and an edge can share a process), named in the style of vLLM's and
//! TGI's under the `hat_cloud_` prefix.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::error::{Error, Result};
use crate::net::protocol::ErrorCode;

/// A block's kind: a sequence of positions, or a draft tree.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

/// An error code sent to an edge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: &'static str,
}

/// Every metric the cloud keeps.
pub struct CloudMetrics {
    registry: Registry,
    pub sessions_active: Gauge,
    pub sessions: Counter,
    pub errors: Family<CodeLabels, Counter>,
    pub blocks: Family<KindLabels, Counter>,
    pub rows: Family<KindLabels, Counter>,
    pub probes: Counter,
    pub pending_notices: Counter,
    pub pass_seconds: Histogram,
    pub pass_rows: Histogram,
    pub pass_blocks: Histogram,
    pub queue_wait_seconds: Histogram,
    pub bytes_received: Counter,
    pub bytes_sent: Counter,
    resident_memory: Gauge,
}

impl Default for CloudMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl CloudMetrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("hat_cloud");
        let sessions_active = Gauge::default();
        r.register("sessions_active", "Edge sessions open", sessions_active.clone());
        let sessions = Counter::default();
        r.register("sessions", "Edge sessions opened", sessions.clone());
        let errors = Family::<CodeLabels, Counter>::default();
        r.register("errors", "Error frames sent to edges, by code (Busy: refused at the session limit)", errors.clone());
        let blocks = Family::<KindLabels, Counter>::default();
        r.register("blocks", "Blocks of hidden states computed, by kind (sequence or tree)", blocks.clone());
        let rows = Family::<KindLabels, Counter>::default();
        r.register("rows", "Positions computed through the middle layers, by block kind", rows.clone());
        let probes = Counter::default();
        r.register("probes", "Link probes answered", probes.clone());
        let pending_notices = Counter::default();
        r.register("pending_notices", "Notices to edges that their block is still queued or computing", pending_notices.clone());
        // 0.5 ms … ~16 s.
        let pass_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        r.register("pass_seconds", "Time of one pass through the middle layers", pass_seconds.clone());
        let pass_rows = Histogram::new(exponential_buckets(1.0, 2.0, 13));
        r.register("pass_rows", "Positions per pass through the middle layers", pass_rows.clone());
        let pass_blocks = Histogram::new(exponential_buckets(1.0, 2.0, 7));
        r.register("pass_blocks", "Blocks (sessions) per pass: the batch size", pass_blocks.clone());
        let queue_wait_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        r.register("queue_wait_seconds", "Time a block waited, received and checked, before its pass began", queue_wait_seconds.clone());
        let bytes_received = Counter::default();
        r.register("bytes_received", "Frame bytes received from edges", bytes_received.clone());
        let bytes_sent = Counter::default();
        r.register("bytes_sent", "Frame bytes sent to edges", bytes_sent.clone());
        let resident_memory = Gauge::default();
        r.register("resident_memory_bytes", "The server process's resident memory (Linux; 0 elsewhere)", resident_memory.clone());
        Self { registry: r, sessions_active, sessions, errors, blocks, rows, probes, pending_notices, pass_seconds, pass_rows, pass_blocks, queue_wait_seconds, bytes_received, bytes_sent, resident_memory }
    }

    /// Counts an error frame sent.
    pub fn error(&self, code: ErrorCode) {
        self.errors.get_or_create(&CodeLabels { code: code.name() }).inc();
    }

    /// Counts a block computed.
    pub fn block(&self, tree: bool, rows: usize) {
        let kind = KindLabels { kind: if tree { "tree" } else { "sequence" } };
        self.blocks.get_or_create(&kind).inc();
        self.rows.get_or_create(&kind).inc_by(rows as u64);
    }

    /// Records a pass through the middle layers: its blocks, rows and time.
    pub fn pass(&self, blocks: usize, rows: usize, seconds: f64) {
        self.pass_seconds.observe(seconds);
        self.pass_rows.observe(rows as f64);
        self.pass_blocks.observe(blocks as f64);
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        self.resident_memory.set(resident_bytes() as i64);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// This process's resident memory, from `VmRSS` in `/proc/self/status` (0 where there is none).
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).and_then(|v| v.parse::<u64>().ok());
    kib.unwrap_or(0) * 1024
}

/// Serves `GET /metrics` on `listener` until the runtime stops.
pub async fn serve(metrics: Arc<CloudMetrics>, listener: tokio::net::TcpListener) -> Result<()> {
    use axum::http::header;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move { ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], m.render()) }
        }),
    );
    axum::serve(listener, app).await.map_err(|e| Error::invalid(format!("the metrics server failed: {e}")))
}
