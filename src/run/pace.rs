//! Where a run is in its schedule, kept the same way by every process that takes part: the
//! learning rate of each step, which batch of its pass a client is at, which steps train (a
//! batch of one image does not: BatchNorm needs two), and — for the sequential hand-off — who
//! holds the client-side model and the hand-offs a step needs. The in-process trainer, the
//! server process and every client process walk the same [`EpochPlan`] through a [`Pacer`], so
//! they agree step by step without telling each other.

use crate::config::ExperimentConfig;
use crate::federation::{EpochPlan, ModelFlow, RatePosition};
use crate::party::Rates;
use crate::party::optim::LrSchedule;

/// One step of an epoch, as every party sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PacedStep {
    /// The client whose batch this is.
    pub client: usize,
    /// The batch's position in the client's pass (0-based), and its image count (0 past the
    /// end of the shard).
    pub batch: usize,
    pub images: usize,
    pub rates: Rates,
    /// Sequential: the hand-offs (from, to) that bring the model to `client` first.
    pub hand_offs: Vec<(usize, usize)>,
}

impl PacedStep {
    /// Whether the step trains (a batch of fewer than two images is skipped).
    pub fn trains(&self) -> bool {
        self.images >= 2
    }
}

/// A run's position in its schedule.
#[derive(Debug, Clone)]
pub struct Pacer {
    /// The learning rate by the run's step count, and by each client's own steps (SplitFed).
    schedule: LrSchedule,
    client_schedules: Vec<LrSchedule>,
    /// Per client: images in its shard and batches per epoch.
    shard_sizes: Vec<usize>,
    batches: Vec<usize>,
    batch_size: usize,
    /// Steps trained so far in the run (the global schedule's position).
    global_step: usize,
    /// This epoch: batches taken and steps trained per client.
    taken: Vec<usize>,
    trained: Vec<usize>,
    epoch: usize,
    /// Sequential: the client holding the client-side model.
    holder: Option<usize>,
}

impl Pacer {
    /// At the start of a run whose clients hold `shard_sizes[i]` images; client 0 holds the
    /// model when it is handed off.
    pub fn new(config: &ExperimentConfig, shard_sizes: &[usize]) -> Self {
        let batch_size = config.train.batch_size.max(1);
        let batches: Vec<usize> = shard_sizes.iter().map(|n| n.div_ceil(batch_size)).collect();
        let epochs = config.train.epochs;
        let total: usize = batches.iter().sum();
        let hands_off = config.clients.schedule.model_flow() == ModelFlow::HandOff;
        Self {
            schedule: LrSchedule::new(&config.optim, total * epochs),
            client_schedules: batches
                .iter()
                .map(|&b| LrSchedule::new(&config.optim, b * epochs))
                .collect(),
            shard_sizes: shard_sizes.to_vec(),
            taken: vec![0; batches.len()],
            trained: vec![0; batches.len()],
            batches,
            batch_size,
            global_step: 0,
            epoch: 1,
            holder: hands_off.then_some(0),
        }
    }

    /// Batches per epoch of each client.
    pub fn batches(&self) -> &[usize] {
        &self.batches
    }

    /// Steps per epoch, all clients together.
    pub fn steps_per_epoch(&self) -> usize {
        self.batches.iter().sum()
    }

    /// Steps trained so far in the run.
    pub fn global_step(&self) -> usize {
        self.global_step
    }

    /// The run's learning rate now (the global schedule).
    pub fn global_rate(&self) -> f64 {
        self.schedule.at(self.global_step)
    }

    /// Sequential: the client that holds the model.
    pub fn holder(&self) -> Option<usize> {
        self.holder
    }

    /// The client that evaluates after an epoch of `plan`: the model's holder (sequential), or
    /// client 0 with the global model (SplitFed).
    pub fn evaluator(&self, plan: &EpochPlan) -> usize {
        match plan.model {
            ModelFlow::HandOff => self.holder.unwrap_or(0),
            ModelFlow::Federated { .. } => 0,
        }
    }

    /// Continues from a checkpoint: `global_step` steps trained, `holder` holding the model.
    pub fn resume(&mut self, global_step: usize, holder: Option<usize>) {
        self.global_step = global_step;
        if self.holder.is_some() {
            self.holder = holder;
        }
    }

