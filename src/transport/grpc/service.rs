//! The gRPC service `splitaux.Split`, written by hand in the shape tonic-build generates (so the
//! build needs no `protoc`):
//!
//! ```proto
//! syntax = "proto3";
//! package splitaux;
//! message Frame { bytes payload = 1; }          // one frame of splitaux's wire format
//! service Split { rpc Link(stream Frame) returns (stream Frame); }
//! ```
//!
//! One `Link` call is one bidirectional link between two parties. The server side routes the
//! call to a [`LinkHandler`]; the client side opens it on a tonic channel.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::Stream;
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};
use tonic::{Request, Response, Status, Streaming};

/// `message Frame { bytes payload = 1; }`
#[derive(Clone, PartialEq, ::prost::Message)]
pub struct Frame {
    #[prost(bytes = "vec", tag = "1")]
    pub payload: Vec<u8>,
}

pub const SERVICE_NAME: &str = "splitaux.Split";
pub const LINK_PATH: &str = "/splitaux.Split/Link";

/// What the server streams back on one link.
pub type FrameStream = Pin<Box<dyn Stream<Item = Result<Frame, Status>> + Send + 'static>>;

/// What the server does with each `Link` call.
pub trait LinkHandler: Send + Sync + 'static {
    fn link(&self, request: Request<Streaming<Frame>>) -> BoxFuture<Response<FrameStream>, Status>;
}

/// The tower service tonic's server drives: `Link` goes to the handler, anything else is
/// answered `Unimplemented`.
pub struct SplitServer<H> {
    handler: Arc<H>,
    /// Largest encoded message accepted from, and sent to, a client.
    max_message: usize,
}

impl<H> Clone for SplitServer<H> {
    fn clone(&self) -> Self {
        Self {
            handler: Arc::clone(&self.handler),
            max_message: self.max_message,
        }
    }
}

impl<H: LinkHandler> SplitServer<H> {
    pub fn new(handler: H, max_message: usize) -> Self {
        Self {
            handler: Arc::new(handler),
            max_message,
        }
    }
}

/// Adapts the handler to tonic's streaming-method interface.
struct LinkMethod<H>(Arc<H>);

impl<H: LinkHandler> tonic::server::StreamingService<Frame> for LinkMethod<H> {
    type Response = Frame;
    type ResponseStream = FrameStream;
    type Future = BoxFuture<Response<FrameStream>, Status>;

    fn call(&mut self, request: Request<Streaming<Frame>>) -> Self::Future {
        self.0.link(request)
    }
}

impl<H: LinkHandler> Service<http::Request<tonic::body::Body>> for SplitServer<H> {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != LINK_PATH {
            let response =
                Status::unimplemented(format!("no method {}", request.uri().path())).into_http();
            return Box::pin(async move { Ok(response) });
        }
        let method = LinkMethod(Arc::clone(&self.handler));
        let max = self.max_message;
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<Frame, Frame>::default();
            let mut grpc = tonic::server::Grpc::new(codec)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max);
            Ok(grpc.streaming(method, request).await)
        })
    }
}

impl<H> tonic::server::NamedService for SplitServer<H> {
    const NAME: &'static str = SERVICE_NAME;
}

/// The client side of the service on one channel.
#[derive(Debug, Clone)]
pub struct SplitClient {
    inner: tonic::client::Grpc<tonic::transport::Channel>,
}

impl SplitClient {
    /// A client whose messages, both ways, may be up to `max_message` bytes encoded.
    pub fn new(channel: tonic::transport::Channel, max_message: usize) -> Self {
        Self {
            inner: tonic::client::Grpc::new(channel)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        }
    }

    /// Opens a link; resolves once the server has accepted it (or refused it).
    pub async fn link(
        &mut self,
        request: impl tonic::IntoStreamingRequest<Message = Frame>,
    ) -> Result<Response<Streaming<Frame>>, Status> {
        self.inner
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("the channel is not ready: {e}")))?;
        let codec = tonic_prost::ProstCodec::<Frame, Frame>::default();
        let path = http::uri::PathAndQuery::from_static(LINK_PATH);
        let mut request = request.into_streaming_request();
        request
            .extensions_mut()
            .insert(tonic::GrpcMethod::new(SERVICE_NAME, "Link"));
        self.inner.streaming(request, path, codec).await
    }
}
