//! Subcommands whose issues are still open. They are listed in `hat --help` from the start, and
//! refuse to run (non-zero exit) until they are built; each moves to its own file when it is.

/// Arguments are accepted verbatim so that `hat X --anything` reaches the clear refusal.
macro_rules! pending_args {
    ($name:ident, $about:literal) => {
        #[derive(clap::Args, Debug)]
        #[command(about = $about, disable_help_flag = false)]
        pub struct $name {
            #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
            pub args: Vec<String>,
        }
    };
}

pending_args!(ProfileArgs, "Profile device, cloud and link to choose chunk sizes (not implemented yet)");

pub fn run(name: &str, _args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("`hat {name}` is not implemented yet")
}
