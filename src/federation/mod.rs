//! Who trains when: the schedule by which clients take turns with the server
//! (`clients.schedule`). A schedule drives an [`EpochDriver`] — the run in progress — through
//! one epoch; it knows the order of passes and hand-offs, not how a pass trains.

pub mod sequential;

use serde::{Deserialize, Serialize};

/// How the clients take turns (config key `clients.schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientSchedule {
    /// Vanilla split learning (Gupta & Raskar): one client-side model visits the clients in
    /// turn; each trains on its whole shard, then hands the model on.
    #[default]
    Sequential,
}

impl ClientSchedule {
    pub fn name(self) -> &'static str {
        match self {
            ClientSchedule::Sequential => "sequential",
        }
    }

    /// Runs `epoch` (1-based) of this schedule on `driver`.
    pub fn epoch<D: EpochDriver>(self, driver: &mut D, epoch: usize) -> Result<Flow, D::Error> {
        match self {
            ClientSchedule::Sequential => sequential::epoch(driver, epoch),
        }
    }
}

/// Whether training goes on after a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    /// A loss diverged; the run's report says where.
    Stop,
}

/// What a schedule needs from the run it drives.
pub trait EpochDriver {
    type Error;

    fn clients(&self) -> usize;

    /// Whether `client` holds the client-side model.
    fn holds_model(&self, client: usize) -> bool;

    /// Moves the client-side model from `from` to `to` over their link.
    fn hand_off(&mut self, from: usize, to: usize) -> Result<(), Self::Error>;

    /// `client`'s pass over its shard in `epoch`.
    fn pass(&mut self, client: usize, epoch: usize) -> Result<Flow, Self::Error>;
}
