//! A discrete-event simulation of a preble cluster: the scheduler's policy, each worker's
//! local scheduler and KV cache, and GPU time from the cost model, with no sleeps and no
//! network. It runs the same crates as the services (`preble-policy`, `preble-localsched`,
//! `preble-costmodel`), so what it shows is what the services' logic does; what it leaves out
//! is the transport (NATS hops, tokenisation), which the live mode measures.
//!
//! Per worker it does what the worker's engine loop does: plan an iteration, take the cost
//! model's time for it, commit, stream tokens, finish requests, then report `Finished` and
//! the cache's inserts and evictions to the policy. Load reports reach the policy every
//! `report_period_ms`, like the workers' periodic reports.
//!
//! Layout: [`cluster`] names the clusters; this module runs them.

pub mod bound;
pub mod cluster;

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use preble_costmodel::SeqWork;
use preble_localsched::{CacheEvent, LocalScheduler, Plan, SchedulerConfig, WaitOrder};
use preble_policy::{
    ClusterEvent, ClusterView, Policy, PolicyKind, PolicySettings, RouteRequest, WorkerLoad,
    WorkerView,
};

pub use cluster::ClusterSpec;

use crate::report::{LoadSample, RequestRecord, RunResult};
use crate::workload::Request;

/// The local scheduler's knobs, with the worker's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct WorkerSettings {
    /// Chunked-prefill budget per iteration, tokens.
    pub chunk_tokens: u32,
    /// Most requests in the running batch.
    pub max_running: usize,
    /// Priority groups by cache-hit ratio.
    pub priority_groups: usize,
    /// Order of the wait queue.
    pub wait_order: WaitOrder,
    /// Share of the running requests' remaining output kept free at admission.
    pub decode_reserve: f64,
    /// KV capacity, tokens; default: the profile's.
    pub kv_capacity_tokens: Option<u64>,
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            chunk_tokens: 512,
            max_running: 256,
            priority_groups: 10,
            wait_order: WaitOrder::Priority,
            decode_reserve: 0.25,
            kv_capacity_tokens: None,
        }
    }
}

/// A simulation's setup.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The cluster.
    pub cluster: ClusterSpec,
    /// The global policy.
    pub policy: PolicyKind,
    /// Every policy's settings (E2's cost profile is set to the cluster's).
    pub settings: PolicySettings,
    /// Each worker's local scheduler.
    pub worker: WorkerSettings,
    /// How often workers report load, milliseconds (the worker's heartbeat default).
    pub report_period_ms: f64,
    /// How often the run samples each worker's load for the report, milliseconds.
    pub sample_period_ms: f64,
}

impl SimConfig {
    /// `policy` on `cluster` with every other knob at its default.
    pub fn new(cluster: ClusterSpec, policy: PolicyKind) -> Self {
        Self {
            cluster,
            policy,
            settings: PolicySettings::default(),
            worker: WorkerSettings::default(),
            report_period_ms: 500.0,
            sample_period_ms: 1000.0,
        }
    }
}

/// What the simulation noticed about itself (beyond the requests' records).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimCounters {
    /// Engine iterations run, all workers.
    pub iterations: u64,
    /// Requests preempted by a local scheduler.
    pub preemptions: u64,
    /// Times the policy's picture of a cache went out of step and was rebuilt from a digest
    /// (never expected: the simulator loses no events).
    pub resyncs: u64,
}

/// A request's state inside a simulated worker.
#[derive(Debug)]
struct Job {
    record: usize,
    prompt_hash: u64,
    accepted_ms: f64,
    first_token_ms: Option<f64>,
}

