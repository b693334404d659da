//! The experiment layer: sweeps over config grids, the `runs.jsonl` log, paper-style tables and
//! SVG plots.

pub mod grid;
pub mod log;
pub mod plot;
pub mod sweep;
pub mod table;

pub use grid::{Axis, Combination, Sweep, expand};
pub use log::{RunRecord, read_records};
pub use sweep::{SweepOptions, SweepSummary, run_sweep};
