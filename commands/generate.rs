//! `hat generate`: the unsplit model, locally — the reference for every split path.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use hat::generate::{generate, ModelDecoder, SamplingParams};
use hat::tokenizer::TextStream;

use crate::ModelArgs;

/// Generate text with the whole (unsplit) model on this machine.
///
/// Applies the model's chat template to the prompt, streams the answer to stdout and stops at
/// the end-of-sequence token or --max-tokens. Timing goes to stderr; --json prints one JSON
/// object instead (text, token_ids, prompt_tokens, generated_tokens, ttft_ms, tbt_ms,
/// tokens_per_s, prefill_tokens_per_s, stop_reason).
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// The prompt (a user message when the chat template applies).
    #[arg(long, short = 'p', conflicts_with = "prompt_file", required_unless_present = "prompt_file")]
    pub prompt: Option<String>,

    /// Read the prompt from a file ('-' for stdin).
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,

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

    /// Random seed for sampling.
    #[arg(long, default_value_t = 299_792_458)]
    pub seed: u64,

    /// Feed the prompt as raw text instead of through the model's chat template.
    #[arg(long)]
    pub no_chat_template: bool,

    /// Print one JSON object with the text, ids and timings instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

/// Reads `--prompt` or `--prompt-file`.
pub fn read_prompt(prompt: &Option<String>, file: &Option<PathBuf>) -> anyhow::Result<String> {
    match (prompt, file) {
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

pub fn run(args: Args) -> anyhow::Result<()> {
    let prompt = read_prompt(&args.prompt, &args.prompt_file)?;
    let sampling = SamplingParams { temperature: args.temperature, top_p: args.top_p, top_k: args.top_k, seed: args.seed };
    sampling.validate()?;
    let device = hat::source::select_device(&args.model.device)?;
    let loaded = args.model.load()?;
    let model = loaded.model(candle_core::DType::F32, &device)?;
    let tokenizer = &loaded.tokenizer;
    let ids = tokenizer.encode_prompt(&prompt, !args.no_chat_template)?;

    let mut stream = TextStream::new(tokenizer);
    let mut stdout = std::io::stdout().lock();
    let mut decoder = ModelDecoder::new(&model);
    let report = generate(&mut decoder, &ids, args.max_tokens, &sampling, &tokenizer.eos_token_ids, |id| {
        if !args.json {
            if let Some(piece) = stream.push(id)? {
                let _ = write!(stdout, "{piece}");
                let _ = stdout.flush();
            }
        }
        Ok(())
    })?;
    let text = tokenizer.decode(&report.token_ids, true)?;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["text"] = serde_json::Value::String(text);
        v["model"] = serde_json::Value::String(loaded.name.clone());
        writeln!(stdout, "{}", serde_json::to_string(&v)?)?;
    } else {
        if let Some(rest) = stream.finish()? {
            write!(stdout, "{rest}")?;
        }
        writeln!(stdout)?;
        eprintln!(
            "hat: {} prompt tokens, {} generated ({:?}); TTFT {:.1} ms ({:.0} tok/s prefill), TBT {:.2} ms ({:.1} tok/s)",
            report.prompt_tokens,
            report.generated_tokens,
            report.stop_reason,
            report.ttft_ms,
            report.prefill_tokens_per_s,
            report.tbt_ms,
            report.tokens_per_s
        );
    }
    Ok(())
}
