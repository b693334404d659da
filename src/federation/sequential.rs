//! Sequential (vanilla) split learning, Gupta & Raskar: one client-side model (with its
//! auxiliary head in decoupled mode, and its optimizer state) visits clients 0…N−1 in turn each
//! epoch. Each client trains on its whole shard, then the next one receives the model over their
//! link: N·epochs − 1 hand-offs in a run, none with one client. One server model throughout.

use super::{EpochDriver, Flow};

/// One epoch: every client's pass, in client order, each after taking over the model.
pub fn epoch<D: EpochDriver>(driver: &mut D, epoch: usize) -> Result<Flow, D::Error> {
    let n = driver.clients();
    for client in 0..n {
        if !driver.holds_model(client) {
            driver.hand_off((client + n - 1) % n, client)?;
        }
        if driver.pass(client, epoch)? == Flow::Stop {
            return Ok(Flow::Stop);
        }
    }
    Ok(Flow::Continue)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what the schedule asks for.
    struct Log {
        holder: usize,
        clients: usize,
        events: Vec<String>,
        stop_at: Option<usize>,
    }

    impl EpochDriver for Log {
        type Error = String;

        fn clients(&self) -> usize {
            self.clients
        }

        fn holds_model(&self, client: usize) -> bool {
            self.holder == client
        }

        fn hand_off(&mut self, from: usize, to: usize) -> Result<(), String> {
            assert_eq!(from, self.holder, "only the holder hands off");
            self.holder = to;
            self.events.push(format!("{from}>{to}"));
            Ok(())
        }

        fn pass(&mut self, client: usize, epoch: usize) -> Result<Flow, String> {
            self.events.push(format!("e{epoch}c{client}"));
            Ok(if self.stop_at == Some(client) {
                Flow::Stop
            } else {
                Flow::Continue
            })
        }
    }

    #[test]
    fn clients_take_turns_with_n_epochs_minus_one_hand_offs() {
        let mut log = Log {
            holder: 0,
            clients: 3,
            events: Vec::new(),
            stop_at: None,
        };
        for e in 1..=2 {
            assert_eq!(epoch(&mut log, e).unwrap(), Flow::Continue);
        }
        assert_eq!(
            log.events.join(" "),
            "e1c0 0>1 e1c1 1>2 e1c2 2>0 e2c0 0>1 e2c1 1>2 e2c2"
        );
        assert_eq!(
            log.events.iter().filter(|e| e.contains('>')).count(),
            3 * 2 - 1
        );

        let mut one = Log {
            holder: 0,
            clients: 1,
            events: Vec::new(),
            stop_at: None,
        };
        epoch(&mut one, 1).unwrap();
        epoch(&mut one, 2).unwrap();
        assert_eq!(one.events.join(" "), "e1c0 e2c0");

        let mut stops = Log {
            holder: 0,
            clients: 3,
            events: Vec::new(),
            stop_at: Some(1),
        };
        assert_eq!(epoch(&mut stops, 1).unwrap(), Flow::Stop);
        assert_eq!(stops.events.join(" "), "e1c0 0>1 e1c1");
    }
}
