//! The `preble-scheduler` binary.

use clap::Parser;
use preble_scheduler::{Args, Config};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tracing = preble_telemetry::init_tracing("preble-scheduler", args.log_format);
    tracing
        .run(async {
            let config = Config::from_args(args)?;
            preble_scheduler::run(config, preble_telemetry::shutdown_signal()).await
        })
        .await
}
