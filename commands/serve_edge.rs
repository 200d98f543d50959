//! `hat serve-edge`: the device side as a local OpenAI-compatible HTTP service.

use std::net::SocketAddr;
use std::sync::Arc;

use hat::api::{EdgeService, ServiceConfig};

use crate::run_edge::EdgeArgs;

/// Serve the device side as a local HTTP API in the OpenAI format, against a hat cloud.
///
/// Applications use hat by pointing an OpenAI client at http://LISTEN/v1: POST
/// /v1/chat/completions (messages through the model's chat template) and /v1/completions, with
/// max_tokens, temperature (OpenAI's default 1; 0 = greedy), top_p, seed, stop and stream
/// (server-sent events ending with `data: [DONE]`); GET /v1/models, /health and /metrics
/// (Prometheus). Each request is its own cloud session, generated as `run-edge` would with the
/// same flags; only hidden states cross the network. Answers carry `usage` and hat's own figures
/// in an extra `hat` field (TTFT, TBT, tokens per round, bytes up and down). A client that
/// disconnects ends its generation and its cloud session. Stop with Ctrl-C.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub edge: EdgeArgs,

    /// Address to listen on (HTTP). Keep it on loopback unless --api-key is set: the service
    /// answers anyone who reaches it.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Bearer token clients must send (`Authorization: Bearer KEY`; also $HAT_API_KEY).
    #[arg(long, env = "HAT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// The model's id in the API (/v1/models and the `model` field); default: the bundle's
    /// model name.
    #[arg(long)]
    pub model_name: Option<String>,

    /// Most requests generating at once (each holds a cloud session); more wait their turn.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let edge = args.edge.prepare()?;
    let model_id = args.model_name.clone().unwrap_or_else(|| model_id(&edge.bundle.manifest.source.name));
    let connect = args.edge.connect.options(&edge.bundle, &edge.resolved, None);
    let profile = edge.profile.zip(args.edge.profile.clone());
    let config = ServiceConfig { clouds: connect, cloud_timeout: args.edge.connect.cloud_timeout(), mode: edge.mode, draft_len: edge.draft_len, chunk_size: edge.chunk_size, profile, model_id, api_key: args.api_key.clone(), parallel: args.parallel, fallback: edge.fallback };
    let service = Arc::new(EdgeService::new(edge.bundle, edge.drafter, config)?);
    if !args.listen.ip().is_loopback() && args.api_key.is_none() {
        eprintln!("hat-edge: warning: listening on {} without --api-key: anyone who reaches it can use the cloud session", args.listen);
    }
    let threads = hat::util::threads::count();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(threads.clamp(1, 4)).thread_name("hat-serve-edge").enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "hat-edge: serving {} ({}, adapter {}) on http://{addr}/v1 against the cloud at {}; Ctrl-C stops",
            service.model_id(),
            if edge.mode == hat::edge::Mode::Hat { "hat" } else { "u-shape" },
            edge.adapter_name,
            edge.resolved.0.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(", ")
        );
        hat::api::serve(service, listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
        eprintln!("hat-edge: stopped");
        anyhow::Ok(())
    })
}

/// A model id from a source name: the file or folder name without a `.gguf` suffix.
fn model_id(source: &str) -> String {
    let name = source.rsplit(['/', '\\']).next().unwrap_or(source);
    name.strip_suffix(".gguf").unwrap_or(name).to_string()
}
