//! The OpenAI API's shapes: requests as clients send them (absent parameters take OpenAI's
//! defaults), checked into a [`Job`]; responses, stream chunks and errors as its clients expect.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::decode::{SamplingParams, StopReason};
use crate::edge::EdgeReport;
use crate::io::tokenizer::{HatTokenizer, Message};

/// Most stop sequences per request (OpenAI's limit).
pub const MAX_STOPS: usize = 4;

/// Which endpoint a job came from: it decides the response's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completion => "/v1/completions",
        }
    }
}

/// `stop`: one string or a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// A message's `content`: a string, or a list of parts of which only text is supported.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The parameters both endpoints share; unknown fields are ignored, as OpenAI-compatible
/// servers do.
#[derive(Debug, Deserialize)]
struct Common {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    n: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<ChatMessage>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Prompt,
    #[serde(flatten)]
    common: Common,
}

/// One checked request: the prompt's token ids and how to generate.
#[derive(Debug, Clone)]
pub struct Job {
    pub endpoint: Endpoint,
    pub ids: Vec<u32>,
    pub sampling: SamplingParams,
    /// Most tokens to generate; `None`: until the end of the answer or of the context.
    pub max_tokens: Option<usize>,
    pub stops: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

/// A request the API refuses: HTTP status, OpenAI error type, the parameter at fault.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub param: Option<&'static str>,
    pub message: String,
    /// Seconds a client should wait before retrying (busy).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn bad_request(param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self { status: 400, kind: "invalid_request_error", param, message: message.into(), retry_after: None }
    }

    pub fn unavailable(message: impl Into<String>, retry_after: Option<u64>) -> Self {
        Self { status: 503, kind: "service_unavailable", param: None, message: message.into(), retry_after }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self { status: 500, kind: "server_error", param: None, message: message.into(), retry_after: None }
    }

    /// OpenAI's error object.
    pub fn body(&self) -> Value {
        json!({ "error": { "message": self.message, "type": self.kind, "param": self.param, "code": Value::Null } })
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(None, format!("the request body is not valid JSON for this endpoint: {e}")))
}

/// The shared parameters, checked.
struct Checked {
    sampling: SamplingParams,
    max_tokens: Option<usize>,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
}

impl Checked {
    fn job(self, endpoint: Endpoint, ids: Vec<u32>) -> Job {
        Job { endpoint, ids, sampling: self.sampling, max_tokens: self.max_tokens, stops: self.stops, stream: self.stream, include_usage: self.include_usage }
    }
}

/// Checks the parameters both endpoints share. `default_max_tokens` is the endpoint's default
/// (OpenAI: none for chat, 16 for completions); `random_seed` seeds requests that give none.
fn check_common(c: Common, model_id: &str, default_max_tokens: Option<usize>, random_seed: u64) -> Result<Checked, ApiError> {
    if let Some(m) = &c.model {
        if m != model_id && !m.is_empty() {
            return Err(ApiError { status: 404, kind: "invalid_request_error", param: Some("model"), message: format!("the model `{m}` does not exist; this server serves `{model_id}`"), retry_after: None });
        }
    }
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_request(Some("n"), "only n = 1 is supported"));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad_request(Some("temperature"), format!("temperature {temperature} is not between 0 and 2")));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request(Some("top_p"), format!("top_p {top_p} is not in (0, 1]")));
    }
    let max_tokens = c.max_completion_tokens.or(c.max_tokens).or(default_max_tokens);
    if max_tokens == Some(0) {
        return Err(ApiError::bad_request(Some("max_tokens"), "max_tokens must be at least 1"));
    }
    let stops = match c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stops.len() > MAX_STOPS {
        return Err(ApiError::bad_request(Some("stop"), format!("at most {MAX_STOPS} stop sequences, not {}", stops.len())));
    }
    let sampling = SamplingParams { temperature, top_p: (top_p < 1.0).then_some(top_p), top_k: None, seed: c.seed.unwrap_or(random_seed) };
    sampling.validate().map_err(|e| ApiError::bad_request(None, e.to_string()))?;
    let stream = c.stream.unwrap_or(false);
    let include_usage = c.stream_options.is_some_and(|o| o.include_usage);
    Ok(Checked { sampling, max_tokens, stops, stream, include_usage })
}

