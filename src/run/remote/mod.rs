//! A run whose parties are separate processes: the server process ([`server`]) and one process
//! per client ([`client`]), each over one network link (a [`Mux`] on a gRPC stream) to the
//! server. Hand-offs between clients are relayed by the server.
//!
//! Every process builds the run exactly as an in-process run does (the same seeded draws in the
//! same order) and then plays its own party: its in-memory links are replaced by network ones.
//! All processes walk the same [`EpochPlan`](crate::federation::EpochPlan) through a
//! [`Pacer`](super::pace::Pacer), so the server takes the clients' batches in the schedule's
//! order, whatever order they arrive in, and a run over the network reports exactly what the
//! in-process run reports (timing and memory aside).

mod admission;
pub mod client;
pub mod server;

use std::time::Duration;

use md5::{Digest, Md5};

use crate::data::Split;
use crate::party::PartyError;
use crate::party::state::StateError;
use crate::protocol::control::{Control, MAX_CONTROL_BYTES};
use crate::run::setup::model_config;
use crate::transport::grpc::LinkLimits;
use crate::transport::mux::{Channel, Mux, MuxChannel};
use crate::transport::{Transport, TransportError};
use burn::module::Module;

use super::RunError;
use crate::config::ExperimentConfig;

/// A digest of a client's shard: its indices into the training subset and their labels, so
/// that processes that partitioned different data are told apart at hello.
pub fn shard_digest(train: &Split, shard: &[usize]) -> String {
    let mut md5 = Md5::new();
    for &i in shard {
        md5.update((i as u64).to_le_bytes());
        md5.update([train.labels.get(i).copied().unwrap_or(u8::MAX)]);
    }
    format!("{:x}", md5.finalize())
}

/// The limits of a run's links: the largest legal frame is the largest of a training or
/// evaluation batch of activations, the client-side model's values or its optimizer state, and
/// a control message, plus room for headers; every wait is bounded by `timeout`.
pub fn link_limits(
    config: &ExperimentConfig,
    classes: usize,
    timeout: Duration,
) -> Result<LinkLimits, RunError> {
    let device = config.train.backend.device()?;
    let (client, _, cut) = model_config(config, classes).init(&device)?;
    let per_image: usize = cut.activation_shape.iter().product::<usize>() * 4;
    let batch = config.train.batch_size.max(config.train.eval_batch_size);
    let activations = batch * per_image;
    // Parameters and BatchNorm buffers, or the optimizer's state (at most two values per
    // parameter, e.g. Adam's moments), as f32.
    let values = client.net.num_params() + client.aux.num_params();
    let model = values * 4 * 2;
    let largest = activations.max(model).max(MAX_CONTROL_BYTES);
    Ok(LinkLimits {
        depth: 8,
        max_frame: largest + (64 << 10),
        send_timeout: timeout,
        recv_timeout: timeout,
    })
}

/// The control channel of a link, with its byte count.
pub struct ControlLink {
    channel: MuxChannel,
    /// Control frames sent and received.
    bytes: u64,
}

impl ControlLink {
    /// The control channel of `mux`, which has carried `bytes` of control frames already (the
    /// hello and its answer, exchanged before the link was multiplexed).
    pub fn new(mux: &Mux, bytes: u64) -> Self {
        Self {
            channel: mux.channel(Channel::Control),
            bytes,
        }
    }

    pub fn peer(&self) -> &str {
        self.channel.peer()
    }

    /// Control frames sent and received so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn send(&mut self, message: &Control) -> Result<(), RunError> {
        let frame = message.encode();
        self.bytes += frame.len() as u64;
        self.channel
            .send(frame)
            .map_err(|e| RunError::Party(e.into()))
    }

    pub fn recv(&mut self) -> Result<Control, RunError> {
        let frame = self.channel.recv().map_err(|e| RunError::Party(e.into()))?;
        self.bytes += frame.len() as u64;
        Control::decode(&frame).map_err(|detail| RunError::Peer {
            peer: self.peer().to_string(),
            detail,
        })
    }

    /// The next control message, which `pick` must accept (a `stop` is passed on as the
    /// peer's error; anything else is named as out of place).
    pub fn expect<T>(
        &mut self,
        expected: &str,
        pick: impl FnOnce(&Control) -> Option<T>,
    ) -> Result<T, RunError> {
        let message = self.recv()?;
        if let Some(value) = pick(&message) {
            return Ok(value);
        }
        Err(match message {
            Control::Stop { reason } => RunError::Stopped {
                peer: self.peer().to_string(),
                reason,
            },
            other => RunError::Peer {
                peer: self.peer().to_string(),
                detail: format!("sent {} where {expected} was due", other.name()),
            },
        })
    }
}

/// A multiplexer over `transport` whose waits end when the peer sends `stop`.
pub fn link(transport: Box<dyn Transport>) -> Mux {
    Mux::new(transport).interrupted_by(Channel::Control, |frame| match Control::decode(frame) {
        Ok(Control::Stop { reason }) => Some(reason),
        _ => None,
    })
}

/// Sends `stop` with `reason` to the peer and gives it [`LAST_WORD_WAIT`] to hang up, so the
/// message is on the wire before this process lets the link go.
pub fn say_stop(mux: &Mux, control: &mut ControlLink, reason: String) {
    mux.set_timeout(LAST_WORD_WAIT);
    if control.send(&Control::Stop { reason }).is_ok() {
        linger(mux, control, LAST_WORD_WAIT);
    }
}

