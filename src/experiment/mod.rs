//! The experiment layer: sweeps over config grids (whole, or one shard of N), the `runs.jsonl`
//! log, merging logs of several shards or sweeps, paper-style tables and SVG plots.

pub mod grid;
pub mod log;
pub mod merge;
pub mod plot;
pub mod shard;
pub mod sweep;
pub mod table;

pub use grid::{Axis, Combination, Sweep, expand};
pub use log::{RunRecord, read_records};
pub use merge::{MergeError, RunsFile, merge_files, read_merged};
pub use shard::{Shard, ShardError};
pub use sweep::{SweepError, SweepOptions, SweepSummary, run_sweep};
