//! `hat serve-edge` over a real socket with a real HTTP client (ureq), against a cloud on
//! loopback, on the default model: greedy answers equal `hat generate`'s, streamed or not;
//! OpenAI's shapes (chunks, usage, `[DONE]`, errors); stop sequences; concurrent requests; a
//! client that disconnects frees its cloud session; a busy or absent cloud is a 503 at once.

use std::io::BufRead;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use hat::api::{BackgroundEdge, EdgeService, ServiceConfig};
use hat::cloud::BackgroundServer;
use hat::decode::{generate, ModelDecoder, SamplingParams};
use hat::edge::{DraftOptions, Drafter, Mode};
use hat::io::source::{LoadedModel, ModelSpec};
use hat::io::tokenizer::Message;
use hat::model::Model;
use hat::net::protocol::WireDtype;
use hat::net::tls::Trust;
use hat::net::{ConnectOptions, LinkEmulation};
use hat::testing::{default_gguf, SplitWorld};
use serde_json::{json, Value};

struct World {
    model: Model,
    split: SplitWorld,
    server: BackgroundServer,
}

const MODEL_ID: &str = "smollm2-test";

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let loaded = LoadedModel::load(&ModelSpec::Gguf(default_gguf().unwrap())).unwrap();
        // In a static, never dropped: its folder goes where later runs clean it up.
        let split = SplitWorld::new_in(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")), &loaded, 2, 2).unwrap();
        let server = split.serve("state", None, 8, 4096).unwrap();
        World { model: loaded.model(DType::F32, &Device::Cpu).unwrap(), split, server }
    })
}

fn connect_options(w: &World, server: &BackgroundServer) -> ConnectOptions {
    ConnectOptions {
        addr: server.addr,
        trust: Trust::Fingerprint(server.fingerprint.clone()),
        token: None,
        split_id: w.split.device.manifest.split_id.clone(),
        hidden_size: w.split.device.manifest.hidden_size,
        dtype: WireDtype::F32,
        emulation: LinkEmulation::default(),
        tap: None,
        connect_timeout: Duration::from_secs(2),
        runtime: None,
    }
}

/// An edge service for the world's split with the shipped adapter, hat mode, f32 on the wire.
fn service(w: &World, connect: ConnectOptions, api_key: Option<&str>, parallel: usize) -> BackgroundEdge {
    let bundle = w.split.device.clone();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(hat::adapter::default_adapter_path(&bundle.manifest));
    let adapter = hat::adapter::Adapter::load(&path, &bundle.manifest, bundle.rope.clone(), &Device::Cpu).unwrap();
    let drafter = Drafter::new(&bundle, &adapter, DraftOptions::default()).unwrap();
    let config = ServiceConfig { clouds: vec![connect], cloud_timeout: Duration::from_secs(10), mode: Mode::Hat, draft_len: 4, chunk_size: Some(16), profile: None, model_id: MODEL_ID.into(), api_key: api_key.map(str::to_string), parallel, fallback: Default::default() };
    let svc = Arc::new(EdgeService::new(bundle, drafter, config).unwrap());
    BackgroundEdge::start(svc, "127.0.0.1:0".parse().unwrap()).unwrap()
}

fn shared_service() -> &'static BackgroundEdge {
    static S: OnceLock<BackgroundEdge> = OnceLock::new();
    S.get_or_init(|| {
        let w = world();
        service(w, connect_options(w, &w.server), None, 4)
    })
}

/// `hat generate`'s greedy text for chat `messages` (or a raw prompt).
fn reference(w: &World, ids: &[u32], max_tokens: usize) -> (String, usize) {
    let eos = &w.split.device.tokenizer.eos_token_ids;
    let t = generate(&mut ModelDecoder::new(&w.model), ids, max_tokens, &SamplingParams::greedy(), eos, |_| Ok(())).unwrap().token_ids;
    (w.split.device.tokenizer.decode(&t, true).unwrap(), t.len())
}

fn chat_ids(w: &World, user: &str) -> Vec<u32> {
    let tok = &w.split.device.tokenizer;
    let text = tok.chat_template.as_ref().unwrap().render(&[Message { role: "system".into(), content: "Be brief.".into() }, Message::user(user)], true).unwrap();
    tok.encode(&text).unwrap()
}

