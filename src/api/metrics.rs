//! The edge service's Prometheus metrics (`GET /metrics`, text format), named after vLLM's and
//! TGI's where they mean the same thing, under the `hat_edge_` prefix.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::edge::EdgeReport;

/// A request's endpoint and HTTP status.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub status: u16,
}

/// Which way bytes went.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabels {
    pub direction: &'static str,
}

/// How a session with the cloud failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub failure: &'static str,
}

/// Every metric the service keeps, registered once.
pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub running: Gauge,
    pub waiting: Gauge,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub request_latency: Histogram,
    pub tokens_per_round: Histogram,
    pub cloud_bytes: Family<DirectionLabels, Counter>,
    pub cloud_failures: Family<FailureLabels, Counter>,
    pub cloud_reconnects: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("hat_edge");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "HTTP requests answered, by endpoint and status", requests.clone());
        let running = Gauge::default();
        registry.register("num_requests_running", "Generations running (each with its own cloud session)", running.clone());
        let waiting = Gauge::default();
        registry.register("num_requests_waiting", "Generations waiting for a free slot (--parallel)", waiting.clone());
        let prompt_tokens = Counter::default();
        registry.register("prompt_tokens", "Prompt tokens prefilled", prompt_tokens.clone());
        let generation_tokens = Counter::default();
        registry.register("generation_tokens", "Tokens generated", generation_tokens.clone());
        // 5 ms … ~41 s.
        let time_to_first_token = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register("time_to_first_token_seconds", "Time from the request to its first token", time_to_first_token.clone());
        // 1 ms … ~8 s.
        let time_per_output_token = Histogram::new(exponential_buckets(0.001, 2.0, 14));
        registry.register("time_per_output_token_seconds", "Mean time between tokens, per request", time_per_output_token.clone());
        let request_latency = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        registry.register("e2e_request_latency_seconds", "Time from the request to its last token", request_latency.clone());
        let tokens_per_round = Histogram::new([1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0]);
        registry.register("tokens_per_round", "Tokens committed per cloud round trip, per request", tokens_per_round.clone());
        let cloud_bytes = Family::<DirectionLabels, Counter>::default();
        registry.register("cloud_bytes", "Bytes exchanged with the cloud (hidden states and framing)", cloud_bytes.clone());
        let cloud_failures = Family::<FailureLabels, Counter>::default();
        registry.register("cloud_failures", "Sessions with the cloud that failed: refused, busy, unreachable, lost", cloud_failures.clone());
        let cloud_reconnects = Counter::default();
        registry.register("cloud_reconnects", "Cloud sessions opened again and replayed after the cloud was lost mid-answer", cloud_reconnects.clone());
        Self {
            registry,
            requests,
            running,
            waiting,
            prompt_tokens,
            generation_tokens,
            time_to_first_token,
            time_per_output_token,
            request_latency,
            tokens_per_round,
            cloud_bytes,
            cloud_failures,
            cloud_reconnects,
        }
    }

    /// Counts one answered request.
    pub fn answered(&self, endpoint: &str, status: u16) {
        self.requests.get_or_create(&RequestLabels { endpoint: endpoint.to_string(), status }).inc();
    }

    /// Records a finished generation (`ttft`, `latency`: from the request's arrival to its
    /// first and last token).
    pub fn generated(&self, r: &EdgeReport, ttft: std::time::Duration, latency: std::time::Duration) {
        self.prompt_tokens.inc_by(r.prompt_tokens as u64);
        self.generation_tokens.inc_by(r.generated_tokens as u64);
        self.time_to_first_token.observe(ttft.as_secs_f64());
        if r.generated_tokens > 1 {
            self.time_per_output_token.observe(r.tbt_ms / 1e3);
        }
        if r.rounds > 0 {
            self.tokens_per_round.observe(r.mean_accepted);
        }
        self.request_latency.observe(latency.as_secs_f64());
        self.cloud_bytes.get_or_create(&DirectionLabels { direction: "up" }).inc_by(r.bytes_up);
        self.cloud_bytes.get_or_create(&DirectionLabels { direction: "down" }).inc_by(r.bytes_down);
        self.cloud_reconnects.inc_by(r.cloud_reconnects as u64);
    }

    /// Counts a failed session with the cloud.
    pub fn cloud_failed(&self, failure: crate::error::CloudFailure) {
        let failure = match failure {
            crate::error::CloudFailure::Refused => "refused",
            crate::error::CloudFailure::Busy => "busy",
            crate::error::CloudFailure::Unreachable => "unreachable",
            crate::error::CloudFailure::Lost => "lost",
        };
        self.cloud_failures.get_or_create(&FailureLabels { failure }).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
