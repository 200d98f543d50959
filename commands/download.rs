//! `hat download`: fetch a model from the Hugging Face hub into its cache (and a folder).

use std::path::PathBuf;

use anyhow::Context;
use hat::io::source::{safetensors_files, ModelSpec, DEFAULT_HUB_ID};

/// Fetch a model from the Hugging Face hub (config, tokenizer, safetensors weights).
///
/// Files go to the hub cache ($HF_HOME); with --out they are also copied into a folder usable
/// as --model. HF_HUB_OFFLINE=1 resolves from the cache only.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Hub id org/name[@revision].
    #[arg(long, short = 'm', default_value = DEFAULT_HUB_ID)]
    pub model: String,

    /// Copy the files into this folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let ModelSpec::Hub { repo, revision } = ModelSpec::parse(&args.model)? else {
        anyhow::bail!("--model {} is a local path; hat download takes a hub id org/name[@revision]", args.model);
    };
    let dir = hat::io::hub::snapshot(&repo, revision.as_deref())?;
    let Some(out) = args.out else {
        println!("{}", dir.display());
        return Ok(());
    };
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut files: Vec<PathBuf> = ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "model.safetensors.index.json"]
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| p.exists())
        .collect();
    files.extend(safetensors_files(&dir)?);
    for f in files {
        let name = f.file_name().context("file without a name")?;
        std::fs::copy(&f, out.join(name)).with_context(|| format!("cannot copy {} to {}", f.display(), out.display()))?;
    }
    println!("{}", out.display());
    Ok(())
}
