//! The `hat` command line: a thin layer over the `hat` library, one file per subcommand.

mod audit;
mod download;
mod generate;
mod loadgen;
mod profile;
mod run_edge;
mod serve_cloud;
mod serve_edge;
mod split;
mod train_adapter;

use clap::{Parser, Subcommand};

/// hat: device–cloud collaborative LLM inference (U-shaped split inference + speculative decoding).
///
/// A model is cut in three: the input submodel (embedding + first K1 layers) and the output
/// submodel (last K2 layers + head) stay on the device, the middle layers run in the cloud, and
/// only hidden states cross the network. `hat generate` runs the unsplit model locally: the
/// reference every split path is checked against.
#[derive(Parser, Debug)]
#[command(name = "hat", version, propagate_version = true, max_term_width = 100)]
struct Cli {
    /// Threads that compute (model kernels, matmuls, the network runtime's workers); default:
    /// every core. With `taskset -c N` and 1, a process computes on one core, as one of two
    /// machines would.
    #[arg(long, global = true, env = "HAT_THREADS")]
    threads: Option<usize>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Generate(generate::Args),
    Split(split::Args),
    TrainAdapter(train_adapter::Args),
    Profile(profile::Args),
    ServeCloud(serve_cloud::Args),
    RunEdge(run_edge::Args),
    ServeEdge(serve_edge::Args),
    Download(download::Args),
    Loadgen(loadgen::Args),
    Audit(audit::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Err(e) = hat::util::threads::configure(cli.threads) {
        eprintln!("error: {e}");
        return std::process::ExitCode::FAILURE;
    }
    hat::util::memory::keep_freed_memory();
    let result = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Split(a) => split::run(a),
        Command::Download(a) => download::run(a),
        Command::Loadgen(a) => loadgen::run(a),
        Command::Audit(a) => audit::run(a),
        Command::TrainAdapter(a) => train_adapter::run(a),
        Command::Profile(a) => profile::run(a),
        Command::ServeCloud(a) => serve_cloud::run(a),
        Command::RunEdge(a) => run_edge::run(a),
        Command::ServeEdge(a) => serve_edge::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Options shared by the subcommands that load a model.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// The model: a Hugging Face directory, a GGUF file, or a hub id `org/name[@revision]`.
    /// Default: $HAT_MODEL, else the default model fetched by recipes/fetch-assets.sh into
    /// ./assets ($HAT_ASSETS), else the hub id HuggingFaceTB/SmolLM2-135M-Instruct.
    #[arg(long, short = 'm', env = "HAT_MODEL")]
    pub model: Option<String>,

    /// Where to compute: cpu, cuda, cuda:N or auto.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl ModelArgs {
    /// Loads the model named by `--model`, saying on stderr what it loaded.
    pub fn load(&self) -> anyhow::Result<hat::io::source::LoadedModel> {
        use anyhow::Context;
        let spec = hat::io::source::ModelSpec::from_arg(self.model.as_deref())?;
        let t = std::time::Instant::now();
        let model = hat::io::source::LoadedModel::load(&spec).with_context(|| format!("cannot load model {spec}"))?;
        let c = &model.config;
        eprintln!(
            "hat: loaded {spec} ({:?}, {} layers, hidden {}, {}/{} heads) in {:.1} s",
            c.family,
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            t.elapsed().as_secs_f64()
        );
        Ok(model)
    }
}

/// How the edge reaches the cloud: address, trust, token, wire dtype and link emulation
/// (`run-edge`, and `profile` when it measures the link).
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectArgs {
    /// The cloud's address, host:port (default 127.0.0.1:4433). Repeat it to name other clouds
    /// serving the same split: the first that accepts a session is used, and the others take
    /// over when it is lost.
    #[arg(long)]
    pub cloud: Vec<String>,

    /// Pin the cloud's certificate by its fingerprint (sha256:<hex>, printed by serve-cloud).
    #[arg(long, conflicts_with = "cloud_cert")]
    pub cloud_fingerprint: Option<String>,

    /// Trust the cloud's certificate file (DER or PEM; serve-cloud keeps it in its state dir).
    #[arg(long)]
    pub cloud_cert: Option<std::path::PathBuf>,

    /// Shared secret the cloud asks for (also $HAT_TOKEN).
    #[arg(long, env = "HAT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    /// How hidden states are encoded on the wire.
    #[arg(long, default_value = "f16", value_parser = ["f16", "bf16", "f32"])]
    pub wire_dtype: String,

    /// Emulated uplink rate, Mbit/s (emulation on this side of a real connection).
    #[arg(long)]
    pub link_up_mbps: Option<f64>,

    /// Emulated downlink rate, Mbit/s.
    #[arg(long)]
    pub link_down_mbps: Option<f64>,

    /// Emulated round-trip propagation delay, ms.
    #[arg(long, default_value_t = 0.0)]
    pub link_rtt_ms: f64,

    /// Seconds to wait for the cloud to accept the connection and answer the handshake before
    /// giving up on it (a cloud that is not there fails this fast, not after QUIC's idle timeout).
    #[arg(long, default_value_t = 5.0)]
    pub connect_timeout: f64,

    /// Seconds to keep looking for a cloud (the same one, then the other --cloud addresses)
    /// after losing one mid-answer. The device keeps every hidden state it sent, so a new
    /// session is replayed to exactly where the lost one was and the answer goes on unchanged;
    /// 0 = fail at once.
    #[arg(long, default_value_t = 30.0)]
    pub cloud_timeout: f64,
}

/// What [`ConnectArgs::resolve`] checks before anything is loaded: the clouds' addresses, how to
/// trust them, the emulated link and the wire dtype.
pub type Resolved = (Vec<std::net::SocketAddr>, hat::net::tls::Trust, hat::net::LinkEmulation, hat::net::protocol::WireDtype);

impl ConnectArgs {
    /// The address, trust, emulation and wire dtype, checked (before any model is loaded).
    pub fn resolve(&self) -> anyhow::Result<Resolved> {
        use anyhow::Context;
        use std::net::ToSocketAddrs;
        let wire = hat::net::protocol::WireDtype::parse(&self.wire_dtype)?;
        if !(self.connect_timeout.is_finite() && self.connect_timeout > 0.0) {
            anyhow::bail!("--connect-timeout {}: must be a positive number of seconds", self.connect_timeout);
        }
        if !(self.cloud_timeout.is_finite() && self.cloud_timeout >= 0.0) {
            anyhow::bail!("--cloud-timeout {}: must be a number of seconds, 0 or more", self.cloud_timeout);
        }
        let emulation = hat::net::LinkEmulation { up_mbps: self.link_up_mbps, down_mbps: self.link_down_mbps, rtt_ms: self.link_rtt_ms };
        emulation.validate()?;
        let trust = match (&self.cloud_fingerprint, &self.cloud_cert) {
            (Some(fp), _) => hat::net::tls::Trust::Fingerprint(hat::net::tls::parse_fingerprint(fp)?),
            (None, Some(cert)) => hat::net::tls::Trust::CertFile(cert.clone()),
            (None, None) => anyhow::bail!("give --cloud-fingerprint or --cloud-cert"),
        };
        let clouds = if self.cloud.is_empty() { vec!["127.0.0.1:4433".to_string()] } else { self.cloud.clone() };
        let mut addrs = Vec::new();
        for cloud in &clouds {
            let addr = cloud
                .to_socket_addrs()
                .with_context(|| format!("--cloud {cloud}: not a host:port"))?
                .next()
                .with_context(|| format!("--cloud {cloud}: no address"))?;
            addrs.push(addr);
        }
        Ok((addrs, trust, emulation, wire))
    }

