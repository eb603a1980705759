//! The scheduler's view of its workers: who is alive, what they serve, and how loaded they are.
//!
//! Load is charged when a request is dispatched and released on every way it can end (finished,
//! failed, cancelled, dispatch not accepted, worker dead), so a burst of requests sees the
//! charges of the ones before it instead of waiting for the next periodic load report.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use preble_policy::workers::MAX_WORKERS;
use preble_policy::{WorkerLoad, WorkerView};
use preble_protocol::{WorkerEvent, WorkerEventBody};

/// What the scheduler knows about one worker.
#[derive(Clone, Debug)]
pub struct WorkerState {
    /// Models it serves.
    pub models: Vec<String>,
    /// When it was last heard from.
    pub last_seen: Instant,
    /// Its heartbeat period.
    pub period: Duration,
    /// Its load (charges plus last report).
    pub load: WorkerLoad,
    /// Sequence number of its last event.
    pub last_seq: Option<u64>,
    /// Whether it announced it is leaving.
    pub leaving: bool,
    /// Its KV-cache capacity, tokens.
    pub kv_capacity_tokens: u64,
    /// Tokens its cache events say it holds (inserted minus evicted since its last digest).
    pub cached_tokens: u64,
}

/// A request dispatched to a worker and not yet finished.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outstanding {
    /// The worker.
    pub worker: String,
    /// Its prompt length.
    pub prompt_tokens: u64,
    /// Its stream key (to tell the client if the worker dies).
    pub stream_key: String,
}

/// What observing an event changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The worker is known (it has sent a heartbeat): only then do its other events count.
    pub known: bool,
    /// The worker is new (or back).
    pub joined: bool,
    /// A new worker announced itself while the cluster already had as many as a scheduler
    /// routes to ([`MAX_WORKERS`]): it is not admitted (its requests would all fail).
    pub refused: bool,
    /// Events were lost between the previous one and this one.
    pub gap: bool,
    /// A request ended: its charge was released.
    pub released: Option<String>,
}

/// Longest heartbeat period a worker may announce; a longer one is taken as this.
const MAX_HEARTBEAT_PERIOD: Duration = Duration::from_secs(60);

/// The period a heartbeat announces, within 1 ms and [`MAX_HEARTBEAT_PERIOD`].
fn heartbeat_period(period_ms: u64) -> Duration {
    Duration::from_millis(period_ms.max(1)).min(MAX_HEARTBEAT_PERIOD)
}

/// Every worker and every outstanding request.
#[derive(Debug)]
pub struct Cluster {
    workers: BTreeMap<String, WorkerState>,
    outstanding: HashMap<String, Outstanding>,
    misses: u32,
}

impl Cluster {
    /// An empty cluster; a worker silent for `misses` heartbeat periods is dead.
    pub fn new(misses: u32) -> Self {
        Self {
            workers: BTreeMap::new(),
            outstanding: HashMap::new(),
            misses,
        }
    }

    /// Applies one worker event.
    pub fn observe(&mut self, event: &WorkerEvent, now: Instant) -> Observed {
        let mut observed = Observed::default();
        // Only the worker a request was dispatched to can end it.
        if let WorkerEventBody::Finished(f) = &event.body
            && self
                .outstanding
                .get(&f.request_id)
                .is_some_and(|o| o.worker == event.worker_id)
        {
            observed.released = self.release(&f.request_id).map(|_| f.request_id.clone());
        }
        let joined_by = match &event.body {
            WorkerEventBody::Heartbeat(h) => Some(h),
            _ => None,
        };
        let full = self.workers.len() >= MAX_WORKERS;
        let state = match (self.workers.get_mut(&event.worker_id), joined_by) {
            (Some(state), _) => state,
            (None, Some(_)) if full => {
                observed.refused = true;
                return observed;
            }
            (None, Some(beat)) => {
                observed.joined = true;
                self.workers
                    .entry(event.worker_id.clone())
                    .or_insert(WorkerState {
                        models: beat.models.clone(),
                        last_seen: now,
                        period: heartbeat_period(beat.period_ms),
                        load: WorkerLoad::default(),
                        last_seq: None,
                        leaving: false,
                        kv_capacity_tokens: beat.kv_capacity_tokens,
                        cached_tokens: 0,
                    })
            }
            // Events of a worker we do not know (yet) count once its heartbeat arrives.
            (None, None) => return observed,
        };
        observed.known = true;
        state.last_seen = now;
        if let Some(last) = state.last_seq
            && event.seq > last.saturating_add(1)
        {
            observed.gap = true;
        }
        if state.last_seq.is_none_or(|last| event.seq > last) || event.seq == 0 {
            state.last_seq = Some(event.seq);
        }
        match &event.body {
            WorkerEventBody::Heartbeat(beat) => {
                state.models = beat.models.clone();
                state.period = heartbeat_period(beat.period_ms);
                state.leaving = false;
                state.kv_capacity_tokens = beat.kv_capacity_tokens;
            }
            WorkerEventBody::Load(report) => {
                state.load.reported_prefill_tokens = report.queued_prefill_tokens;
                state.load.reported_drain_ms = report.est_drain_ms;
                state.load.reported_decode_tokens = report.running_decode_tokens;
            }
            WorkerEventBody::Leaving => state.leaving = true,
            _ => {}
        }
        observed
    }

