//! Several logical links over one transport: a process talks to another over one connection
//! (one gRPC stream), on which training frames, relayed hand-offs, control messages and
//! evaluation frames each travel on their own [`Channel`]. Every frame carries its channel in
//! one leading byte; a receiver reading one channel keeps the frames that arrive for the others
//! until they are read, up to a bound (a peer flooding a channel nobody reads is an error, not
//! unbounded memory).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::{Transport, TransportError};

/// What a frame is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// Training traffic between a client and the server (cut tensors, labels, SplitFed's model
    /// download and upload).
    Train,
    /// Sequential hand-offs between neighbouring clients, relayed by the server.
    Relay,
    /// Control messages (hello, end of epoch, evaluate, done, error).
    Control,
    /// Evaluation traffic (test activations and labels, the model to evaluate).
    Eval,
}

impl Channel {
    const ALL: [Channel; 4] = [
        Channel::Train,
        Channel::Relay,
        Channel::Control,
        Channel::Eval,
    ];

    fn code(self) -> u8 {
        match self {
            Channel::Train => 1,
            Channel::Relay => 2,
            Channel::Control => 3,
            Channel::Eval => 4,
        }
    }

    fn index(self) -> usize {
        self.code() as usize - 1
    }

    pub fn name(self) -> &'static str {
        match self {
            Channel::Train => "training",
            Channel::Relay => "hand-off",
            Channel::Control => "control",
            Channel::Eval => "evaluation",
        }
    }
}

/// Frames held for a channel that is not being read, at most (the protocol needs a few: a
/// decoupled client's step is three frames on two channels).
pub const HELD_FRAMES: usize = 16;

/// Tags `frame` with `channel` (the one byte in front).
pub fn tag(channel: Channel, frame: &[u8]) -> Vec<u8> {
    let mut tagged = Vec::with_capacity(frame.len() + 1);
    tagged.push(channel.code());
    tagged.extend_from_slice(frame);
    tagged
}

/// A tagged frame's channel and the frame itself.
pub fn untag(peer: &str, mut tagged: Vec<u8>) -> Result<(Channel, Vec<u8>), TransportError> {
    let channel = tagged
        .first()
        .and_then(|&code| Channel::ALL.into_iter().find(|c| c.code() == code))
        .ok_or_else(|| TransportError::Broken {
            peer: peer.to_string(),
            detail: format!(
                "a frame on no known channel (first byte {:?})",
                tagged.first()
            ),
        })?;
    tagged.remove(0);
    Ok((channel, tagged))
}

struct Shared {
    transport: Box<dyn Transport>,
    held: [VecDeque<Vec<u8>>; 4],
}

/// Tells whether a frame of its channel stops the run (and why): checked on frames that arrive
/// while another channel is read, so that a peer's `stop` ends any wait at once.
pub type Interrupt = fn(&[u8]) -> Option<String>;

/// One transport, shared by its channels.
#[derive(Clone)]
pub struct Mux {
    shared: Arc<Mutex<Shared>>,
    peer: String,
    interrupt: Option<(Channel, Interrupt)>,
}

impl Mux {
    pub fn new(transport: Box<dyn Transport>) -> Self {
        let peer = transport.peer().to_string();
        Self {
            shared: Arc::new(Mutex::new(Shared {
                transport,
                held: Default::default(),
            })),
            peer,
            interrupt: None,
        }
    }

    /// Frames on `channel` that `stops` recognizes end a wait on any other channel with
    /// [`TransportError::Stopped`] (the frame stays held for its own channel).
    pub fn interrupted_by(mut self, channel: Channel, stops: Interrupt) -> Self {
        self.interrupt = Some((channel, stops));
        self
    }

    /// Who is at the other end.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// A transport for one channel of this link.
    pub fn channel(&self, channel: Channel) -> MuxChannel {
        MuxChannel {
            peer: self.peer.clone(),
            mux: self.clone(),
            channel,
        }
    }

