//! How encoded frames travel between two endpoints. [`Transport`] is the seam a network
//! transport implements; [`memory`] is the in-process one (a bounded channel pair).

pub mod memory;

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
}

/// One end of a bidirectional, ordered, reliable frame channel.
pub trait Transport: Send {
    /// Who is at the other end (for error messages).
    fn peer(&self) -> &str;

    /// Hands one frame to the other end.
    fn send(&mut self, frame: Vec<u8>) -> Result<(), TransportError>;

    /// The next frame from the other end.
    fn recv(&mut self) -> Result<Vec<u8>, TransportError>;
}
