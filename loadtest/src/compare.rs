//! Several policies over a sweep of request rates on the same requests, in the simulator:
//! the table, files and plots that say which policy wins where.

use std::path::{Path, PathBuf};

use preble_policy::PolicyKind;
use serde::Serialize;

use crate::report::{self, Judging, RunResult, Summary};
use crate::sim::{SimConfig, SimCounters, simulate};
use crate::workload::Request;
use crate::workload::arrivals::Arrivals;

/// A sweep: every policy at every rate, on the same request contents.
#[derive(Clone, Debug)]
pub struct Sweep {
    /// The workload's name (for titles and file names).
    pub workload: String,
    /// The requests, in arrival order (their times are replaced at each rate).
    pub requests: Vec<Request>,
    /// Offered rates, requests per second.
    pub rates: Vec<f64>,
    /// Policies to compare.
    pub policies: Vec<PolicyKind>,
    /// Seed of the Poisson arrivals (the same at every rate and for every policy).
    pub arrival_seed: u64,
    /// Cluster and knobs (its `policy` is replaced by each of `policies`).
    pub sim: SimConfig,
    /// How runs are judged.
    pub judging: Judging,
}

/// One run of a sweep.
#[derive(Clone, Debug)]
pub struct SweepRun {
    /// Its summary.
    pub summary: Summary,
    /// Its records and load samples.
    pub result: RunResult,
    /// The simulator's own counters.
    pub counters: SimCounters,
}

/// Runs every (rate, policy) of `sweep`; `progress(run_index, runs, ended, requests)` reports
/// progress.
pub fn run_sweep(
    sweep: &Sweep,
    progress: &mut dyn FnMut(usize, usize, usize, usize),
) -> Vec<SweepRun> {
    let runs = sweep.rates.len() * sweep.policies.len();
    let mut out = Vec::with_capacity(runs);
    for &rate in &sweep.rates {
        let mut requests = sweep.requests.clone();
        Arrivals::Poisson {
            rate,
            seed: sweep.arrival_seed,
        }
        .apply(&mut requests);
        for &policy in &sweep.policies {
            let index = out.len();
            let config = SimConfig {
                policy,
                ..sweep.sim.clone()
            };
            let n = requests.len();
            let (mut result, counters) = simulate(&requests, &config, &mut |ended| {
                progress(index, runs, ended, n)
            });
            result.workload = sweep.workload.clone();
            result.rate = rate;
            let summary = Summary::of(&result, sweep.judging);
            out.push(SweepRun {
                summary,
                result,
                counters,
            });
        }
    }
    out
}

/// How much better E2 did than another policy at one rate.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Ratio {
    /// The workload.
    pub workload: String,
    /// The rate.
    pub rate: f64,
    /// The other policy.
    pub baseline: String,
    /// Its average latency over E2's.
    pub avg: f64,
    /// Its p99 latency over E2's.
    pub p99: f64,
    /// Whether the baseline was saturated at this rate (completed under 90% of the offered
    /// rate): a gain only here is a gain at saturation.
    pub baseline_saturated: bool,
    /// Whether E2 was.
    pub e2_saturated: bool,
}

/// Whether a run could not keep up with its offered rate.
pub fn saturated(s: &Summary) -> bool {
    s.throughput_rps < 0.9 * s.rate
}

/// E2's latency ratios against every other policy at every rate.
pub fn ratios(summaries: &[Summary]) -> Vec<Ratio> {
    let mut out = Vec::new();
    for e2 in summaries.iter().filter(|s| s.policy == "e2") {
        for other in summaries
            .iter()
            .filter(|s| s.policy != "e2" && s.rate == e2.rate && s.workload == e2.workload)
        {
            let div = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
            out.push(Ratio {
                workload: e2.workload.clone(),
                rate: e2.rate,
                baseline: other.policy.clone(),
                avg: div(other.latency_ms.mean, e2.latency_ms.mean),
                p99: div(other.latency_ms.p99, e2.latency_ms.p99),
                baseline_saturated: saturated(other),
                e2_saturated: saturated(e2),
            });
        }
    }
    out
}

/// The ratios as a terminal table.
pub fn render_ratios(ratios: &[Ratio]) -> String {
    let mut out = format!(
        "{:<10} {:>7} {:<12} {:>10} {:>10}  note\n",
        "workload", "rate", "vs", "avg x", "p99 x"
    );
    for r in ratios {
        let note = match (r.baseline_saturated, r.e2_saturated) {
            (true, true) => "both saturated",
            (true, false) => "baseline saturated",
            (false, true) => "e2 saturated",
            (false, false) => "",
        };
        out.push_str(&format!(
            "{:<10} {:>7.2} {:<12} {:>10.2} {:>10.2}  {}\n",
            r.workload, r.rate, r.baseline, r.avg, r.p99, note
        ));
    }
    out
}

/// Everything a sweep writes.
#[derive(Serialize)]
struct ReportFile<'a> {
    summaries: Vec<&'a Summary>,
    ratios: &'a [Ratio],
}

/// Writes `summary.json`, `summary.csv`, and the plots of `runs` into `dir`; returns the
/// files written.
pub fn write_report(dir: &Path, runs: &[SweepRun]) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let summaries: Vec<Summary> = runs.iter().map(|r| r.summary.clone()).collect();
    let ratios = ratios(&summaries);
    let mut files = Vec::new();
    let json = dir.join("summary.json");
    report::files::write_json(
        &json,
        &ReportFile {
            summaries: summaries.iter().collect(),
            ratios: &ratios,
        },
    )?;
    files.push(json);
    let csv = dir.join("summary.csv");
    report::files::write_summaries_csv(&csv, &summaries)?;
    files.push(csv);
    let mut workloads: Vec<&str> = summaries.iter().map(|s| s.workload.as_str()).collect();
    workloads.dedup();
    for workload in workloads {
        let of: Vec<Summary> = summaries
            .iter()
            .filter(|s| s.workload == workload)
            .cloned()
            .collect();
        files.extend(report::plot::plot_latency_vs_rate(
            &dir.join(format!("latency-vs-rate-{workload}")),
            workload,
            &of,
        )?);
        // CDFs and load at the highest rate no policy saturated at (else the lowest rate).
        let rates: Vec<f64> = of.iter().map(|s| s.rate).collect();
        let calm = rates
            .iter()
            .copied()
            .filter(|&r| of.iter().filter(|s| s.rate == r).all(|s| !saturated(s)))
            .fold(f64::NAN, f64::max);
        let rate = if calm.is_nan() {
            rates.iter().copied().fold(f64::INFINITY, f64::min)
        } else {
            calm
        };
        let at_rate: Vec<&SweepRun> = runs
            .iter()
            .filter(|r| r.summary.workload == workload && r.summary.rate == rate)
            .collect();
        let cdf: Vec<(String, Vec<f64>)> = at_rate
            .iter()
            .map(|r| {
                (
                    r.summary.policy.clone(),
                    r.result
                        .records
                        .iter()
                        .filter_map(|x| x.latency_ms())
                        .collect(),
                )
            })
            .collect();
        files.extend(report::plot::plot_latency_cdf(
            &dir.join(format!("latency-cdf-{workload}")),
            &format!("{workload} at {rate:.2} req/s: latency CDF"),
            &cdf,
        )?);
        for run in at_rate {
            files.extend(report::plot::plot_load_over_time(
                &dir.join(format!("load-{workload}-{}", run.summary.policy)),
                &run.result,
            )?);
        }
    }
    Ok(files)
}
