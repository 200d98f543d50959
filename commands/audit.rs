//! `hat audit`: what a curious cloud recovers from the hidden states it sees.

use std::path::PathBuf;

use hat::audit::AuditOptions;

use crate::ModelArgs;

/// Play an honest-but-curious cloud and measure what it recovers of conversations.
///
/// For held-out conversations of --dataset (the first user turn through the chat template, then
/// the model's greedy reply), the cloud sees what hat sends: the input submodel's states (up) and
/// the middle layers' outputs (down), rounded as the wire rounds them. Attacks of a cloud that
/// holds the model's public weights: replay inversion of the uplink (per position, candidate
/// tokens ranked by cosine to the embedding rows are run through the public input layers after
/// the prefix recovered so far; the closest state wins) and the public output layers and head on
/// the downlink (the model's next-token prediction: greedy answers exactly). The replay's
/// candidates are ranked by what the attacker learns from its own text (400 conversations before
/// the audited ones) through the public layers. Learned inverters of a cloud without the device's
/// weights, trained on the attacker's own (state, token) pairs from the same text at 10 % and all
/// of it: the nearest public embedding row (no training), a linear probe, and a small network over
/// a window of three states. Recovery counts content tokens only (not the chat template's), top-1
/// and top-10, beside a unigram baseline. The learned inverters take a few minutes per K1.
///
/// Every attack runs under each of --defences, with its cost: the agreement of the device's next
/// token with the model's (noise and secret weights make outputs differ from the model's) and
/// the device's compute per token at each K1. `rotation` (a secret orthogonal basis across the wire, the cloud's
/// weights rotated to match) is shown against a cloud that knows the public weights: it solves
/// for the rotation from its own weights. `weights=S` gives the device input layers the cloud
/// cannot know (Gaussian noise of S × each weight row's RMS, secret per device; no fine-tune
/// wins the accuracy back): the replay runs the public layers, the learned inverters train on the
/// attacker's own device's (other) secret weights.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// Conversations (ShareGPT JSON or JSONL, as train-adapter reads them).
    #[arg(long)]
    pub dataset: PathBuf,

    /// Device layers before the cloud (K1) to audit, comma-separated.
    #[arg(long, default_value = "1,2,4", value_delimiter = ',')]
    pub input_layers: Vec<usize>,

    /// Device layers after the cloud (K2).
    #[arg(long, default_value_t = 2)]
    pub output_layers: usize,

    /// Conversations to audit.
    #[arg(long, default_value_t = 8)]
    pub conversations: usize,

    /// Skip this many conversations first (held out from what adapters train on: the first
    /// 1,600 by default).
    #[arg(long, default_value_t = 2000)]
    pub skip: usize,

    /// Most content tokens of each prompt.
    #[arg(long, default_value_t = 96)]
    pub prompt_tokens: usize,

    /// Tokens of each greedy reply.
    #[arg(long, default_value_t = 32)]
    pub reply_tokens: usize,

    /// How hidden states are rounded on the wire.
    #[arg(long, default_value = "f16", value_parser = ["f16", "bf16", "f32"])]
    pub wire_dtype: String,

    /// Candidate tokens the replay inversion checks per position.
    #[arg(long, default_value_t = 256)]
    pub candidates: usize,

    /// Defences to audit under, comma-separated: none, noise=S (Gaussian noise of S × each
    /// state's RMS on the uplink), rotation, weights=S (secret input-layer weights: noise of S ×
    /// each weight row's RMS), finetune=S (weights=S, then a private fine-tune of the input
    /// layers that wins the model's answers back; the victim and the attacker's own device each
    /// tune on half of the attacker's conversations).
    #[arg(long, default_value = "none", value_delimiter = ',')]
    pub defences: Vec<String>,

    /// AdamW steps of each private fine-tune (finetune=S), of 4 texts of 64 tokens each.
    #[arg(long, default_value_t = 60)]
    pub finetune_steps: usize,

    /// Write SVG charts here: top-1 recovery against K1 per attack, and against the attacker's
    /// training pairs per learned inverter.
    #[arg(long)]
    pub plot: Option<PathBuf>,

    /// Print one JSON object (`{"results": [...], "costs": [...], "unigram_baseline": …}`)
    /// instead of the tables.
    #[arg(long)]
    pub json: bool,
}

/// The attacker's own text: this many conversations before the audited ones, each turn cut to
/// this many tokens.
const ATTACKER_CONVERSATIONS: usize = 400;
const ATTACKER_TOKENS_PER_TURN: usize = 256;

