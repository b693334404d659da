//! The network transport: gRPC (tonic on tokio), one bidirectional `Link` stream per pair of
//! parties, each message one frame of splitaux's wire format ([`service`]).
//!
//! The parties are synchronous; the network is not. Each process runs one small tokio runtime
//! (one worker thread) that serves connections, answers keep-alive pings and moves frames between
//! the sockets and bounded channels; a [`GrpcTransport`] is the synchronous end of those
//! channels, and waits on them with timeouts. So it must never be used from inside a tokio
//! runtime.
//!
//! Security: a server given a token admits only clients that present it (`authorization: Bearer
//! …`, compared in constant time) before any frame is accepted; a server without a token admits
//! only loopback peers. TLS is rustls with the ring provider. Frames larger than the
//! configuration's largest legal one are refused by the gRPC layer before they are buffered.

pub mod service;
mod wire;

pub use wire::{WireCount, WireCounts};

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use subtle::ConstantTimeEq;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::BoxFuture;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Server, ServerTlsConfig,
};
use tonic::{Request, Response, Status, Streaming};

use self::service::{Frame, FrameStream, LinkHandler, SplitClient, SplitServer};
use super::{Transport, TransportError};

/// Metadata key naming the connecting party (e.g. `client 3`).
const PEER_KEY: &str = "x-splitaux-peer";

/// Buffering, size and time limits of a link (both ends use the same ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkLimits {
    /// Frames buffered each way between the party and the socket.
    pub depth: usize,
    /// The largest legal frame, in bytes; anything larger is refused unbuffered.
    pub max_frame: usize,
    /// How long a send may wait for room (the peer not reading).
    pub send_timeout: Duration,
    /// How long a receive waits for the peer's next frame.
    pub recv_timeout: Duration,
}

impl LinkLimits {
    /// The largest encoded gRPC message carrying a frame of `max_frame` bytes (protobuf tag and
    /// length prefix).
    fn max_message(&self) -> usize {
        self.max_frame.saturating_add(16)
    }
}

/// A failure to set up the network side; each names the address involved.
#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("cannot start the network runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot listen on {addr}: {cause}")]
    Listen { addr: SocketAddr, cause: String },
    #[error("TLS set-up: {0}")]
    Tls(String),
    #[error("{addr}: not a usable address ({cause})")]
    Address { addr: String, cause: String },
    #[error("cannot reach the server at {addr}: {cause}")]
    Connect { addr: String, cause: String },
    #[error("the server at {addr} refused this client: {reason}")]
    Refused { addr: String, reason: String },
    #[error("{what} cannot be sent as gRPC metadata: {cause}")]
    Metadata { what: &'static str, cause: String },
}

/// One end of a link over gRPC.
pub struct GrpcTransport {
    peer: String,
    out: mpsc::Sender<Frame>,
    inbound: mpsc::Receiver<Result<Vec<u8>, Status>>,
    limits: LinkLimits,
    /// The server's count of this connection's socket bytes (clients do not count).
    wire: Option<Arc<WireCount>>,
    /// Keeps the runtime (and with it the connection) alive while this end exists.
    runtime: Arc<Runtime>,
}

impl Transport for GrpcTransport {
    fn peer(&self) -> &str {
        &self.peer
    }

    fn wire_bytes(&self) -> Option<(u64, u64)> {
        self.wire.as_ref().map(|count| count.get())
    }

    fn set_timeout(&mut self, wait: Duration) {
        self.limits.recv_timeout = wait;
        self.limits.send_timeout = wait;
    }

    fn send(&mut self, frame: Vec<u8>) -> Result<(), TransportError> {
        if frame.len() > self.limits.max_frame {
            return Err(TransportError::TooLarge {
                peer: self.peer.clone(),
                len: frame.len(),
                max: self.limits.max_frame,
            });
        }
        // The timer must be made inside the runtime (`block_on`'s future runs there).
        let (out, wait) = (&self.out, self.limits.send_timeout);
        let sent = self.runtime.block_on(async move {
            tokio::time::timeout(wait, out.send(Frame { payload: frame })).await
        });
        match sent {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(TransportError::Closed {
                peer: self.peer.clone(),
            }),
            Err(_) => Err(TransportError::Full {
                peer: self.peer.clone(),
                depth: self.limits.depth,
            }),
        }
    }