/// Reads (and drops) what the peer still sends until it closes the link or `wait` passes.
pub fn linger(mux: &Mux, control: &mut ControlLink, wait: Duration) {
    let deadline = std::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        mux.set_timeout(left);
        if control.recv().is_err() {
            return;
        }
    }
}

/// How long to wait for a peer's last words (a `stop`) once its link has failed.
pub const LAST_WORD_WAIT: Duration = Duration::from_secs(5);

/// After `error` on the link to the peer of `control` (whose multiplexer is `mux`): the `stop`
/// that peer sent before the link failed, if one arrives within [`LAST_WORD_WAIT`].
pub fn last_word(mux: &Mux, control: &mut ControlLink, error: &RunError) -> Option<RunError> {
    match error {
        RunError::Party(PartyError::Transport(TransportError::Stopped { peer, reason })) => {
            return Some(RunError::Stopped {
                peer: peer.clone(),
                reason: reason.clone(),
            });
        }
        RunError::Party(PartyError::Transport(_)) => {}
        _ => return None,
    }
    mux.set_timeout(LAST_WORD_WAIT);
    loop {
        match control.recv() {
            Ok(Control::Stop { reason }) => {
                return Some(RunError::Stopped {
                    peer: control.peer().to_string(),
                    reason,
                });
            }
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
}

/// A model-state error that came over a link from `peer`.
pub fn model_error(peer: &str, source: StateError) -> RunError {
    RunError::Party(PartyError::Model {
        peer: peer.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use burn::tensor::TensorData;

    use crate::config::ExperimentConfig;
    use crate::data::{Normalization, Split};
    use crate::party::Endpoint;
    use crate::protocol::{Direction, Message, MessageKind};
    use crate::run::RunSetup;
    use crate::transport::memory_pair;

    /// The server of a tiny run, and the client's end of its link to client 0.
    fn server_and_peer() -> (RunSetup, Endpoint) {
        let mut config = ExperimentConfig::default();
        config.model.depth = 8;
        config.train.batch_size = 4;
        let identity = Normalization {
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        let mut setup = RunSetup::new(
            &config,
            10,
            Arc::new(Split::default()),
            vec![Vec::new()],
            identity,
        )
        .unwrap();
        let (ours, theirs) = memory_pair("server", "client 0", 4);
        setup
            .parties
            .server
            .attach_links(vec![Endpoint::new(Box::new(theirs), Direction::Down)])
            .unwrap();
        (setup, Endpoint::new(Box::new(ours), Direction::Up))
    }

    /// What serving a step says after the client sent `frames` (made for the cut's shape
    /// `[c, h, w]`).
    fn serve_after(frames: impl Fn([usize; 3]) -> Vec<Message>) -> String {
        let (mut setup, mut peer) = server_and_peer();
        for frame in frames(setup.cut.activation_shape) {
            peer.send(&frame).unwrap();
        }
        setup
            .parties
            .server
            .serve(0, 0.1, &mut setup.meter)
            .unwrap_err()
            .to_string()
    }

    fn floats(batch: usize, [c, h, w]: [usize; 3]) -> Message {
        Message {
            kind: MessageKind::Activations,
            data: TensorData::new(vec![0.5f32; batch * c * h * w], [batch, c, h, w]),
        }
    }

    fn labels(values: Vec<i64>) -> Message {
        let n = values.len();
        Message {
            kind: MessageKind::Labels,
            data: TensorData::new(values, [n]),
        }
    }

    #[test]
    fn a_client_sending_the_wrong_shapes_or_labels_is_named_not_a_panic() {
        let wrong_channels = serve_after(|[c, h, w]| vec![floats(2, [c + 1, h, w])]);
        assert!(wrong_channels.contains("from client 0"), "{wrong_channels}");
        assert!(wrong_channels.contains("expected [_, "), "{wrong_channels}");
        let too_many = serve_after(|shape| vec![floats(5, shape)]);
        assert!(
            too_many.contains("a batch of 5 activations (at most 4)"),
            "{too_many}"
        );
        let out_of_range = serve_after(|shape| vec![floats(2, shape), labels(vec![3, 10])]);
        assert!(
            out_of_range.contains("label 10 (there are 10 classes)"),
            "{out_of_range}"
        );
        let miscounted = serve_after(|shape| vec![floats(2, shape), labels(vec![3])]);
        assert!(miscounted.contains("labels of shape [1]"), "{miscounted}");
        let gradients_instead = serve_after(|shape| {
            vec![
                floats(2, shape),
                Message {
                    kind: MessageKind::Gradients,
                    data: TensorData::new(vec![0f32; 2], [2]),
                },
            ]
        });
        assert!(
            gradients_instead.contains("expected a labels message, got gradients"),
            "{gradients_instead}"
        );
        // And a well-formed step goes through.
        let (mut setup, mut peer) = server_and_peer();
        peer.send(&floats(2, setup.cut.activation_shape)).unwrap();
        peer.send(&labels(vec![1, 2])).unwrap();
        let loss = setup
            .parties
            .server
            .serve(0, 0.1, &mut setup.meter)
            .unwrap();
        assert!(loss.is_finite());
    }
}