/// Parses and checks a chat completion request; the messages go through the model's chat
/// template.
pub fn chat_job(body: &[u8], tokenizer: &HatTokenizer, model_id: &str, random_seed: u64) -> Result<Job, ApiError> {
    let req: ChatRequest = parse(body)?;
    if req.messages.is_empty() {
        return Err(ApiError::bad_request(Some("messages"), "messages must not be empty"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        if !["system", "developer", "user", "assistant", "tool"].contains(&m.role.as_str()) {
            return Err(ApiError::bad_request(Some("messages"), format!("messages[{i}]: unknown role `{}`", m.role)));
        }
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => return Err(ApiError::bad_request(Some("messages"), format!("messages[{i}]: content parts of type `{kind}` are not supported (text only)"))),
                    }
                }
                text
            }
        };
        // Templates written for "system" do not know OpenAI's newer name for it.
        let role = if m.role == "developer" { "system".to_string() } else { m.role };
        messages.push(Message { role, content });
    }
    let template = tokenizer.chat_template.as_ref().ok_or_else(|| ApiError::bad_request(None, "this model has no chat template: use /v1/completions"))?;
    let text = template.render(&messages, true).map_err(|e| ApiError::bad_request(Some("messages"), e.to_string()))?;
    let ids = tokenizer.encode(&text).map_err(|e| ApiError::bad_request(Some("messages"), e.to_string()))?;
    Ok(check_common(req.common, model_id, None, random_seed)?.job(Endpoint::Chat, ids))
}

/// Parses and checks a (legacy) completion request: the prompt is raw text (BOS added when the
/// model wants one).
pub fn completion_job(body: &[u8], tokenizer: &HatTokenizer, model_id: &str, random_seed: u64) -> Result<Job, ApiError> {
    let req: CompletionRequest = parse(body)?;
    let prompt = match req.prompt {
        Prompt::One(p) => p,
        Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Many(v) => return Err(ApiError::bad_request(Some("prompt"), format!("one prompt per request, not {}", v.len()))),
    };
    let ids = tokenizer.encode_prompt(&prompt, false).map_err(|e| ApiError::bad_request(Some("prompt"), e.to_string()))?;
    if ids.is_empty() {
        return Err(ApiError::bad_request(Some("prompt"), "the prompt is empty"));
    }
    Ok(check_common(req.common, model_id, Some(16), random_seed)?.job(Endpoint::Completion, ids))
}

/// OpenAI's `finish_reason`: `stop` (end of the answer or a stop sequence) or `length`.
pub fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::Eos | StopReason::Stopped => "stop",
        StopReason::MaxTokens | StopReason::ContextFull => "length",
    }
}

/// The identity every object of one response carries.
#[derive(Debug, Clone)]
pub struct ResponseId {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub endpoint: Endpoint,
}

impl ResponseId {
    pub fn new(endpoint: Endpoint, model: &str, n: u64) -> Self {
        let created = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let prefix = if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" };
        Self { id: format!("{prefix}-hat{created:x}{n:06x}"), created, model: model.to_string(), endpoint }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    /// The whole answer, not streamed.
    pub fn response(&self, text: &str, finish: &str, usage: Value, hat: Value) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => json!({ "index": 0, "message": { "role": "assistant", "content": text }, "logprobs": null, "finish_reason": finish }),
            Endpoint::Completion => json!({ "index": 0, "text": text, "logprobs": null, "finish_reason": finish }),
        };
        json!({ "id": self.id, "object": self.object(false), "created": self.created, "model": self.model, "choices": [choice], "usage": usage, "hat": hat })
    }

    /// One streamed chunk: a piece of text (the first chat chunk also carries the role), or
    /// the last one with its finish reason.
    pub fn chunk(&self, text: Option<&str>, first: bool, finish: Option<&str>) -> Value {
        let choice = match self.endpoint {
            Endpoint::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), "assistant".into());
                }
                if let Some(t) = text {
                    delta.insert("content".into(), t.into());
                }
                json!({ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish })
            }
            Endpoint::Completion => json!({ "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish }),
        };
        json!({ "id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [choice] })
    }

    /// The usage chunk that ends a stream when the client asked for it (no choices).
    pub fn usage_chunk(&self, usage: Value, hat: Value) -> Value {
        json!({ "id": self.id, "object": self.object(true), "created": self.created, "model": self.model, "choices": [], "usage": usage, "hat": hat })
    }
}

/// OpenAI's `usage` object.
pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({ "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens })
}

/// hat's own figures for one answer, in the extra `hat` field standard clients ignore.
pub fn hat_figures(r: &EdgeReport) -> Value {
    json!({
        "mode": r.mode,
        "ttft_ms": r.ttft_ms,
        "tbt_ms": r.tbt_ms,
        "rounds": r.rounds,
        "tokens_per_round": r.mean_accepted,
        "acceptance_rate": r.acceptance_rate,
        "bytes_up": r.bytes_up,
        "bytes_down": r.bytes_down,
        "device_compute_ms": r.device_compute_ms,
        "cloud_compute_ms": r.cloud_compute_ms,
        "network_wait_ms": r.network_wait_ms,
        "cloud_reconnects": r.cloud_reconnects,
        "recovery_ms": r.recovery_ms,
        "unverified_from": r.unverified_from,
        "cloud_error": r.cloud_error,
        "chunk_plan": r.chunk_plan,
        "stop_reason": r.stop_reason,
    })
}
