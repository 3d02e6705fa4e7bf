//! Connect and listen, with real sockets or turmoil's simulated ones.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Which network a service uses. Chosen once, when the [`crate::Runtime`] is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Net {
    /// The operating system's TCP, through `tokio::net`.
    Tokio,
    /// turmoil's simulated TCP between simulated hosts.
    #[cfg(feature = "sim")]
    Turmoil,
}

impl Net {
    /// Opens a TCP connection to `addr` (`host:port`; host names are resolved by the
    /// network in use).
    pub async fn connect(&self, addr: &str) -> io::Result<Connection> {
        match self {
            Net::Tokio => {
                let stream = tokio::net::TcpStream::connect(addr).await?;
                // The relay path is latency-sensitive and writes whole messages.
                stream.set_nodelay(true)?;
                let local = stream.local_addr().ok();
                let peer = stream.peer_addr().ok();
                Ok(Connection::with_addrs(stream, local, peer))
            }
            #[cfg(feature = "sim")]
            Net::Turmoil => {
                let stream = turmoil::net::TcpStream::connect(addr).await?;
                let local = stream.local_addr().ok();
                let peer = stream.peer_addr().ok();
                Ok(Connection::with_addrs(stream, local, peer))
            }
        }
    }

    /// Listens for TCP connections on `addr` (`ip:port`; port 0 picks a free port).
    pub async fn listen(&self, addr: &str) -> io::Result<Listener> {
        let inner = match self {
            Net::Tokio => ListenerInner::Tokio(tokio::net::TcpListener::bind(addr).await?),
            #[cfg(feature = "sim")]
            Net::Turmoil => ListenerInner::Turmoil(turmoil::net::TcpListener::bind(addr).await?),
        };
        Ok(Listener { inner })
    }
}

/// A bound listening socket.
pub struct Listener {
    inner: ListenerInner,
}

enum ListenerInner {
    Tokio(tokio::net::TcpListener),
    #[cfg(feature = "sim")]
    Turmoil(turmoil::net::TcpListener),
}

impl Listener {
    /// Waits for the next connection.
    pub async fn accept(&self) -> io::Result<Connection> {
        match &self.inner {
            ListenerInner::Tokio(listener) => {
                let (stream, peer) = listener.accept().await?;
                stream.set_nodelay(true)?;
                let local = stream.local_addr().ok();
                Ok(Connection::with_addrs(stream, local, Some(peer)))
            }
            #[cfg(feature = "sim")]
            ListenerInner::Turmoil(listener) => {
                let (stream, peer) = listener.accept().await?;
                let local = stream.local_addr().ok();
                Ok(Connection::with_addrs(stream, local, Some(peer)))
            }
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.inner {
            ListenerInner::Tokio(listener) => listener.local_addr(),
            #[cfg(feature = "sim")]
            ListenerInner::Turmoil(listener) => listener.local_addr(),
        }
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("local_addr", &self.local_addr().ok())
            .finish()
    }
}

/// Any bidirectional byte stream a connection can be carried on: a TCP socket, a TLS
/// session over one, or a channel of a tunnel.
pub trait ByteStream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> ByteStream for T {}

/// A boxed byte stream with the addresses of its two ends, where known.
pub struct Connection {
    stream: Box<dyn ByteStream>,
    local_addr: Option<SocketAddr>,
    peer_addr: Option<SocketAddr>,
}

impl Connection {
    /// Wraps any byte stream, for instance a tunnel channel, which has no socket address.
    pub fn new(stream: impl ByteStream) -> Self {
        Self::with_addrs(stream, None, None)
    }

    pub fn with_addrs(
        stream: impl ByteStream,
        local_addr: Option<SocketAddr>,
        peer_addr: Option<SocketAddr>,
    ) -> Self {
        Self {
            stream: Box::new(stream),
            local_addr,
            peer_addr,
        }
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.peer_addr
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("local_addr", &self.local_addr)
            .field("peer_addr", &self.peer_addr)
            .finish()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
