//! A party's end of a link: encodes messages, counts their bytes, and moves the frames over a
//! [`Transport`].

use serde::{Deserialize, Serialize};

use crate::protocol::{Bytes, Direction, Message};
use crate::transport::Transport;

use super::PartyError;

/// One end of a link between two parties. Bytes are counted here, where frames are encoded
/// (sent) and decoded (received), by kind and direction.
pub struct Endpoint {
    transport: Box<dyn Transport>,
    /// The direction of the frames this end sends (`Up` from a client, `Down` from the server).
    sends: Direction,
    sent: Bytes,
    received: Bytes,
}

impl Endpoint {
    pub fn new(transport: Box<dyn Transport>, sends: Direction) -> Self {
        Self {
            transport,
            sends,
            sent: Bytes::default(),
            received: Bytes::default(),
        }
    }

    /// Who is at the other end.
    pub fn peer(&self) -> &str {
        self.transport.peer()
    }

    /// Encodes `message`, counts it and hands the frame to the transport.
    pub fn send(&mut self, message: &Message) -> Result<(), PartyError> {
        let frame = message.encode().map_err(|source| PartyError::Encode {
            peer: self.peer().to_string(),
            source,
        })?;
        self.sent
            .record(message.kind, self.sends, frame.len() as u64);
        Ok(self.transport.send(frame)?)
    }

    /// The next message from the other end, decoded and counted.
    pub fn recv(&mut self) -> Result<Message, PartyError> {
        let frame = self.transport.recv()?;
        let message = Message::decode(&frame).map_err(|source| PartyError::Protocol {
            peer: self.peer().to_string(),
            source,
        })?;
        let arrives = match self.sends {
            Direction::Up => Direction::Down,
            Direction::Down => Direction::Up,
        };
        self.received
            .record(message.kind, arrives, frame.len() as u64);
        Ok(message)
    }

    /// Everything this end has sent.
    pub fn sent(&self) -> Bytes {
        self.sent
    }

    /// Everything this end has received.
    pub fn received(&self) -> Bytes {
        self.received
    }

    /// Both counters, to be saved in a checkpoint.
    pub fn ledger(&self) -> Ledger {
        Ledger {
            sent: self.sent,
            received: self.received,
        }
    }

    /// Continues counting from a saved ledger.
    pub fn restore_ledger(&mut self, ledger: Ledger) {
        self.sent = ledger.sent;
        self.received = ledger.received;
    }
}

/// What an endpoint has counted so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    pub sent: Bytes,
    pub received: Bytes,
}
