//! The local scheduler of one preble worker, as a pure library (no I/O, no clock, no async):
//! the radix KV cache with exact slot bookkeeping and LRU eviction ([`cache`]), the fair wait
//! queue by cache-hit ratio ([`queue`]), and the per-iteration batch builder with chunked
//! prefill and preemption ([`scheduler`]). The worker runs it over its engines; the simulator
//! and the benchmarks run the very same code.

pub mod cache;
pub mod queue;
pub mod scheduler;

pub use cache::{CacheEvent, CacheSpan, NodeId, PrefixMatch, RadixCache, Slot};
pub use queue::{LPM_MAX_SORTED, PriorityQueue, WaitOrder};
pub use scheduler::{
    AdmitError, Load, LocalScheduler, Plan, PlanItem, SchedulerConfig, SeqId, Sequence,
};
