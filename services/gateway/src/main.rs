//! The `preble-gateway` binary.

use clap::Parser;
use preble_gateway::{Args, Config};

// Tokenising a huge prompt allocates hundreds of megabytes for a moment; mimalloc gives them
// back to the system afterwards, where the system allocator kept most (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tracing = preble_telemetry::init_tracing("preble-gateway", args.log_format);
    tracing
        .run(async {
            let config = Config::from_args(args)?;
            preble_gateway::run(config, preble_telemetry::shutdown_signal()).await
        })
        .await
}
