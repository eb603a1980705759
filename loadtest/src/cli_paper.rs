//! The binary's `paper` command: one of the paper's experiments by name, run in the simulator,
//! with its tables, report files and plots.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use indicatif::ProgressBar;
use preble_loadtest::compare::{self, SweepRun};
use preble_loadtest::paper::{self, Contender, Point};
use preble_loadtest::report::{self, Judging, Summary};
use preble_loadtest::sim::SimConfig;
use preble_policy::{E2Config, PolicyKind};
use serde::Serialize;

/// What the `paper` command was asked.
pub struct PaperRun {
    /// The experiment (`list` for the list).
    pub name: String,
    /// Contenders of the sweeps and the mixed run.
    pub contenders: Vec<Contender>,
    /// The simulated cluster and its knobs.
    pub sim: SimConfig,
    /// Seed of the workload.
    pub seed: u64,
    /// Seed of the Poisson arrivals.
    pub arrival_seed: u64,
    /// Share of the paper's request counts to run.
    pub fraction: f64,
    /// Directory of the Azure traces.
    pub traces: PathBuf,
    /// Report directory; default `loadtest-report/paper/<name>`.
    pub out: Option<PathBuf>,
    /// How runs are judged.
    pub judging: Judging,
    /// The E2 the ablation takes apart: `e2` or `e2-paper` (the paper's code's rules).
    pub ablate: PolicyKind,
}

/// One progress bar per stage, replaced when the stage changes.
struct Stages {
    current: Option<(String, ProgressBar)>,
}

impl Stages {
    fn new() -> Self {
        Self { current: None }
    }

    fn update(&mut self, stage: String, ended: usize, total: usize) {
        if self.current.as_ref().is_none_or(|(s, _)| *s != stage) {
            self.finish();
            self.current = Some((stage.clone(), crate::bar(total as u64, stage)));
        }
        if let Some((_, b)) = &self.current {
            b.set_position(ended as u64);
        }
    }

    fn finish(&mut self) {
        if let Some((_, b)) = self.current.take() {
            b.finish_and_clear();
        }
    }
}

/// Runs the experiment `run.name`.
pub fn run(run: &PaperRun) -> Result<()> {
    if !(run.fraction > 0.0 && run.fraction <= 1.0) {
        bail!("--fraction must be in (0, 1], not {}", run.fraction);
    }
    let out = run
        .out
        .clone()
        .unwrap_or_else(|| Path::new("loadtest-report/paper").join(&run.name));
    match run.name.as_str() {
        "list" => {
            list(run.sim.cluster.units);
            Ok(())
        }
        paper::MIXED_NAME => mixed(run, &out),
        paper::ABLATION_NAME => ablation(run, &out),
        name => match paper::sweep(name) {
            Some(sweep) => rate_sweep(run, sweep, &out),
            None => bail!(
                "no paper experiment {name:?}; expected list or one of {}",
                paper::names().join(", ")
            ),
        },
    }
}

fn list(units: usize) {
    let show = |p: &Point| format!("[{}, {}, {}]", p.patterns, p.requests, p.rate);
    for s in paper::SWEEPS.iter().chain([&paper::ABLATION]) {
        let points: Vec<String> = s
            .points
            .iter()
            .map(|p| show(&p.scaled(units, 1.0)))
            .collect();
        println!(
            "{:<16} {} {:?}, on {units} units: {}  ({})",
            s.name,
            s.workload.name(),
            s.popularity,
            points.join(" "),
            s.source
        );
    }
    let parts: Vec<String> = paper::MIXED
        .iter()
        .map(|p| {
            format!(
                "{} [{}, {}] at {}",
                p.workload.name(),
                p.patterns,
                p.requests,
                p.trace
            )
        })
        .collect();
    println!(
        "{:<16} {}, entries {}.. x {}",
        paper::MIXED_NAME,
        parts.join(" + "),
        paper::MIXED_FIRST_ENTRY,
        paper::MIXED_TIME_SCALE
    );
}

fn rate_sweep(run: &PaperRun, sweep: &paper::Sweep, out: &Path) -> Result<()> {
    let units = run.sim.cluster.units;
    let mut stages = Stages::new();
    let mut all: Vec<SweepRun> = Vec::new();
    for (i, point) in sweep.points.iter().enumerate() {
        let point = point.scaled(units, run.fraction);
        let requests = paper::sweep_requests(sweep, point, run.seed, run.arrival_seed);
        let runs = tokio::task::block_in_place(|| {
            paper::run_contenders(
                &requests,
                sweep.name,
                point.rate,
                &run.contenders,
                &run.sim,
                run.judging,
                &mut |c, ended, total| {
                    let stage = format!(
                        "[{}/{}] {} @ {}/s",
                        i + 1,
                        sweep.points.len(),
                        c.label(),
                        point.rate
                    );
                    stages.update(stage, ended, total);
                },
            )
        });
        stages.finish();
        let summaries: Vec<Summary> = runs.iter().map(|r| r.summary.clone()).collect();
        print!("{}", report::table::render(&summaries));
        all.extend(runs);
    }
    let summaries: Vec<Summary> = all.iter().map(|r| r.summary.clone()).collect();
    print!("{}", compare::render_ratios(&compare::ratios(&summaries)));
    print_written(compare::write_report(out, &all)?);
    Ok(())
}

