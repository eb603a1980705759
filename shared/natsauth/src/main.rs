//! `preble-nats-auth`: writes the NATS server configuration and every service's credentials
//! for one deployment (see the library's documentation).

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use preble_natsauth::Deployment;
use preble_protocol::Subjects;

/// Generates `nats.conf` (one user per role, each allowed only its own subjects) and one
/// credentials file per role (`gateway.env`, `scheduler.env`, `client.env`,
/// `worker-<id>.env`; mode 0600) into `--out`. Start the server with
/// `nats-server -c <out>/nats.conf` and each service with its file's variables.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory to write into (created if missing; existing files are replaced).
    #[arg(long, env = "PREBLE_NATS_AUTH_DIR")]
    out: PathBuf,
    /// Subject prefix of the deployment.
    #[arg(long, env = "PREBLE_SUBJECT_PREFIX", default_value = preble_protocol::subjects::DEFAULT_PREFIX)]
    subject_prefix: String,
    /// Worker ids, comma-separated (each gets its own identity).
    #[arg(long, value_delimiter = ',', required = true)]
    workers: Vec<String>,
    /// Address the server listens on.
    #[arg(long, default_value = "127.0.0.1:4223")]
    listen: String,
    /// JetStream store directory (default: `<out>/jetstream`).
    #[arg(long)]
    store_dir: Option<PathBuf>,
    /// bcrypt cost of the password hashes.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(4..=31))]
    bcrypt_cost: u32,
    /// The server's TLS certificate (PEM), with `--tls-key`: clients must then use TLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The key of the server's TLS certificate (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let store_dir = args
        .store_dir
        .clone()
        .unwrap_or_else(|| args.out.join("jetstream"));
    let generated = Deployment {
        subjects: Subjects::new(args.subject_prefix),
        workers: args.workers,
        listen: args.listen,
        store_dir,
        bcrypt_cost: args.bcrypt_cost,
        tls: args.tls_cert.zip(args.tls_key),
    }
    .generate()?;
    generated.write(&args.out)?;
    println!(
        "wrote nats.conf and {} credential files to {}",
        generated.credentials.len(),
        args.out.display()
    );
    Ok(())
}
