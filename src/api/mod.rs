//! `hat serve-edge`: the device side as a long-running local service that speaks the OpenAI
//! API, so that applications use hat by changing a base URL.
//!
//! Routes: `POST /v1/chat/completions` and `POST /v1/completions` (streamed as server-sent
//! events with `stream: true`), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus).
//! Each request is its own cloud session; at most `parallel` generate at once, the others wait.
//! A generation runs on a blocking thread and hands its text to the request's task through a
//! channel; when the client goes away the channel closes and the generation (and its cloud
//! session) ends at the next token.
//!
//! One tokio runtime serves the HTTP connections and every cloud session's network tasks
//! ([`crate::net::ConnectOptions::runtime`]).
//!
//! - [`openai`]: request parsing and checks, response and chunk shapes, errors;
//! - [`stop`]: stop sequences over streamed text;
//! - [`metrics`]: the Prometheus registry;
//! - `background`: [`BackgroundEdge`], the service on a thread of its own (tests, benchmarks);
//! - here: the service, its routes and the generation thread.
//!
//! May use [`crate::edge`], [`crate::net`], [`crate::profile`], [`crate::split`],
//! [`crate::decode`], [`crate::io`] and [`crate::util`]; nothing below uses it.

mod background;
pub mod metrics;
pub mod openai;
pub mod stop;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedSender;

use crate::decode::Flow;
use crate::edge::{Drafter, EdgeOptions, EdgeReport, Mode};
use crate::error::{CloudFailure, Error, Result};
use crate::io::tokenizer::TextStream;
use crate::net::{ConnectOptions, ResilientLink};
use crate::profile::Profile;
use crate::split::DeviceBundle;
pub use background::BackgroundEdge;
pub use metrics::Metrics;
use openai::{ApiError, Endpoint, Job, ResponseId};
use stop::StopMatcher;

/// How the service generates and whom it serves.
#[derive(Clone)]
pub struct ServiceConfig {
    /// The clouds and how to reach them, in order of preference (their `runtime` is replaced
    /// by the service's).
    pub clouds: Vec<ConnectOptions>,
    /// How long a generation looks for a cloud again after losing one (see
    /// [`crate::net::ResilientLink`]).
    pub cloud_timeout: Duration,
    pub mode: Mode,
    /// γ: most tokens drafted per round (hat mode).
    pub draft_len: usize,
    /// Fixed prefill chunks of this many positions (0 = the whole prompt), or `None` to plan
    /// each prompt's chunks from the profile, the cloud's cost model and the link.
    pub chunk_size: Option<usize>,
    /// The device's profile for planning, and its path (see [`crate::profile::plan_session`]).
    pub profile: Option<(Profile, PathBuf)>,
    /// The model's id in the API (`/v1/models`, the `model` field).
    pub model_id: String,
    /// Bearer token clients must send, if any.
    pub api_key: Option<String>,
    /// Most generations at once.
    pub parallel: usize,
    /// What a generation does when its cloud is lost for good.
    pub fallback: crate::edge::Fallback,
}

/// The service: the device bundle and its drafter, loaded once, and the settings.
pub struct EdgeService {
    bundle: DeviceBundle,
    drafter: Drafter,
    config: ServiceConfig,
    pub metrics: Metrics,
    slots: Arc<tokio::sync::Semaphore>,
    requests: AtomicU64,
}

/// What a generation thread tells its request.
#[derive(Debug)]
enum Event {
    /// The cloud session is open and the prompt is going up.
    Started,
    /// Text that is final (never a stop sequence or a part of one).
    Text(String),
    /// The answer ended: why, with the generation's report and the time to its first token
    /// from the request's arrival.
    Done { finish: &'static str, report: Box<EdgeReport>, ttft: Duration },
    /// The answer failed; `tokens` were generated before.
    Failed { error: ApiError, tokens: usize },
}

impl EdgeService {
    /// A service for `bundle`, drafting with `drafter` (prepared for `config.mode`).
    pub fn new(bundle: DeviceBundle, drafter: Drafter, config: ServiceConfig) -> Result<Self> {
        if config.parallel == 0 {
            return Err(Error::invalid("--parallel must be at least 1"));
        }
        if config.clouds.is_empty() {
            return Err(Error::invalid("no cloud address given"));
        }
        if config.model_id.is_empty() {
            return Err(Error::invalid("the model id must not be empty"));
        }
        Ok(Self { bundle, drafter, slots: Arc::new(tokio::sync::Semaphore::new(config.parallel)), config, metrics: Metrics::new(), requests: AtomicU64::new(0) })
    }

