//! `hat serve-cloud`: serve a cloud bundle's middle layers over QUIC.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hat::cloud::{CloudConfig, CloudServer};
use hat::split::CloudBundle;

/// Serve the middle layers of a split over QUIC (TLS 1.3, ALPN hat/1).
///
/// On first start a self-signed certificate is generated and kept in --state-dir; the server
/// prints its fingerprint (`fingerprint sha256:<hex>`), which edges pin with
/// --cloud-fingerprint (or they trust the certificate file, STATE_DIR/cert.der, with
/// --cloud-cert). Each edge session gets its own middle-layer KV cache, freed when the session
/// ends or idles out. Each edge is told the middle layers' cost model (--profile, or a quick
/// profile measured at start) and, with every reply, the cloud's load. Stop with Ctrl-C.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The cloud bundle (DIR/cloud from `hat split`).
    #[arg(long)]
    pub bundle: PathBuf,

    /// Address to listen on (UDP).
    #[arg(long, default_value = "127.0.0.1:4433")]
    pub listen: SocketAddr,

    /// Where the certificate and key are kept across restarts.
    #[arg(long, env = "HAT_STATE_DIR", default_value = ".hat-cloud")]
    pub state_dir: PathBuf,

    /// Shared secret every edge must present (also $HAT_TOKEN).
    #[arg(long, env = "HAT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// Most edge sessions at once; more are refused.
    #[arg(long, default_value_t = 16)]
    pub max_sessions: usize,

    /// Most positions (prompt + generated) one session may hold.
    #[arg(long, default_value_t = 8192)]
    pub max_context: usize,

    /// Close sessions that send nothing for this many seconds.
    #[arg(long, default_value_t = 300)]
    pub idle_timeout_s: u64,

    /// A reply the edge does not take within this many seconds (it stopped reading) ends its
    /// session and frees its slot.
    #[arg(long, default_value_t = 10)]
    pub write_timeout_s: u64,

    /// Where to compute: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,

    /// Compute dtype of the middle layers: auto (f32 on the CPU, the bundle's stored dtype on a
    /// GPU), f32, f16 or bf16. Only f32 on the CPU computes every position bitwise as the
    /// unsplit model (greedy hat then equals `hat generate` token for token); on a GPU, f32 is
    /// the closest, and f16/bf16 halve the weights' and caches' memory. Blocks cross the
    /// network in the edge's wire dtype whatever this is.
    #[arg(long, default_value = "auto", value_parser = ["auto", "f32", "f16", "bf16"])]
    pub dtype: String,

    /// The cloud's profile (`hat profile --bundle DIR/cloud --out FILE`): the cost model every
    /// edge gets in the handshake to plan its prompt chunks. Without it a quick profile is
    /// measured before listening (a few seconds) and kept in --state-dir for the next start.
    #[arg(long)]
    pub profile: Option<PathBuf>,

    /// Serve Prometheus metrics on this address (HTTP, `GET /metrics`): sessions, blocks and
    /// rows by kind, pass time and rows, queue wait, bytes, errors by code, resident memory.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,

    /// Run every block on its own instead of packing the sessions' waiting decode and
    /// verification blocks into shared passes through the middle layers (the output is the same
    /// either way; packing reads the weights once for all of them).
    #[arg(long)]
    pub no_batching: bool,

    /// Most positions in one packed pass (at most 64: the row-invariant kernels' range); a
    /// prefill chunk runs in a pass of its own.
    #[arg(long, default_value_t = 64)]
    pub batch_rows: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let device = hat::io::source::select_device(&args.device)?;
    let dtype = match args.dtype.as_str() {
        "auto" => None,
        d => Some(hat::split::parse_dtype(d)?),
    };
    let bundle = Arc::new(CloudBundle::load_as(&args.bundle, &device, dtype)?);
    let (cost, source) = hat::profile::cloud_model(&bundle, args.profile.as_deref(), &args.state_dir)?;
    eprintln!(
        "hat-cloud: cost model from {source}: {:.3} ms + {:.3} ms/row + {:.5} ms/(row·position)",
        cost.middle.fixed_ms, cost.middle.per_row_ms, cost.middle.per_row_ctx_ms
    );
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(hat::util::threads::count()).max_blocking_threads(hat::util::threads::count()).enable_all().build()?;
    rt.block_on(async {
        let m = &bundle.manifest;
        let config = CloudConfig {
            listen: args.listen,
            state_dir: args.state_dir.clone(),
            token: args.token.clone(),
            max_sessions: args.max_sessions,
            max_context: args.max_context,
            idle_timeout: Duration::from_secs(args.idle_timeout_s.max(1)),
            write_timeout: Duration::from_secs(args.write_timeout_s.max(1)),
            handshake_timeout: hat::cloud::HANDSHAKE_TIMEOUT,
            cost,
            metrics: args.metrics,
            batching: !args.no_batching,
            batch_rows: args.batch_rows,
            pass_delay: std::time::Duration::ZERO,
        };
        if !args.listen.ip().is_loopback() && args.token.is_none() {
            eprintln!("hat-cloud: warning: listening on {} without --token: anyone who can reach it may use the middle layers", args.listen);
        }
        let server = CloudServer::bind(bundle.clone(), config)?;
        let r = m.plan.middle_range();
        eprintln!(
            "hat-cloud: serving split {} of {} (layers [{}, {})) on {}, computing in {}{}",
            m.split_id,
            m.source.name,
            r.start,
            r.end,
            args.device,
            bundle.middle.compute_dtype().map_or("f32", |d| d.as_str()),
            match bundle.middle.packed_projections() {
                (0, _) => String::new(),
                (p, all) => format!(" ({p} of {all} projections read as exact 4-bit blocks)"),
            }
        );
        // Machine-readable lines on stdout for scripts.
        println!("listening {}", server.local_addr()?);
        println!("fingerprint {}", server.fingerprint());
        if let Some(a) = server.metrics_addr() {
            eprintln!("hat-cloud: metrics on http://{a}/metrics");
        }
        let endpoint = server.endpoint();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("hat-cloud: stopping");
            endpoint.close(0u32.into(), b"server stopping");
        });
        server.serve().await?;
        Ok::<_, anyhow::Error>(())
    })
}