    fn recv(&mut self) -> Result<Vec<u8>, TransportError> {
        let (inbound, wait) = (&mut self.inbound, self.limits.recv_timeout);
        let got = self
            .runtime
            .block_on(async move { tokio::time::timeout(wait, inbound.recv()).await });
        match got {
            Ok(Some(Ok(frame))) => Ok(frame),
            Ok(Some(Err(status))) => Err(TransportError::Broken {
                peer: self.peer.clone(),
                detail: status.message().to_string(),
            }),
            Ok(None) => Err(TransportError::Closed {
                peer: self.peer.clone(),
            }),
            Err(_) => Err(TransportError::Timeout {
                peer: self.peer.clone(),
                after: self.limits.recv_timeout,
            }),
        }
    }
}

/// The runtime behind a process's links: one worker thread keeps serving connections between
/// the parties' blocking calls.
fn runtime() -> Result<Arc<Runtime>, GrpcError> {
    // rustls picks its crypto provider from its crate features unless one is installed; install
    // ring's so that no other crate's features can make that choice ambiguous.
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("splitaux-net")
        .enable_all()
        .build()
        .map(Arc::new)
        .map_err(GrpcError::Runtime)
}

/// Copies frames from a gRPC stream into the bounded channel a transport reads, so HTTP/2 flow
/// control pushes back on the sender. Ends on the peer's end of stream (the transport then
/// reports `Closed`), on an error (passed on: `Broken`) or when the transport is dropped.
async fn pump(mut inbound: Streaming<Frame>, tx: mpsc::Sender<Result<Vec<u8>, Status>>) {
    loop {
        let item = tokio::select! {
            item = inbound.message() => item,
            _ = tx.closed() => return,
        };
        match item {
            Ok(Some(frame)) => {
                if tx.send(Ok(frame.payload)).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(status) => {
                let _ = tx.send(Err(status)).await;
                return;
            }
        }
    }
}

/// A server's certificate chain and private key (PEM).
#[derive(Debug, Clone)]
pub struct TlsIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

/// How a server listens.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Where to listen; port 0 picks a free port ([`GrpcServer::local_addr`] tells which).
    pub listen: SocketAddr,
    /// The token clients must present; without one only loopback peers are admitted.
    pub token: Option<String>,
    pub tls: Option<TlsIdentity>,
    pub limits: LinkLimits,
}

/// A link the server admitted, waiting for [`GrpcServer::accept`].
struct Admitted {
    peer: String,
    wire: Option<Arc<WireCount>>,
    out: mpsc::Sender<Frame>,
    inbound: mpsc::Receiver<Result<Vec<u8>, Status>>,
}

/// Admits or refuses each `Link` call before any of its frames is read.
struct Doorkeeper {
    token: Option<String>,
    depth: usize,
    admitted: mpsc::Sender<Admitted>,
    /// Refusals so far, for the server's log.
    refused: mpsc::UnboundedSender<String>,
    wire: WireCounts,
    /// Cleared once the server has every party it waits for: later links are refused.
    open: Arc<AtomicBool>,
}

impl LinkHandler for Doorkeeper {
    fn link(&self, request: Request<Streaming<Frame>>) -> BoxFuture<Response<FrameStream>, Status> {
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let verdict = admit(
            self.token.as_deref(),
            presented.as_deref(),
            request.remote_addr(),
        )
        .and_then(|()| match self.open.load(Ordering::Relaxed) {
            true => Ok(()),
            false => Err(Status::failed_precondition(
                "the run has started: no more clients are admitted",
            )),
        });
        let peer = peer_name(&request);
        let wire = request.remote_addr().and_then(|addr| self.wire.take(addr));
        let (depth, admitted, refused) = (self.depth, self.admitted.clone(), self.refused.clone());
        Box::pin(async move {
            if let Err(status) = verdict {
                let _ = refused.send(format!("{peer}: {}", status.message()));
                return Err(status);
            }
            let (in_tx, in_rx) = mpsc::channel(depth);
            let (out_tx, out_rx) = mpsc::channel::<Frame>(depth);
            tokio::spawn(pump(request.into_inner(), in_tx));
            admitted
                .send(Admitted {
                    peer,
                    wire,
                    out: out_tx,
                    inbound: in_rx,
                })
                .await
                .map_err(|_| {
                    Status::failed_precondition("the run has started: no more clients are admitted")
                })?;
            // The response stream ends when the server drops its transport.
            let frames: FrameStream =
                Box::pin(ReceiverStream::new(out_rx).map(Ok::<Frame, Status>));
            Ok(Response::new(frames))
        })
    }
}