    pub fn model_id(&self) -> &str {
        &self.config.model_id
    }

    /// The routes, ready for [`axum::serve`].
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completion))
            .route("/v1/models", get(models))
            .route("/health", get(health))
            .route("/metrics", get(prometheus))
            .fallback(not_found)
            .with_state(self)
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(want) = &self.config.api_key else { return true };
        let sent = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
        crate::util::digest::secrets_match(sent, want)
    }

    /// Answers one generation request.
    async fn generate(self: Arc<Self>, endpoint: Endpoint, headers: HeaderMap, body: Bytes) -> Response {
        let received = Instant::now();
        let answer = self.clone().answer(endpoint, headers, body, received).await;
        let response = match answer {
            Ok(r) => r,
            Err(e) => error_response(&e),
        };
        self.metrics.answered(endpoint.path(), response.status().as_u16());
        response
    }

    async fn answer(self: Arc<Self>, endpoint: Endpoint, headers: HeaderMap, body: Bytes, received: Instant) -> Result<Response, ApiError> {
        if !self.authorized(&headers) {
            return Err(ApiError { status: 401, kind: "invalid_request_error", param: None, message: "a valid API key is required (Authorization: Bearer …)".into(), retry_after: None });
        }
        let seed = rand::random::<u64>();
        let tokenizer = &self.bundle.tokenizer;
        let job = match endpoint {
            Endpoint::Chat => openai::chat_job(&body, tokenizer, &self.config.model_id, seed)?,
            Endpoint::Completion => openai::completion_job(&body, tokenizer, &self.config.model_id, seed)?,
        };
        let limit = self.bundle.input.max_positions();
        if job.ids.len() >= limit {
            return Err(prompt_too_long(job.ids.len(), limit));
        }
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        let id = ResponseId::new(endpoint, &self.config.model_id, n);

        self.metrics.waiting.inc();
        let permit = self.slots.clone().acquire_owned().await;
        self.metrics.waiting.dec();
        let permit = permit.map_err(|_| ApiError::unavailable("the service is shutting down", None))?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let runtime = tokio::runtime::Handle::current();
        let svc = self.clone();
        let job_in = job.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let _running = Running::start(&svc.metrics);
            svc.run(&job_in, runtime, &tx, received);
        });
        // Errors before the session is open get an HTTP status of their own.
        match rx.recv().await {
            Some(Event::Started) => {}
            Some(Event::Failed { error, .. }) => return Err(error),
            other => return Err(ApiError::internal(format!("internal: the generation began with {other:?}"))),
        }
        if job.stream {
            let stream = futures_util::stream::unfold((rx, id, job, true, false), |(mut rx, id, job, first, ended)| async move {
                if ended {
                    return None;
                }
                let (events, first, ended) = match rx.recv().await {
                    Some(Event::Text(t)) => (vec![sse(&id.chunk(Some(&t), first, None))], false, false),
                    Some(Event::Done { finish, report, ttft }) => {
                        let usage = openai::usage(report.prompt_tokens, report.generated_tokens);
                        let hat = hat_figures(&report, ttft);
                        // The usage goes in the last chunk, or, when the client asked for it
                        // (`stream_options.include_usage`), in a chunk of its own after it, as
                        // OpenAI sends it.
                        let mut last = id.chunk(None, first, Some(finish));
                        let mut events = Vec::new();
                        if job.include_usage {
                            events.push(sse(&last));
                            events.push(sse(&id.usage_chunk(usage, hat)));
                        } else {
                            last["usage"] = usage;
                            last["hat"] = hat;
                            events.push(sse(&last));
                        }
                        events.push(SseEvent::default().data("[DONE]"));
                        (events, false, true)
                    }
                    Some(Event::Failed { error, tokens }) => {
                        let mut body = error.body();
                        body["error"]["completion_tokens"] = tokens.into();
                        (vec![sse(&body), SseEvent::default().data("[DONE]")], false, true)
                    }
                    // The generation ended without an answer (it failed unexpectedly).
                    Some(Event::Started) | None => {
                        let error = ApiError::internal("internal: the generation ended without an answer");
                        (vec![sse(&error.body()), SseEvent::default().data("[DONE]")], first, true)
                    }
                };
                Some((futures_util::stream::iter(events.into_iter().map(Ok::<_, std::convert::Infallible>)), (rx, id, job, first, ended)))
            })
            .flatten();
            return Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response());
        }
        let mut text = String::new();
        loop {
            match rx.recv().await {
                Some(Event::Text(t)) => text.push_str(&t),
                Some(Event::Done { finish, report, ttft }) => {
                    let usage = openai::usage(report.prompt_tokens, report.generated_tokens);
                    return Ok(axum::Json(id.response(&text, finish, usage, hat_figures(&report, ttft))).into_response());
                }
                Some(Event::Failed { mut error, tokens }) => {
                    error.message = format!("{} (after {tokens} tokens; the text so far is in `partial_text`)", error.message);
                    let mut response = error_response(&error);
                    if let Ok(mut body) = serde_json::to_value(error.body()) {
                        body["error"]["partial_text"] = text.into();
                        body["error"]["completion_tokens"] = tokens.into();
                        *response.body_mut() = axum::body::Body::from(body.to_string());
                    }
                    return Ok(response);
                }
                Some(Event::Started) | None => return Err(ApiError::internal("internal: the generation ended without an answer")),
            }
        }
    }

    /// Runs one generation on this (blocking) thread, telling the request how it goes.
    fn run(&self, job: &Job, runtime: tokio::runtime::Handle, events: &UnboundedSender<Event>, received: Instant) {
        let mut generated = 0usize;
        if let Err(e) = self.run_inner(job, runtime, events, received, &mut generated) {
            if let Some(f) = e.cloud_failure() {
                self.metrics.cloud_failed(f);
            }
            let _ = events.send(Event::Failed { error: api_error(&e, job.ids.len()), tokens: generated });
        }
    }

    fn run_inner(&self, job: &Job, runtime: tokio::runtime::Handle, events: &UnboundedSender<Event>, received: Instant, generated: &mut usize) -> Result<()> {
        let bundle = &self.bundle;
        let clouds = self.config.clouds.iter().map(|c| ConnectOptions { runtime: Some(runtime.clone()), ..c.clone() }).collect();
        let mut link = ResilientLink::connect(clouds, self.config.cloud_timeout)?;
        let (wire, max_context) = (link.session().dtype(), link.session().max_context);
        let limit = max_context.min(bundle.input.max_positions());
        if job.ids.len() >= limit {
            return Err(Error::ContextTooLong { needed: job.ids.len() + 1, limit });
        }
        let drafting = self.config.mode == Mode::Hat && self.config.draft_len > 0;
        let profile = self.config.profile.as_ref().map(|(p, path)| (p, path.as_path()));
        let choice = crate::profile::choose_chunking(bundle, &self.drafter, link.session(), profile, job.ids.len(), wire, drafting, self.config.chunk_size);
        let room = limit - job.ids.len();
        let opts = EdgeOptions {
            mode: self.config.mode,
            draft_len: self.config.draft_len,
            chunking: choice.chunking,
            sampling: job.sampling,
            max_tokens: job.max_tokens.map_or(room, |m| m.min(room)),
            max_context,
            draft: self.drafter.options,
            fallback: self.config.fallback,
        };
        if events.send(Event::Started).is_err() {
            return Ok(());
        }
        let mut text = TextStream::new(&bundle.tokenizer);
        let mut stops = StopMatcher::new(job.stops.clone());
        let mut first_token = None;
        let mut stopped_by_sequence = false;
        let report = crate::edge::generate_with(bundle, &self.drafter, &mut link, &job.ids, &opts, |id| {
            *generated += 1;
            first_token.get_or_insert_with(|| received.elapsed());
            if let Some(piece) = text.push(id)? {
                let (shown, stop) = stops.push(&piece);
                if !shown.is_empty() && events.send(Event::Text(shown)).is_err() {
                    return Ok(Flow::Stop);
                }
                if stop {
                    stopped_by_sequence = true;
                    return Ok(Flow::Stop);
                }
            }
            // The client went away: end the generation and its cloud session now.
            Ok(if events.is_closed() { Flow::Stop } else { Flow::Continue })
        })?;
        drop(link);
        if report.stop_reason == crate::decode::StopReason::Stopped && !stopped_by_sequence {
            return Ok(()); // nobody is listening
        }
        if !stopped_by_sequence {
            let (rest, _) = stops.push(&text.finish()?.unwrap_or_default());
            let rest = rest + &stops.finish();
            if !rest.is_empty() {
                let _ = events.send(Event::Text(rest));
            }
        }
        let ttft = first_token.unwrap_or_default();
        self.metrics.generated(&report, ttft, received.elapsed());
        let _ = events.send(Event::Done { finish: openai::finish_reason(report.stop_reason), report: Box::new(report), ttft });
        Ok(())
    }
}