fn chat_body(user: &str, extra: Value) -> Value {
    let mut body = json!({ "model": MODEL_ID, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": user}], "temperature": 0 });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// A response: status, `Retry-After`, body.
struct Reply {
    status: u16,
    retry_after: Option<String>,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn call(method: &str, url: &str, body: Option<&str>, key: Option<&str>) -> Reply {
    let mut req = ureq::request(method, url).timeout(Duration::from_secs(120));
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let result = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    let resp = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let (status, retry_after) = (resp.status(), resp.header("Retry-After").map(str::to_string));
    Reply { status, retry_after, body: resp.into_string().unwrap() }
}

fn post(edge: &BackgroundEdge, path: &str, body: &Value) -> Reply {
    call("POST", &format!("{}{path}", edge.base_url()), Some(&body.to_string()), None)
}

/// The `data:` payloads of a server-sent event stream, in order.
fn sse_data(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ").map(str::to_string)).collect()
}

#[test]
fn answers_equal_hat_generate_streamed_or_not() {
    let w = world();
    let edge = shared_service();
    let models = call("GET", &format!("{}/models", edge.base_url()), None, None).json();
    assert_eq!(models["data"][0]["id"], MODEL_ID);

    let user = "Name three colours of the rainbow.";
    let (want, n) = reference(w, &chat_ids(w, user), 24);
    let r = post(edge, "/chat/completions", &chat_body(user, json!({"max_tokens": 24})));
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], MODEL_ID);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], want.as_str());
    assert_eq!(v["choices"][0]["finish_reason"], if n < 24 { "stop" } else { "length" });
    assert_eq!(v["usage"]["prompt_tokens"], chat_ids(w, user).len());
    assert_eq!(v["usage"]["completion_tokens"], n);
    assert_eq!(v["usage"]["total_tokens"], chat_ids(w, user).len() + n);
    assert!(v["hat"]["tokens_per_round"].as_f64().unwrap() >= 1.0 && v["hat"]["request_ttft_ms"].as_f64().unwrap() > 0.0, "{v}");

    // Streamed: chunks of the same text, the role first, the finish reason and usage last, then
    // [DONE].
    let r = post(edge, "/chat/completions", &chat_body(user, json!({"max_tokens": 24, "stream": true})));
    assert_eq!(r.status, 200, "{}", r.body);
    let data = sse_data(&r.body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert!(chunks.len() >= 3, "{}", r.body);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, want);
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert_eq!(c["id"], chunks[0]["id"]);
    }
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], if n < 24 { "stop" } else { "length" });
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c["choices"][0]["finish_reason"].is_null()));
    assert_eq!(last["usage"]["completion_tokens"], n);

    // stream_options.include_usage: the usage in a chunk of its own, with no choices.
    let r = post(edge, "/chat/completions", &chat_body(user, json!({"max_tokens": 8, "stream": true, "stream_options": {"include_usage": true}})));
    let data = sse_data(&r.body);
    let usage: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"].as_u64().unwrap(), n.min(8) as u64);

    // Completions: raw text, OpenAI's default of 16 tokens.
    let prompt = "The three primary colours are";
    let ids = w.split.device.tokenizer.encode_prompt(prompt, false).unwrap();
    let (want, n) = reference(w, &ids, 16);
    let v = post(edge, "/completions", &json!({"model": MODEL_ID, "prompt": prompt, "temperature": 0})).json();
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["choices"][0]["text"], want.as_str());
    assert_eq!(v["usage"]["completion_tokens"], n);
    let r = post(edge, "/completions", &json!({"prompt": prompt, "temperature": 0, "max_tokens": 16, "stream": true}));
    let data = sse_data(&r.body);
    let text: String = data[..data.len() - 1].iter().map(|d| serde_json::from_str::<Value>(d).unwrap()["choices"][0]["text"].as_str().unwrap().to_string()).collect();
    assert_eq!(text, want);

    // The metrics saw the requests.
    let m = call("GET", &format!("http://{}/metrics", edge.addr), None, None).body;
    assert!(m.contains("hat_edge_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}"), "{m}");
    assert!(m.contains("hat_edge_time_to_first_token_seconds_count") && m.contains("hat_edge_cloud_bytes_total{direction=\"up\"}"), "{m}");
}