/// With a token: the presented one must equal it (constant time). Without: loopback peers only.
fn admit(
    token: Option<&str>,
    presented: Option<&str>,
    remote: Option<SocketAddr>,
) -> Result<(), Status> {
    match token {
        Some(expected) => match presented {
            Some(p) if bool::from(p.as_bytes().ct_eq(expected.as_bytes())) => Ok(()),
            Some(_) => Err(Status::unauthenticated("wrong token")),
            None => Err(Status::unauthenticated("no token presented")),
        },
        None => match remote {
            Some(addr) if addr.ip().to_canonical().is_loopback() => Ok(()),
            Some(addr) => Err(Status::permission_denied(format!(
                "this server has no token, so it admits only loopback peers, not {addr}"
            ))),
            None => Err(Status::permission_denied("the peer's address is unknown")),
        },
    }
}

/// How the server calls a peer: its claimed name and its address.
fn peer_name<T>(request: &Request<T>) -> String {
    let claimed = request
        .metadata()
        .get(PEER_KEY)
        .and_then(|v| v.to_str().ok());
    match (claimed, request.remote_addr()) {
        (Some(name), Some(addr)) => format!("{name} ({addr})"),
        (Some(name), None) => name.to_string(),
        (None, Some(addr)) => addr.to_string(),
        (None, None) => "an unknown peer".to_string(),
    }
}

/// A listening gRPC server; [`Self::accept`] hands out its admitted links.
pub struct GrpcServer {
    runtime: Arc<Runtime>,
    local_addr: SocketAddr,
    admitted: mpsc::Receiver<Admitted>,
    refused: mpsc::UnboundedReceiver<String>,
    stop: Option<oneshot::Sender<()>>,
    limits: LinkLimits,
    open: Arc<AtomicBool>,
}

impl GrpcServer {
    /// Starts listening (TLS and token as `options` say).
    pub fn start(options: ServerOptions) -> Result<Self, GrpcError> {
        let runtime = runtime()?;
        let listen = options.listen;
        let incoming = {
            // Binding makes a tokio listener: it needs the runtime's reactor.
            let _inside = runtime.enter();
            TcpIncoming::bind(listen).map_err(|e| GrpcError::Listen {
                addr: listen,
                cause: e.to_string(),
            })?
        }
        .with_nodelay(Some(true));
        let local_addr = incoming.local_addr().map_err(|e| GrpcError::Listen {
            addr: listen,
            cause: e.to_string(),
        })?;
        let (admitted_tx, admitted) = mpsc::channel(64);
        let (refused_tx, refused) = mpsc::unbounded_channel();
        let wire = WireCounts::default();
        let counted = wire.clone();
        let open = Arc::new(AtomicBool::new(true));
        let incoming = incoming.map(move |stream| stream.map(|s| counted.wrap(s)));
        let service = SplitServer::new(
            Doorkeeper {
                token: options.token,
                depth: options.limits.depth,
                admitted: admitted_tx,
                refused: refused_tx,
                wire,
                open: Arc::clone(&open),
            },
            options.limits.max_message(),
        );
        let mut builder = Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)));
        if let Some(tls) = &options.tls {
            builder = builder
                .tls_config(
                    ServerTlsConfig::new()
                        .identity(Identity::from_pem(&tls.cert_pem, &tls.key_pem)),
                )
                .map_err(|e| GrpcError::Tls(error_chain(&e)))?;
        }
        let (stop, stopped) = oneshot::channel::<()>();
        runtime.spawn(
            builder.serve_with_incoming_shutdown(service, incoming, async move {
                let _ = stopped.await;
            }),
        );
        Ok(Self {
            runtime,
            local_addr,
            admitted,
            refused,
            stop: Some(stop),
            limits: options.limits,
            open,
        })
    }

    /// The address the server listens on (with the port it picked).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The next admitted link, waiting at most `wait`.
    pub fn accept(&mut self, wait: Duration) -> Result<GrpcTransport, TransportError> {
        let admitted = &mut self.admitted;
        match self
            .runtime
            .block_on(async move { tokio::time::timeout(wait, admitted.recv()).await })
        {
            Ok(Some(link)) => Ok(GrpcTransport {
                peer: link.peer,
                wire: link.wire,
                out: link.out,
                inbound: link.inbound,
                limits: self.limits.clone(),
                runtime: Arc::clone(&self.runtime),
            }),
            Ok(None) => Err(TransportError::Closed {
                peer: "the gRPC server".into(),
            }),
            Err(_) => Err(TransportError::Timeout {
                peer: "any client".into(),
                after: wait,
            }),
        }
    }

    /// Refuses every link from now on (the server has all the parties it waits for).
    pub fn stop_admitting(&mut self) {
        self.open.store(false, Ordering::Relaxed);
        self.admitted.close();
    }

    /// The peers refused so far (wrong or missing token, not loopback), one line each.
    pub fn refusals(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(line) = self.refused.try_recv() {
            out.push(line);
        }
        out
    }
}

