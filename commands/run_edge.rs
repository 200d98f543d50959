//! `hat run-edge`: the device side, against a `hat serve-cloud`.

use std::net::ToSocketAddrs;
use std::path::PathBuf;

use anyhow::Context;
use hat::edge::{DraftOptions, EdgeOptions, Mode};
use hat::net::{ConnectOptions, LinkEmulation, QuicLink};
use hat::net::protocol::WireDtype;
use hat::split::DeviceBundle;
use hat::net::tls::Trust;

use crate::{PromptArgs, SamplingArgs, Streamer};

/// Generate with a device bundle, the middle layers running on a hat cloud over QUIC.
///
/// Only hidden states (and positions and counts) cross the network: the prompt, token ids,
/// logits and probabilities stay here. In --mode hat (default) the on-device SLM drafts up to
/// --draft-len tokens that the cloud verifies in one round trip; --mode u-shape is the baseline
/// (one round trip per token). Prompts are sent in chunks of --chunk-size positions so that
/// device compute, link and cloud compute overlap. --json prints one JSON object with the text,
/// timings (ttft_ms, tbt_ms), rounds, mean_accepted, acceptance_rate, bytes_up/bytes_down, a
/// breakdown of device compute, cloud compute and network wait, and how it drafted (draft
/// vocabulary, threshold and the costs it came from, time drafting, verifying and drafting ahead).
/// Drafting is cheap by default (reduced draft vocabulary, int8 draft compute), stops on low
/// confidence (--draft-threshold) and runs ahead while the cloud verifies (--draft-ahead); each
/// can be switched off.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The device bundle (DIR/device from `hat split`).
    #[arg(long)]
    pub bundle: PathBuf,

    /// The cloud's address, host:port.
    #[arg(long, default_value = "127.0.0.1:4433")]
    pub cloud: String,

    /// Pin the cloud's certificate by its fingerprint (sha256:<hex>, printed by serve-cloud).
    #[arg(long, conflicts_with = "cloud_cert", required_unless_present = "cloud_cert")]
    pub cloud_fingerprint: Option<String>,

    /// Trust the cloud's certificate file (DER or PEM; serve-cloud keeps it in its state dir).
    #[arg(long)]
    pub cloud_cert: Option<PathBuf>,

    /// Shared secret the cloud asks for (also $HAT_TOKEN).
    #[arg(long, env = "HAT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,

    #[command(flatten)]
    pub prompt: PromptArgs,

    #[command(flatten)]
    pub sampling: SamplingArgs,

    /// hat: speculative decoding with the on-device SLM; u-shape: no drafting (baseline).
    #[arg(long, default_value = "hat", value_parser = ["hat", "u-shape"])]
    pub mode: String,

    /// The draft adapter: a file from `hat train-adapter`; `none` (untrained: the SLM skips the
    /// middle; still lossless, fewer drafts accepted); or `auto`: the adapter shipped for this
    /// split in adapters/<split id>.safetensors ($HAT_ADAPTERS) if there is one, else none.
    #[arg(long, default_value = "auto")]
    pub adapter: String,

    /// γ: most tokens drafted per round trip. Drafting stops earlier when the next draft is
    /// unlikely to be accepted (--draft-threshold).
    #[arg(long, default_value_t = 4)]
    pub draft_len: usize,

    /// Stop drafting when the chain's cumulative draft probability falls below this: `auto`
    /// (default) derives it from the measured cost of a draft step and of a committed token
    /// (greedy; with sampling `auto` is a fixed prior, so that --seed reproduces a run); 0 =
    /// always draft --draft-len.
    #[arg(long, default_value = "auto")]
    pub draft_threshold: String,

    /// Rows the SLM's head scores while drafting: `auto` (the adapter's stored draft vocabulary
    /// at its default size, or the whole vocabulary if it has none), `full`, or N (the adapter's
    /// N most frequent tokens). Verification always uses the full head.
    #[arg(long, default_value = "auto")]
    pub draft_vocab: String,

    /// Draft compute (adapter layers, draft head): `int8` (row-scaled 8-bit matrices) or `f32`.
    /// The LLM path is f32 either way.
    #[arg(long, default_value = "int8", value_parser = ["int8", "f32"])]
    pub draft_compute: String,

    /// Draft the next round while the cloud verifies this one (`on`), or not (`off`).
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub draft_ahead: String,

    /// Prompt positions per prefill chunk; 0 = the whole prompt at once. Default: 64 in hat
    /// mode, 0 (no chunking) in u-shape mode.
    #[arg(long)]
    pub chunk_size: Option<usize>,

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

    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let prompt = args.prompt.read()?;
    let sampling = args.sampling.params()?;
    let draft = draft_options(&args)?;
    let mode = if args.mode == "u-shape" { Mode::UShape } else { Mode::Hat };
    let wire = WireDtype::parse(&args.wire_dtype)?;
    let emulation = LinkEmulation { up_mbps: args.link_up_mbps, down_mbps: args.link_down_mbps, rtt_ms: args.link_rtt_ms };
    emulation.validate()?;
    let trust = match (&args.cloud_fingerprint, &args.cloud_cert) {
        (Some(fp), _) => Trust::Fingerprint(hat::net::tls::parse_fingerprint(fp)?),
        (None, Some(cert)) => Trust::CertFile(cert.clone()),
        (None, None) => anyhow::bail!("give --cloud-fingerprint or --cloud-cert"),
    };
    let addr = args
        .cloud
        .to_socket_addrs()
        .with_context(|| format!("--cloud {}: not a host:port", args.cloud))?
        .next()
        .with_context(|| format!("--cloud {}: no address", args.cloud))?;

    let device = candle_core::Device::Cpu;
    let bundle = DeviceBundle::load(&args.bundle, &device)?;
    let (adapter, adapter_name) = hat::adapter::load_choice(&args.adapter, &bundle, &device)?;
    let ids = bundle.tokenizer.encode_prompt(&prompt, !args.prompt.no_chat_template)?;
    let mut link = QuicLink::connect(ConnectOptions {
        addr,
        trust,
        token: args.token.clone(),
        split_id: bundle.manifest.split_id.clone(),
        hidden_size: bundle.manifest.hidden_size,
        dtype: wire,
        emulation,
        tap: None,
    })?;
    let opts = EdgeOptions {
        mode,
        draft_len: args.draft_len,
        chunk_size: args.chunk_size.unwrap_or(if mode == Mode::Hat { 64 } else { 0 }),
        sampling,
        max_tokens: args.sampling.max_tokens,
        max_context: link.max_context,
        draft,
    };
    let mut out = Streamer::new(&bundle.tokenizer, args.json);
    let report = hat::edge::generate(&bundle, &adapter, &mut link, &ids, &opts, |id| out.push(id))?;
    out.finish()?;
    drop(link);
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["text"] = bundle.tokenizer.decode(&report.token_ids, true)?.into();
        v["wire_dtype"] = wire.name().into();
        v["draft_len"] = opts.draft_len.into();
        v["chunk_size"] = opts.chunk_size.into();
        v["adapter"] = adapter_name.into();
        println!("{}", serde_json::to_string(&v)?);
    } else {
        eprintln!(
            "hat-edge: {:?}: {} prompt tokens, {} generated; TTFT {:.1} ms, TBT {:.2} ms; {} rounds, {:.2} tokens/round, {:.0}% drafts accepted; {:.1} KiB up, {:.1} KiB down",
            report.mode,
            report.prompt_tokens,
            report.generated_tokens,
            report.ttft_ms,
            report.tbt_ms,
            report.rounds,
            report.mean_accepted,
            report.acceptance_rate * 100.0,
            report.bytes_up as f64 / 1024.0,
            report.bytes_down as f64 / 1024.0
        );
    }
    Ok(())
}

/// The drafting flags as [`DraftOptions`].
fn draft_options(args: &Args) -> anyhow::Result<DraftOptions> {
    let threshold = match args.draft_threshold.as_str() {
        "auto" => None,
        t => Some(t.parse::<f32>().map_err(|_| anyhow::anyhow!("--draft-threshold {t}: not `auto` or a probability"))?),
    };
    let vocab = match args.draft_vocab.as_str() {
        "auto" => None,
        "full" => Some(0),
        n => Some(n.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(|| anyhow::anyhow!("--draft-vocab {n}: not `auto`, `full` or a positive number"))?),
    };
    let options = DraftOptions { vocab, int8: args.draft_compute == "int8", threshold, overlap: args.draft_ahead == "on" };
    options.validate()?;
    Ok(options)
}