    /// Starts epoch `epoch` (1-based): every pass begins at its first batch.
    pub fn begin_epoch(&mut self, epoch: usize) {
        self.epoch = epoch;
        self.taken.fill(0);
        self.trained.fill(0);
    }

    /// The next step of `plan`, for `client`: its batch, rates and hand-offs. Call
    /// [`Self::trained`] once it has trained.
    pub fn next(&mut self, plan: &EpochPlan, client: usize) -> PacedStep {
        let batch = self.taken[client];
        self.taken[client] += 1;
        let images = self.shard_sizes[client]
            .saturating_sub(batch * self.batch_size)
            .min(self.batch_size);
        // A client's local step counts its trained steps; its epoch offset counts every batch
        // (a skipped one-image batch included), so a round starts where the schedule says
        // whatever was skipped before.
        let rate = |position: RatePosition| match position {
            RatePosition::Global => self.schedule.at(self.global_step),
            RatePosition::PerClient => self.client_schedules[client]
                .at((self.epoch - 1) * self.batches[client] + self.trained[client]),
        };
        let rates = Rates {
            client: rate(plan.client_rate),
            server: rate(plan.server_rate),
        };
        let mut hand_offs = Vec::new();
        if plan.model == ModelFlow::HandOff
            && let Some(holder) = self.holder.as_mut()
        {
            // Round the ring until `client` holds it (a client with no images passes it on).
            let n = self.batches.len();
            while *holder != client {
                let next = (*holder + 1) % n;
                hand_offs.push((*holder, next));
                *holder = next;
            }
        }
        PacedStep {
            client,
            batch,
            images,
            rates,
            hand_offs,
        }
    }

    /// Counts a trained step of `client`.
    pub fn trained(&mut self, client: usize) {
        self.global_step += 1;
        self.trained[client] += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federation::ClientSchedule;

    fn config(schedule: ClientSchedule) -> ExperimentConfig {
        let mut config = ExperimentConfig::default();
        config.train.batch_size = 4;
        config.train.epochs = 2;
        config.clients.schedule = schedule;
        config
    }

    #[test]
    fn steps_carry_batch_sizes_and_the_hand_offs_round_the_ring() {
        let config = config(ClientSchedule::Sequential);
        // Client 1 has no images: the model passes through it.
        let mut pacer = Pacer::new(&config, &[9, 0, 5]);
        assert_eq!(pacer.batches(), [3, 0, 2]);
        pacer.begin_epoch(1);
        let plan = ClientSchedule::Sequential.plan(1, pacer.batches(), 0);
        assert_eq!(plan.steps, [0, 0, 0, 2, 2]);
        let steps: Vec<PacedStep> = plan
            .steps
            .iter()
            .map(|&c| {
                let step = pacer.next(&plan, c);
                if step.trains() {
                    pacer.trained(c);
                }
                step
            })
            .collect();
        let images: Vec<usize> = steps.iter().map(|s| s.images).collect();
        assert_eq!(images, [4, 4, 1, 4, 1]);
        assert_eq!(steps[3].hand_offs, [(0, 1), (1, 2)]);
        assert!(
            steps
                .iter()
                .enumerate()
                .all(|(i, s)| i == 3 || s.hand_offs.is_empty())
        );
        assert_eq!(pacer.global_step(), 3, "one-image batches do not train");
        pacer.begin_epoch(2);
        let step = pacer.next(&plan, 0);
        assert_eq!(step.hand_offs, [(2, 0)]);
        assert_eq!(pacer.holder(), Some(0));
    }

    #[test]
    fn splitfed_rates_follow_each_clients_own_steps() {
        let mut config = config(ClientSchedule::SplitfedV1);
        config.optim.schedule = crate::config::Schedule::Cosine;
        let mut pacer = Pacer::new(&config, &[8, 16]);
        pacer.begin_epoch(2);
        let plan = ClientSchedule::SplitfedV1.plan(2, pacer.batches(), 0);
        let first = pacer.next(&plan, 1);
        // Client 1 starts round 2 at its local step 4 of 8.
        let expected = LrSchedule::new(&config.optim, 8).at(4);
        assert_eq!(first.rates, Rates::both(expected));
        assert!(first.hand_offs.is_empty());
        assert_eq!(pacer.holder(), None);
    }
}