/// E2's gains over one contender in the mixed run, on the paper's four metrics.
#[derive(Serialize)]
struct MixedGain {
    baseline: String,
    avg_latency: f64,
    p99_latency: f64,
    avg_ttft: f64,
    avg_tpot: f64,
}

fn mixed(run: &PaperRun, out: &Path) -> Result<()> {
    let requests = paper::mixed_requests(&run.traces, run.seed, run.fraction)?;
    let span_s = requests.last().map_or(0.0, |r| r.at_ms / 1e3);
    println!(
        "{} requests over {span_s:.0} s: {:.2} req/s offered",
        requests.len(),
        requests.len() as f64 / span_s.max(1e-9)
    );
    let mut stages = Stages::new();
    let runs = tokio::task::block_in_place(|| {
        paper::run_contenders(
            &requests,
            paper::MIXED_NAME,
            0.0,
            &run.contenders,
            &run.sim,
            run.judging,
            &mut |c, ended, total| stages.update(format!("mixed {}", c.label()), ended, total),
        )
    });
    stages.finish();
    let summaries: Vec<Summary> = runs.iter().map(|r| r.summary.clone()).collect();
    print!("{}", report::table::render(&summaries));
    let gains = mixed_gains(&summaries);
    println!(
        "{:<18} {:>9} {:>9} {:>9} {:>9}   (baseline over e2; the paper vs round-robin: 6.0, 4.6, 5.6, 2.4)",
        "e2 vs", "avg", "p99", "ttft avg", "tpot avg"
    );
    for g in &gains {
        println!(
            "{:<18} {:>8.2}x {:>8.2}x {:>8.2}x {:>8.2}x",
            g.baseline, g.avg_latency, g.p99_latency, g.avg_ttft, g.avg_tpot
        );
    }
    let mut files = compare::write_report(out, &runs)?;
    let gains_file = out.join("gains.json");
    report::files::write_json(&gains_file, &gains)?;
    files.push(gains_file);
    print_written(files);
    Ok(())
}

fn mixed_gains(summaries: &[Summary]) -> Vec<MixedGain> {
    let Some(e2) = summaries.iter().find(|s| s.policy == PolicyKind::E2.name()) else {
        return Vec::new();
    };
    let over = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    summaries
        .iter()
        .filter(|s| s.policy != e2.policy)
        .map(|s| MixedGain {
            baseline: s.policy.clone(),
            avg_latency: over(s.latency_ms.mean, e2.latency_ms.mean),
            p99_latency: over(s.latency_ms.p99, e2.latency_ms.p99),
            avg_ttft: over(s.ttft_ms.mean, e2.ttft_ms.mean),
            avg_tpot: over(s.tpot_ms.mean, e2.tpot_ms.mean),
        })
        .collect()
}

fn ablation(run: &PaperRun, out: &Path) -> Result<()> {
    let sweep = &paper::ABLATION;
    let Some(point) = sweep.points.first() else {
        bail!("the ablation has no point");
    };
    let point = point.scaled(run.sim.cluster.units, run.fraction);
    let requests = paper::sweep_requests(sweep, point, run.seed, run.arrival_seed);
    let mut sim = run.sim.clone();
    match run.ablate {
        PolicyKind::E2 => {}
        // The paper's rules, with E2's prefill/decode balance for that step to add.
        PolicyKind::E2Paper => {
            sim.settings.e2 = E2Config {
                decode_discount: sim.settings.e2.decode_discount,
                ..sim.settings.e2.clone().paper()
            }
        }
        other => bail!("--ablate takes e2 or e2-paper, not {}", other.name()),
    }
    let mut stages = Stages::new();
    let steps = tokio::task::block_in_place(|| {
        paper::run_ablation(
            &requests,
            point.rate,
            &sim,
            run.judging,
            &mut |i, ended, total| stages.update(format!("ablation step {}", i + 1), ended, total),
        )
    });
    stages.finish();
    let summaries: Vec<Summary> = steps.iter().map(|(_, r)| r.summary.clone()).collect();
    print!("{}", report::table::render(&summaries));
    print!("{}", paper::render_ablation(&steps));
    std::fs::create_dir_all(out)?;
    let json = out.join("summary.json");
    report::files::write_json(&json, &summaries)?;
    let csv = out.join("summary.csv");
    report::files::write_summaries_csv(&csv, &summaries)?;
    let bars: Vec<(String, f64, f64)> = summaries
        .iter()
        .map(|s| {
            (
                s.policy.clone(),
                s.latency_ms.mean / 1e3,
                s.latency_ms.p99 / 1e3,
            )
        })
        .collect();
    let title = format!(
        "{} steps, ToolBench Zipf-1.1, {} req/s on {}",
        run.ablate.name(),
        point.rate,
        run.sim.cluster.name
    );
    let mut files = vec![json, csv];
    files.extend(report::plot::plot_steps(
        &out.join("ablation"),
        &title,
        &bars,
    )?);
    print_written(files);
    Ok(())
}

fn print_written(files: Vec<PathBuf>) {
    for f in files {
        println!("wrote {}", f.display());
    }
}
