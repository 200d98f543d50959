//! `hat run-edge`: the device side, against a `hat serve-cloud`.

use std::path::PathBuf;

use hat::decode::Flow;
use hat::edge::{DraftOptions, EdgeOptions, Mode};
use hat::split::DeviceBundle;

use crate::{ConnectArgs, PromptArgs, SamplingArgs, Streamer};

/// Generate with a device bundle, the middle layers running on a hat cloud over QUIC.
///
/// Only hidden states (and positions and counts) cross the network: the prompt, token ids,
/// logits and probabilities stay here. In --mode hat (default) the on-device SLM drafts a tree
/// of candidates (--draft-tree, at most --draft-len deep) that the cloud verifies in one round
/// trip; --mode u-shape is the baseline (one round trip per token). Prompts are sent in chunks of --chunk-size positions so that
/// device compute, link and cloud compute overlap. --json prints one JSON object with the text,
/// timings (ttft_ms, tbt_ms), rounds, mean_accepted, acceptance_rate, bytes_up/bytes_down, a
/// breakdown of device compute, cloud compute and network wait, and how it drafted (draft
/// vocabulary, threshold and the costs it came from, time drafting, verifying and drafting ahead,
/// tree nodes sent).
/// Drafting is cheap by default (reduced draft vocabulary, int8 draft compute), stops on low
/// confidence (--draft-threshold) and runs ahead while the cloud verifies (--draft-ahead); each
/// can be switched off.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub edge: EdgeArgs,

    #[command(flatten)]
    pub prompt: PromptArgs,

    #[command(flatten)]
    pub sampling: SamplingArgs,

    /// Print one JSON object instead of streaming text (also when the generation fails
    /// part-way: then with an `error` and the text so far).
    #[arg(long)]
    pub json: bool,

    /// Privacy defence: add Gaussian noise of S × each position's RMS to the hidden states sent
    /// to the cloud (0 = none). The answer then differs from the model's (the cloud computes on
    /// noisy states) and fewer drafts are accepted; see the README's privacy section for what
    /// it hides and what it costs (`hat audit --defences noise=S`).
    #[arg(long, default_value_t = 0.0)]
    pub uplink_noise: f32,
}

/// The device side's settings, shared by `run-edge` and `serve-edge`: the bundle, the cloud,
/// the mode and how it drafts and chunks.
#[derive(clap::Args, Debug)]
pub struct EdgeArgs {

    /// The device bundle (DIR/device from `hat split`).
    #[arg(long)]
    pub bundle: PathBuf,

    #[command(flatten)]
    pub connect: ConnectArgs,

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

    /// Draft the next round while the cloud verifies this one (`on`), or not (`off`): a chain
    /// drafts on after its guess of the reply; a tree grows on, best first, with nodes the cloud
    /// does not see, and when the reply's bonus token is one of them the next round is sent
    /// without drafting.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub draft_ahead: String,

    /// With trees drafted ahead and greedy decoding: send the likeliest nodes drafted ahead as
    /// rows extending the sent tree before its reply (`on`, default), so that the cloud computes
    /// them right after the tree; when the reply's bonus token is among them verification walks
    /// on into them (waiting for their reply, much sooner than another round) instead of
    /// sending another round. The rows sent are those expected to save most: their summed
    /// cumulative draft probability times what a walk into them saves (the measured time per
    /// token less the wait for their reply, from the measured row cost and the cloud's cost
    /// model), and never more than the cloud can compute before the next block would reach it. Exact either way; rows verification does
    /// not reach are computed for nothing. A number N sends up to N rows whenever drafting
    /// ahead grew any (for experiments).
    #[arg(long, default_value = "on")]
    pub draft_pipeline: String,