struct SimWorker {
    id: String,
    sched: LocalScheduler<Job>,
    plan: Option<Plan>,
    work: Vec<SeqWork>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Happening {
    Arrive(usize),
    StepDone(usize),
    Report,
    Sample,
}

#[derive(Debug)]
struct Event {
    t: f64,
    seq: u64,
    what: Happening,
}

impl PartialEq for Event {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Event {}
impl PartialOrd for Event {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Event {
    /// Earliest first out of a max-heap; ties in the order they were scheduled.
    fn cmp(&self, other: &Self) -> Ordering {
        other
            .t
            .total_cmp(&self.t)
            .then_with(|| other.seq.cmp(&self.seq))
    }
}

/// The token a simulated GPU samples: outside the prompt vocabulary, so outputs never
/// pretend to be a cached prompt.
fn sampled_token(prompt_hash: u64, index: usize) -> u32 {
    (1 << 30) | (preble_prefix::mix64(prompt_hash ^ (index as u64 + 1)) as u32 >> 2)
}

/// One simulation run.
struct Simulation<'a> {
    requests: &'a [Request],
    config: &'a SimConfig,
    policy: Box<dyn Policy>,
    workers: Vec<SimWorker>,
    views: Vec<WorkerView>,
    records: Vec<RequestRecord>,
    load: Vec<LoadSample>,
    heap: BinaryHeap<Event>,
    seq: u64,
    remaining: usize,
    counters: SimCounters,
}

/// Runs `requests` (in arrival order) through the simulated cluster; `progress` is called
/// with the number of ended requests as they end.
pub fn simulate(
    requests: &[Request],
    config: &SimConfig,
    progress: &mut dyn FnMut(usize),
) -> (RunResult, SimCounters) {
    let started = std::time::Instant::now();
    let profile = &config.cluster.profile;
    let mut settings = config.settings.clone();
    settings.e2.profile = profile.clone();
    let capacity = config
        .worker
        .kv_capacity_tokens
        .unwrap_or(profile.kv_capacity_tokens)
        .min(u64::from(u32::MAX));
    let sched_config = SchedulerConfig {
        kv_capacity: capacity as u32,
        prefill_budget: config.worker.chunk_tokens,
        max_running: config.worker.max_running,
        priority_groups: config.worker.priority_groups,
        wait_order: config.worker.wait_order,
        decode_reserve: config.worker.decode_reserve,
    };
    let workers: Vec<SimWorker> = (0..config.cluster.units)
        .map(|i| SimWorker {
            id: format!("gpu-{i}"),
            sched: LocalScheduler::new(sched_config.clone()),
            plan: None,
            work: Vec::new(),
        })
        .collect();
    let views = workers
        .iter()
        .map(|w| WorkerView {
            id: w.id.clone(),
            load: WorkerLoad::default(),
            kv_capacity_tokens: capacity,
        })
        .collect();
    let mut sim = Simulation {
        requests,
        config,
        policy: config.policy.build(&settings),
        workers,
        views,
        records: requests
            .iter()
            .zip(bound::lower_bounds(
                requests,
                profile,
                config.worker.chunk_tokens,
            ))
            .map(|(r, lower_bound)| RequestRecord {
                id: r.id,
                sent_ms: r.at_ms,
                prompt_tokens: r.prompt_len(),
                lower_bound_ms: Some(lower_bound),
                ..RequestRecord::default()
            })
            .collect(),
        load: Vec::new(),
        heap: BinaryHeap::new(),
        seq: 0,
        remaining: requests.len(),
        counters: SimCounters::default(),
    };
    sim.run(progress);
    let result = RunResult {
        mode: "sim".into(),
        workload: String::new(),
        policy: config.policy.name().to_string(),
        rate: 0.0,
        workers: sim.workers.iter().map(|w| w.id.clone()).collect(),
        records: sim.records,
        load: sim.load,
        wall_s: started.elapsed().as_secs_f64(),
    };
    (result, sim.counters)
}

impl Simulation<'_> {
    fn at(&mut self, t: f64, what: Happening) {
        self.seq += 1;
        self.heap.push(Event {
            t,
            seq: self.seq,
            what,
        });
    }