    /// Live workers that serve `model` and are not in `excluded`, in id order.
    pub fn eligible(&self, model: &str, excluded: &[String]) -> Vec<WorkerView> {
        self.workers
            .iter()
            .filter(|(id, w)| {
                !w.leaving && w.models.iter().any(|m| m == model) && !excluded.contains(id)
            })
            .map(|(id, w)| WorkerView {
                id: id.clone(),
                load: w.load,
                kv_capacity_tokens: w.kv_capacity_tokens,
            })
            .collect()
    }

    /// Whether any live worker serves `model`.
    pub fn serves(&self, model: &str) -> bool {
        !self.eligible(model, &[]).is_empty()
    }

    /// Counts a change to what `worker`'s cache holds: `inserted` tokens cached, `evicted`
    /// dropped. Returns false when the worker now claims more than twice its announced capacity
    /// (a lie, beyond any reordering of one iteration's inserts and evictions: its picture must
    /// be rebuilt from a digest).
    pub fn cache_changed(&mut self, worker: &str, inserted: u64, evicted: u64) -> bool {
        let Some(w) = self.workers.get_mut(worker) else {
            return true;
        };
        w.cached_tokens = w
            .cached_tokens
            .saturating_add(inserted)
            .saturating_sub(evicted);
        w.cached_tokens <= w.kv_capacity_tokens.saturating_mul(2)
    }

    /// What `worker`'s cache holds, as its digest says.
    pub fn cache_reset(&mut self, worker: &str, tokens: u64) {
        if let Some(w) = self.workers.get_mut(worker) {
            w.cached_tokens = tokens;
        }
    }

    /// The KV-cache capacity `worker` announced, in tokens.
    pub fn kv_capacity(&self, worker: &str) -> Option<u64> {
        self.workers.get(worker).map(|w| w.kv_capacity_tokens)
    }

    /// Number of live workers.
    pub fn live_workers(&self) -> usize {
        self.workers.values().filter(|w| !w.leaving).count()
    }

    /// Charges a dispatched request to its worker.
    pub fn charge(&mut self, request_id: &str, outstanding: Outstanding) {
        if let Some(w) = self.workers.get_mut(&outstanding.worker) {
            w.load.outstanding += 1;
            w.load.outstanding_prompt_tokens += outstanding.prompt_tokens;
        }
        if let Some(previous) = self.outstanding.insert(request_id.to_string(), outstanding) {
            self.uncharge(&previous);
        }
    }

    /// Releases a request's charge; returns what it was, if it was outstanding.
    pub fn release(&mut self, request_id: &str) -> Option<Outstanding> {
        let outstanding = self.outstanding.remove(request_id)?;
        self.uncharge(&outstanding);
        Some(outstanding)
    }

    fn uncharge(&mut self, o: &Outstanding) {
        if let Some(w) = self.workers.get_mut(&o.worker) {
            w.load.outstanding = w.load.outstanding.saturating_sub(1);
            w.load.outstanding_prompt_tokens = w
                .load
                .outstanding_prompt_tokens
                .saturating_sub(o.prompt_tokens);
        }
    }

    /// Gives every worker until `grace` after `now` before its allowance of missed heartbeats
    /// starts again (after the scheduler's own outage, workers reconnect in their own time).
    pub fn refresh(&mut self, now: Instant, grace: Duration) {
        for w in self.workers.values_mut() {
            w.last_seen = now + grace;
        }
    }

    /// Removes workers not heard from for their allowed misses; returns each with the requests
    /// it still owed (their charges released).
    pub fn reap(&mut self, now: Instant) -> Vec<(String, Vec<(String, Outstanding)>)> {
        let misses = self.misses;
        let dead: Vec<String> = self
            .workers
            .iter()
            .filter(|(_, w)| {
                now.saturating_duration_since(w.last_seen) > w.period.saturating_mul(misses)
            })
            .map(|(id, _)| id.clone())
            .collect();
        dead.into_iter()
            .map(|id| {
                self.workers.remove(&id);
                let owed: Vec<String> = self
                    .outstanding
                    .iter()
                    .filter(|(_, o)| o.worker == id)
                    .map(|(r, _)| r.clone())
                    .collect();
                let owed = owed
                    .into_iter()
                    .filter_map(|r| self.outstanding.remove(&r).map(|o| (r, o)))
                    .collect();
                (id, owed)
            })
            .collect()
    }

    /// Each worker's load (for metrics).
    pub fn loads(&self) -> impl Iterator<Item = (&str, &WorkerLoad)> {
        self.workers.iter().map(|(id, w)| (id.as_str(), &w.load))
    }

