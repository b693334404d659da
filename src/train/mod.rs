//! Split training: the two parties, the strategies that order a step (coupled, decoupled), the
//! shared loop, optimizers and schedules, and the speed benchmark.

pub mod bench;
pub mod optim;
pub mod party;
pub mod runner;
pub mod strategy;

pub use runner::{PreparedData, RunError, RunOptions, run};
pub use strategy::{Coupled, Decoupled, Strategy, strategy_for};
