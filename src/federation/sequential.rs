//! Sequential (vanilla) split learning, Gupta & Raskar: one client-side model (with its
//! auxiliary head in decoupled mode, and its optimizer state) visits clients 0…N−1 in turn each
//! epoch. Each client trains on its whole shard, then the next one receives the model over their
//! link: N·epochs − 1 hand-offs in a run (fewer if the last clients hold no images), none with
//! one client. One server model throughout.

/// Every client's batches, client after client: the client of each step.
pub fn client_after_client(batches: &[usize]) -> Vec<usize> {
    batches
        .iter()
        .enumerate()
        .flat_map(|(client, &n)| std::iter::repeat_n(client, n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::federation::{ClientSchedule, ModelFlow, RatePosition};

    #[test]
    fn clients_take_turns_in_order() {
        assert_eq!(client_after_client(&[2, 1, 3]), vec![0, 0, 1, 2, 2, 2]);
        assert_eq!(client_after_client(&[4]), vec![0; 4]);
        let plan = ClientSchedule::Sequential.plan(1, &[2, 1], 0);
        assert_eq!(plan.steps, vec![0, 0, 1]);
        assert_eq!(plan.model, ModelFlow::HandOff);
        assert_eq!(plan.client_rate, RatePosition::Global);
    }
}