pub fn run(args: Args) -> anyhow::Result<()> {
    use anyhow::Context;
    let wire = hat::net::protocol::WireDtype::parse(&args.wire_dtype)?;
    anyhow::ensure!(!args.input_layers.is_empty() && args.conversations > 0, "give --input-layers and at least one conversation");
    let data = hat::io::dataset::load_conversations(&args.dataset).with_context(|| format!("cannot read --dataset {}", args.dataset.display()))?;
    let with_prompt = |c: &hat::io::dataset::Conversation| c.first_prompt().is_some_and(|p| !p.trim().is_empty());
    // The attacker's own text (for its candidate ranker): conversations before the audited ones.
    let own: Vec<_> = data.conversations.iter().take(args.skip).rev().filter(|c| with_prompt(c)).take(ATTACKER_CONVERSATIONS).cloned().collect();
    let conversations: Vec<_> = data.conversations.into_iter().skip(args.skip).filter(with_prompt).take(args.conversations).collect();
    anyhow::ensure!(!conversations.is_empty(), "--dataset {} has no conversation with a user turn after the first {} (--skip)", args.dataset.display(), args.skip);
    let loaded = args.model.load()?;
    let model = loaded.model(candle_core::DType::F32, &candle_core::Device::Cpu)?;
    let defences = args.defences.iter().map(|d| hat::audit::Defence::parse(d)).collect::<Result<Vec<_>, _>>()?;
    let opts = AuditOptions { input_layers: args.input_layers.clone(), output_layers: args.output_layers, prompt_tokens: args.prompt_tokens, reply_tokens: args.reply_tokens, wire, candidates: args.candidates, defences, finetune: hat::audit::finetune::FineTune { steps: args.finetune_steps, ..Default::default() } };
    let pb = hat::util::progress::bar(conversations.len() as u64, "replies");
    let samples = hat::audit::samples(&model, &loaded.tokenizer, &conversations, &opts)?;
    pb.finish_and_clear();
    let pb = hat::util::progress::bar(hat::audit::steps(samples.len(), &opts), "attacks");
    let mut attacker_texts = Vec::new();
    for c in &own {
        for turn in &c.turns {
            attacker_texts.push(loaded.tokenizer.encode_prompt_within(&turn.text, turn.role == "user", ATTACKER_TOKENS_PER_TURN)?);
        }
    }
    // The bar counts the steps done and names the one running.
    let mut begun = false;
    let audit = hat::audit::run(&model, &samples, &attacker_texts, &opts, &mut |what| {
        if std::mem::replace(&mut begun, true) {
            pb.inc(1);
        }
        pb.set_message(what.to_string());
    })?;
    pb.finish_and_clear();
    let baseline = hat::audit::unigram_baseline(&samples);
    let charts = match &args.plot {
        Some(dir) => hat::audit::plot::charts(&audit).iter().map(|(name, svg)| hat::util::svg::write(dir, name, svg)).collect::<Result<Vec<_>, _>>()?,
        None => Vec::new(),
    };
    if args.json {
        println!("{}", serde_json::json!({ "results": audit.results, "costs": audit.costs, "unigram_baseline": baseline, "conversations": samples.len(), "wire_dtype": wire.name() }));
        return Ok(());
    }
    println!("| K1 | defence | direction | attack | inverter | attacker's pairs | top-1 | top-10 | content tokens |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &audit.results {
        let pairs = r.train_tokens.map_or("public weights".to_string(), |n| n.to_string());
        println!("| {} | {} | {} | {} | {} | {pairs} | {:.1} % | {:.1} % | {} |", r.input_layers, r.defence, r.direction, r.attack, r.inverter, 100.0 * r.top1, 100.0 * r.top10, r.tokens);
    }
    println!("\n| K1 | defence | next token agrees with the model's | device ms per token | rotation recovered to | fine-tune loss, first → last |");
    println!("|---|---|---|---|---|---|");
    for c in &audit.costs {
        let rotation = c.rotation_error.map_or("-".to_string(), |e| format!("{e:.1e}"));
        let tune = c.finetune_loss.map_or("-".to_string(), |[a, b]| format!("{a:.3} → {b:.3}"));
        println!("| {} | {} | {:.1} % | {:.1} | {rotation} | {tune} |", c.input_layers, c.defence, 100.0 * c.agreement, c.device_ms_per_token);
    }
    println!("\nunigram baseline (always the most frequent content token): {:.1} %; {} conversations, {} on the wire", 100.0 * baseline, samples.len(), wire.name());
    for c in charts {
        println!("chart: {}", c.display());
    }
    Ok(())
}
