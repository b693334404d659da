//! The in-process transport: two bounded channels, one each way.
//!
//! Parties in one process are driven by one thread in lock-step, so neither end may block: a
//! send into a full channel or a receive from an empty one is a protocol error (it would wait
//! forever), reported as such rather than hanging.

use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};

use super::{Transport, TransportError};

/// One end of an in-memory channel pair.
pub struct MemoryTransport {
    peer: String,
    depth: usize,
    tx: SyncSender<Vec<u8>>,
    rx: Receiver<Vec<u8>>,
}

/// Two connected ends holding at most `depth` frames in flight each way; `a` talks to `b_name`
/// and `b` to `a_name`.
pub fn memory_pair(a_name: &str, b_name: &str, depth: usize) -> (MemoryTransport, MemoryTransport) {
    let (to_b, from_a) = sync_channel(depth);
    let (to_a, from_b) = sync_channel(depth);
    (
        MemoryTransport {
            peer: b_name.to_string(),
            depth,
            tx: to_b,
            rx: from_b,
        },
        MemoryTransport {
            peer: a_name.to_string(),
            depth,
            tx: to_a,
            rx: from_a,
        },
    )
}

impl Transport for MemoryTransport {
    fn peer(&self) -> &str {
        &self.peer
    }

    fn send(&mut self, frame: Vec<u8>) -> Result<(), TransportError> {
        self.tx.try_send(frame).map_err(|e| match e {
            TrySendError::Full(_) => TransportError::Full {
                peer: self.peer.clone(),
                depth: self.depth,
            },
            TrySendError::Disconnected(_) => TransportError::Closed {
                peer: self.peer.clone(),
            },
        })
    }

    fn recv(&mut self) -> Result<Vec<u8>, TransportError> {
        self.rx.try_recv().map_err(|e| match e {
            TryRecvError::Empty => TransportError::Empty {
                peer: self.peer.clone(),
            },
            TryRecvError::Disconnected => TransportError::Closed {
                peer: self.peer.clone(),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_arrive_in_order_and_limits_are_errors() {
        let (mut a, mut b) = memory_pair("client 0", "server", 2);
        a.send(vec![1]).unwrap();
        a.send(vec![2, 2]).unwrap();
        let full = a.send(vec![3]).unwrap_err();
        assert_eq!(
            full.to_string(),
            "the channel to server is full (2 frames): its receiver is not reading"
        );
        assert_eq!(b.recv().unwrap(), vec![1]);
        assert_eq!(b.recv().unwrap(), vec![2, 2]);
        assert!(matches!(b.recv(), Err(TransportError::Empty { .. })));
        b.send(vec![9]).unwrap();
        assert_eq!(a.recv().unwrap(), vec![9]);
        drop(a);
        assert_eq!(
            b.send(vec![0]).unwrap_err(),
            TransportError::Closed {
                peer: "client 0".into()
            }
        );
    }
}