    fn run(&mut self, progress: &mut dyn FnMut(usize)) {
        if self.requests.is_empty() {
            return;
        }
        self.at(self.requests[0].at_ms, Happening::Arrive(0));
        self.at(self.config.report_period_ms, Happening::Report);
        self.at(0.0, Happening::Sample);
        let total = self.requests.len();
        let mut reported = total;
        while let Some(event) = self.heap.pop() {
            let now = event.t;
            match event.what {
                Happening::Arrive(i) => {
                    if i + 1 < total {
                        self.at(
                            self.requests[i + 1].at_ms.max(now),
                            Happening::Arrive(i + 1),
                        );
                    }
                    self.arrive(i, now);
                }
                Happening::StepDone(w) => {
                    self.finish_step(w, now);
                    self.start_step(w, now);
                }
                Happening::Report => {
                    self.report();
                    self.at(now + self.config.report_period_ms, Happening::Report);
                }
                Happening::Sample => {
                    self.sample(now);
                    self.at(now + self.config.sample_period_ms, Happening::Sample);
                }
            }
            if self.remaining != reported {
                reported = self.remaining;
                progress(total - self.remaining);
            }
            if self.remaining == 0 {
                break;
            }
        }
    }

    fn arrive(&mut self, i: usize, now: f64) {
        let request = &self.requests[i];
        let prompt = request.prompt();
        let request_id = request.id.to_string();
        let route = RouteRequest {
            request_id: &request_id,
            prompt: &prompt,
            max_tokens: request.output_tokens,
            now_ms: now as u64,
        };
        let decision = match self.policy.route(
            &ClusterView {
                workers: &self.views,
            },
            &route,
        ) {
            Ok(d) => d,
            Err(e) => return self.fail(i, now, e.to_string()),
        };
        let Some(w) = self.views.iter().position(|v| v.id == decision.worker) else {
            return self.fail(
                i,
                now,
                format!("policy chose unknown worker {}", decision.worker),
            );
        };
        let record = &mut self.records[i];
        record.worker = Some(w as u32);
        record.decision = Some(decision.kind.as_str().to_string());
        let worker = &mut self.workers[w];
        if let Err(e) = worker.sched.check(prompt.len(), request.output_tokens) {
            return self.fail(i, now, format!("context_length_exceeded: {e}"));
        }
        let load = &mut self.views[w].load;
        load.outstanding += 1;
        load.outstanding_prompt_tokens += prompt.len() as u64;
        let job = Job {
            record: i,
            prompt_hash: preble_prefix::path_hash(&prompt),
            accepted_ms: now,
            first_token_ms: None,
        };
        if let Err(e) = worker.sched.enqueue(job, prompt, request.output_tokens) {
            return self.fail(i, now, e.to_string());
        }
        if worker.plan.is_none() {
            self.start_step(w, now);
        }
    }

    fn fail(&mut self, i: usize, now: f64, error: String) {
        self.records[i].error = Some(error);
        self.records[i].end_ms = Some(now);
        self.remaining -= 1;
    }

    fn start_step(&mut self, w: usize, now: f64) {
        let worker = &mut self.workers[w];
        let plan = worker.sched.plan();
        self.counters.preemptions += plan.preempted.len() as u64;
        if plan.is_empty() {
            return;
        }
        worker.work.clear();
        worker.work.extend(plan.items.iter().map(|item| SeqWork {
            extend: item.extend,
            context: item.start,
        }));
        let ms = self.config.cluster.profile.iteration_ms(&worker.work);
        worker.plan = Some(plan);
        self.counters.iterations += 1;
        self.at(now + ms, Happening::StepDone(w));
    }