#[test]
fn stop_sequences_end_the_answer_before_them() {
    let w = world();
    let edge = shared_service();
    let user = "Count from one to ten in words, separated by commas.";
    let (full, _) = reference(w, &chat_ids(w, user), 32);
    // A stop sequence from the middle of the answer (two characters).
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 8, "{full}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let stop = stop.as_str();
    let want = &full[..full.find(stop).unwrap()];
    for stream in [false, true] {
        let r = post(edge, "/chat/completions", &chat_body(user, json!({"max_tokens": 32, "stop": [stop, "never appears"], "stream": stream})));
        assert_eq!(r.status, 200, "{}", r.body);
        let (text, finish) = if stream {
            let data = sse_data(&r.body);
            let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
            (chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<String>(), chunks.last().unwrap()["choices"][0]["finish_reason"].clone())
        } else {
            let v = r.json();
            (v["choices"][0]["message"]["content"].as_str().unwrap().to_string(), v["choices"][0]["finish_reason"].clone())
        };
        assert_eq!(text, want, "stream {stream}, stop {stop:?}");
        assert_eq!(finish, "stop");
    }
}

#[test]
fn bad_requests_get_openai_errors() {
    let edge = shared_service();
    let url = format!("{}/chat/completions", edge.base_url());
    let long = "word ".repeat(5000);
    let cases: Vec<(&str, String, u16, Option<&str>, &str)> = vec![
        ("bad JSON", "{not json".into(), 400, None, "not valid JSON"),
        ("no messages", json!({"messages": []}).to_string(), 400, Some("messages"), "must not be empty"),
        ("hot", chat_body("hi", json!({"temperature": 3.5})).to_string(), 400, Some("temperature"), "between 0 and 2"),
        ("top_p", chat_body("hi", json!({"top_p": 0})).to_string(), 400, Some("top_p"), "(0, 1]"),
        ("n", chat_body("hi", json!({"n": 2})).to_string(), 400, Some("n"), "n = 1"),
        ("zero tokens", chat_body("hi", json!({"max_tokens": 0})).to_string(), 400, Some("max_tokens"), "at least 1"),
        ("stops", chat_body("hi", json!({"stop": ["a", "b", "c", "d", "e"]})).to_string(), 400, Some("stop"), "at most 4"),
        ("role", json!({"messages": [{"role": "wizard", "content": "hi"}]}).to_string(), 400, Some("messages"), "unknown role"),
        ("image", json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}).to_string(), 400, Some("messages"), "image_url"),
        ("model", chat_body("hi", json!({"model": "gpt-4"})).to_string(), 404, Some("model"), MODEL_ID),
        // Past the cloud's context (4096 here), the limit named.
        ("too long", chat_body(&long, json!({})).to_string(), 400, Some("messages"), "context is 4096 tokens"),
    ];
    for (name, body, status, param, says) in cases {
        let r = call("POST", &url, Some(&body), None);
        assert_eq!(r.status, status, "{name}: {}", r.body);
        let v = r.json();
        assert_eq!(v["error"]["type"], "invalid_request_error", "{name}");
        assert_eq!(v["error"]["param"].as_str(), param, "{name}");
        assert!(v["error"]["message"].as_str().unwrap().contains(says), "{name}: {v}");
    }
    let r = call("GET", &format!("http://{}/v2/nothing", edge.addr), None, None);
    assert_eq!(r.status, 404);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("/v1/chat/completions"));
}

#[test]
fn an_api_key_is_required_when_set() {
    let w = world();
    let edge = service(w, connect_options(w, &w.server), Some("k3y"), 1);
    let url = format!("{}/chat/completions", edge.base_url());
    let body = chat_body("Say hi.", json!({"max_tokens": 2})).to_string();
    for key in [None, Some("wrong")] {
        let r = call("POST", &url, Some(&body), key);
        assert_eq!(r.status, 401, "{key:?}");
        assert!(r.json()["error"]["message"].as_str().unwrap().contains("API key"));
        assert_eq!(call("GET", &format!("{}/models", edge.base_url()), None, key).status, 401);
    }
    assert_eq!(call("POST", &url, Some(&body), Some("k3y")).status, 200);
}