    /// With trees and greedy decoding: send a tree's first rows (by draft probability, a
    /// prefix holding its likeliest path) as a block of their own and the rest right after
    /// them (`on`, default), so that the cloud replies for the first rows sooner and verification
    /// waits for the rest only when it walks into them. Split where the expected saving is
    /// largest: the rows held back times their cost (the cloud's passes as its replies report
    /// them, its cost model until measured, and the device's measured verification per row)
    /// when the walk stays in the first rows, against the extra pass
    /// when it does not (the draft's probability of walking into them) and the delay of the
    /// extension; no split when nothing is expected to save. Exact either way. A number N sends
    /// the first N rows first whenever the tree has more (for experiments).
    #[arg(long, default_value = "on")]
    pub draft_tree_split: String,

    /// The shape of each round's drafts: `auto` (default: a tree grown by cumulative draft
    /// probability, EAGLE-2 style, nodes kept while their odds pay for a verified row and
    /// levels drafted further while their best child would pay for its row and the draft step,
    /// all measured; at most 24 nodes, 6 per level,
    /// --draft-len levels), `chain` (one chain, drafted ahead while the cloud verifies),
    /// NODES or NODESxDEPTH (a tree of that many drafts in equal levels, no thresholds). The
    /// cloud verifies every branch in one pass; the output stays exact.
    #[arg(long, default_value = "auto")]
    pub draft_tree: String,

    /// With trees drafted ahead (--draft-ahead on): when the draft path lags the committed
    /// text by 16 positions or more, as after a prompt whose middle outputs came back with its
    /// last chunk, the round sends the committed token alone (`on`, default) and runs the draft path
    /// over those positions while the cloud verifies it, then drafts the next round ahead;
    /// `off` drafts a tree first, the catch-up on the critical path. Exact either way.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub draft_catch_up: String,

    /// With a reduced draft vocabulary: the draft head also scores the tokens of this
    /// generation's own text (the prompt and the answer so far) that the vocabulary lacks
    /// (`on`, default; at most 1,024 rows added), since names, identifiers and rare words are
    /// what answers repeat; `off` scores the vocabulary alone. Exact either way.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub draft_vocab_context: String,

    /// How the prompt is cut into prefill chunks: `auto` (default in hat mode) plans the
    /// chunks that minimise the predicted TTFT for this prompt from the device's profile, the
    /// cloud's cost model and load (sent in the handshake) and the measured link; N = chunks
    /// of N positions; 0 = the whole prompt at once (default in u-shape mode).
    #[arg(long)]
    pub chunk_size: Option<String>,

    /// The device's profile for `--chunk-size auto` (`hat profile --bundle DIR/device --out
    /// FILE`, with `--cloud` to include the link). Without it a quick profile is measured once
    /// and cached in $HAT_CACHE_DIR (default ~/.cache/hat; `off` = never cache), and the link is
    /// probed at the start of the session.
    #[arg(long)]
    pub profile: Option<PathBuf>,

    /// How greedy decoding reads the LM head: `screened` (default) scores every vocabulary row
    /// with an 8-bit copy and computes in f32 only the rows that could be the largest (the same
    /// token as the full head, proven bound; a quarter of the bytes); `full` computes every row
    /// in f32. Sampling always uses the full head.
    #[arg(long, default_value = "screened", value_parser = ["screened", "full"])]
    pub greedy_head: String,

