//! The per-iteration scheduler of one worker: a FIFO waiting queue, a running batch, decodes
//! first, then prefill chunks under a token budget, and KV admission control.
//!
//! KV accounting reserves a request's prompt plus its `max_tokens` at admission, so a running
//! request can never run out of slots. (The radix KV cache with prefix reuse, priority groups
//! and preemption replaces this in the local-scheduler work.)

use std::collections::VecDeque;
use std::time::Instant;

use preble_costmodel::SeqWork;
use preble_protocol::GenerateRequest;

/// One request on this worker.
#[derive(Debug)]
pub struct Sequence {
    /// The request.
    pub request: GenerateRequest,
    /// Hash of its prompt.
    pub prompt_hash: u64,
    /// Prompt tokens computed so far.
    pub prefilled: u32,
    /// Prompt tokens reused from the cache.
    pub cached: u32,
    /// Tokens generated so far.
    pub generated: u32,
    /// Next stream sequence number.
    pub next_stream_seq: u64,
    /// When the worker accepted it.
    pub accepted_at: Instant,
    /// When an iteration first computed part of it.
    pub started_at: Option<Instant>,
    /// When its first token was published.
    pub first_token_at: Option<Instant>,
}

impl Sequence {
    /// A newly accepted request.
    pub fn new(request: GenerateRequest, prompt_hash: u64, accepted_at: Instant) -> Self {
        Self {
            request,
            prompt_hash,
            prefilled: 0,
            cached: 0,
            generated: 0,
            next_stream_seq: 0,
            accepted_at,
            started_at: None,
            first_token_at: None,
        }
    }

    /// Prompt length.
    pub fn prompt_len(&self) -> u32 {
        self.request.prompt_tokens.len() as u32
    }

    /// KV slots this request may need at most.
    pub fn kv_need(&self) -> u64 {
        u64::from(self.prompt_len()) + u64::from(self.request.sampling.max_tokens)
    }

    /// Whether its prompt is fully computed.
    pub fn is_decoding(&self) -> bool {
        self.prefilled >= self.prompt_len()
    }

    /// Its request id.
    pub fn id(&self) -> &str {
        &self.request.request_id
    }
}

/// Why a request cannot be admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdmitError {
    /// It needs more KV slots than the whole cache has.
    #[error("request needs {need} KV slots but this worker has {capacity}")]
    NeverFits {
        /// Slots needed.
        need: u64,
        /// Slots in total.
        capacity: u64,
    },
}

/// One planned piece of work: the running sequence at `index` does `work`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Planned {
    /// Index into [`Batcher::running`].
    pub index: usize,
    /// Tokens to compute and cached before.
    pub work: SeqWork,
    /// Whether the step samples a token for it.
    pub samples: bool,
}

/// Counts for load reports.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Load {
    /// Running requests.
    pub running: u32,
    /// Waiting requests.
    pub waiting: u32,
    /// Prompt tokens still to compute.
    pub queued_prefill_tokens: u64,
    /// Context tokens of decoding requests.
    pub running_decode_tokens: u64,
    /// KV slots not reserved.
    pub free_kv_tokens: u64,
}

/// Waiting queue plus running batch.
#[derive(Debug)]
pub struct Batcher {
    waiting: VecDeque<Sequence>,
    /// The running batch.
    pub running: Vec<Sequence>,
    kv_capacity: u64,
    kv_reserved: u64,
    chunk_tokens: u32,
    max_running: usize,
}

impl Batcher {
    /// An empty batcher.
    pub fn new(kv_capacity: u64, chunk_tokens: u32, max_running: usize) -> Self {
        Self {
            waiting: VecDeque::new(),
            running: Vec::new(),
            kv_capacity,
            kv_reserved: 0,
            chunk_tokens,
            max_running,
        }
    }

    /// Checks that a request could ever run here.
    pub fn check(&self, need: u64) -> Result<(), AdmitError> {
        if need > self.kv_capacity {
            return Err(AdmitError::NeverFits {
                need,
                capacity: self.kv_capacity,
            });
        }
        Ok(())
    }

    /// Queues a request.
    pub fn enqueue(&mut self, seq: Sequence) -> Result<(), AdmitError> {
        self.check(seq.kv_need())?;
        self.waiting.push_back(seq);
        Ok(())
    }

    /// KV capacity in tokens.
    pub fn kv_capacity(&self) -> u64 {
        self.kv_capacity
    }

    /// Whether there is nothing to do.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Removes a request wherever it is.
    pub fn remove(&mut self, request_id: &str) -> Option<Sequence> {
        if let Some(i) = self.running.iter().position(|s| s.id() == request_id) {
            let seq = self.running.swap_remove(i);
            self.kv_reserved -= seq.kv_need();
            return Some(seq);
        }
        let i = self.waiting.iter().position(|s| s.id() == request_id)?;
        self.waiting.remove(i)
    }

    /// Removes running request `index` once it finished (frees its KV).
    pub fn finish(&mut self, index: usize) -> Sequence {
        let seq = self.running.swap_remove(index);
        self.kv_reserved -= seq.kv_need();
        seq
    }

    /// Drains every request (shutdown).
    pub fn drain_all(&mut self) -> Vec<Sequence> {
        self.kv_reserved = 0;
        let mut all: Vec<Sequence> = self.running.drain(..).collect();
        all.extend(self.waiting.drain(..));
        all
    }

