//! Writes the project's generated model directory (tokenizer and configuration files).

use std::path::PathBuf;

use clap::Parser;
use preble_modelgen::{SimModelOptions, write_sim_model};

/// Generate a model directory for the `sim` engine: a BPE tokenizer trained on text in this
/// repository, plus `config.json`, `tokenizer_config.json` and `generation_config.json`.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory to write (its name is the served model name by default).
    #[arg(long, default_value = "models/preble-sim")]
    out: PathBuf,
    /// Target vocabulary size.
    #[arg(long, default_value_t = 2048)]
    vocab_size: usize,
    /// Context length of the model.
    #[arg(long, default_value_t = 32768)]
    context_len: u32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    write_sim_model(
        &args.out,
        &SimModelOptions {
            vocab_size: args.vocab_size,
            context_len: args.context_len,
        },
    )?;
    println!("wrote {}", args.out.display());
    Ok(())
}
