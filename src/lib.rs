//! splitaux: decoupled split learning via an auxiliary loss, compared with classic (coupled)
//! split learning on CIFAR, with every reported number measured.
//!
//! Layout: [`data`] reads CIFAR; [`model`] builds the ResNet, its split and the auxiliary heads;
//! [`kernels`] are the CPU convolution and BatchNorm kernels the model runs on burn's flex
//! backend; [`link`] is what crosses the cut; [`train`] holds the shared loop and the coupled and
//! decoupled strategies; [`memory`] measures peaks; [`report`] turns runs into JSON and tables;
//! [`experiment`] runs sweeps and makes paper-style tables and plots from them.

pub mod backend;
pub mod config;
pub mod data;
pub mod experiment;
pub mod kernels;
pub mod link;
pub mod memory;
pub mod model;
pub mod report;
pub mod train;

/// Every allocation of a process linking splitaux is counted, so CPU peak memory is measured.
#[global_allocator]
static ALLOCATOR: memory::CountingAlloc = memory::CountingAlloc;

/// This build's version, recorded in every report.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