#[test]
fn concurrent_requests_each_get_their_own_answer() {
    let w = world();
    let edge = shared_service();
    let users = ["What is two plus two?", "Name a fruit.", "Say hello in French."];
    let wants: Vec<String> = users.iter().map(|u| reference(w, &chat_ids(w, u), 16).0).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = users.iter().enumerate().map(|(i, u)| s.spawn(move || (i, post(edge, "/chat/completions", &chat_body(u, json!({"max_tokens": 16, "stream": i == 1})))))).collect();
        for h in handles {
            let (i, r) = h.join().unwrap();
            assert_eq!(r.status, 200, "{}", r.body);
            let text = if i == 1 {
                let data = sse_data(&r.body);
                data[..data.len() - 1].iter().filter_map(|d| serde_json::from_str::<Value>(d).unwrap()["choices"][0]["delta"]["content"].as_str().map(str::to_string)).collect::<String>()
            } else {
                r.json()["choices"][0]["message"]["content"].as_str().unwrap().to_string()
            };
            assert_eq!(text, wants[i], "{}", users[i]);
        }
    });
}

/// A cloud with one session slot of its own, so that a session left open shows.
fn one_slot_cloud(w: &World, dir: &Path) -> BackgroundServer {
    BackgroundServer::start(w.split.cloud.clone(), hat::testing::cloud_config(dir.to_path_buf(), None, 1, 4096)).unwrap()
}

#[test]
fn a_client_that_disconnects_frees_its_cloud_session() {
    let w = world();
    let dir = tempfile::tempdir().unwrap();
    let cloud = one_slot_cloud(w, dir.path());
    let edge = service(w, connect_options(w, &cloud), None, 2);
    let url = format!("{}/chat/completions", edge.base_url());
    // A long answer, streamed; the client reads its first chunk and hangs up.
    let body = json!({"messages": [{"role": "user", "content": "Write a long story about a dragon."}], "max_tokens": 400, "stream": true, "temperature": 0, "stop": []}).to_string();
    let resp = ureq::post(&url).set("Content-Type", "application/json").send_string(&body).unwrap();
    let mut reader = std::io::BufReader::new(resp.into_reader());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.starts_with("data: "), "{line}");
    let hung_up = Instant::now();
    drop(reader);
    // The cloud's only slot comes free within a few seconds (the 400 tokens would take much
    // longer), so the next request is served.
    let short = chat_body("Say hi.", json!({"max_tokens": 3})).to_string();
    let r = loop {
        let r = call("POST", &url, Some(&short), None);
        if r.status != 503 || hung_up.elapsed() > Duration::from_secs(20) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(hung_up.elapsed() < Duration::from_secs(10), "the slot came free after {:?}", hung_up.elapsed());
}

#[test]
fn a_busy_or_absent_cloud_is_a_503_at_once() {
    let w = world();
    let dir = tempfile::tempdir().unwrap();
    let cloud = one_slot_cloud(w, dir.path());
    let edge = service(w, connect_options(w, &cloud), None, 2);
    let body = chat_body("Say hi.", json!({"max_tokens": 2}));
    // Another edge holds the only slot.
    let held = hat::net::QuicLink::connect(connect_options(w, &cloud)).unwrap();
    let r = post(&edge, "/chat/completions", &body);
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.retry_after.as_deref(), Some("1"));
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("busy"), "{}", r.body);
    drop(held);

    // Nothing listens at this address: refused within the connect timeout (2 s), not QUIC's
    // idle timeout.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let nowhere = ConnectOptions { addr: socket.local_addr().unwrap(), ..connect_options(w, &cloud) };
    let edge = service(w, nowhere, None, 2);
    let t = Instant::now();
    let r = post(&edge, "/chat/completions", &body);
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.retry_after.is_some());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("cannot reach the cloud"), "{}", r.body);
}