    fn finish_step(&mut self, w: usize, now: f64) {
        let worker = &mut self.workers[w];
        let Some(plan) = worker.plan.take() else {
            return;
        };
        let sampled: Vec<Option<u32>> = plan
            .items
            .iter()
            .map(|item| {
                let seq = &worker.sched.running()[item.index];
                item.samples
                    .then(|| sampled_token(seq.payload.prompt_hash, seq.generated().len()))
            })
            .collect();
        let mut ended = Vec::new();
        for (index, _) in worker.sched.commit(&plan, &sampled) {
            let seq = worker.sched.running_mut(index);
            seq.payload.first_token_ms.get_or_insert(now);
            if seq.generated().len() as u32 >= seq.max_new_tokens() {
                ended.push(index);
            }
        }
        ended.sort_unstable_by(|a, b| b.cmp(a));
        for index in ended {
            let seq = self.workers[w].sched.finish(index);
            let job = &seq.payload;
            let output = seq.generated().len() as u32;
            let first = job.first_token_ms.unwrap_or(now);
            let record = &mut self.records[job.record];
            record.first_token_ms = Some(first);
            record.end_ms = Some(now);
            record.cached_tokens = seq.cached_prompt_tokens();
            record.output_tokens = output;
            let request_id = record.id.to_string();
            self.remaining -= 1;
            let load = &mut self.views[w].load;
            load.outstanding = load.outstanding.saturating_sub(1);
            load.outstanding_prompt_tokens = load
                .outstanding_prompt_tokens
                .saturating_sub(u64::from(seq.prompt_len()));
            let tpot_ms = if output > 1 {
                (now - first) / f64::from(output - 1)
            } else {
                0.0
            };
            // Finished events carry no cache state, so they cannot be out of step.
            let _ = self.policy.observe(&ClusterEvent::Finished {
                worker: &self.workers[w].id,
                output_tokens: output,
                ttft_ms: first - job.accepted_ms,
                tpot_ms,
                now_ms: now as u64,
            });
            let _ = self.policy.observe(&ClusterEvent::Released {
                worker: &self.workers[w].id,
                request_id: &request_id,
            });
        }
        self.publish_cache_events(w, now);
    }

    /// Feeds the worker's cache changes to the policy, rebuilding its picture from a digest if
    /// one does not apply (as the scheduler service does).
    fn publish_cache_events(&mut self, w: usize, now: f64) {
        let worker = &mut self.workers[w];
        let mut out_of_step = false;
        for event in worker.sched.take_events() {
            let result = match &event {
                CacheEvent::Inserted(span) => self.policy.observe(&ClusterEvent::CacheInserted {
                    worker: &worker.id,
                    parent_hash: span.parent_hash,
                    hash: span.hash,
                    tokens: &span.tokens,
                    now_ms: now as u64,
                }),
                CacheEvent::Evicted { hash, num_tokens } => {
                    self.policy.observe(&ClusterEvent::CacheEvicted {
                        worker: &worker.id,
                        hash: *hash,
                        num_tokens: *num_tokens,
                    })
                }
            };
            out_of_step |= result.is_err();
        }
        if out_of_step {
            self.counters.resyncs += 1;
            let _ = self
                .policy
                .observe(&ClusterEvent::CacheReset { worker: &worker.id });
            for span in worker.sched.cache().digest() {
                let _ = self.policy.observe(&ClusterEvent::CacheInserted {
                    worker: &worker.id,
                    parent_hash: span.parent_hash,
                    hash: span.hash,
                    tokens: &span.tokens,
                    now_ms: now as u64,
                });
            }
        }
    }

    /// Every worker's periodic load report. (`reported_drain_ms` stays 0: no policy reads it.)
    fn report(&mut self) {
        for (worker, view) in self.workers.iter().zip(&mut self.views) {
            let load = worker.sched.load();
            view.load.reported_prefill_tokens = load.queued_prefill_tokens;
            view.load.reported_decode_tokens = load.running_decode_tokens;
        }
    }

    fn sample(&mut self, now: f64) {
        for (i, worker) in self.workers.iter().enumerate() {
            let load = worker.sched.load();
            let capacity = f64::from(worker.sched.config().kv_capacity).max(1.0);
            self.load.push(LoadSample {
                t_ms: now,
                worker: i as u32,
                running: load.running,
                waiting: load.waiting,
                prefill_tokens: load.queued_prefill_tokens,
                kv_used: 1.0 - load.free_slots as f64 / capacity,
            });
        }
    }
}