/// Counts a generation as running for as long as it lives, however it ends.
struct Running<'a>(&'a Metrics);

impl<'a> Running<'a> {
    fn start(metrics: &'a Metrics) -> Self {
        metrics.running.inc();
        Self(metrics)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.dec();
    }
}

/// hat's figures for an answer, with the TTFT the client saw (from its request's arrival:
/// connecting and planning included).
fn hat_figures(report: &EdgeReport, ttft: Duration) -> Value {
    let mut v = openai::hat_figures(report);
    v["request_ttft_ms"] = (ttft.as_secs_f64() * 1e3).into();
    v
}

fn sse(v: &Value) -> SseEvent {
    SseEvent::default().data(v.to_string())
}

fn prompt_too_long(len: usize, limit: usize) -> ApiError {
    ApiError::bad_request(Some("messages"), format!("the prompt has {len} tokens; this model's context is {limit} tokens, and at least one must be left to generate"))
}

/// The API's error for a library error.
fn api_error(e: &Error, prompt_len: usize) -> ApiError {
    match e {
        Error::ContextTooLong { limit, .. } => prompt_too_long(prompt_len, *limit),
        Error::Cloud { failure: CloudFailure::Busy, message } => ApiError::unavailable(format!("the cloud is busy: {message}"), Some(1)),
        Error::Cloud { failure: CloudFailure::Unreachable | CloudFailure::Lost, message } => ApiError::unavailable(message.clone(), Some(5)),
        Error::Cloud { failure: CloudFailure::Refused, message } => ApiError::unavailable(message.clone(), None),
        Error::InvalidInput(m) => ApiError::bad_request(None, m.clone()),
        e => ApiError::internal(e.to_string()),
    }
}