    /// A channel whose frames come from (or go to) `peer` through the party at the other end
    /// (a relayed hand-off), named so in errors.
    pub fn relayed_channel(&self, channel: Channel, peer: String) -> MuxChannel {
        MuxChannel {
            peer,
            mux: self.clone(),
            channel,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // A panic while holding the lock leaves plain queues behind: still usable.
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits at most `wait` to send or receive each frame from now on.
    pub fn set_timeout(&self, wait: std::time::Duration) {
        self.lock().transport.set_timeout(wait);
    }

    /// The socket bytes (sent, received) the underlying transport counted, if it can.
    pub fn wire_bytes(&self) -> Option<(u64, u64)> {
        self.lock().transport.wire_bytes()
    }

    fn send(&self, channel: Channel, frame: &[u8]) -> Result<(), TransportError> {
        self.lock().transport.send(tag(channel, frame))
    }

    fn recv(&self, channel: Channel) -> Result<Vec<u8>, TransportError> {
        let mut shared = self.lock();
        if let Some(frame) = shared.held[channel.index()].pop_front() {
            return Ok(frame);
        }
        loop {
            let tagged = shared.transport.recv()?;
            let (arrived, frame) = untag(&self.peer, tagged)?;
            if arrived == channel {
                return Ok(frame);
            }
            let stop = match self.interrupt {
                Some((on, stops)) if on == arrived => stops(&frame),
                _ => None,
            };
            let held = &mut shared.held[arrived.index()];
            if let Some(reason) = stop {
                held.push_back(frame);
                return Err(TransportError::Stopped {
                    peer: self.peer.clone(),
                    reason,
                });
            }
            if held.len() >= HELD_FRAMES {
                return Err(TransportError::Broken {
                    peer: self.peer.clone(),
                    detail: format!(
                        "{HELD_FRAMES} unread {} frames while waiting for a {} frame",
                        arrived.name(),
                        channel.name()
                    ),
                });
            }
            held.push_back(frame);
        }
    }
}

/// One channel of a [`Mux`], usable wherever a transport is.
pub struct MuxChannel {
    peer: String,
    mux: Mux,
    channel: Channel,
}

impl Transport for MuxChannel {
    fn peer(&self) -> &str {
        &self.peer
    }

    fn send(&mut self, frame: Vec<u8>) -> Result<(), TransportError> {
        self.mux.send(self.channel, &frame)
    }

    fn recv(&mut self) -> Result<Vec<u8>, TransportError> {
        self.mux.recv(self.channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::memory_pair;

    #[test]
    fn each_channel_reads_its_own_frames_in_order() {
        let (a, b) = memory_pair("client 0", "server", 16);
        let (a, b) = (Mux::new(Box::new(a)), Mux::new(Box::new(b)));
        let (mut train, mut control) = (a.channel(Channel::Train), a.channel(Channel::Control));
        train.send(vec![1]).unwrap();
        control.send(vec![2]).unwrap();
        train.send(vec![3]).unwrap();
        let mut at_b = b.channel(Channel::Control);
        assert_eq!(at_b.recv().unwrap(), vec![2]);
        let mut at_b = b.channel(Channel::Train);
        assert_eq!(at_b.recv().unwrap(), vec![1]);
        assert_eq!(at_b.recv().unwrap(), vec![3]);
        assert_eq!(at_b.peer(), "client 0");
    }

    #[test]
    fn an_interrupt_ends_a_wait_on_another_channel() {
        let (a, b) = memory_pair("client 0", "server", 4);
        let a = Mux::new(Box::new(a));
        let b = Mux::new(Box::new(b)).interrupted_by(Channel::Control, |f| {
            (f == b"stop").then(|| "because".to_string())
        });
        a.channel(Channel::Control).send(b"note".to_vec()).unwrap();
        a.channel(Channel::Control).send(b"stop".to_vec()).unwrap();
        let err = b.channel(Channel::Train).recv().unwrap_err();
        assert_eq!(err.to_string(), "client 0 stopped the run: because");
        let mut control = b.channel(Channel::Control);
        assert_eq!(control.recv().unwrap(), b"note");
        assert_eq!(control.recv().unwrap(), b"stop");
    }

    #[test]
    fn unknown_channels_and_floods_are_errors() {
        let (mut raw, b) = memory_pair("client 0", "server", HELD_FRAMES + 2);
        let b = Mux::new(Box::new(b));
        raw.send(vec![9, 1, 2]).unwrap();
        let err = b.channel(Channel::Train).recv().unwrap_err();
        assert!(err.to_string().contains("no known channel"), "{err}");
        for _ in 0..=HELD_FRAMES {
            raw.send(tag(Channel::Eval, &[0])).unwrap();
        }
        let err = b.channel(Channel::Train).recv().unwrap_err();
        assert!(
            err.to_string().contains("unread evaluation frames"),
            "{err}"
        );
        assert!(untag("x", Vec::new()).is_err());
    }
}