    /// Outstanding requests per worker.
    pub fn outstanding_by_worker(&self) -> impl Iterator<Item = (&str, u32)> {
        self.workers
            .iter()
            .map(|(id, w)| (id.as_str(), w.load.outstanding))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use preble_protocol::{FinishedRequest, Heartbeat, PROTOCOL_VERSION, Usage};

    fn event(worker: &str, seq: u64, body: WorkerEventBody) -> WorkerEvent {
        WorkerEvent {
            v: PROTOCOL_VERSION,
            worker_id: worker.into(),
            seq,
            at_ms: 0,
            body,
        }
    }

    fn beat() -> WorkerEventBody {
        WorkerEventBody::Heartbeat(Heartbeat {
            models: vec!["m".into()],
            period_ms: 100,
            ..Heartbeat::default()
        })
    }

    fn finished(id: &str) -> WorkerEventBody {
        WorkerEventBody::Finished(FinishedRequest {
            request_id: id.into(),
            finish_reason: None,
            usage: Usage::default(),
            ttft_ms: 0.0,
            tpot_ms: 0.0,
        })
    }

    fn owed(worker: &str) -> Outstanding {
        Outstanding {
            worker: worker.into(),
            prompt_tokens: 10,
            stream_key: "s".into(),
        }
    }

    #[test]
    fn a_worker_past_the_most_a_scheduler_routes_to_is_refused_at_join() {
        let t = Instant::now();
        let mut c = Cluster::new(3);
        for i in 0..MAX_WORKERS {
            assert!(c.observe(&event(&format!("w{i}"), 0, beat()), t).joined);
        }
        let o = c.observe(&event("one-too-many", 0, beat()), t);
        assert!(o.refused && !o.joined && !o.known, "{o:?}");
        assert_eq!(c.live_workers(), MAX_WORKERS);
        assert!(c.eligible("m", &[]).iter().all(|w| w.id != "one-too-many"));
        // A known worker's heartbeats still count.
        assert!(c.observe(&event("w0", 1, beat()), t).known);
    }

    #[test]
    fn charges_are_released_when_requests_finish() {
        let t = Instant::now();
        let mut c = Cluster::new(3);
        assert!(c.observe(&event("a", 0, beat()), t).joined);
        c.charge("r1", owed("a"));
        c.charge("r2", owed("a"));
        assert_eq!(c.eligible("m", &[])[0].load.outstanding, 2);
        let o = c.observe(&event("a", 1, finished("r1")), t);
        assert_eq!(o.released.as_deref(), Some("r1"));
        assert_eq!(c.eligible("m", &[])[0].load.outstanding, 1);
        assert_eq!(c.eligible("m", &[])[0].load.outstanding_prompt_tokens, 10);
        assert!(c.release("r1").is_none(), "released once only");
    }

    #[test]
    fn silent_workers_die_and_hand_back_what_they_owed() {
        let t = Instant::now();
        let mut c = Cluster::new(3);
        c.observe(&event("a", 0, beat()), t);
        c.observe(&event("b", 0, beat()), t);
        c.charge("r1", owed("a"));
        c.observe(&event("b", 1, beat()), t + Duration::from_millis(250));
        assert!(c.reap(t + Duration::from_millis(250)).is_empty());
        let dead = c.reap(t + Duration::from_millis(301));
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].0, "a");
        assert_eq!(dead[0].1[0].0, "r1");
        assert_eq!(c.live_workers(), 1);
    }

    #[test]
    fn after_an_outage_of_the_scheduler_every_worker_gets_a_fresh_allowance() {
        let t = Instant::now();
        let mut c = Cluster::new(3);
        c.observe(&event("a", 0, beat()), t);
        // Long silent (the scheduler was cut off), then refreshed with a grace.
        let back = t + Duration::from_secs(10);
        c.refresh(back, Duration::from_secs(2));
        assert!(c.reap(back + Duration::from_millis(2_200)).is_empty());
        assert_eq!(c.reap(back + Duration::from_millis(2_400)).len(), 1);
    }

    #[test]
    fn a_worker_claiming_more_than_its_capacity_is_caught() {
        let t = Instant::now();
        let mut c = Cluster::new(3);
        c.observe(
            &event(
                "a",
                0,
                WorkerEventBody::Heartbeat(Heartbeat {
                    kv_capacity_tokens: 100,
                    period_ms: 100,
                    ..Heartbeat::default()
                }),
            ),
            t,
        );
        assert!(c.cache_changed("a", 150, 0));
        assert!(c.cache_changed("a", 90, 40));
        assert!(
            !c.cache_changed("a", 20, 0),
            "220 tokens in a 100-token cache"
        );
        c.cache_reset("a", 10);
        assert!(c.cache_changed("a", 190, 0));
    }

    #[test]
    fn gaps_leaving_and_models_are_tracked() {
        let t = Instant::now();
        let mut c = Cluster::new(3);
        c.observe(&event("a", 0, beat()), t);
        assert!(c.observe(&event("a", 3, beat()), t).gap);
        assert!(c.eligible("other", &[]).is_empty());
        assert!(c.eligible("m", &["a".to_string()]).is_empty());
        c.observe(&event("a", 4, WorkerEventBody::Leaving), t);
        assert!(!c.serves("m"));
    }
}
