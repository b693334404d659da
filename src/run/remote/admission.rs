//! The server's side of a run's links: admitting clients (hello: version, id, configuration
//! and shard checked; later links refused), each admitted client's [`Link`] by channel, and
//! telling them all to stop.

use std::time::{Duration, Instant};

use super::server::ServeOptions;
use super::{ControlLink, LAST_WORD_WAIT, linger};
use crate::config::{ExperimentConfig, differing_keys};
use crate::party::Endpoint;
use crate::protocol::control::Control;
use crate::protocol::{Bytes, Direction};
use crate::run::RunError;
use crate::transport::grpc::{GrpcServer, GrpcTransport};
use crate::transport::mux::{self, Channel, Mux, MuxChannel};
use crate::transport::{Transport, TransportError};

/// One admitted client's link, by channel.
pub(super) struct Link {
    pub(super) mux: Mux,
    pub(super) control: ControlLink,
    pub(super) relay: MuxChannel,
    pub(super) eval: Endpoint,
    /// Hand-off frames relayed from this client (as it sent them) and to it (as it received
    /// them), by kind.
    pub(super) relayed_from: Bytes,
    pub(super) relayed_to: Bytes,
}

impl Link {
    /// What the client sent, as the server counted it: its frames to the server and the
    /// hand-offs it passed on through the server.
    pub(super) fn client_sent(&self, train: &Endpoint) -> Bytes {
        train.received() + self.relayed_from
    }

    /// Everything the client sent and received.
    pub(super) fn client_traffic(&self, train: &Endpoint) -> Bytes {
        train.received() + train.sent() + self.relayed_from + self.relayed_to
    }
}

/// Sends `stop` with `reason` down `links`, then gives the clients [`LAST_WORD_WAIT`] in all to
/// hang up (best effort: some may be gone).
pub(super) fn tell_stop<'a>(links: impl Iterator<Item = &'a mut Link>, reason: &str) {
    let mut links: Vec<&mut Link> = links.collect();
    for link in links.iter_mut() {
        link.mux.set_timeout(LAST_WORD_WAIT);
        let _ = link.control.send(&Control::Stop {
            reason: reason.to_string(),
        });
    }
    let deadline = Instant::now() + LAST_WORD_WAIT;
    for link in links {
        let left = deadline.saturating_duration_since(Instant::now());
        linger(&link.mux, &mut link.control, left);
    }
}

/// Accepts links until every client has said a valid hello (others are refused and the server
/// goes on waiting), or `options.wait_for_clients` has passed.
pub(super) fn admit_clients(
    config: &ExperimentConfig,
    digests: &[String],
    listener: &mut GrpcServer,
    options: &ServeOptions,
) -> Result<Vec<Link>, RunError> {
    let n = digests.len();
    let mut links: Vec<Option<Link>> = (0..n).map(|_| None).collect();
    let deadline = Instant::now() + options.wait_for_clients;
    while links.iter().any(Option::is_none) {
        let missing = || {
            let ids: Vec<String> = (0..n)
                .filter(|&i| links[i].is_none())
                .map(|i| i.to_string())
                .collect();
            RunError::Failed(format!(
                "clients {} did not connect within {:?}",
                ids.join(", "),
                options.wait_for_clients
            ))
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let accepted = listener.accept(left);
        for line in listener.refusals() {
            eprintln!("refused {line}");
        }
        let mut transport = match accepted {
            Ok(transport) => transport,
            Err(TransportError::Timeout { .. }) => {
                let error = missing();
                tell_stop(links.iter_mut().flatten(), &error.to_string());
                return Err(error);
            }
            Err(e) => return Err(RunError::Party(e.into())),
        };
        let peer = transport.peer().to_string();
        let admitted =
            hello(config, digests, &links, &mut transport, options).and_then(|(id, hello_len)| {
                let welcome = Control::Welcome.encode();
                transport
                    .send(mux::tag(Channel::Control, &welcome))
                    .map_err(|e| format!("gone before the welcome: {e}"))?;
                Ok((id, (hello_len + welcome.len()) as u64))
            });
        match admitted {
            Ok((id, control_bytes)) => {
                transport.set_timeout(options.timeout);
                let mux = super::link(Box::new(transport));
                if options.progress {
                    eprintln!("client {id} joined from {peer}");
                }
                links[id] = Some(Link {
                    control: ControlLink::new(&mux, control_bytes),
                    relay: mux.channel(Channel::Relay),
                    eval: Endpoint::new(Box::new(mux.channel(Channel::Eval)), Direction::Down),
                    mux,
                    relayed_from: Bytes::default(),
                    relayed_to: Bytes::default(),
                });
            }
            Err(reason) => {
                eprintln!("refused {peer}: {reason}");
                let refusal = Control::Refused { reason };
                let _ = transport.send(mux::tag(Channel::Control, &refusal.encode()));
            }
        }
    }
    listener.stop_admitting();
    // Links admitted while the last hello was read: the run has started without them.
    while let Ok(mut late) = listener.accept(Duration::ZERO) {
        let refusal = Control::Refused {
            reason: "the run has started: no more clients are admitted".into(),
        };
        let _ = late.send(mux::tag(Channel::Control, &refusal.encode()));
    }
    Ok(links.into_iter().flatten().collect())
}

/// Reads a new link's hello; the client's id (and the hello's size) if it is admitted, else
/// why not.
fn hello(
    config: &ExperimentConfig,
    digests: &[String],
    links: &[Option<Link>],
    transport: &mut GrpcTransport,
    options: &ServeOptions,
) -> Result<(usize, usize), String> {
    transport.set_timeout(options.hello_timeout);
    let frame = transport.recv().map_err(|e| e.to_string())?;
    let (channel, frame) = mux::untag(transport.peer(), frame).map_err(|e| e.to_string())?;
    let len = frame.len();
    if channel != Channel::Control {
        return Err(format!("sent a {} frame before hello", channel.name()));
    }
    let Control::Hello {
        client,
        version,
        config: theirs,
        shard_images,
        shard_digest,
    } = Control::decode(&frame)?
    else {
        return Err("the first message was not a hello".into());
    };
    if version != crate::VERSION {
        return Err(format!(
            "client {client} runs splitaux {version}, the server {}",
            crate::VERSION
        ));
    }
    let n = digests.len();
    if client >= n {
        return Err(format!(
            "client id {client}: this run has {n} clients (ids 0 to {})",
            n - 1
        ));
    }
    if links[client].is_some() {
        return Err(format!("client {client} is already connected"));
    }
    let keys = differing_keys(config, &theirs);
    if !keys.is_empty() {
        return Err(format!(
            "client {client}'s configuration differs from the server's: {}",
            keys.join(", ")
        ));
    }
    if shard_digest != digests[client] {
        return Err(format!(
            "client {client}'s shard ({shard_images} images) is not the one the server's data \
             gives it: the processes read different datasets"
        ));
    }
    Ok((client, len))
}