impl Drop for GrpcServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A server's CA certificate (PEM) and the name its certificate must carry.
#[derive(Debug, Clone)]
pub struct TrustedServer {
    pub ca_pem: String,
    pub domain: String,
}

/// How a client connects.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `host:port` of the server.
    pub server: String,
    /// This party's name, shown in the server's messages (e.g. `client 3`).
    pub name: String,
    pub token: Option<String>,
    pub tls: Option<TrustedServer>,
    pub limits: LinkLimits,
    /// Connecting is retried with backoff (0.1 s doubling to 5 s) until this long has passed.
    pub connect_for: Duration,
}

/// Opens a link to the server, retrying while it cannot be reached (not when it refuses).
pub fn connect(options: &ClientOptions) -> Result<GrpcTransport, GrpcError> {
    let runtime = runtime()?;
    let (out, inbound) = runtime.block_on(open_link(options))?;
    Ok(GrpcTransport {
        peer: format!("the server at {}", options.server),
        out,
        inbound,
        wire: None,
        limits: options.limits.clone(),
        runtime,
    })
}

type Inbound = mpsc::Receiver<Result<Vec<u8>, Status>>;

async fn open_link(options: &ClientOptions) -> Result<(mpsc::Sender<Frame>, Inbound), GrpcError> {
    let addr = options.server.clone();
    let address = |cause: String| GrpcError::Address {
        addr: addr.clone(),
        cause,
    };
    // tonic speaks TLS only to https:// addresses.
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let step = Duration::from_secs(5).min(options.connect_for.max(Duration::from_millis(100)));
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| address(e.to_string()))?
        .connect_timeout(step)
        .timeout(step)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    if let Some(tls) = &options.tls {
        endpoint = endpoint
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(&tls.ca_pem))
                    .domain_name(tls.domain.clone())
                    .timeout(step),
            )
            .map_err(|e| GrpcError::Tls(error_chain(&e)))?;
    }
    let channel = connect_with_backoff(&endpoint, options.connect_for)
        .await
        .map_err(|cause| GrpcError::Connect {
            addr: addr.clone(),
            cause,
        })?;
    let mut client = SplitClient::new(channel, options.limits.max_message());
    let (out_tx, out_rx) = mpsc::channel::<Frame>(options.limits.depth);
    let mut request = Request::new(ReceiverStream::new(out_rx));
    let metadata = |what, value: String| {
        AsciiMetadataValue::try_from(value).map_err(|e| GrpcError::Metadata {
            what,
            cause: e.to_string(),
        })
    };
    request.metadata_mut().insert(
        PEER_KEY,
        metadata("the party's name", options.name.clone())?,
    );
    if let Some(token) = &options.token {
        request.metadata_mut().insert(
            "authorization",
            metadata("the token", format!("Bearer {token}"))?,
        );
    }
    let inbound = client
        .link(request)
        .await
        .map_err(|status| match status.code() {
            tonic::Code::Unauthenticated
            | tonic::Code::PermissionDenied
            | tonic::Code::FailedPrecondition => GrpcError::Refused {
                addr: addr.clone(),
                reason: status.message().to_string(),
            },
            _ => GrpcError::Connect {
                addr: addr.clone(),
                cause: status.message().to_string(),
            },
        })?
        .into_inner();
    let (in_tx, in_rx) = mpsc::channel(options.limits.depth);
    tokio::spawn(pump(inbound, in_tx));
    Ok((out_tx, in_rx))
}

/// Connects (TCP, TLS, HTTP/2), retrying with exponential backoff for at most `total`. TLS
/// failures (an unknown CA, a wrong name) are final.
async fn connect_with_backoff(endpoint: &Endpoint, total: Duration) -> Result<Channel, String> {
    let deadline = tokio::time::Instant::now() + total;
    let mut delay = Duration::from_millis(100);
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) => {
                let cause = error_chain(&e);
                let now = tokio::time::Instant::now();
                if !retryable(&e) || now + delay > deadline {
                    return Err(cause);
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Whether a connection error may go away by itself (nobody listening yet, a timeout), as
/// opposed to a TLS failure (rustls errors arrive as `InvalidData`).
fn retryable(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return io.kind() != std::io::ErrorKind::InvalidData;
        }
        source = e.source();
    }
    true
}

/// An error and its causes on one line (tonic's own message is just "transport error").
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let text = e.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = e.source();
    }
    line
}

#[cfg(test)]
mod tests;