    /// Plans the next iteration: every decoding request steps once; then prefill chunks of
    /// running requests; then newly admitted requests, while the prefill budget, the running
    /// cap and the KV capacity allow.
    pub fn plan(&mut self) -> Vec<Planned> {
        let mut plan = Vec::with_capacity(self.running.len() + 1);
        let mut budget = self.chunk_tokens;
        for (index, seq) in self.running.iter().enumerate() {
            if seq.is_decoding() {
                plan.push(Planned {
                    index,
                    work: SeqWork::decode(seq.prompt_len() + seq.generated),
                    samples: true,
                });
            }
        }
        for (index, seq) in self.running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            if !seq.is_decoding() {
                plan.push(self.prefill_chunk(index, seq, &mut budget));
            }
        }
        while budget > 0 && self.running.len() < self.max_running {
            let Some(front) = self.waiting.front() else {
                break;
            };
            if self.kv_reserved + front.kv_need() > self.kv_capacity {
                break;
            }
            let Some(seq) = self.waiting.pop_front() else {
                break;
            };
            self.kv_reserved += seq.kv_need();
            self.running.push(seq);
            let index = self.running.len() - 1;
            let planned = self.prefill_chunk(index, &self.running[index], &mut budget);
            plan.push(planned);
        }
        plan
    }

    fn prefill_chunk(&self, index: usize, seq: &Sequence, budget: &mut u32) -> Planned {
        let remaining = seq.prompt_len() - seq.prefilled;
        let extend = remaining.min(*budget);
        *budget -= extend;
        Planned {
            index,
            work: SeqWork {
                extend,
                context: seq.prefilled,
            },
            samples: extend == remaining,
        }
    }

    /// The current load.
    pub fn load(&self) -> Load {
        let queued_prefill_tokens = self
            .waiting
            .iter()
            .chain(self.running.iter())
            .map(|s| u64::from(s.prompt_len() - s.prefilled.min(s.prompt_len())))
            .sum();
        let running_decode_tokens = self
            .running
            .iter()
            .filter(|s| s.is_decoding())
            .map(|s| u64::from(s.prompt_len() + s.generated))
            .sum();
        Load {
            running: self.running.len() as u32,
            waiting: self.waiting.len() as u32,
            queued_prefill_tokens,
            running_decode_tokens,
            free_kv_tokens: self.kv_capacity - self.kv_reserved,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use preble_protocol::SamplingParams;

    fn seq(id: &str, prompt: usize, max_tokens: u32) -> Sequence {
        let request = GenerateRequest::new(
            id.into(),
            "m".into(),
            vec![7; prompt],
            SamplingParams {
                max_tokens,
                ..SamplingParams::default()
            },
            "s".into(),
        );
        Sequence::new(request, 0, Instant::now())
    }

    #[test]
    fn long_prompts_are_chunked_and_decodes_go_first() {
        let mut b = Batcher::new(10_000, 512, 8);
        b.enqueue(seq("a", 1200, 4)).unwrap();
        let p = b.plan();
        assert_eq!(p.len(), 1);
        assert_eq!(
            p[0].work,
            SeqWork {
                extend: 512,
                context: 0
            }
        );
        assert!(!p[0].samples);
        b.running[0].prefilled += 512;
        b.enqueue(seq("b", 100, 4)).unwrap();
        let p = b.plan();
        assert_eq!(p.len(), 1, "the budget is spent on \"a\"");
        assert_eq!(
            p[0].work,
            SeqWork {
                extend: 512,
                context: 512
            }
        );
        b.running[0].prefilled += 512;
        // "a" has 176 left and samples; "b" is admitted into the rest of the budget.
        let p = b.plan();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].work.extend, 176);
        assert!(p[0].samples);
        assert_eq!(
            p[1].work,
            SeqWork {
                extend: 100,
                context: 0
            }
        );
        b.running[0].prefilled += 176;
        b.running[1].prefilled += 100;
        b.running[0].generated = 1;
        b.running[1].generated = 1;
        // Both decode now, before any prefill.
        let p = b.plan();
        assert!(p.iter().all(|x| x.work.extend == 1 && x.samples));
    }

    #[test]
    fn kv_capacity_gates_admission_and_never_fitting_is_an_error() {
        let mut b = Batcher::new(1000, 4096, 8);
        assert!(matches!(
            b.enqueue(seq("x", 990, 20)),
            Err(AdmitError::NeverFits { .. })
        ));
        b.enqueue(seq("a", 500, 100)).unwrap();
        b.enqueue(seq("b", 500, 100)).unwrap();
        let p = b.plan();
        assert_eq!(p.len(), 1, "the second does not fit next to the first");
        assert_eq!(b.load().waiting, 1);
        let done = b.finish(0);
        assert_eq!(done.id(), "a");
        assert_eq!(b.plan().len(), 1);
        assert_eq!(b.load().free_kv_tokens, 400);
    }

    #[test]
    fn remove_frees_slots() {
        let mut b = Batcher::new(1000, 4096, 8);
        b.enqueue(seq("a", 500, 100)).unwrap();
        b.plan();
        assert!(b.remove("a").is_some());
        assert_eq!(b.load().free_kv_tokens, 1000);
        assert!(b.is_idle());
    }
}
