//! How long a GPU takes to run a batch: the single cost model shared by the global policy (load
//! estimates), the worker's `sim` engine (how long to sleep) and the simulator.
//!
//! Layout:
//! - [`hardware`]: GPU datasheet numbers and model shapes, with their sources.
//! - [`profile`]: a GPU x model x tensor-parallel profile and its iteration-time formulas: the
//!   Preble paper's profiled fit where one exists, a roofline model otherwise.
//! - [`bound`]: a lower bound on any schedule's latency for one request, from those formulas.
//!
//! Pure: no I/O, no clock. Times are milliseconds as `f64`.

pub mod bound;
pub mod hardware;
pub mod profile;

pub use hardware::{GpuSpec, ModelSpec};
pub use profile::{Profile, SeqWork, UnknownProfile};
