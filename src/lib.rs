//! splitaux: decoupled split learning via an auxiliary loss, compared with classic (coupled)
//! split learning on CIFAR, with every reported number measured.
//!
//! Layout, top calls down: [`experiment`] runs sweeps and makes paper-style tables and plots;
//! [`run`] sets up one run from its [`config`] and trains it; [`federation`] decides which
//! client trains when; [`party`] holds the clients and the server, which own their state and
//! exchange [`protocol`] messages over a [`transport`]; [`model`] builds the ResNet, its split
//! and the auxiliary heads, on the CPU [`kernels`]; [`data`] reads CIFAR and partitions it among
//! the clients; [`memory`] measures peaks; [`report`] turns runs into JSON and tables.

pub mod backend;
pub mod config;
pub mod data;
pub mod experiment;
pub mod federation;
pub mod kernels;
pub mod memory;
pub mod model;
pub mod party;
pub mod protocol;
pub mod report;
pub mod run;
pub mod transport;

/// Every allocation of a process linking splitaux is counted, so CPU peak memory is measured.
#[global_allocator]
static ALLOCATOR: memory::CountingAlloc = memory::CountingAlloc;

/// This build's version, recorded in every report.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
