//! `preble-faults`: the fault suite. Runs each fault under load on a fresh local stack (its
//! own NATS and Redis, sim workers, two gateways) and prints what the clients saw, as a
//! Markdown table (and JSON with `--json`).
//!
//! Needs the service binaries built with the same profile (`cargo build --workspace --bins`,
//! or `--release`), `nats-server` and `redis-server`.

use std::time::Duration;

use anyhow::{Result, bail};
use clap::Parser;
use preble_tests::faults::{self, Fault, SuiteOptions};

/// Runs faults under load and reports sent, completed, refused, failed and lost requests.
#[derive(Parser)]
#[command(name = "preble-faults")]
struct Cli {
    /// Faults to run, comma-separated (worker-kill, scheduler-kill, redis-restart,
    /// nats-restart, gateway-kill, overload); default: all.
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// Streaming requests per fault.
    #[arg(long, default_value_t = 600)]
    requests: usize,
    /// Seconds over which they are sent; the fault strikes at 40% of it.
    #[arg(long, default_value_t = 10.0)]
    spread_s: f64,
    /// Tokens per request.
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Sim workers.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Sim time multiplier (1: the modelled GPU's speed).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Requests the overload sends at once.
    #[arg(long, default_value_t = 3000)]
    overload_requests: usize,
    /// Tokens per overload request.
    #[arg(long, default_value_t = 256)]
    overload_max_tokens: u32,
    /// Requests each gateway admits at once during the overload.
    #[arg(long, default_value_t = 512)]
    overload_limit: usize,
    /// Seconds after which a request counts as lost.
    #[arg(long, default_value_t = 60.0)]
    deadline_s: f64,
    /// Also write the reports as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let chosen: Vec<Fault> = if cli.faults.is_empty() {
        Fault::ALL.to_vec()
    } else {
        cli.faults
            .iter()
            .map(|f| Fault::parse(f))
            .collect::<Result<_>>()?
    };
    if cli.spread_s < 0.0 || cli.deadline_s <= 0.0 || cli.requests == 0 {
        bail!("--spread-s must be at least 0, --deadline-s and --requests positive");
    }
    let options = SuiteOptions {
        requests: cli.requests,
        spread: Duration::from_secs_f64(cli.spread_s),
        max_tokens: cli.max_tokens,
        workers: cli.workers,
        time_scale: cli.time_scale,
        overload_requests: cli.overload_requests,
        overload_max_tokens: cli.overload_max_tokens,
        overload_limit: cli.overload_limit,
        deadline: Duration::from_secs_f64(cli.deadline_s),
    };
    let mut reports = Vec::new();
    for fault in chosen {
        eprintln!("== {}", fault.name());
        let report = faults::run_fault(fault, &options, &|line| eprintln!("   {line}")).await?;
        for example in &report.examples {
            eprintln!("   {example}");
        }
        reports.push(report);
    }
    println!("{}", faults::table(&reports));
    if let Some(path) = cli.json {
        let json: Vec<_> = reports.iter().map(|r| r.to_json()).collect();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, serde_json::to_string_pretty(&json)?)?;
        eprintln!("wrote {}", path.display());
    }
    let broken: usize = reports.iter().map(|r| r.failed + r.lost).sum();
    if broken > 0 {
        bail!("{broken} requests failed or were lost");
    }
    Ok(())
}
