//! How encoded frames travel between two endpoints. [`Transport`] is the seam: [`memory`] is the
//! in-process one (a bounded channel pair), [`grpc`] the network one (a gRPC stream).

pub mod grpc;
pub mod memory;
pub mod mux;

use std::time::Duration;

pub use memory::{MemoryTransport, memory_pair};

/// A failure to move a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransportError {
    #[error("{peer} has hung up")]
    Closed { peer: String },
    #[error("no frame from {peer} is waiting (the protocol expected one)")]
    Empty { peer: String },
    #[error("the channel to {peer} is full ({depth} frames): its receiver is not reading")]
    Full { peer: String, depth: usize },
    #[error("a frame of {len} bytes for {peer} is larger than the largest legal one ({max} bytes)")]
    TooLarge {
        peer: String,
        len: usize,
        max: usize,
    },
    #[error("the link to {peer} broke: {detail}")]
    Broken { peer: String, detail: String },
    #[error("nothing from {peer} within {after:?}")]
    Timeout { peer: String, after: Duration },
    #[error("{peer} stopped the run: {reason}")]
    Stopped { peer: String, reason: String },
}

/// One end of a bidirectional, ordered, reliable frame channel.
pub trait Transport: Send {
    /// Who is at the other end (for error messages).
    fn peer(&self) -> &str;

    /// Hands one frame to the other end.
    fn send(&mut self, frame: Vec<u8>) -> Result<(), TransportError>;

    /// The next frame from the other end.
    fn recv(&mut self) -> Result<Vec<u8>, TransportError>;

    /// The bytes this link moved on the socket (sent, received), protocol overhead included,
    /// when the transport can count them.
    fn wire_bytes(&self) -> Option<(u64, u64)> {
        None
    }

    /// Waits at most `wait` to send or receive each frame from now on, where the transport
    /// waits at all (the in-memory one never does).
    fn set_timeout(&mut self, _wait: Duration) {}
}