    /// When the cloud is lost for good mid-answer (no cloud reached within --cloud-timeout):
    /// `none` fails with the text so far (printed, and in --json); `slm` finishes the answer with
    /// the on-device SLM alone (its adapter in f32 whatever --draft-compute says) and says from
    /// which token on it is unverified (`unverified_from` in --json).
    #[arg(long, default_value = "none", value_parser = ["none", "slm"])]
    pub fallback: String,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let prompt = args.prompt.read()?;
    let noise = hat::net::noise::check_sigma(args.uplink_noise)?;
    let sampling = args.sampling.params()?;
    let edge = args.edge.prepare()?;
    let (bundle, drafter, mode, wire) = (&edge.bundle, &edge.drafter, edge.mode, edge.resolved.3);
    let ids = bundle.tokenizer.encode_prompt(&prompt, !args.prompt.no_chat_template)?;
    let session = std::time::Instant::now();
    let mut link = hat::net::NoisyUplink::new(args.edge.connect.open(bundle, &edge.resolved)?, noise)?;
    if noise > 0.0 && !args.json {
        eprintln!("hat-edge: uplink noise {noise} × RMS: the answer differs from the model's");
    }
    let choice = hat::profile::choose_chunking(bundle, drafter, link.inner_mut().session(), edge.profile.as_ref().zip(args.edge.profile.as_deref()), ids.len(), wire, edge.drafting(), edge.chunk_size);
    if let Some(w) = &choice.warning {
        eprintln!("hat-edge: warning: {w}");
    }
    if let (Some(p), false) = (&choice.plan, args.json) {
        eprintln!(
            "hat-edge: {} prompt positions in {} chunks {:?}, predicted TTFT {:.0} ms (link {:.1} ms round trip, {:.0}/{:.0} Mbit/s, {}; device profile: {})",
            ids.len(),
            p.plan.chunks.len(),
            p.plan.chunks,
            p.plan.predicted_ttft_ms,
            p.link.rtt_ms,
            p.link.up_mbps,
            p.link.down_mbps,
            p.link_source,
            p.device_source
        );
    }
    let opts = edge.options(choice.chunking.clone(), sampling, args.sampling.max_tokens, link.inner_mut().session().max_context);
    // Connecting and planning, before the prompt goes up (TTFT counts from there).
    let session_ms = session.elapsed().as_secs_f64() * 1e3;
    let mut out = Streamer::new(&bundle.tokenizer, args.json);
    let mut generated = Vec::new();
    // One generation in this process: on a thread of the compute pool (see `in_pool`).
    let result = hat::util::threads::in_pool(|| {
        hat::edge::generate_with(bundle, drafter, &mut link, &ids, &opts, |id| {
            generated.push(id);
            out.push(id).map(|_| Flow::Continue)
        })
    });
    // What was streamed stays on screen, and --json still reports it, when the cloud fails
    // part-way.
    out.finish()?;
    drop(link);
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            if args.json {
                let v = serde_json::json!({
                    "error": e.to_string(),
                    "text": bundle.tokenizer.decode(&generated, true)?,
                    "token_ids": generated,
                    "prompt_tokens": ids.len(),
                    "generated_tokens": generated.len(),
                    "mode": mode,
                    "adapter": edge.adapter_name,
                });
                println!("{}", serde_json::to_string(&v)?);
            }
            anyhow::bail!("the generation failed after {} tokens: {e}", generated.len());
        }
    };
    if let (Some(n), Some(why)) = (report.unverified_from, &report.cloud_error) {
        eprintln!("hat-edge: warning: the cloud was lost ({why}); tokens from #{n} on were made by the on-device SLM alone, not verified (--fallback slm)");
    }
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["text"] = bundle.tokenizer.decode(&report.token_ids, true)?.into();
        v["wire_dtype"] = wire.name().into();
        v["session_ms"] = session_ms.into();
        v["draft_len"] = opts.draft_len.into();
        v["chunk_size"] = opts.chunking.size().into();
        if let Some(p) = &choice.plan {
            v["predicted_ttft_ms"] = p.plan.predicted_ttft_ms.into();
            v["plan_link"] = serde_json::to_value(p.link)?;
            v["plan_link_source"] = p.link_source.into();
            v["plan_cloud_load"] = serde_json::to_value(p.cloud_load)?;
            v["link_probe_ms"] = p.probe_ms.into();
            v["device_profile"] = p.device_source.to_string().into();
        }
        v["adapter"] = edge.adapter_name.clone().into();
        v["uplink_noise"] = noise.into();
        v["greedy_head"] = (if !sampling.is_greedy() { "off (sampling)" } else if bundle.head.screened() { "screened" } else { "full" }).into();
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

