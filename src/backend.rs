//! Which burn backend runs the tensors.

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::memory;

/// A compute backend splitaux can train on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// burn's pure-Rust CPU backend.
    #[default]
    Flex,
    /// burn's wgpu GPU backend (cargo feature `wgpu`).
    Wgpu,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error(
        "backend `wgpu` is not compiled into this binary: rebuild with `cargo build --release --features wgpu`"
    )]
    WgpuNotCompiled,
}

impl BackendKind {
    /// The plain (inference) device of this backend.
    pub fn device(self) -> Result<Device, BackendError> {
        match self {
            BackendKind::Flex => Ok(Device::flex()),
            #[cfg(feature = "wgpu")]
            BackendKind::Wgpu => Ok(Device::wgpu(Default::default())),
            #[cfg(not(feature = "wgpu"))]
            BackendKind::Wgpu => Err(BackendError::WgpuNotCompiled),
        }
    }

    /// Whether tensors live in ordinary heap memory, where the counting allocator sees them.
    pub fn host_resident(self) -> bool {
        matches!(self, BackendKind::Flex)
    }
}

/// Prepares the process for CPU training: the allocator keeps freed buffers for reuse
/// ([`memory::retain_freed_memory`]), and the number of worker threads is set (0 = one per
/// core). Only the first thread count in a process takes effect; the pool then runs.
pub fn configure_cpu(threads: usize) {
    memory::retain_freed_memory();
    if threads > 0 {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
    }
}
