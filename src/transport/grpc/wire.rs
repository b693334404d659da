//! Bytes on the socket: the server wraps every accepted TCP connection so that what it reads
//! and writes — gRPC, HTTP/2 and TLS framing included — is counted per peer address.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Socket bytes of one connection, seen from the server.
#[derive(Debug, Default)]
pub struct WireCount {
    sent: AtomicU64,
    received: AtomicU64,
}

impl WireCount {
    /// (sent, received) so far.
    pub fn get(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }
}

/// The counts of every connection, by the peer's address.
#[derive(Debug, Clone, Default)]
pub struct WireCounts(Arc<Mutex<HashMap<SocketAddr, Arc<WireCount>>>>);

impl WireCounts {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<WireCount>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts counting a new connection.
    pub fn wrap(&self, stream: TcpStream) -> Counted {
        let count = Arc::new(WireCount::default());
        if let Ok(addr) = stream.peer_addr() {
            self.lock().insert(addr, Arc::clone(&count));
        }
        Counted { stream, count }
    }

    /// The count of the connection from `addr`, handed to its link (and forgotten here).
    pub fn take(&self, addr: SocketAddr) -> Option<Arc<WireCount>> {
        self.lock().remove(&addr)
    }
}

/// A TCP stream whose traffic is counted.
pub struct Counted {
    stream: TcpStream,
    count: Arc<WireCount>,
}

impl Connected for Counted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        self.count
            .received
            .fetch_add(read as u64, Ordering::Relaxed);
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &polled {
            self.count.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &polled {
            self.count.sent.fetch_add(*n as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