/// What [`EdgeArgs::prepare`] loads and checks, before any session opens.
pub struct PreparedEdge {
    pub bundle: DeviceBundle,
    pub adapter_name: String,
    pub drafter: hat::edge::Drafter,
    pub profile: Option<hat::profile::Profile>,
    pub resolved: crate::Resolved,
    pub mode: Mode,
    pub draft_len: usize,
    pub draft: DraftOptions,
    /// Fixed prefill chunks, or `None` to plan them per session.
    pub chunk_size: Option<usize>,
    pub fallback: hat::edge::Fallback,
}

impl PreparedEdge {
    pub fn drafting(&self) -> bool {
        self.mode == Mode::Hat && self.draft_len > 0
    }

    /// One generation's options.
    pub fn options(&self, chunking: hat::edge::Chunking, sampling: hat::decode::SamplingParams, max_tokens: usize, max_context: usize) -> EdgeOptions {
        EdgeOptions { mode: self.mode, draft_len: self.draft_len, chunking, sampling, max_tokens, max_context, draft: self.draft, fallback: self.fallback }
    }
}

impl EdgeArgs {
    /// Checks the flags (before anything loads), then loads the bundle, the profile, the adapter
    /// and the drafter.
    pub fn prepare(&self) -> anyhow::Result<PreparedEdge> {
        let draft = draft_options(self)?;
        let mode = if self.mode == "u-shape" { Mode::UShape } else { Mode::Hat };
        let resolved = self.connect.resolve()?;
        let chunk_size = match self.chunk_size.as_deref() {
            None if mode == Mode::Hat => None,
            None => Some(0),
            Some("auto") => None,
            Some(n) => Some(n.parse::<usize>().map_err(|_| anyhow::anyhow!("--chunk-size {n}: not `auto` or a number of positions"))?),
        };
        let device = candle_core::Device::Cpu;
        let mut bundle = DeviceBundle::load(&self.bundle, &device)?;
        bundle.head.set_screen(self.greedy_head == "screened")?;
        let profile = match &self.profile {
            Some(path) => {
                let p = hat::profile::Profile::load(path, &bundle.manifest.split_id)?;
                if p.threads != hat::util::threads::count() {
                    eprintln!("hat-edge: warning: the profile was measured with {} threads, this run computes with {}", p.threads, hat::util::threads::count());
                }
                Some(p)
            }
            None => None,
        };
        let (adapter, adapter_name) = hat::adapter::load_choice(&self.adapter, &bundle, &device)?;
        let drafter = hat::edge::Drafter::new(&bundle, &adapter, if mode == Mode::Hat { draft } else { DraftOptions::plain() })?;
        let fallback = hat::edge::Fallback::parse(&self.fallback)?;
        Ok(PreparedEdge { bundle, adapter_name, drafter, profile, resolved, mode, draft_len: self.draft_len, draft, chunk_size, fallback })
    }
}

/// The drafting flags as [`DraftOptions`].
fn draft_options(args: &EdgeArgs) -> anyhow::Result<DraftOptions> {
    let threshold = match args.draft_threshold.as_str() {
        "auto" => None,
        t => Some(t.parse::<f32>().map_err(|_| anyhow::anyhow!("--draft-threshold {t}: not `auto` or a probability"))?),
    };
    let vocab = match args.draft_vocab.as_str() {
        "auto" => None,
        "full" => Some(0),
        n => Some(n.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(|| anyhow::anyhow!("--draft-vocab {n}: not `auto`, `full` or a positive number"))?),
    };
    let tree = hat::edge::TreeChoice::parse(&args.draft_tree)?;
    let options = DraftOptions { vocab, int8: args.draft_compute == "int8", threshold, overlap: args.draft_ahead == "on", pipeline: hat::edge::Pipeline::parse(&args.draft_pipeline)?, split: hat::edge::TreeSplit::parse(&args.draft_tree_split)?, tree, catch_up: args.draft_catch_up == "on", context_rows: args.draft_vocab_context == "on" };
    options.validate()?;
    Ok(options)
}
