//! `preble-loadtest`: generate Preble's workloads, simulate clusters, drive a live stack, and
//! compare scheduling policies. `preble-loadtest --help` lists the commands.

mod cli_paper;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use preble_loadtest::compare::{self, Sweep};
use preble_loadtest::live::{self, LiveConfig, Transport};
use preble_loadtest::paper::{self, Contender};
use preble_loadtest::report::{self, Judging, Summary};
use preble_loadtest::sim::{ClusterSpec, SimConfig, simulate};
use preble_loadtest::workload::arrivals::Arrivals;
use preble_loadtest::workload::stats::Stats;
use preble_loadtest::workload::synth::{Kind, Popularity, SynthConfig, generate};
use preble_loadtest::workload::{Request, Workload, trace};
use preble_localsched::WaitOrder;
use preble_policy::PolicyKind;

#[derive(Parser)]
#[command(
    version,
    about = "Preble's workloads, cluster simulator, live load driver and policy comparisons"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a workload and write it as JSON lines (the same file drives every mode).
    Gen {
        #[command(flatten)]
        workload: WorkloadArgs,
        #[command(flatten)]
        arrivals: ArrivalArgs,
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print a workload's statistics next to the paper's Table 1.
    Stats {
        #[command(flatten)]
        workload: WorkloadArgs,
    },
    /// Simulate one policy on one cluster (no services, no sleeping).
    Sim {
        #[command(flatten)]
        workload: WorkloadArgs,
        #[command(flatten)]
        arrivals: ArrivalArgs,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Global scheduling policy.
        #[arg(long, default_value = "e2")]
        policy: PolicyKind,
        #[command(flatten)]
        judging: JudgingArgs,
        /// Directory for summary.json, records.csv and the load plot.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Simulate several policies over a sweep of rates on the same requests and write the
    /// report (table, JSON, CSV, plots).
    Compare {
        /// Workloads, comma-separated (each gets the same number of requests).
        #[arg(long, value_delimiter = ',', default_value = "toolbench")]
        workloads: Vec<String>,
        /// Requests per run.
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        /// Seed of the workload and the arrivals.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Popularity of key prefixes: uniform, zipf or zipf:S.
        #[arg(long, default_value = "uniform")]
        popularity: Popularity,
        /// Number of distinct key prefixes per workload (the paper's prefix patterns);
        /// default: as Table 1's requests per key portion give.
        #[arg(long)]
        patterns: Option<usize>,
        /// Rates, requests per second, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        rates: Vec<f64>,
        /// Policies, comma-separated.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "e2,e2-paper,dynamo,sglang,round-robin,least-load,cache-aware,kv-cost"
        )]
        policies: Vec<PolicyKind>,
        #[command(flatten)]
        cluster: ClusterArgs,
        #[command(flatten)]
        judging: JudgingArgs,
        /// Directory of the report.
        #[arg(long, default_value = "loadtest-report")]
        out: PathBuf,
    },
    /// Run one of the paper's experiments by name in the simulator (`list` names them):
    /// the rate sweeps of Figure 3, the mixed Azure-trace run of Figure 4, the ablation of
    /// Figure 5.
    Paper {
        /// The experiment, or `list`.
        name: String,
        /// Contenders of the sweeps and the mixed run: policies, each optionally with its
        /// units' wait order (`round-robin/lpm` is the paper's SGLang baseline).
        #[arg(long, value_delimiter = ',', default_value = paper::DEFAULT_CONTENDERS)]
        policies: Vec<Contender>,
        #[command(flatten)]
        cluster: ClusterArgs,
        /// Seed of the workload.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Seed of the Poisson arrivals.
        #[arg(long, default_value_t = 7)]
        arrival_seed: u64,
        /// Share of the paper's request counts to run (quick looks), in (0, 1].
        #[arg(long, default_value_t = 1.0)]
        fraction: f64,
        /// Directory holding the Azure traces (the mixed run).
        #[arg(long, default_value = "../shared/traces")]
        traces: PathBuf,
        #[command(flatten)]
        judging: JudgingArgs,
        /// The E2 the ablation takes apart: e2, or e2-paper (the paper's code's rules).
        #[arg(long, default_value = "e2")]
        ablate: PolicyKind,
        /// Directory of the report; default: loadtest-report/paper/<name>.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Send a workload to a running stack and measure from the client side.
    Live {
        #[command(flatten)]
        workload: WorkloadArgs,
        #[command(flatten)]
        arrivals: ArrivalArgs,
        /// Gateway base URL (HTTP transport).
        #[arg(long, default_value = "http://127.0.0.1:8000")]
        gateway: String,
        /// Use the NATS request API at this URL instead of HTTP.
        #[arg(long)]
        nats: Option<String>,
        /// NATS user (the deployment's `client` identity from `preble-nats-auth`).
        #[arg(long, env = "PREBLE_NATS_USER", requires = "nats_password")]
        nats_user: Option<String>,
        /// NATS password.
        #[arg(long, env = "PREBLE_NATS_PASSWORD", hide_env_values = true)]
        nats_password: Option<String>,
        /// Subject prefix of the deployment (NATS transport).
        #[arg(long, default_value = preble_protocol::subjects::DEFAULT_PREFIX)]
        subject_prefix: String,
        /// Model name; default: the first the gateway lists.
        #[arg(long)]
        model: Option<String>,
        /// API key, if the gateway wants one.
        #[arg(long, env = "PREBLE_API_KEY")]
        api_key: Option<String>,
        /// Give up on a request after this many seconds.
        #[arg(long, default_value_t = 600)]
        request_timeout_s: u64,
        #[command(flatten)]
        judging: JudgingArgs,
        /// Directory for summary.json and records.csv.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Start a local stack of sim workers, run a workload through it over HTTP, run the same
    /// requests through the simulator, and compare the two.
    Crosscheck {
        #[command(flatten)]
        workload: WorkloadArgs,
        #[command(flatten)]
        arrivals: ArrivalArgs,
        /// Simulated workers (A6000 running Mistral-7B, in real time).
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// Global scheduling policy.
        #[arg(long, default_value = "e2")]
        policy: PolicyKind,
        /// Directory for both runs' summaries and records.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Overhead of the serving path (gateway + NATS + scheduler + worker hand-off).
    PathBench {
        /// Simulated workers.
        #[arg(long, default_value_t = 4)]
        workers: usize,
        /// Streams in the concurrent phase.
        #[arg(long, default_value_t = 200)]
        concurrency: usize,
        /// Requests per phase.
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        /// Only the open-loop phase (real-time GPUs, `concurrency` streams open).
        #[arg(long)]
        open_loop_only: bool,
        /// Instead: the throughput cost of span export over OTLP: tracing off, every request
        /// traced and a tenth traced, in rotating rounds.
        #[arg(long)]
        tracing_overhead: bool,
        /// Rounds of the tracing comparison.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
}

#[derive(Args, Clone)]
struct WorkloadArgs {
    /// A generator (toolbench, alfworld, apps, videoqa, loogle, mixed), a saved workload
    /// (`file:PATH`), or a trace (`azure:PATH`, `mooncake:PATH`).
    #[arg(long, default_value = "toolbench")]
    workload: String,
    /// Requests (generators: how many; files and traces: at most this many).
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Seed of the generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Popularity of key prefixes: uniform, zipf or zipf:S.
    #[arg(long, default_value = "uniform")]
    popularity: Popularity,
    /// Number of distinct key prefixes (the paper's prefix patterns); default: as Table 1's
    /// requests per key portion give.
    #[arg(long)]
    patterns: Option<usize>,
    /// Longest prompt plus output, tokens; default: the simulated model's context (`sim`),
    /// 32,768 otherwise.
    #[arg(long)]
    max_context: Option<u32>,
}

/// Context bound of generated prompts when neither `--max-context` nor a simulated model sets it.
const DEFAULT_MAX_CONTEXT: u32 = 32_768;

impl WorkloadArgs {
    /// The requests and a name for reports; `timed` says whether they carry their own times.
    /// Generated prompts fit `context` unless `--max-context` says otherwise.
    fn load(&self, context: u32) -> Result<(String, Vec<Request>, bool)> {
        let (name, mut requests, timed) = match self.workload.split_once(':') {
            Some(("file", path)) => (stem(path), Workload::load(path.as_ref())?.requests, true),
            Some(("azure", path)) => (stem(path), trace::load_azure(path.as_ref())?, true),
            Some(("mooncake", path)) => (stem(path), trace::load_mooncake(path.as_ref())?, true),
            _ => {
                let kind: Kind = self.workload.parse().map_err(anyhow::Error::msg)?;
                let requests = generate(&SynthConfig {
                    kind,
                    requests: self.requests,
                    seed: self.seed,
                    popularity: self.popularity,
                    patterns: self.patterns,
                    max_context: self.max_context.unwrap_or(context),
                });
                (kind.name().to_string(), requests, false)
            }
        };
        requests.truncate(self.requests);
        if requests.is_empty() {
            bail!("workload {} has no requests", self.workload);
        }
        Ok((name, requests, timed))
    }
}

fn stem(path: &str) -> String {
    std::path::Path::new(path)
        .file_stem()
        .map_or("trace".into(), |s| s.to_string_lossy().into_owned())
}

#[derive(Args, Clone)]
struct ArrivalArgs {
    /// Poisson arrivals at this many requests per second (default for generated workloads: 1).
    #[arg(long)]
    rate: Option<f64>,
    /// Use the timestamps of an Azure trace (`azure:PATH`) or Mooncake trace (`mooncake:PATH`).
    #[arg(long)]
    arrivals: Option<String>,
    /// Multiply trace times by this (0.5 replays twice as fast).
    #[arg(long, default_value_t = 1.0)]
    time_scale: f64,
    /// Seed of Poisson arrivals.
    #[arg(long, default_value_t = 7)]
    arrival_seed: u64,
}

/// A workload's name, its requests in arrival order with their times set, and the offered rate.
fn timed_workload(
    workload: &WorkloadArgs,
    arrivals: &ArrivalArgs,
    context: u32,
) -> Result<(String, Workload, f64)> {
    let (name, mut requests, timed) = workload.load(context)?;
    let rate = arrivals.apply(&mut requests, timed)?;
    Ok((name, Workload::new(requests), rate))
}

impl ArrivalArgs {
    /// Sets arrival times; returns the offered rate (0 when the times come from a trace).
    fn apply(&self, requests: &mut [Request], timed: bool) -> Result<f64> {
        if let Some(spec) = &self.arrivals {
            let times: Vec<f64> = match spec.split_once(':') {
                Some(("azure", path)) => trace::load_azure(path.as_ref())?,
                Some(("mooncake", path)) => trace::load_mooncake(path.as_ref())?,
                _ => bail!("--arrivals must be azure:PATH or mooncake:PATH, not {spec:?}"),
            }
            .iter()
            .map(|r| r.at_ms)
            .collect();
            Arrivals::Timestamps {
                times_ms: times,
                scale: self.time_scale,
            }
            .apply(requests);
            return Ok(0.0);
        }
        match (self.rate, timed) {
            (Some(rate), _) => {
                if !(rate > 0.0 && rate.is_finite()) {
                    bail!("--rate must be positive, not {rate}");
                }
                Arrivals::Poisson {
                    rate,
                    seed: self.arrival_seed,
                }
                .apply(requests);
                Ok(rate)
            }
            (None, true) => {
                for r in requests.iter_mut() {
                    r.at_ms *= self.time_scale;
                }
                Ok(0.0)
            }
            (None, false) => {
                Arrivals::Poisson {
                    rate: 1.0,
                    seed: self.arrival_seed,
                }
                .apply(requests);
                Ok(1.0)
            }
        }
    }
}

#[derive(Args, Clone)]
struct ClusterArgs {
    /// Cluster: `<GPUs>x<profile>` (4xa6000-mistral-7b, 8xh100-tp4-llama3-70b, ...) or the
    /// aliases 4xA6000-mistral7b and 8xH100-llama3-70b.
    #[arg(long, default_value = "4xA6000-mistral7b")]
    cluster: ClusterSpec,
    /// Chunked-prefill budget per iteration, tokens.
    #[arg(long, default_value_t = 512)]
    chunk_tokens: u32,
    /// KV capacity per serving unit, tokens; default: the profile's.
    #[arg(long)]
    kv_capacity_tokens: Option<u64>,
    /// Each unit's wait-queue order: priority, fcfs or lpm (SGLang's longest prefix match).
    #[arg(long, default_value = "priority")]
    wait_order: WaitOrder,
    #[command(flatten)]
    e2: E2Args,
}

/// E2's knobs, as the scheduler's flags of the same names (for experiments in simulation).
#[derive(Args, Clone)]
struct E2Args {
    /// E2: load window, milliseconds.
    #[arg(long = "e2-window-ms")]
    window_ms: Option<u64>,
    /// E2: rebalance when a holder's load exceeds the lightest worker's by this factor.
    #[arg(long = "e2-rebalance-threshold")]
    rebalance_threshold: Option<f64>,
    /// E2: replicate a prefix when its holder's TTFT grew by this factor over the window.
    #[arg(long = "e2-replicate-ttft-ratio")]
    replicate_ttft_ratio: Option<f64>,
    /// E2: weight of a worker's queued prefill in its load cost (0: the paper's load cost).
    #[arg(long = "e2-queue-weight")]
    queue_weight: Option<f64>,
    /// E2: weight of a decode-heavy worker's decode load for prefill-heavy requests.
    #[arg(long = "e2-decode-discount")]
    decode_discount: Option<f64>,
    /// E2: move whole prefixes between workers as the paper's code does (true or false).
    #[arg(long = "e2-subtree-rebalance")]
    subtree_rebalance: Option<bool>,
    /// E2: softmax temperature over normalised costs (0: pick the minimum).
    #[arg(long = "e2-temperature")]
    temperature: Option<f64>,
}

impl E2Args {
    /// Overrides `c`'s defaults with the flags given.
    fn apply(&self, c: &mut preble_policy::E2Config) {
        if let Some(v) = self.window_ms {
            c.window_ms = v;
        }
        if let Some(v) = self.rebalance_threshold {
            c.rebalance_threshold = v;
        }
        if let Some(v) = self.replicate_ttft_ratio {
            c.replicate_ttft_ratio = v;
        }
        if let Some(v) = self.queue_weight {
            c.queue_weight = v;
        }
        if let Some(v) = self.decode_discount {
            c.decode_discount = v;
        }
        if let Some(v) = self.subtree_rebalance {
            c.subtree_rebalance = v;
        }
        if let Some(v) = self.temperature {
            c.temperature = v;
        }
    }
}

impl ClusterArgs {
    fn config(&self, policy: PolicyKind) -> SimConfig {
        let mut c = SimConfig::new(self.cluster.clone(), policy);
        c.worker.chunk_tokens = self.chunk_tokens;
        c.worker.kv_capacity_tokens = self.kv_capacity_tokens;
        c.worker.wait_order = self.wait_order;
        self.e2.apply(&mut c.settings.e2);
        c
    }
}

#[derive(Args, Clone, Copy)]
struct JudgingArgs {
    /// Latency SLO for goodput, seconds.
    #[arg(long, default_value_t = 10.0)]
    slo_s: f64,
    /// Requests slower than this count as timed out, seconds.
    #[arg(long, default_value_t = 600.0)]
    timeout_s: f64,
}

impl From<JudgingArgs> for Judging {
    fn from(a: JudgingArgs) -> Self {
        Judging {
            slo_ms: a.slo_s * 1e3,
            timeout_ms: a.timeout_s * 1e3,
        }
    }
}

fn bar(len: u64, prefix: String) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:<32} [{bar:40}] {pos}/{len} requests, {elapsed} elapsed, eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(prefix);
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

fn write_run(dir: &std::path::Path, summary: &Summary, run: &report::RunResult) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    report::files::write_json(&dir.join("summary.json"), summary)?;
    report::files::write_records_csv(&dir.join("records.csv"), run)?;
    let mut written = vec![dir.join("summary.json"), dir.join("records.csv")];
    if !run.load.is_empty() {
        written.extend(report::plot::plot_load_over_time(&dir.join("load"), run)?);
    }
    for f in written {
        println!("wrote {}", f.display());
    }
    Ok(())
}

fn print_stats(name: &str, requests: &[Request]) {
    let s = Stats::of(requests);
    println!(
        "{name}: {} requests; prompt {:.0} ± {:.0} tokens; output {:.1} ± {:.1}; shared prefix {:.0}%; {:.1} requests per key; {:.2} req/s",
        s.requests,
        s.prompt_mean,
        s.prompt_std,
        s.output_mean,
        s.output_std,
        s.shared_fraction * 100.0,
        s.requests_per_key,
        s.rate
    );
    if let Some(shape) = name.parse::<Kind>().ok().and_then(|k| k.shape()) {
        println!(
            "{:>width$}  paper: prompt {:.0} ± {:.0}; output {:.1} ± {:.1}; shared prefix {:.0}%; {:.1} requests per key",
            "",
            shape.prompt_mean,
            shape.prompt_std,
            shape.output_mean,
            shape.output_std,
            shape.shared * 100.0,
            shape.per_key,
            width = name.len()
        );
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Gen {
            workload,
            arrivals,
            out,
        } => {
            let (name, w, _) = timed_workload(&workload, &arrivals, DEFAULT_MAX_CONTEXT)?;
            w.save(&out)?;
            print_stats(&name, &w.requests);
            println!("wrote {}", out.display());
        }
        Command::Stats { workload } => {
            let (name, requests, _) = workload.load(DEFAULT_MAX_CONTEXT)?;
            print_stats(&name, &requests);
        }
        Command::Sim {
            workload,
            arrivals,
            cluster,
            policy,
            judging,
            out,
        } => {
            let context = cluster.cluster.profile.model.context_len;
            let (name, workload, rate) = timed_workload(&workload, &arrivals, context)?;
            let requests = workload.requests;
            let config = cluster.config(policy);
            let progress = bar(
                requests.len() as u64,
                format!("{name} {} @ {rate:.2}/s", policy.name()),
            );
            let (mut run, counters) = tokio::task::block_in_place(|| {
                simulate(&requests, &config, &mut |n| progress.set_position(n as u64))
            });
            progress.finish_and_clear();
            run.workload = name;
            run.rate = rate;
            let summary = Summary::of(&run, judging.into());
            print!("{}", report::table::render(std::slice::from_ref(&summary)));
            println!(
                "simulated {:.0} s of {} in {:.1} s wall ({} iterations, {} preemptions, {} resyncs)",
                run.records
                    .iter()
                    .filter_map(|r| r.end_ms)
                    .fold(0.0, f64::max)
                    / 1e3,
                config.cluster.name,
                run.wall_s,
                counters.iterations,
                counters.preemptions,
                counters.resyncs
            );
            if let Some(dir) = out {
                write_run(&dir, &summary, &run)?;
            }
        }
        Command::Compare {
            workloads,
            requests,
            seed,
            popularity,
            patterns,
            rates,
            policies,
            cluster,
            judging,
            out,
        } => {
            let mut all = Vec::new();
            for name in &workloads {
                let kind: Kind = name.parse().map_err(anyhow::Error::msg)?;
                let sweep = Sweep {
                    workload: kind.name().to_string(),
                    requests: generate(&SynthConfig {
                        popularity,
                        patterns,
                        max_context: cluster.cluster.profile.model.context_len,
                        ..SynthConfig::new(kind, requests, seed)
                    }),
                    rates: rates.clone(),
                    policies: policies.clone(),
                    arrival_seed: seed,
                    sim: cluster.config(PolicyKind::E2),
                    judging: judging.into(),
                };
                let runs = rates.len() * policies.len();
                let mut current: Option<(usize, ProgressBar)> = None;
                let done = tokio::task::block_in_place(|| {
                    compare::run_sweep(&sweep, &mut |index, _, ended, n| {
                        if current.as_ref().is_none_or(|(i, _)| *i != index) {
                            if let Some((_, b)) = current.take() {
                                b.finish_and_clear();
                            }
                            let rate = rates[index / policies.len()];
                            let policy = policies[index % policies.len()].name();
                            current = Some((
                                index,
                                bar(
                                    n as u64,
                                    format!("[{}/{runs}] {name} {policy} @ {rate}/s", index + 1),
                                ),
                            ));
                        }
                        if let Some((_, b)) = &current {
                            b.set_position(ended as u64);
                        }
                    })
                });
                if let Some((_, b)) = current.take() {
                    b.finish_and_clear();
                }
                let summaries: Vec<Summary> = done.iter().map(|r| r.summary.clone()).collect();
                print!("{}", report::table::render(&summaries));
                print!("{}", compare::render_ratios(&compare::ratios(&summaries)));
                all.extend(done);
            }
            let files = compare::write_report(&out, &all)?;
            for f in files {
                println!("wrote {}", f.display());
            }
        }
        Command::Paper {
            name,
            policies,
            cluster,
            seed,
            arrival_seed,
            fraction,
            traces,
            judging,
            ablate,
            out,
        } => cli_paper::run(&cli_paper::PaperRun {
            name,
            contenders: policies,
            sim: cluster.config(PolicyKind::E2),
            seed,
            arrival_seed,
            fraction,
            traces,
            out,
            judging: judging.into(),
            ablate,
        })?,
        Command::Live {
            workload,
            arrivals,
            gateway,
            nats,
            nats_user,
            nats_password,
            subject_prefix,
            model,
            api_key,
            request_timeout_s,
            judging,
            out,
        } => {
            let (name, workload, rate) = timed_workload(&workload, &arrivals, DEFAULT_MAX_CONTEXT)?;
            let requests = workload.requests;
            let transport = match nats {
                Some(url) => Transport::Nats {
                    url,
                    subject_prefix,
                    credentials: nats_user.zip(nats_password),
                    api_key,
                },
                None => Transport::Http {
                    base_url: gateway.clone(),
                    api_key,
                },
            };
            let model = match model {
                Some(m) => m,
                None => live::first_model(&gateway)
                    .await
                    .context("asking the gateway for its models (or pass --model)")?,
            };
            let config = LiveConfig {
                transport,
                model,
                request_timeout: Duration::from_secs(request_timeout_s),
            };
            let progress = bar(requests.len() as u64, format!("live {name} @ {rate:.2}/s"));
            let mut run =
                live::run(&requests, &config, &|n| progress.set_position(n as u64)).await?;
            progress.finish_and_clear();
            run.workload = name;
            run.rate = rate;
            let summary = Summary::of(&run, judging.into());
            print!("{}", report::table::render(std::slice::from_ref(&summary)));
            if let Some(dir) = out {
                write_run(&dir, &summary, &run)?;
            }
            if summary.errors > 0 {
                let first = run.records.iter().find_map(|r| r.error.clone());
                bail!(
                    "{} of {} requests failed (first: {})",
                    summary.errors,
                    summary.requests,
                    first.unwrap_or_default()
                );
            }
        }
        Command::Crosscheck {
            workload,
            arrivals,
            workers,
            policy,
            out,
        } => {
            let (name, workload, rate) = timed_workload(&workload, &arrivals, DEFAULT_MAX_CONTEXT)?;
            let requests = workload.requests;
            crosscheck(&name, rate, &requests, workers, policy, out).await?;
        }
        Command::PathBench {
            workers,
            concurrency,
            requests,
            open_loop_only,
            tracing_overhead,
            rounds,
        } => {
            use preble_loadtest::path_bench::{open_loop_overhead, path_bench};
            if tracing_overhead {
                preble_loadtest::path_bench::tracing_overhead(
                    workers,
                    concurrency,
                    requests,
                    rounds,
                )
                .await?;
                return Ok(());
            }
            if !open_loop_only {
                path_bench(workers, concurrency, requests).await?;
            }
            open_loop_overhead(workers, concurrency, requests).await?;
        }
    }
    Ok(())
}

/// Runs `requests` live on a fresh local stack and in the simulator; prints both and the
/// ratio of their average latencies.
async fn crosscheck(
    name: &str,
    rate: f64,
    requests: &[Request],
    workers: usize,
    policy: PolicyKind,
    out: Option<PathBuf>,
) -> Result<()> {
    let stack = preble_tests::TestCluster::start(preble_tests::Options {
        workers,
        time_scale: 1.0,
        scheduler_args: vec!["--policy".into(), policy.name().into()],
        ..preble_tests::Options::default()
    })
    .await?;
    println!(
        "stack up: {workers} sim workers (a6000-mistral-7b, real time), gateway {}",
        stack.gateway
    );
    let config = LiveConfig {
        transport: Transport::Http {
            base_url: stack.gateway.clone(),
            api_key: None,
        },
        model: stack.model.clone(),
        request_timeout: Duration::from_secs(600),
    };
    let progress = bar(requests.len() as u64, format!("live {name} @ {rate:.2}/s"));
    let mut live_run = live::run(requests, &config, &|n| progress.set_position(n as u64)).await?;
    progress.finish_and_clear();
    drop(stack);
    live_run.workload = name.to_string();
    live_run.policy = format!("live {}", policy.name());
    live_run.rate = rate;
    let cluster: ClusterSpec = format!("{workers}xa6000-mistral-7b")
        .parse()
        .map_err(anyhow::Error::msg)?;
    let (mut sim_run, _) = tokio::task::block_in_place(|| {
        simulate(requests, &SimConfig::new(cluster, policy), &mut |_| {})
    });
    sim_run.workload = name.to_string();
    sim_run.policy = format!("sim {}", policy.name());
    sim_run.rate = rate;
    let judging = Judging::default();
    let (live_summary, sim_summary) = (
        Summary::of(&live_run, judging),
        Summary::of(&sim_run, judging),
    );
    print!(
        "{}",
        report::table::render(&[live_summary.clone(), sim_summary.clone()])
    );
    let ratio = live_summary.latency_ms.mean / sim_summary.latency_ms.mean;
    println!(
        "average latency: live {:.3} s, simulated {:.3} s: live/sim = {ratio:.3} ({:+.1}%); TTFT live {:.3} s, simulated {:.3} s",
        live_summary.latency_ms.mean / 1e3,
        sim_summary.latency_ms.mean / 1e3,
        (ratio - 1.0) * 100.0,
        live_summary.ttft_ms.mean / 1e3,
        sim_summary.ttft_ms.mean / 1e3,
    );
    if let Some(dir) = out {
        write_run(&dir.join("live"), &live_summary, &live_run)?;
        write_run(&dir.join("sim"), &sim_summary, &sim_run)?;
    }
    if live_summary.errors > 0 || live_summary.timed_out > 0 {
        bail!(
            "live run: {} errors, {} timed out",
            live_summary.errors,
            live_summary.timed_out
        );
    }
    Ok(())
}
