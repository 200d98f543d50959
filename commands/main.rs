//! The `hat` command line: a thin layer over the `hat` library, one file per subcommand.

mod download;
mod generate;
mod pending;
mod split;

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    Generate(generate::Args),
    Split(split::Args),
    TrainAdapter(pending::TrainAdapterArgs),
    Profile(pending::ProfileArgs),
    ServeCloud(pending::ServeCloudArgs),
    RunEdge(pending::RunEdgeArgs),
    Download(download::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Split(a) => split::run(a),
        Command::Download(a) => download::run(a),
        Command::TrainAdapter(a) => pending::run("train-adapter", &a.args),
        Command::Profile(a) => pending::run("profile", &a.args),
        Command::ServeCloud(a) => pending::run("serve-cloud", &a.args),
        Command::RunEdge(a) => pending::run("run-edge", &a.args),
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
    pub fn load(&self) -> anyhow::Result<hat::source::LoadedModel> {
        use anyhow::Context;
        let spec = hat::source::ModelSpec::from_arg(self.model.as_deref())?;
        let t = std::time::Instant::now();
        let model = hat::source::LoadedModel::load(&spec).with_context(|| format!("cannot load model {spec}"))?;
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
