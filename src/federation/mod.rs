//! Who trains when: the schedule by which clients take turns with the server
//! (`clients.schedule`). A schedule turns an epoch into an [`EpochPlan`] — which client takes
//! each step, and how the client-side model moves — that the run carries out; it knows nothing
//! of how a step trains. [`fedavg`] averages models for the SplitFed schedules.

pub mod fedavg;
pub mod sequential;
pub mod splitfed;

use serde::{Deserialize, Serialize};

pub use fedavg::fedavg;

/// How the clients take turns (config key `clients.schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientSchedule {
    /// Vanilla split learning (Gupta & Raskar): one client-side model visits the clients in
    /// turn; each trains on its whole shard, then hands the model on.
    #[default]
    Sequential,
    /// SplitFed v1 (Thapa et al.): every round each client trains a copy of the global
    /// client-side model against its own copy of the global server model; both sides are
    /// averaged (FedAvg) at the end of the round.
    SplitfedV1,
    /// SplitFed v2: client side as in v1; one server model takes the clients' batches in a
    /// seeded random order; only the client side is averaged.
    SplitfedV2,
}

/// How the client-side model moves during an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFlow {
    /// One model, handed from client to client when the step's client changes.
    HandOff,
    /// Every client downloads the global model at the start of the round and uploads its
    /// trained copy at the end; the uploads are averaged. With `server_copies`, the server also
    /// trains one copy of its model per client and averages them.
    Federated { server_copies: bool },
}

/// Where a step's learning rate is read from the schedule (`optim.schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RatePosition {
    /// The run's step count, over a schedule spanning epochs × Σᵢ ⌈nᵢ / batch⌉ steps.
    Global,
    /// Client i at its local step t of round r: step r·Sᵢ + t of a schedule spanning
    /// epochs·Sᵢ steps (Sᵢ = ⌈nᵢ / batch⌉); its optimizer restarts every round.
    PerClient,
}

/// One epoch of a schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EpochPlan {
    /// The client of each step, in order (each client's steps are its batches, in its order).
    pub steps: Vec<usize>,
    pub model: ModelFlow,
    /// Learning rates of the clients' and of the server's updates.
    pub client_rate: RatePosition,
    pub server_rate: RatePosition,
}

impl ClientSchedule {
    pub fn name(self) -> &'static str {
        match self {
            ClientSchedule::Sequential => "sequential",
            ClientSchedule::SplitfedV1 => "splitfed-v1",
            ClientSchedule::SplitfedV2 => "splitfed-v2",
        }
    }

    /// Epoch `epoch` (1-based) for clients with `batches[i]` batches each; `seed` drives any
    /// random order.
    pub fn plan(self, epoch: usize, batches: &[usize], seed: u64) -> EpochPlan {
        let steps = match self {
            ClientSchedule::Sequential | ClientSchedule::SplitfedV1 => {
                sequential::client_after_client(batches)
            }
            ClientSchedule::SplitfedV2 => splitfed::random_order(batches, seed, epoch),
        };
        let (client_rate, server_rate) = match self {
            ClientSchedule::Sequential => (RatePosition::Global, RatePosition::Global),
            ClientSchedule::SplitfedV1 => (RatePosition::PerClient, RatePosition::PerClient),
            ClientSchedule::SplitfedV2 => (RatePosition::PerClient, RatePosition::Global),
        };
        EpochPlan {
            steps,
            model: self.model_flow(),
            client_rate,
            server_rate,
        }
    }

    /// How the client-side model moves under this schedule.
    pub fn model_flow(self) -> ModelFlow {
        match self {
            ClientSchedule::Sequential => ModelFlow::HandOff,
            ClientSchedule::SplitfedV1 => ModelFlow::Federated {
                server_copies: true,
            },
            ClientSchedule::SplitfedV2 => ModelFlow::Federated {
                server_copies: false,
            },
        }
    }

    /// Whether client-side models start each round from an averaged global model.
    pub fn is_federated(self) -> bool {
        matches!(self.model_flow(), ModelFlow::Federated { .. })
    }

    /// Whether the server trains one copy of its model per client (SplitFed v1).
    pub fn server_copies(self) -> bool {
        self.model_flow()
            == ModelFlow::Federated {
                server_copies: true,
            }
    }
}