    /// The session settings for `bundle`'s split, one per cloud address (`runtime`: a
    /// service's shared runtime).
    pub fn options(&self, bundle: &hat::split::DeviceBundle, resolved: &Resolved, runtime: Option<tokio::runtime::Handle>) -> Vec<hat::net::ConnectOptions> {
        let (addrs, trust, emulation, wire) = resolved;
        addrs
            .iter()
            .map(|&addr| hat::net::ConnectOptions {
                addr,
                trust: trust.clone(),
                token: self.token.clone(),
                split_id: bundle.manifest.split_id.clone(),
                hidden_size: bundle.manifest.hidden_size,
                dtype: *wire,
                emulation: *emulation,
                tap: None,
                connect_timeout: std::time::Duration::from_secs_f64(self.connect_timeout),
                runtime: runtime.clone(),
            })
            .collect()
    }

    /// `--cloud-timeout`.
    pub fn cloud_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.cloud_timeout)
    }

    /// Opens a session for `bundle`'s split with the first cloud that accepts one.
    pub fn open(&self, bundle: &hat::split::DeviceBundle, resolved: &Resolved) -> anyhow::Result<hat::net::ResilientLink> {
        Ok(hat::net::ResilientLink::connect(self.options(bundle, resolved, None), self.cloud_timeout())?)
    }
}

