//! `hat generate`: the unsplit model, locally — the reference for every split path.

use hat::decode::{generate, ModelDecoder};

use crate::{ModelArgs, PromptArgs, SamplingArgs, Streamer};

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

    #[command(flatten)]
    pub prompt: PromptArgs,

    #[command(flatten)]
    pub sampling: SamplingArgs,

    /// Print one JSON object with the text, ids and timings instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let prompt = args.prompt.read()?;
    let sampling = args.sampling.params()?;
    let device = hat::io::source::select_device(&args.model.device)?;
    let loaded = args.model.load()?;
    let model = loaded.model(candle_core::DType::F32, &device)?;
    let tokenizer = &loaded.tokenizer;
    let ids = tokenizer.encode_prompt(&prompt, !args.prompt.no_chat_template)?;

    let mut out = Streamer::new(tokenizer, args.json);
    let mut decoder = ModelDecoder::new(&model);
    // On a thread of the compute pool (see `in_pool`).
    let report = hat::util::threads::in_pool(|| generate(&mut decoder, &ids, args.sampling.max_tokens, &sampling, &tokenizer.eos_token_ids, |id| out.push(id)))?;
    out.finish()?;
    if args.json {
        let mut v = serde_json::to_value(&report)?;
        v["text"] = tokenizer.decode(&report.token_ids, true)?.into();
        v["model"] = loaded.name.clone().into();
        println!("{}", serde_json::to_string(&v)?);
    } else {
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