fn error_response(e: &ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, axum::Json(e.body())).into_response();
    if let Some(s) = e.retry_after {
        response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    if e.status == 401 {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

async fn chat(State(svc): State<Arc<EdgeService>>, headers: HeaderMap, body: Bytes) -> Response {
    svc.generate(Endpoint::Chat, headers, body).await
}

async fn completion(State(svc): State<Arc<EdgeService>>, headers: HeaderMap, body: Bytes) -> Response {
    svc.generate(Endpoint::Completion, headers, body).await
}

async fn models(State(svc): State<Arc<EdgeService>>, headers: HeaderMap) -> Response {
    if !svc.authorized(&headers) {
        return error_response(&ApiError { status: 401, kind: "invalid_request_error", param: None, message: "a valid API key is required (Authorization: Bearer …)".into(), retry_after: None });
    }
    axum::Json(json!({ "object": "list", "data": [{ "id": svc.config.model_id, "object": "model", "created": 0, "owned_by": "hat" }] })).into_response()
}

async fn health(State(svc): State<Arc<EdgeService>>) -> Response {
    axum::Json(json!({ "status": "ok", "model": svc.config.model_id, "mode": svc.config.mode, "running": svc.metrics.running.get(), "waiting": svc.metrics.waiting.get() })).into_response()
}

async fn prometheus(State(svc): State<Arc<EdgeService>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], svc.metrics.render()).into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    error_response(&ApiError { status: 404, kind: "invalid_request_error", param: None, message: format!("no route {uri}: this server has /v1/chat/completions, /v1/completions, /v1/models, /health and /metrics"), retry_after: None })
}

/// Serves `service` on `listener` until `shutdown` completes.
pub async fn serve(service: Arc<EdgeService>, listener: tokio::net::TcpListener, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<()> {
    axum::serve(listener, service.router()).with_graceful_shutdown(shutdown).await.map_err(|e| Error::invalid(format!("the HTTP server failed: {e}")))
}