/// The prompt, from the command line or a file.
#[derive(clap::Args, Debug, Clone)]
pub struct PromptArgs {
    /// The prompt (a user message when the chat template applies).
    #[arg(long, short = 'p', conflicts_with = "prompt_file", required_unless_present = "prompt_file")]
    pub prompt: Option<String>,

    /// Read the prompt from a file ('-' for stdin).
    #[arg(long)]
    pub prompt_file: Option<std::path::PathBuf>,

    /// Feed the prompt as raw text instead of through the model's chat template.
    #[arg(long)]
    pub no_chat_template: bool,
}

impl PromptArgs {
    /// Reads `--prompt` or `--prompt-file`.
    pub fn read(&self) -> anyhow::Result<String> {
        use anyhow::Context;
        match (&self.prompt, &self.prompt_file) {
            (Some(p), _) => Ok(p.clone()),
            (None, Some(f)) if f.as_os_str() == "-" => {
                let mut s = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("cannot read the prompt from stdin")?;
                Ok(s)
            }
            (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("cannot read --prompt-file {}", f.display())),
            (None, None) => anyhow::bail!("give a prompt with --prompt or --prompt-file"),
        }
    }
}

/// How many tokens and how to pick them.
#[derive(clap::Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,

    /// Sampling temperature; 0 = greedy (always the most likely token).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,

    /// Nucleus sampling: sample from the smallest set of tokens with this total probability.
    #[arg(long)]
    pub top_p: Option<f64>,

    /// Sample from the k most likely tokens only.
    #[arg(long)]
    pub top_k: Option<usize>,

    /// Random seed for sampling (the same seed gives the same output).
    #[arg(long, default_value_t = 299_792_458)]
    pub seed: u64,
}

impl SamplingArgs {
    pub fn params(&self) -> anyhow::Result<hat::decode::SamplingParams> {
        if self.max_tokens == 0 {
            anyhow::bail!("--max-tokens must be at least 1");
        }
        let p = hat::decode::SamplingParams { temperature: self.temperature, top_p: self.top_p, top_k: self.top_k, seed: self.seed };
        p.validate()?;
        Ok(p)
    }
}

/// Streams generated text to stdout as tokens arrive (nothing when `quiet`).
pub struct Streamer<'a> {
    stream: hat::io::tokenizer::TextStream<'a>,
    quiet: bool,
}

impl<'a> Streamer<'a> {
    pub fn new(tokenizer: &'a hat::io::tokenizer::HatTokenizer, quiet: bool) -> Self {
        Self { stream: hat::io::tokenizer::TextStream::new(tokenizer), quiet }
    }

    pub fn push(&mut self, id: u32) -> hat::Result<()> {
        use std::io::Write;
        if let (Some(piece), false) = (self.stream.push(id)?, self.quiet) {
            let mut out = std::io::stdout().lock();
            let _ = write!(out, "{piece}");
            let _ = out.flush();
        }
        Ok(())
    }

    /// Prints what was held back and a final newline.
    pub fn finish(mut self) -> hat::Result<()> {
        if !self.quiet {
            println!("{}", self.stream.finish()?.unwrap_or_default());
        }
        Ok(())
    }
}
