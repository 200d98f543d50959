//! `hat split`: cut a model into the device and cloud bundles.

use std::path::PathBuf;

use hat::split::{parse_dtype, write_split, SplitPlan};

use crate::ModelArgs;

/// Cut a model into a device bundle and a cloud bundle.
///
/// DIR/device/ gets the embedding, layers [0, K1), layers [L-K2, L), the final norm, the LM head,
/// the tokenizer and chat template; DIR/cloud/ gets layers [K1, L-K2) only. Both carry a
/// manifest.json with the same split id, derived from the model's content hash and the layer
/// ranges (the same split made twice gets the same id).
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,

    /// K1: decoder layers kept on the device before the cloud (at least 1).
    #[arg(long, default_value_t = 2)]
    pub input_layers: usize,

    /// K2: decoder layers kept on the device after the cloud (at least 1).
    #[arg(long, default_value_t = 2)]
    pub output_layers: usize,

    /// Output directory (gets device/ and cloud/).
    #[arg(long)]
    pub out: PathBuf,

    /// Storage dtype of the bundles' weights: f32, f16 or bf16.
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
    pub dtype: String,

    /// Replace the contents of a non-empty --out (only once the new bundles are complete).
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dtype = parse_dtype(&args.dtype)?;
    let model = args.model.load()?;
    let plan = SplitPlan::new(model.config.num_hidden_layers, args.input_layers, args.output_layers)?;
    let bar = hat::util::progress::bar(0, "splitting");
    let out = write_split(&model, &plan, &args.out, dtype, args.force, &bar)?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let (i, m, o) = (plan.input_range(), plan.middle_range(), plan.output_range());
    println!("split id {}", out.split_id);
    println!(
        "device: {} (embedding, layers [{}, {}) and [{}, {}), head; {:.1} MiB)",
        out.device_dir.display(),
        i.start,
        i.end,
        o.start,
        o.end,
        mib(out.device_bytes)
    );
    println!("cloud:  {} (layers [{}, {}); {:.1} MiB)", out.cloud_dir.display(), m.start, m.end, mib(out.cloud_bytes));
    Ok(())
}
