//! SplitFed (Thapa et al., AAAI 2022), the parallel form of split learning. A round is one
//! epoch: every client starts from the global client-side model and makes one pass over its
//! shard; at the end the clients' models are averaged (FedAvg, weighted by shard size) into the
//! new global model. v1 gives each client its own copy of the server model, averaged too; v2
//! keeps one server model that takes the clients' batches in a seeded random order.
//!
//! In one process v1's clients run one after another and v2's steps interleave in the seeded
//! order; each client starts from the same global weights (and, in v1, its own server copy), so
//! the result is what parallel clients would compute.

use rand::RngExt;

use crate::data::batch::epoch_rng;

/// The generator stream of v2's client order (far from the clients' data streams 2i, 2i+1).
const ORDER_STREAM: u64 = 1 << 32;

/// SplitFed v2's order of one round: at each step, a uniformly random client among those with
/// batches left.
pub fn random_order(batches: &[usize], seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = epoch_rng(seed, epoch, ORDER_STREAM);
    let mut left = batches.to_vec();
    let mut waiting: Vec<usize> = (0..batches.len()).filter(|&c| batches[c] > 0).collect();
    let mut steps = Vec::with_capacity(batches.iter().sum());
    while !waiting.is_empty() {
        let pick = rng.random_range(0..waiting.len());
        let client = waiting[pick];
        steps.push(client);
        left[client] -= 1;
        if left[client] == 0 {
            waiting.remove(pick);
        }
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::federation::{ClientSchedule, ModelFlow, RatePosition};

    #[test]
    fn v2_order_is_seeded_and_takes_every_batch_once() {
        let batches = [3, 5, 1, 4];
        let v2 = |seed, epoch| ClientSchedule::SplitfedV2.plan(epoch, &batches, seed).steps;
        let a = v2(7, 1);
        assert_eq!(a, v2(7, 1), "same seed, same order");
        assert_ne!(a, v2(8, 1), "another seed");
        assert_ne!(a, v2(7, 2), "another epoch");
        for (client, &n) in batches.iter().enumerate() {
            assert_eq!(a.iter().filter(|&&c| c == client).count(), n);
        }
        // Interleaved, not client after client.
        let v1 = ClientSchedule::SplitfedV1.plan(1, &batches, 7);
        assert_ne!(a, v1.steps);
        assert_eq!(random_order(&[6], 1, 1), vec![0; 6]);
    }

    #[test]
    fn versions_differ_in_server_copies_and_server_rates() {
        let v1 = ClientSchedule::SplitfedV1.plan(1, &[1], 0);
        let v2 = ClientSchedule::SplitfedV2.plan(1, &[1], 0);
        assert_eq!(
            v1.model,
            ModelFlow::Federated {
                server_copies: true
            }
        );
        assert_eq!(
            v2.model,
            ModelFlow::Federated {
                server_copies: false
            }
        );
        assert_eq!(
            (v1.client_rate, v1.server_rate),
            (RatePosition::PerClient, RatePosition::PerClient)
        );
        assert_eq!(
            (v2.client_rate, v2.server_rate),
            (RatePosition::PerClient, RatePosition::Global)
        );
    }
}
